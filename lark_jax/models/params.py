"""The one parameter table: every weight's name, HF tensor, shape, logical axes, init.

Initialisation, loading, saving, the parameter count and every sharding
(model-parallel scoring and generation, FSDP training, LoRA factors) are derived
from :func:`param_specs`. Logical axes name what a dimension *is* ("vocab",
"embed", "heads", "kv_heads", "mlp", "head_dim"; stacked weights get "layers"
in front); ``lark_jax.parallel.SHARDING_RULES`` says which mesh axis each may be
split over, so a new parallelism mode is one row there, not a new table here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from lark_jax.models.config import ModelConfig


class ParamSpec(NamedTuple):
    attr: str  # attribute on Decoder (top level) or Decoder.layers (stacked)
    hf_name: str  # tensor name in HF safetensors; "{i}" = layer index
    shape: tuple[int, ...]  # per-layer shape for stacked params
    axes: tuple[str, ...]  # logical axis of each dimension of ``shape``
    init: str  # "normal" | "ones" | "zeros"
    stacked: bool

    def full_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The array's shape: [L, *shape] for stacked weights."""
        return (cfg.num_layers, *self.shape) if self.stacked else self.shape

    def full_axes(self) -> tuple[str, ...]:
        return ("layers", *self.axes) if self.stacked else self.axes


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The single table that drives initialisation, loading, saving and sharding."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.q_dim, cfg.kv_dim
    a = "model.layers.{i}.self_attn."
    m = "model.layers.{i}.mlp."
    n = "model.layers.{i}."
    specs = [
        ParamSpec("embed", "model.embed_tokens.weight", (v, d), ("vocab", "embed"), "normal",
                  False),
        ParamSpec("final_norm", "model.norm.weight", (d,), ("embed",), "ones", False),
        ParamSpec("input_norm", n + "input_layernorm.weight", (d,), ("embed",), "ones", True),
        ParamSpec("q_proj", a + "q_proj.weight", (q, d), ("heads", "embed"), "normal", True),
        ParamSpec("k_proj", a + "k_proj.weight", (kv, d), ("kv_heads", "embed"), "normal", True),
        ParamSpec("v_proj", a + "v_proj.weight", (kv, d), ("kv_heads", "embed"), "normal", True),
        ParamSpec("o_proj", a + "o_proj.weight", (d, q), ("embed", "heads"), "normal", True),
        ParamSpec("post_norm", n + "post_attention_layernorm.weight", (d,), ("embed",), "ones",
                  True),
        ParamSpec("gate_proj", m + "gate_proj.weight", (f, d), ("mlp", "embed"), "normal", True),
        ParamSpec("up_proj", m + "up_proj.weight", (f, d), ("mlp", "embed"), "normal", True),
        ParamSpec("down_proj", m + "down_proj.weight", (d, f), ("embed", "mlp"), "normal", True),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec("lm_head", "lm_head.weight", (v, d), ("vocab", "embed"),
                               "normal", False))
    if cfg.qkv_bias:
        specs += [ParamSpec("q_bias", a + "q_proj.bias", (q,), ("heads",), "zeros", True),
                  ParamSpec("k_bias", a + "k_proj.bias", (kv,), ("kv_heads",), "zeros", True),
                  ParamSpec("v_bias", a + "v_proj.bias", (kv,), ("kv_heads",), "zeros", True)]
    if cfg.o_bias:
        specs.append(ParamSpec("o_bias", a + "o_proj.bias", (d,), ("embed",), "zeros", True))
    if cfg.mlp_bias:
        specs += [ParamSpec("gate_bias", m + "gate_proj.bias", (f,), ("mlp",), "zeros", True),
                  ParamSpec("up_bias", m + "up_proj.bias", (f,), ("mlp",), "zeros", True),
                  ParamSpec("down_bias", m + "down_proj.bias", (d,), ("embed",), "zeros", True)]
    if cfg.qk_norm:
        specs += [ParamSpec("q_norm", a + "q_norm.weight", (cfg.head_dim,), ("head_dim",),
                            "ones", True),
                  ParamSpec("k_norm", a + "k_norm.weight", (cfg.head_dim,), ("head_dim",),
                            "ones", True)]
    return specs


def count_params(cfg: ModelConfig) -> int:
    """Σ over the table of each weight's size (a tied head is one weight, counted once).

    The one parameter counter: a model's count is ``count_params(model.cfg)``."""
    return sum(math.prod(s.full_shape(cfg)) for s in param_specs(cfg))


def spec_by_attr(cfg: ModelConfig) -> dict[str, ParamSpec]:
    return {s.attr: s for s in param_specs(cfg)}


def param_shardings(state, cfg: ModelConfig, mesh, mode: str):
    """A tree of ``NamedSharding`` matching a decoder's parameter ``state`` (nnx.split),
    each from its table entry's logical axes under ``parallel.SHARDING_RULES[mode]``."""
    import jax

    from lark_jax.parallel import logical_sharding

    specs = spec_by_attr(cfg)

    def one(path, x):
        attr = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        return logical_sharding(mesh, specs[attr].full_axes(), x.shape, mode)

    return jax.tree_util.tree_map_with_path(one, state)
