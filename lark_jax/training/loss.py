"""The weighted SFT loss, computed without ever holding [B, T, V] float32 logits.

    loss = Σ_t w_t · CE_t / Σ_t w_t,   CE_t = logsumexp(z_t) − z_t[y_t]

w_t is the record's train_weight on its assistant tokens and 0 elsewhere.
The head matmul, logsumexp and target gather run per sequence chunk under
``lax.scan`` with ``jax.checkpoint``, so the backward pass recomputes one
chunk's logits at a time; accumulation is float32 whatever the model dtype, and
the log-sum-exp sums in two levels (``lark_jax.numerics``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lark_jax.numerics import logsumexp
from lark_jax.shapes import pow2_divisor


def weighted_ce_sums(model, ids, positions, segments, targets, weights, chunk_tokens=1024,
                     lora=None):
    """Returns (Σ w·CE, Σ w) as float32 scalars for one packed batch (``lora``: see
    ``Decoder.hidden_states``)."""
    hidden = model.hidden_states(ids, positions, segments, lora=lora)
    b, length, _ = hidden.shape
    c = pow2_divisor(length, chunk_tokens // b)
    n = length // c
    w_head = model.head_weight()

    def chunks(x):
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def body(acc, xs):
        h, y, w = xs
        z = jnp.einsum("bcd,vd->bcv", h, w_head, preferred_element_type=jnp.float32)
        ce = logsumexp(z) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]
        return acc + jnp.stack([(w * ce).sum(), w.sum()]), None

    acc, _ = lax.scan(jax.checkpoint(body), jnp.zeros(2, jnp.float32),
                      (chunks(hidden), chunks(targets), chunks(weights.astype(jnp.float32))))
    return acc[0], acc[1]
