"""One optimizer step: the update rule every fine-tune in lark-jax applies.

``Trainer`` (micro-batches accumulated on the device), ``train_together`` (one
micro-batch per step, many runs) and the demo's metrics all go through this module.

For step s with micro-batches m = 1..M, per-token objective coefficients c_t
(``training.objective``) and the step's normaliser D (``data.step_denominator``):

    S = Σ_m Σ_t c_t · CE_t              (loss sum)
    G = Σ_m ∇θ Σ_t c_t · CE_t           (gradient sum, accumulated micro-batch by micro-batch)
    g = G / D,   loss = S / D,   grad_norm = ‖g‖₂
    θ ← θ + AdamW_lr(s)(clip_c(g)),     clip_c(g) = g · min(1, c / ‖g‖₂)

so the update follows the objective exactly, whatever the packing, micro-batch size
or device count. The learning rate lr(s) follows HF Trainer's linear warm-up + cosine
schedule: W = ceil(warmup_ratio · total), lr(s) = lr · s / W for s < W (the first
update is at lr 0), then lr · ½(1 + cos(π (s − W) / (total − W))).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Sums(NamedTuple):
    """What a step accumulates over its micro-batches: G, S and Σ c (the default D)."""

    grad: object  # a pytree like the trained parameters
    loss: jax.Array
    weight: jax.Array


LossSums = Callable[[object, dict], tuple[jax.Array, jax.Array]]  # (params, batch) -> (S, Σc)


def warmup_steps(cfg, total: int) -> int:
    """HF Trainer's rule: ceil(warmup_ratio × total steps) (e.g. 59 at 1,170 steps).

    ``cfg`` here and below: a ``TrainConfig`` (its lr, warmup_ratio, clip_norm and
    weight_decay)."""
    return math.ceil(cfg.warmup_ratio * total)


def make_schedule(cfg, total: int):
    """HF's linear warm-up from 0 then cosine to 0 (``get_cosine_schedule_with_warmup``)."""
    w = warmup_steps(cfg, total)
    decay = max(1, total - w)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(1, w)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((s - w) / decay, 0.0, 1.0)))
        return cfg.lr * jnp.where(s < w, warm, cos)

    return schedule


def make_optimizer(cfg, total: int):
    """clip_by_global_norm then AdamW (β = 0.9, 0.999, ε = 1e-8, HF's defaults)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(make_schedule(cfg, total), b1=0.9, b2=0.999, eps=1e-8,
                    weight_decay=cfg.weight_decay))


def grad_sums(loss_sums: LossSums, params, batch: dict) -> Sums:
    """G, S and Σ c of one micro-batch."""
    (s, w), g = jax.value_and_grad(lambda p: loss_sums(p, batch), has_aux=True)(params)
    return Sums(g, s, w)


def add_sums(acc: Sums, new: Sums) -> Sums:
    return Sums(jax.tree.map(jnp.add, acc.grad, new.grad), acc.loss + new.loss,
                acc.weight + new.weight)


def zero_sums(params) -> Sums:
    """The sums of a step with nothing to train on (every coefficient 0)."""
    return Sums(jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))


def apply_update(tx, params, opt_state, sums: Sums, denom):
    """g = G / D, then the optimizer; returns (params, opt_state, S / D, ‖g‖₂)."""
    g = jax.tree.map(lambda x: x / denom, sums.grad)
    gnorm = optax.tree.norm(g)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sums.loss / denom, gnorm


def one_batch_update(loss_sums: LossSums, tx, params, opt_state, batch: dict, denom):
    """A whole step whose records fit one micro-batch (``apply_update`` of its sums)."""
    return apply_update(tx, params, opt_state, grad_sums(loss_sums, params, batch), denom)


def step_tokens(examples, idx) -> int:
    """Tokens of a step's records, every process's share: the trained records are those of
    weight > 0 under every objective."""
    return sum(len(examples[i].tok.ids) for i in idx if examples[i].weight > 0)


def metrics_record(step: int, steps_per_epoch: int, *, loss: float, lr: float,
                   grad_norm: float, tokens: int, seconds: float | None = None) -> dict:
    """One line of metrics.jsonl for 0-based ``step`` (written 1-based); with the step's
    wall time, its throughput too."""
    rec = {"step": step + 1, "epoch": step // steps_per_epoch + 1, "loss": loss, "lr": lr,
           "grad_norm": grad_norm, "tokens": tokens}
    if seconds is not None:
        rec["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    return rec


__all__ = ["LossSums", "Sums", "add_sums", "apply_update", "grad_sums", "make_optimizer",
           "make_schedule", "metrics_record", "one_batch_update", "step_tokens",
           "warmup_steps", "zero_sums"]
