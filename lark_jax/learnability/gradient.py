"""The exact first-order learnability rate (the quantity the Brier/L proxy stands for).

Under gradient flow on the parameters, dL_k/dt = -‖∇_θ L_k‖², so the
trajectory's exponential loss-decay rate is

    ρ_k^grad = ‖∇_θ L_k‖² / L_k,   L_k = Σ_t w_t CE_t / Σ_t w_t   (mean assistant-token CE).

That is the rate of the *mean* loss (``rate_mean`` in the scores; the SFT objectives
``record`` and ``reference`` train on mean losses). The rate of the *summed* loss
S_k = T_k·L_k, ‖∇_θ S_k‖²/S_k = T_k·ρ_k^grad (``rate_sum``; the ``token`` objective), is
what the proxy Brier/L stands for: under an identity kernel in logit space
‖∇_z S‖² = T·Brier, so Brier/L ≈ ‖∇_θ S‖²/S (docs/method.md, step 1).

``grad_sq_norms`` computes ‖∇_θ L_k‖² over all parameters for each row of a
batch holding one trajectory per row, one row at a time (``lax.map``), so only
one gradient exists at once. It costs about three forward passes per
trajectory: use it to measure the proxy's error on a sample, or when the
budget allows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lark_jax.training.loss import weighted_ce_sums


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_tokens"))
def grad_sq_norms(graphdef, state, ids, positions, segments, targets, weights, *,
                  chunk_tokens: int = 1024):
    """float32 [B]: ‖∇_θ (Σ w·CE / Σ w)‖² of each row (0 for rows without scored tokens)."""

    def row_loss(params, row):
        model = nnx.merge(graphdef, params)
        s, n = weighted_ce_sums(model, *(x[None] for x in row), chunk_tokens=chunk_tokens)
        return s / jnp.maximum(n, 1.0)

    def one(row):
        g = jax.grad(row_loss)(state, row)
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))

    return lax.map(one, (ids, positions, segments, targets, weights))
