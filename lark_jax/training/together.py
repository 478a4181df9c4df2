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
import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lark_jax.errors import LarkError
from lark_jax.parallel import replicated
from lark_jax.shapes import octave_bucket
from lark_jax.training.data import StepPlan, read_selection, step_denominator, step_microbatches
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.objective import token_coefficient
from lark_jax.training.step import make_optimizer, make_schedule, one_batch_update, step_tokens
from lark_jax.training.trainer import TrainConfig

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
    # Each run's optimizer state (Adam moments and step count: the schedule's position),
    # what ``train_together(..., resume=...)`` continues from.
    opt_states: list = dataclasses.field(default_factory=list)
    steps: tuple[int, int] = (0, 0)  # the [start, stop) of global steps this call trained

    def student(self, r: int):
        """Run ``r``'s fine-tuned student (same tokenizer, config and mesh as the base)."""
        graphdef, _ = nnx.split(self.base.model)
        return dataclasses.replace(self.base, model=nnx.merge(graphdef, self.params[r]),
                                   path=None)


def _pad_rows(mb: dict | None, rows: int, length: int) -> dict:
    """A micro-batch (None: no rows) padded to [rows, length]: padding tokens have segment
    -1, weight 0."""
    out = {}
    for k, dtype in _BATCH_DTYPES.items():
        a = np.full((rows, length), -1 if k == "segments" else 0, dtype)
        if mb is not None:
            v = mb[k]
            a[:v.shape[0], :v.shape[1]] = v
        out[k] = a
    return out


def _check_configs(data, configs, mode: str) -> None:
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


def _distinct_runs(tok, data, configs, start: int, stop: int, dedupe: bool):
    """Each run's records and per-step (record indices, D) for global steps [start, stop);
    runs whose every step would compute the same thing (same tokens, coefficients,
    normalisers and record order) are kept once when ``dedupe``: e.g. LARK at budget 1
    under the record and the reference objective, where every chosen record weighs 1.
    Returns (the distinct runs, same_as)."""
    runs = []
    for path, c in zip(data, configs, strict=True):
        ex, _ = read_selection(path, tok, c.max_length, c.objective, c.system_turn)
        plan = StepPlan(len(ex), c.batch_size, c.epochs, c.max_steps, c.seed)
        steps = [(idx, step_denominator(ex, idx, c.objective))
                 for idx in map(plan.step_indices, range(start, stop))]
        runs.append((ex, steps, c))
    keys = [_run_key(ex, c.objective, steps) for ex, steps, c in runs]
    same_as = [keys.index(k) for k in keys] if dedupe else list(range(len(runs)))
    return [runs[r] for r in sorted(set(same_as))], same_as


def _step_batch(run, step: int, row_len: int, batch_size: int):
    """A run's micro-batch of ``step`` (None when no record has weight), its D and tokens.

    batch_size rows always hold one step's records: one micro-batch per step, of the rows
    its records fill and no more. A call compiles one step per row count that occurs (at
    most batch_size); rows rounded to a power of two computed 1.7x the demo pool's tokens,
    always batch_size rows about 3x."""
    ex, steps, c = run
    idx, denom = steps[step]
    parts = list(step_microbatches(ex, idx, row_len, batch_size, objective=c.objective,
                                   exact_rows=True))
    if len(parts) > 1:
        raise LarkError("a step's records did not fit one micro-batch")
    return (parts[0] if parts else None), (denom or 1.0), step_tokens(ex, idx)


def train_together(student, data: Sequence[str | Path], configs: Sequence[TrainConfig], *,
                   mode: str = "auto", progress: Callable[..., None] | None = None,
                   stop: int | None = None, resume: TrainedTogether | None = None
                   ) -> TrainedTogether:
    """Fine-tune ``student`` (a loaded Student, float32) on each selection file ``data[r]``
    with ``configs[r]`` (which may differ in ``seed`` and ``objective`` only; see SHARED),
    every run through one compiled step (``mode``: "vmap", "loop" or "auto", see the module
    docstring). ``progress(step, total)`` after every step.

    A run can be trained in pieces, each piece on its own data (iterative selection):
    ``stop`` ends this call after global step ``stop`` (default ``max_steps``), and
    ``resume`` (the result of the previous piece, same runs in the same order) continues
    each run from its weights and optimizer state, so the schedule, the Adam moments and
    the step count go on as in one uninterrupted run. Global step s of a piece trains the
    records ``StepPlan(...).step_indices(s)`` of *that piece's* file: on the same files,
    pieces compute exactly the steps of one call (tested). Runs of a resumed call are
    never merged (their starting states differ)."""
    _check_configs(data, configs, mode)
    cfg0 = configs[0]
    total = cfg0.max_steps
    start = resume.steps[1] if resume is not None else 0
    stop = total if stop is None else stop
    if not start < stop <= total:
        raise LarkError(f"train_together: stop must be in ({start}, {total}], got {stop}")
    if resume is not None and len(resume.params) != len(data):
        raise LarkError(f"resume holds {len(resume.params)} runs, this call {len(data)}")
    runs, same_as = _distinct_runs(student.tokenizer, data, configs, start, stop,
                                   dedupe=resume is None)
    unique = sorted(set(same_as))
    # One row length for the whole call (compiled once), so it need not be a power of
    # two: 8 steps per octave. Dense attention's cost per token grows with the row: the
    # demo's longest record (303 tokens) packed into rows of 320, not 512.
    row_len = octave_bucket(max(len(e.tok.ids) for ex, _, _ in runs for e in ex), 64)
    graphdef, params = nnx.split(student.model)
    # Weights, Adam states (their step counts included) and batches replicated on the
    # student's mesh from the start: the step's outputs then carry the inputs' sharding and
    # the second step does not compile a second program.
    rep = replicated(student.mesh)
    params = jax.device_put(params, rep)
    if mode == "auto":
        mode = "loop" if jax.devices()[0].platform == "cpu" else "vmap"
    tx = make_optimizer(cfg0, total)
    one = functools.partial(one_batch_update, functools.partial(_loss_sums, graphdef,
                                                                cfg0.chunk_tokens), tx)
    init = ([(params, jax.device_put(tx.init(params), rep))] * len(runs) if resume is None
            else [(jax.device_put(resume.params[r], rep),
                   jax.device_put(resume.opt_states[r], rep)) for r in unique])
    stepper = (_Stacked if mode == "vmap" else _OneByOne)(one, init, rep)
    n = stop - start
    losses, gnorms = np.zeros((len(runs), n)), np.zeros((len(runs), n))
    tokens = np.zeros((len(runs), n), np.int64)
    pending = None
    for i in range(n):
        mbs, denoms, tokens[:, i] = zip(*(_step_batch(r, i, row_len, cfg0.batch_size)
                                          for r in runs), strict=True)
        loss, gnorm = stepper(mbs, np.asarray(denoms, np.float32), row_len)
        if pending is not None:  # fetch the previous step's numbers while this one runs
            losses[:, i - 1], gnorms[:, i - 1] = jax.device_get(pending)
        pending = (loss, gnorm)
        if progress is not None:
            progress(start + i + 1, total)
    losses[:, n - 1], gnorms[:, n - 1] = jax.device_get(pending)
    bad = ~np.isfinite(losses)
    if bad.any():
        u, s = np.argwhere(bad)[0]
        r = unique[u]
        raise LarkError(f"loss of run {r} ({data[r]}) became {losses[u, s]} at step "
                        f"{start + s + 1}")
    back = [unique.index(same_as[r]) for r in range(len(data))]
    states, opts = stepper.states()
    return TrainedTogether(student, [states[i] for i in back], losses[back], gnorms[back],
                           tokens[back], same_as, [opts[i] for i in back], (start, stop))


def _loss_sums(graphdef, chunk_tokens: int, params, batch: dict):
    return weighted_ce_sums(nnx.merge(graphdef, params), chunk_tokens=chunk_tokens, **batch)


_BATCH_DTYPES = {"ids": np.int32, "positions": np.int32, "segments": np.int32,
                 "targets": np.int32, "weights": np.float32}


class _OneByOne:
    """The same compiled (unbatched) step run once per run, each on its own row count."""

    def __init__(self, one, init, rep):
        # every run its own copy (the base, or a resumed result, stays untouched: the step
        # donates its inputs)
        self.params = [jax.tree.map(jnp.copy, p) for p, _ in init]
        self.opts = [jax.tree.map(jnp.copy, o) for _, o in init]
        self.step = jax.jit(one, donate_argnums=(0, 1))

    def __call__(self, mbs, denoms, row_len: int):
        out = []
        for r, mb in enumerate(mbs):
            batch = _pad_rows(mb, mb["ids"].shape[0] if mb is not None else 1, row_len)
            self.params[r], self.opts[r], loss, gnorm = self.step(self.params[r], self.opts[r],
                                                                  batch, denoms[r])
            out.append((loss, gnorm))
        return [o[0] for o in out], [o[1] for o in out]

    def states(self):
        return self.params, self.opts


class _Stacked:
    """Parameters and Adam states stacked on a leading run axis, one ``jax.vmap``-ed step
    for all runs (every run gets the largest row count of the step)."""

    def __init__(self, one, init, rep):
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        self.params = jax.device_put(jax.tree.map(stack, *[p for p, _ in init]), rep)
        self.opt = jax.device_put(jax.tree.map(stack, *[o for _, o in init]), rep)
        self.n_runs = len(init)
        self.step = jax.jit(jax.vmap(one), donate_argnums=(0, 1))

    def __call__(self, mbs, denoms, row_len: int):
        rows = max(mb["ids"].shape[0] if mb is not None else 1 for mb in mbs)
        padded = [_pad_rows(mb, rows, row_len) for mb in mbs]
        batch = {k: np.stack([b[k] for b in padded]) for k in _BATCH_DTYPES}
        self.params, self.opt, loss, gnorm = self.step(self.params, self.opt, batch, denoms)
        return loss, gnorm

    def states(self):
        take = lambda tree, r: jax.tree.map(lambda x: x[r], tree)  # noqa: E731
        return ([take(self.params, r) for r in range(self.n_runs)],
                [take(self.opt, r) for r in range(self.n_runs)])


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
