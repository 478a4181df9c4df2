"""One Flax NNX decoder for the Llama, Qwen2/Qwen2.5 and Qwen3 families.

Per layer l (pre-norm residual blocks, HF conventions):

    h   = x + W_o · Attn(RoPE(n_q(W_q·RMS(x))), RoPE(n_k(W_k·RMS(x))), W_v·RMS(x))
    out = h + W_down · (silu(W_gate·RMS(h)) ⊙ W_up·RMS(h))

with RMS(x) = w ⊙ x / sqrt(mean(x²) + ε) computed in float32, optional q/k/v
biases (Qwen2), optional per-head RMSNorm n_q, n_k (Qwen3), and logits
z = W_head · RMS(x_L) (W_head = W_embed when tied).

Layer weights are stacked on a leading layer axis and the layers run under
``lax.scan``: one compiled layer body, whatever the depth (fast compiles on
28-layer students), and ``jax.checkpoint`` per layer when ``remat`` is on.
Weight matrices keep the Hugging Face [out, in] layout so loading and saving
never transpose.
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


class Layers(nnx.Module):
    """Holds the stacked [num_layers, ...] weights; the math lives in Decoder._layer."""

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
        for spec in param_specs(cfg):
            if not spec.stacked:
                setattr(self, spec.attr, nnx.Param(_init(spec, spec.shape, dtype, rngs)))
        self.layers = Layers(cfg, dtype, rngs)

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
        x, _ = self._layers(input_ids, positions, AttentionMask.packed(segment_ids), lora=lora)
        return x

    def decode(self, input_ids, positions, cache: KVCache, cache_index
               ) -> tuple[jax.Array, KVCache]:
        """Hidden states [B, T, D] of T new tokens per row, and the cache holding them.

        The T new keys/values are written at slots ``cache_index .. cache_index+T-1``
        and each query attends to every valid slot at or before its own.

        Args:
          input_ids, positions: int [B, T].
          cache: a KVCache ([L, B, S, Hkv, Dh] keys and values, [B, S] valid slots).
          cache_index: int scalar, the slot of input_ids[:, 0]; or int [B], a slot per
            row (rows at different lengths: continuous batching).
        """
        b, t = input_ids.shape
        cache_index = jnp.asarray(cache_index, jnp.int32)
        mask = AttentionMask.cached(cache_index, t, cache.valid)
        return self._layers(input_ids, positions, mask, cache, cache_index)

    def _layers(self, input_ids, positions, mask: AttentionMask, cache: KVCache | None = None,
                cache_index=None, lora: tuple[dict, float] | None = None
                ) -> tuple[jax.Array, KVCache | None]:
        """Embed, run the layer stack (one scan over the stacked weights), final norm."""
        x = jnp.take(self.embed[...], input_ids, axis=0)  # [B, T, D]
        cos, sin = rope_cos_sin(self.cfg, positions, self.dtype)
        layer_params = nnx.to_pure_dict(nnx.state(self.layers))
        scale = 0.0
        if lora is not None:  # scanned over L beside the weights: "q_proj@a" [L, r, in], ...
            factors, scale = lora
            for name, f in factors.items():
                layer_params[name + "@a"], layer_params[name + "@b"] = f["a"], f["b"]
        if cache is None:
            def body(x, p):
                return self._layer(x, p, cos, sin, mask, None, None, scale)

            if self.remat:
                body = jax.checkpoint(body)
            x, _ = lax.scan(body, x, layer_params)
            return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps), None

        # Decoding: the whole [L, B, Hkv, S, D] cache rides in the scan's carry and each
        # layer writes only its new keys and values into it, in place. Scanned over as
        # xs/ys instead, every step wrote out a whole new cache: 1.78x slower decoding of
        # 256 slots on CPU (BENCHMARKS.md, generation, "many slots, small model").
        def cached_body(carry, xs):
            x, ck, cv = carry
            p, layer = xs
            x, (ck, cv) = self._layer(x, p, cos, sin, mask, (ck, cv, layer), cache_index,
                                      scale)
            return (x, ck, cv), None

        layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (x, ck, cv), _ = lax.scan(cached_body, (x, cache.k, cache.v), (layer_params, layer_ids))
        hidden = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        return hidden, KVCache(ck, cv, cache.valid)

    def _layer(self, x, p, cos, sin, mask: AttentionMask, cache_kv, cache_index,
               lora_scale: float = 0.0):
        """One decoder layer on x [B, T, D] with this layer's weights p. With ``cache_kv``
        (the stacked [L, B, Hkv, S, Dh] keys and values, and this layer's index) the new
        keys/values are written into it first; returns (x, the updated stacked cache)."""
        cfg = self.cfg
        b, t, _ = x.shape

        def proj(h, w, bias):  # h [B, T, in] -> [B, T, out]
            y = jnp.einsum("btd,fd->btf", h, p[w])
            if w + "@a" in p:  # LoRA side path: two skinny matmuls through rank r
                y = y + lora_scale * jnp.einsum(
                    "btr,fr->btf", jnp.einsum("btd,rd->btr", h, p[w + "@a"]), p[w + "@b"])
            return y + p[bias] if bias in p else y

        h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
        q = proj(h, "q_proj", "q_bias").reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = proj(h, "k_proj", "k_bias").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = proj(h, "v_proj", "v_bias").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if cache_kv is not None:  # the whole stacked cache and this layer's index
            ck, cv, layer = cache_kv
            kt = jnp.swapaxes(k, 1, 2).astype(ck.dtype)  # [B, Hkv, T, D]: the cache's layout
            vt = jnp.swapaxes(v, 1, 2).astype(cv.dtype)
            if jnp.ndim(cache_index):
                rows = jnp.arange(b)[:, None, None]
                heads = jnp.arange(cfg.num_kv_heads)[None, :, None]
                cols = (cache_index[:, None] + jnp.arange(t)[None])[:, None, :]
                ck = ck.at[layer, rows, heads, cols].set(kt, mode="drop")
                cv = cv.at[layer, rows, heads, cols].set(vt, mode="drop")
            else:
                at = (layer, 0, 0, cache_index, 0)
                ck = lax.dynamic_update_slice(ck, kt[None], at)
                cv = lax.dynamic_update_slice(cv, vt[None], at)
            k, v = ck[layer], cv[layer]  # [B, Hkv, S, D]
            new_kv = (ck, cv)
        platform = (next(iter(self.mesh.devices.flat)) if self.mesh is not None
                    else jax.devices()[0]).platform
        impl = choose_impl(self.attn_impl, cached=cache_kv is not None, platform=platform)
        o = attention(q, k, v, *mask, impl=impl, mesh=self.mesh,
                      kv_heads_first=cache_kv is not None)  # [B, T, H, Dh]
        x = x + proj(o.reshape(b, t, cfg.q_dim), "o_proj", "o_bias")
        h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)

        def mlp(h):
            a = jax.nn.silu(proj(h, "gate_proj", "gate_bias")) * proj(h, "up_proj", "up_bias")
            return proj(a, "down_proj", "down_bias")

        c = _mlp_chunk(b, t)
        if c == t:
            x = x + mlp(h)
        else:
            # Long rows: run the MLP over sequence chunks so its [B, T, F] intermediates
            # (the largest activations) exist for one chunk at a time. Checkpointed, or the
            # backward pass would keep every chunk's intermediates (3 x T x F floats) anyway.
            hc = jnp.moveaxis(h.reshape(b, t // c, c, -1), 1, 0)
            x = x + jnp.moveaxis(lax.map(jax.checkpoint(mlp), hc), 0, 1).reshape(x.shape)
        return x, new_kv


MLP_CHUNK_TOKENS = 4096


def _mlp_chunk(b: int, t: int) -> int:
    """Largest power-of-two chunk dividing t with b * chunk <= MLP_CHUNK_TOKENS (t if small)."""
    return t if b * t <= MLP_CHUNK_TOKENS else pow2_divisor(t, MLP_CHUNK_TOKENS // b)
