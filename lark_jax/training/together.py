"""Many small fine-tunes of one student at once: ``jax.vmap`` over stacked parameters.

A study compares methods × seeds (plus per-teacher runs), each a fine-tune of the same
student for the same number of steps. Run one at a time, a small student spends its time
in per-run overhead (loading, compiling, checkpointing, exporting) rather than in
arithmetic. Here R runs share one compiled step: every step packs each run's records into
one micro-batch of a common [rows, length], and either

- ``vmap``: parameters and Adam states are stacked on a leading run axis and one
  ``jax.vmap``-ed step updates all R at once (one dispatch per step: what an accelerator
  wants), or
- ``loop``: the same compiled (unbatched) step runs once per run. On XLA:CPU this is
  faster: a batched matmul there ran about 2x slower per run than R plain ones (measured on
  the demo's tiny student: 0.63 s vs 0.29 s per run-step).

``auto`` picks ``loop`` on a CPU and ``vmap`` elsewhere. Runs that would compute the same
steps (same tokens, coefficients, normalisers and record order) are trained once and
share the result (:attr:`TrainedTogether.same_as`).

Each run follows ``train`` exactly in what it computes: the same record order
(``StepPlan``), objective coefficients and normaliser D (``training.objective``), loss
(``weighted_ce_sums``), clipping, AdamW and schedule (``make_optimizer``). Only the
packing differs (one micro-batch per step instead of several), which changes float
summation order and nothing else: ``tests/test_training.py`` checks equality with
separate ``train`` runs. No checkpoints and no export: the results stay in memory (see
:meth:`TrainedTogether.student`). Meant for students that fit R times on one device:
weights and batches are replicated over the student's mesh, not split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lark_jax.errors import LarkError
from lark_jax.parallel import replicated
from lark_jax.shapes import octave_bucket
from lark_jax.training.data import StepPlan, read_selection, step_denominator, step_microbatches
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.objective import token_coefficient
from lark_jax.training.trainer import TrainConfig, make_optimizer, make_schedule

# Settings every run of one call must share (one compiled step, one schedule).
SHARED = ("max_steps", "lr", "warmup_ratio", "weight_decay", "clip_norm", "max_length",
          "batch_size", "dtype", "chunk_tokens", "system_turn")


@dataclasses.dataclass
class TrainedTogether:
    """The result of :func:`train_together`: per run, per step loss and grad norm."""

    base: object  # the Student all runs started from
    params: list  # each run's final weights (nnx State)
    losses: np.ndarray  # [R, steps]
    grad_norms: np.ndarray  # [R, steps]
    tokens: np.ndarray  # [R, steps] assistant tokens of the records trained on
    # Per run, the first run that computes exactly the same steps (itself if none):
    # identical runs are trained once and share their results.
    same_as: list[int] = dataclasses.field(default_factory=list)

    def student(self, r: int):
        """Run ``r``'s fine-tuned student (same tokenizer, config and mesh as the base)."""
        graphdef, _ = nnx.split(self.base.model)
        return dataclasses.replace(self.base, model=nnx.merge(graphdef, self.params[r]),
                                   path=None)


def _pad_rows(mb: dict, rows: int, length: int) -> dict:
    """A micro-batch padded to [rows, length]: padding tokens have segment -1, weight 0."""
    out = {}
    for k, v in mb.items():
        fill = -1 if k == "segments" else 0
        a = np.full((rows, length), fill, v.dtype)
        a[:v.shape[0], :v.shape[1]] = v
        out[k] = a
    return out


def train_together(student, data: Sequence[str | Path], configs: Sequence[TrainConfig], *,
                   mode: str = "auto", progress: Callable[..., None] | None = None
                   ) -> TrainedTogether:
    """Fine-tune ``student`` (a loaded Student, float32) on each selection file ``data[r]``
    with ``configs[r]`` (which may differ in ``seed`` and ``objective`` only; see SHARED),
    every run through one compiled step (``mode``: "vmap", "loop" or "auto", see the module
    docstring). ``progress(step, total)`` after every step."""
    if mode not in ("auto", "vmap", "loop"):
        raise LarkError(f"mode must be auto, vmap or loop, got {mode!r}")
    if len(data) != len(configs) or not data:
        raise LarkError("train_together needs one TrainConfig per selection file")
    for c in configs:
        c.validate()
        if not c.max_steps:
            raise LarkError("train_together needs max_steps (every run the same length)")
        diff = [k for k in SHARED if getattr(c, k) != getattr(configs[0], k)]
        if diff:
            raise LarkError(f"runs trained together must share {', '.join(diff)}")
        if c.lora_rank or c.fsdp or c.dtype != "float32":
            raise LarkError("train_together trains full float32 weights (no LoRA, FSDP or "
                            "bfloat16 compute)")
    cfg0 = configs[0]
    total = cfg0.max_steps
    tok = student.tokenizer
    runs = []
    for path, c in zip(data, configs, strict=True):
        ex, _ = read_selection(path, tok, c.max_length, c.objective, c.system_turn)
        runs.append((ex, StepPlan(len(ex), c.batch_size, c.epochs, c.max_steps, c.seed), c))
    # One row length for the whole call (compiled once), so it need not be a power of
    # two: 8 steps per octave. Dense attention's cost per token grows with the row: the
    # demo's longest record (303 tokens) packed into rows of 320, not 512.
    row_len = octave_bucket(max(len(e.tok.ids) for ex, _, _ in runs for e in ex), 64)
    # Runs whose every step would compute the same thing (same tokens, coefficients,
    # normalisers and record order) are trained once: e.g. LARK at budget 1 under the
    # record and the reference objective, where every chosen record weighs 1.
    # Every run's records and normaliser D per step, computed once (the key and the steps).
    sched = [[(idx, step_denominator(ex, idx, c.objective))
              for idx in map(plan.step_indices, range(total))] for ex, plan, c in runs]
    keys = [_run_key(ex, c.objective, steps) for (ex, _, c), steps in zip(runs, sched,
                                                                           strict=True)]
    same_as = [keys.index(k) for k in keys]
    unique = sorted(set(same_as))
    slot = {r: i for i, r in enumerate(unique)}
    runs = [(runs[r][0], sched[r], runs[r][2]) for r in unique]

    graphdef, params = nnx.split(student.model)
    # Weights, Adam states (their step counts included) and batches replicated on the
    # student's mesh from the start: the step's outputs then carry the inputs' sharding and
    # the second step does not compile a second program.
    rep = replicated(student.mesh)
    params = jax.device_put(params, rep)
    n_runs = len(runs)
    if mode == "auto":
        mode = "loop" if jax.devices()[0].platform == "cpu" else "vmap"
    tx = make_optimizer(cfg0, total)
    chunk = cfg0.chunk_tokens

    def one(p, o, batch, denom):
        def loss_sums(q):
            return weighted_ce_sums(nnx.merge(graphdef, q), chunk_tokens=chunk, **batch)

        (s, _), g = jax.value_and_grad(loss_sums, has_aux=True)(p)
        g = jax.tree.map(lambda x: x / denom, g)
        gnorm = optax.tree.norm(g)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, s / denom, gnorm

    if mode == "vmap":
        states = [jax.tree.map(lambda x: jnp.broadcast_to(x, (n_runs, *x.shape)), params)]
        opts = [jax.device_put(jax.vmap(tx.init)(states[0]), rep)]
        step_fn = jax.jit(jax.vmap(one), donate_argnums=(0, 1))
    else:  # every run its own copy (the base stays untouched: the step donates its inputs)
        states = [jax.tree.map(jnp.copy, params) for _ in range(n_runs)]
        opts = [jax.device_put(tx.init(p), rep) for p in states]
        step_fn = jax.jit(one, donate_argnums=(0, 1))
    losses = np.zeros((n_runs, total))
    gnorms = np.zeros((n_runs, total))
    tokens = np.zeros((n_runs, total), np.int64)
    pending = None
    for step in range(total):
        mbs, denoms = [], []
        for r, (ex, steps, c) in enumerate(runs):
            idx, denom = steps[step]
            # batch_size rows always hold one step's records: one micro-batch per step, of
            # the rows its records fill and no more. A call compiles one step per row count
            # that occurs (at most batch_size); rows rounded to a power of two computed
            # 1.7x the demo pool's tokens, always batch_size rows about 3x.
            parts = list(step_microbatches(ex, idx, row_len, cfg0.batch_size,
                                           objective=c.objective, exact_rows=True))
            if len(parts) > 1:
                raise LarkError("a step's records did not fit one micro-batch")
            mbs.append(parts[0] if parts else None)
            denoms.append(denom or 1.0)
            tokens[r, step] = sum(len(ex[i].tok.ids) for i in idx if ex[i].weight > 0)
        need = [m["ids"].shape[0] if m is not None else 1 for m in mbs]
        empty = {k: np.zeros((0, row_len), np.int32) for k in
                 ("ids", "positions", "segments", "targets")} | {
            "weights": np.zeros((0, row_len), np.float32)}
        if mode == "vmap":  # one stacked batch: every run gets the largest row count
            need = [max(need)] * n_runs
        padded = [_pad_rows(m if m is not None else empty, n, row_len)
                  for m, n in zip(mbs, need, strict=True)]
        denoms = np.asarray(denoms, np.float32)
        if mode == "vmap":
            batch = {k: np.stack([b[k] for b in padded]) for k in empty}
            states[0], opts[0], loss, gnorm = step_fn(states[0], opts[0], batch, denoms)
        else:
            out = []
            for r in range(n_runs):
                states[r], opts[r], lr_, gr_ = step_fn(states[r], opts[r], padded[r], denoms[r])
                out.append((lr_, gr_))
            loss, gnorm = [o[0] for o in out], [o[1] for o in out]
        if pending is not None:  # fetch the previous step's numbers while this one runs
            losses[:, step - 1], gnorms[:, step - 1] = jax.device_get(pending)
        pending = (loss, gnorm)
        if progress is not None:
            progress(step + 1, total)
    losses[:, total - 1], gnorms[:, total - 1] = jax.device_get(pending)
    if mode == "vmap":
        states = [jax.tree.map(lambda x, r=r: x[r], states[0]) for r in range(n_runs)]
    bad = ~np.isfinite(losses)
    if bad.any():
        u, s = np.argwhere(bad)[0]
        r = unique[u]
        raise LarkError(f"loss of run {r} ({data[r]}) became {losses[u, s]} at step {s + 1}")
    back = [slot[same_as[r]] for r in range(len(data))]
    return TrainedTogether(student, [states[i] for i in back], losses[back], gnorms[back],
                           tokens[back], same_as)


def _run_key(ex, objective: str, steps) -> str:
    """A digest of everything a run's steps compute from: each record's tokens, assistant
    span and loss coefficient, every step's records and normaliser D. Coefficients and
    normalisers enter to 12 significant digits: a selection's weights of 1 - 1e-16 (the
    rounding of its normalisation) do not make another run, any more than the float
    summation order that already separates these runs from ``train``'s."""
    h = hashlib.sha256()
    for e in ex:
        coef = token_coefficient(e.weight, e.tok.n_targets, objective)
        h.update(e.tok.ids.tobytes() + f"{e.tok.start},{e.tok.end},{coef:.12g}".encode())
    for idx, denom in steps:  # (records, D) of every step
        h.update(np.asarray(idx, np.int64).tobytes() + f"{denom:.12g}".encode())
    return h.hexdigest()


def learning_rates(cfg: TrainConfig) -> list[float]:
    """The schedule's learning rate at each step (for metrics files)."""
    sched = make_schedule(cfg, cfg.max_steps)  # elementwise: one call for every step
    return np.asarray(sched(np.arange(cfg.max_steps)), np.float64).tolist()


__all__ = ["SHARED", "TrainedTogether", "learning_rates", "train_together"]
