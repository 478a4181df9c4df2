"""One Flax NNX decoder for the Llama, Qwen2/Qwen2.5 and Qwen3 families.

Each block (pre-norm residual, HF conventions; ``Decoder._block``):

    q, k, v = RoPE(n_q(W_q·RMS(x))), RoPE(n_k(W_k·RMS(x))), W_v·RMS(x)     (_qkv)
    h       = x + W_o · Attn(q, k, v)
    out     = h + W_down · (silu(W_gate·RMS(h)) ⊙ W_up·RMS(h))               (_mlp)

with RMS(x) = w ⊙ x / sqrt(mean(x²) + ε) computed in float32, optional q/k/v
biases (Qwen2), optional per-head RMSNorm n_q, n_k (Qwen3), and logits
z = W_head · RMS(x_L) (W_head = W_embed when tied). Every projection y = x·Wᵀ (+ b)
may carry a LoRA side path + s·(x·Aᵀ)·Bᵀ (``BlockWeights.proj``). When decoding,
the block first writes its new keys and values into the KV cache
(``KVCache.write``) and attends over that layer's cache.

Layer weights are stacked on a leading layer axis (``StackedLayerWeights``, the
``Decoder.layers`` attribute) and the blocks run under ``lax.scan``
(``Decoder._run_stack``): one compiled block body, whatever the depth (fast
compiles on 28-layer students), and ``jax.checkpoint`` per block when ``remat``
is on. Weight matrices keep the Hugging Face [out, in] layout so loading and
saving never transpose.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lark_jax.models.attention import AttentionMask, attention, choose_impl
from lark_jax.models.config import ModelConfig, rope_inv_freq
from lark_jax.models.params import ParamSpec, param_specs
from lark_jax.shapes import pow2_divisor


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions, dtype):
    """cos/sin tables [B, T, head_dim] for integer positions (float32, then cast like HF)."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, H, D]; rotate-half convention of HF Llama/Qwen."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


class KVCache(NamedTuple):
    """Stacked per-layer cache: k, v [L, B, Hkv, S, D]; valid [B, S] marks usable slots.

    Head-major: a decoding step's attention reads each row's keys and values per head
    as they lie, with no transpose of the cache slice."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, length), bool))

    def write(self, layer, k, v, index) -> KVCache:
        """This cache with layer ``layer``'s new keys and values k, v [B, T, Hkv, D] stored
        at slots ``index .. index+T-1``.

        ``index`` is an int scalar (the same slots in every row: one dynamic_update_slice)
        or int [B], a start slot per row (rows at different lengths), where slots past S
        are dropped. ``valid`` is the caller's to update."""
        kt = jnp.swapaxes(k, 1, 2).astype(self.k.dtype)  # [B, Hkv, T, D]: the cache's layout
        vt = jnp.swapaxes(v, 1, 2).astype(self.v.dtype)
        if jnp.ndim(index):
            b, kv_heads, t, _ = kt.shape
            rows = jnp.arange(b)[:, None, None]
            heads = jnp.arange(kv_heads)[None, :, None]
            cols = (index[:, None] + jnp.arange(t)[None])[:, None, :]
            at = (layer, rows, heads, cols)
            return self._replace(k=self.k.at[at].set(kt, mode="drop"),
                                 v=self.v.at[at].set(vt, mode="drop"))
        at = (layer, 0, 0, index, 0)
        return self._replace(k=lax.dynamic_update_slice(self.k, kt[None], at),
                             v=lax.dynamic_update_slice(self.v, vt[None], at))

    def put_rows(self, slots, rows: KVCache) -> KVCache:
        """This cache with ``rows`` (a cache of n rows, every layer) in its rows ``slots``
        [n]; slots past B are dropped (padding)."""
        return KVCache(self.k.at[:, slots].set(rows.k, mode="drop"),
                       self.v.at[:, slots].set(rows.v, mode="drop"),
                       self.valid.at[slots].set(rows.valid, mode="drop"))


class StackedLayerWeights(nnx.Module):
    """Every block's weights, one ``nnx.Param`` [num_layers, ...] per stacked table entry
    (``params.param_specs``); the math is ``Decoder._block``."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        for spec in param_specs(cfg):
            if spec.stacked:
                setattr(self, spec.attr, nnx.Param(
                    _init(spec, (cfg.num_layers, *spec.shape), dtype, rngs)))


def _init(spec: ParamSpec, shape, dtype, rngs: nnx.Rngs):
    if spec.init == "ones":
        return jnp.ones(shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class BlockWeights(NamedTuple):
    """One block's share of a scan step: ``w`` {table attr: this layer's weight},
    ``lora`` {projection: {"a": [r, in], "b": [out, r]}} (empty without LoRA) and the
    LoRA ``scale``."""

    w: dict
    lora: dict
    scale: float

    def proj(self, h, name: str):
        """h [B, T, in] -> [B, T, out]: h·Wᵀ + scale·(h·Aᵀ)·Bᵀ (with factors) + b (with
        a bias), for W = w[name] and b = w[name with "_proj" -> "_bias"]."""
        y = jnp.einsum("btd,fd->btf", h, self.w[name])
        if name in self.lora:  # two skinny matmuls through rank r: W + scale·B·A never formed
            f = self.lora[name]
            y = y + self.scale * jnp.einsum(
                "btr,fr->btf", jnp.einsum("btd,rd->btr", h, f["a"]), f["b"])
        bias = name.replace("_proj", "_bias")
        return y + self.w[bias] if bias in self.w else y


ATTN_IMPLS = ("auto", "dense", "blockwise", "flash")


class Decoder(nnx.Module):
    """Causal LM. ``model(ids) -> logits``; ``hidden_states`` + ``logits`` for chunked heads.

    Args:
      cfg: the family-agnostic configuration.
      dtype: parameter and activation dtype (float32 or bfloat16); norms, softmax
        and attention scores are always computed in float32.
      remat: recompute each layer in the backward pass (training memory).
      attn_impl: "auto" | "dense" | "blockwise" | "flash" (see ``models.attention``);
        "flash" applies to uncached calls, decoding with a KV cache uses "auto".
      mesh: the mesh the parameters live on; "flash" runs its kernel per device on it.

    ``attn_kernel`` and ``attn_kernel_cached`` are what ``attn_impl`` resolves to on the
    mesh's platform (``attention.choose_impl``) for uncached and cached calls, fixed here.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, remat: bool = False,
                 attn_impl: str = "auto", mesh=None, rngs: nnx.Rngs | None = None):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attn_impl = attn_impl
        self.mesh = mesh
        # The kernel depends only on attn_impl and the platform the model runs on, so it
        # is settled here, once, for uncached rows (scoring, training) and for decoding.
        platform = (next(iter(mesh.devices.flat)) if mesh is not None
                    else jax.devices()[0]).platform
        self.attn_kernel = choose_impl(attn_impl, cached=False, platform=platform)
        self.attn_kernel_cached = choose_impl(attn_impl, cached=True, platform=platform)
        for spec in param_specs(cfg):
            if not spec.stacked:
                setattr(self, spec.attr, nnx.Param(_init(spec, spec.shape, dtype, rngs)))
        # "layers": the state path of every stacked weight in checkpoints and in code that
        # reads nnx.state(model)["layers"]; renaming it would break both.
        self.layers = StackedLayerWeights(cfg, dtype, rngs)

    # -- forward -----------------------------------------------------------------

    def head_weight(self) -> jax.Array:
        """The [V, D] output projection (the embedding when tied)."""
        return (self.embed if self.cfg.tie_word_embeddings else self.lm_head)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Map final hidden states [..., D] to logits [..., V] (in the model dtype)."""
        return jnp.einsum("...d,vd->...v", hidden, self.head_weight())

    def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
        """Logits [B, T, V] of int ids [B, T] (see :meth:`hidden_states`)."""
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, *,
                      lora: tuple[dict, float] | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D] of a batch of (packed) rows.

        Args:
          input_ids: int [B, T].
          positions: int [B, T] RoPE positions; default 0..T-1 (per row).
          segment_ids: int [B, T]; tokens attend only within their segment (packing).
          lora: ({projection: {"a": [L, r, in], "b": [L, out, r]}}, scale): low-rank
            side paths, y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ, so W + scale·B·A is never formed.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.zeros((b, t), jnp.int32)
        x, _ = self._run_stack(input_ids, positions, AttentionMask.packed(segment_ids),
                               lora=lora)
        return x

    def decode(self, input_ids, positions, cache: KVCache, cache_index
               ) -> tuple[jax.Array, KVCache]:
        """Hidden states [B, T, D] of T new tokens per row, and the cache holding them.

        The T new keys/values are written at slots ``cache_index .. cache_index+T-1``
        and each query attends to every valid slot at or before its own.

        Args:
          input_ids, positions: int [B, T].
          cache: a KVCache ([L, B, Hkv, S, D] keys and values, [B, S] valid slots).
          cache_index: int scalar, the slot of input_ids[:, 0]; or int [B], a slot per
            row (rows at different lengths: continuous batching).
        """
        b, t = input_ids.shape
        cache_index = jnp.asarray(cache_index, jnp.int32)
        mask = AttentionMask.cached(cache_index, t, cache.valid)
        return self._run_stack(input_ids, positions, mask, cache, cache_index)

    def _run_stack(self, input_ids, positions, mask: AttentionMask,
                   cache: KVCache | None = None, cache_index=None,
                   lora: tuple[dict, float] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Embed, run the blocks (one scan over the stacked weights, and the LoRA factors
        beside them), final norm. Returns (hidden [B, T, D], the cache or None)."""
        x = jnp.take(self.embed[...], input_ids, axis=0)  # [B, T, D]
        cos, sin = rope_cos_sin(self.cfg, positions, self.dtype)
        weights = nnx.to_pure_dict(nnx.state(self.layers))  # {attr: [L, ...]}
        factors, scale = lora if lora is not None else ({}, 0.0)
        if cache is None:
            def body(x, xs):
                x, _ = self._block(x, BlockWeights(*xs, scale), cos, sin, mask)
                return x, None

            if self.remat:
                body = jax.checkpoint(body)
            x, _ = lax.scan(body, x, (weights, factors))
        else:
            # Decoding: the whole [L, B, Hkv, S, D] cache rides in the scan's carry and each
            # block writes only its new keys and values into it, in place. Scanned over as
            # xs/ys instead, every step wrote out a whole new cache: 1.78x slower decoding
            # of 256 slots on CPU (BENCHMARKS.md, generation, "many slots, small model").
            def cached_body(carry, xs):
                x, cache = carry
                w, f, layer = xs
                return self._block(x, BlockWeights(w, f, scale), cos, sin, mask, cache, layer,
                                   cache_index), None

            layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
            (x, cache), _ = lax.scan(cached_body, (x, cache), (weights, factors, layer_ids))
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps), cache

    def _block(self, x, w: BlockWeights, cos, sin, mask: AttentionMask,
               cache: KVCache | None = None, layer=None, cache_index=None):
        """One decoder block on x [B, T, D] (the module docstring's equations).

        With ``cache`` (the stacked KVCache), ``layer`` (this block's index) and
        ``cache_index`` (see :meth:`decode`), the new keys and values are written into the
        cache first and the queries attend over this layer's whole cache.
        Returns (x, the updated cache or None)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = _qkv(cfg, rms_norm(x, w.w["input_norm"], cfg.rms_norm_eps), w, cos, sin)
        if cache is None:
            o = attention(q, k, v, *mask, impl=self.attn_kernel, mesh=self.mesh)
        else:
            cache = cache.write(layer, k, v, cache_index)
            o = attention(q, cache.k[layer], cache.v[layer], *mask,  # [B, Hkv, S, D] each
                          impl=self.attn_kernel_cached, mesh=self.mesh, kv_heads_first=True)
        x = x + w.proj(o.reshape(b, t, cfg.q_dim), "o_proj")  # o: [B, T, H, D]
        return x + _mlp(rms_norm(x, w.w["post_norm"], cfg.rms_norm_eps), w), cache


def _qkv(cfg: ModelConfig, h, w: BlockWeights, cos, sin):
    """Queries [B, T, H, D], keys and values [B, T, Hkv, D] of the normed input h [B, T, D]:
    projected, per-head RMS-normed (Qwen3), queries and keys rotated."""
    b, t, _ = h.shape
    q = w.proj(h, "q_proj").reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = w.proj(h, "k_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = w.proj(h, "v_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, w.w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w.w["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _mlp(h, w: BlockWeights):
    """W_down · (silu(W_gate·h) ⊙ W_up·h) for h [B, T, D], long rows in sequence chunks."""
    def mlp(h):
        a = jax.nn.silu(w.proj(h, "gate_proj")) * w.proj(h, "up_proj")
        return w.proj(a, "down_proj")

    b, t, _ = h.shape
    c = _mlp_chunk(b, t)
    if c == t:
        return mlp(h)
    # Long rows: run the MLP over sequence chunks so its [B, T, F] intermediates (the
    # largest activations) exist for one chunk at a time. Checkpointed, or the backward
    # pass would keep every chunk's intermediates (3 x T x F floats) anyway.
    hc = jnp.moveaxis(h.reshape(b, t // c, c, -1), 1, 0)
    return jnp.moveaxis(lax.map(jax.checkpoint(mlp), hc), 0, 1).reshape(h.shape)


MLP_CHUNK_TOKENS = 4096


def _mlp_chunk(b: int, t: int) -> int:
    """Largest power-of-two chunk dividing t with b * chunk <= MLP_CHUNK_TOKENS (t if small)."""
    return t if b * t <= MLP_CHUNK_TOKENS else pow2_divisor(t, MLP_CHUNK_TOKENS // b)
