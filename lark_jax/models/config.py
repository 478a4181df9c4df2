"""A family-agnostic decoder configuration built from a Hugging Face ``config.json``.

One frozen dataclass covers Llama, Qwen2/Qwen2.5 and Qwen3: the families differ
only in flags (q/k/v biases, per-head q/k RMSNorm, explicit head_dim, rope
scaling, tied embeddings).

The bottom of the models package: it imports nothing from it. What the config
implies about weights (the parameter table, its count) is ``models.params``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lark_jax.errors import LarkError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("default"|"linear"|"llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # -- Hugging Face conversion -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise LarkError(
                f"unsupported model_type {model_type!r}; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES),
                where=where,
            )

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise LarkError(f"missing required field {key!r}", where=where)
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(need("num_hidden_layers"))
        for key, value in (("num_hidden_layers", layers), ("hidden_size", hidden),
                           ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if value < 1:
                raise LarkError(f"{key} must be >= 1, got {value}", where=where)
        if head_dim < 2 or head_dim % 2:
            raise LarkError(f"head_dim {head_dim} must be even (rotary embeddings pair its "
                            "dimensions)", where=where)
        if heads % kv_heads:
            raise LarkError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}",
                where=where,
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise LarkError(f"unsupported hidden_act {act!r} (only silu)", where=where)
        if cfg.get("use_sliding_window"):
            raise LarkError("sliding-window attention is not supported", where=where)

        # transformers v5 writes rope_parameters; v4 wrote rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise LarkError(
                f"unsupported rope type {rope_type!r}; supported: "
                + ", ".join(SUPPORTED_ROPE_TYPES),
                where=where,
            )

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            # Qwen2 hard-codes biases on q/k/v; Llama and Qwen3 take them from attention_bias.
            qkv_bias=True if qwen2 else bool(cfg.get("attention_bias", False)),
            o_bias=False if qwen2 else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise LarkError("config.json not found", where=str(path.parent))
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LarkError(f"not valid JSON ({e})", where=str(path)) from None
        if not isinstance(cfg, dict):
            raise LarkError("expected a JSON object", where=str(path))
        return cls.from_hf_dict(cfg, where=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers expects for this family."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position,
            )
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        eos: Any = list(self.eos_token_ids)
        if len(eos) == 1:
            eos = eos[0]
        elif not eos:
            eos = None
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        return d


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies θ^(-2i/D), with the linear or Llama-3 rescaling applied.

    Llama-3: with wavelength λ_i = 2π/f_i, L = original context, α/β = low/high
    frequency factors and s = factor: λ > L/α → f/s; λ < L/β → f; between,
    f·((1-γ)/s + γ) with γ = (L/λ - α)/(β - α).
    """
    import numpy as np

    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        s, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / s, inv)
        gamma = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - gamma) * scaled / s + gamma * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
