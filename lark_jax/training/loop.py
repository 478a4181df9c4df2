"""The training loop: dispatch steps, then hand each finished step to hooks.

``run_steps`` keeps the device busy (a step's loss is fetched only after the next
step has been dispatched); ``train_loop`` builds each step's metrics record and calls
the hooks in order, each a small object with one job:

- ``MetricsWriter``: metrics.jsonl (the record format the demo writes too);
- ``LossGuard``: stops on a non-finite loss;
- ``Checkpointer``: ``--save-every``, the hosts' preemption agreement, the final save;
- ``Progress``: the caller's progress callback.

A hook may ask for a step to finish before its ``after_step`` (``wants_sync``: a
checkpoint must hold that step's own weights). Every hook is asked at every step, in
order: the preemption agreement is a collective that all hosts must enter each step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from lark_jax import fsio
from lark_jax.errors import LarkError
from lark_jax.training.step import metrics_record


def run_steps(trainer, items, on_done: Callable[..., None], *, lag: bool = True,
              sync_after: Callable[[int], bool] = lambda step: False) -> None:
    """Run ``items`` = (step, microbatches, denominator) in order, keeping the device busy.

    ``on_done(step, loss, grad_norm, tokens)`` is called in step order with host floats.
    With ``lag`` a step's loss is fetched only after the next step has been dispatched
    (the host never waits for the device between steps); ``sync_after(step)`` true
    forces that step to finish first (before a checkpoint). Without ``lag`` every step
    is waited for, the previous behaviour (the benchmark's baseline).
    """
    pending = None
    for step, mbs, denom in items:
        loss, gnorm, tokens = trainer.dispatch(mbs, denom)
        if pending is not None:
            on_done(pending[0], float(pending[1]), float(pending[2]), pending[3])
            pending = None
        if lag and not sync_after(step):
            pending = (step, loss, gnorm, tokens)
        else:
            on_done(step, float(loss), float(gnorm), tokens)
    if pending is not None:
        on_done(pending[0], float(pending[1]), float(pending[2]), pending[3])


class Hook:
    """Called after every step with its metrics record (0-based step = rec["step"] - 1)."""

    def wants_sync(self, step: int) -> bool:
        return False

    def after_step(self, rec: dict) -> None:
        pass


class LoopResult(NamedTuple):
    loss: float  # the last step's (NaN when no step ran)
    tokens: int  # over the steps run


def train_loop(trainer, items: Iterable, hooks: list[Hook], *, steps_per_epoch: int,
               step_tokens: Callable[[int], int]) -> LoopResult:
    """Run the steps of ``items`` (see ``run_steps``) and call every hook after each.

    ``step_tokens(step)``: the step's tokens over every process (what the record counts;
    ``Trainer.dispatch`` sees this process's share only).
    """
    last = {"loss": math.nan, "tokens": 0, "t": time.perf_counter()}

    def done(step, loss, gnorm, _local_tokens):
        now = time.perf_counter()
        rec = metrics_record(step, steps_per_epoch, loss=loss, lr=float(trainer.schedule(step)),
                             grad_norm=gnorm, tokens=step_tokens(step), seconds=now - last["t"])
        last.update(loss=loss, tokens=last["tokens"] + rec["tokens"], t=now)
        for hook in hooks:
            hook.after_step(rec)

    def sync_after(step):
        return any([hook.wants_sync(step) for hook in hooks])  # a list: ask every hook

    run_steps(trainer, items, done, sync_after=sync_after)
    return LoopResult(last["loss"], last["tokens"])


def write_metrics(path: Path, records: Iterable[dict]) -> None:
    """A whole metrics.jsonl at once (records from ``step.metrics_record``), atomically."""
    fsio.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


class MetricsWriter(Hook):
    """Appends each record to metrics.jsonl (process 0 only: ``enabled``). Resuming from
    step k keeps the records of steps ≤ k (a torn last line is cut); a new run starts the
    file afresh."""

    def __init__(self, path: Path, *, enabled: bool, resumed_from: int | None):
        self.path, self.file = path, None
        if not enabled:
            return
        if resumed_from is not None and path.exists():
            done = fsio.complete_lines(path).decode("utf-8")  # cuts a torn last line
            kept = [ln for ln in done.splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= resumed_from]
            fsio.atomic_write(path, "".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()
        self.file = fsio.open_append(path)

    def after_step(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class LossGuard(Hook):
    """A non-finite loss ends the run (its record is written first)."""

    def after_step(self, rec: dict) -> None:
        if not math.isfinite(rec["loss"]):
            raise LarkError(f"loss became {rec['loss']} at step {rec['step']}")


class Progress(Hook):
    """``callback(step, total, loss=..., tok_s=...)`` after every step."""

    def __init__(self, callback: Callable[..., None] | None, total: int):
        self.callback, self.total = callback, total

    def after_step(self, rec: dict) -> None:
        if self.callback is not None:
            self.callback(rec["step"], self.total, loss=rec["loss"], tok_s=rec["tokens_per_s"])


class Checkpointer(Hook):
    """Orbax checkpoints of (params, optimizer state, step) under ``directory``: every
    ``save_every`` steps, at a preemption notice (SIGTERM on any host: every host reaches
    the same safe step, saves it and stops) and at the end. Written by all processes
    together; restored onto the trainer's shardings, whatever mesh wrote them."""

    def __init__(self, directory: Path, trainer, *, save_every: int | None, keep: int):
        import orbax.checkpoint as ocp

        self.trainer, self.save_every = trainer, save_every
        self.multi = jax.process_count() > 1
        self.preempted: set[int] = set()
        self.mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True))

    def restore(self) -> int | None:
        """Load the latest checkpoint into the trainer; its step, or None if there is none."""
        import orbax.checkpoint as ocp

        latest = self.mgr.latest_step()
        if latest is None:
            return None
        tree = {"params": self.trainer.params, "opt_state": self.trainer.opt_state}
        abstract = {**jax.tree.map(ocp.utils.to_shape_dtype_struct, tree),
                    "step": np.zeros((), np.int32)}
        restored = self.mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
        self.trainer.params, self.trainer.opt_state = restored["params"], restored["opt_state"]
        return int(latest)

    def save(self, step: int) -> None:
        import orbax.checkpoint as ocp

        self.mgr.save(step, args=ocp.args.StandardSave(
            {"params": self.trainer.params, "opt_state": self.trainer.opt_state,
             # a host value: a device scalar would live on one process's device only
             "step": np.asarray(step, np.int32)}))

    def _regular(self, step: int) -> bool:
        return bool(self.save_every) and (step + 1) % self.save_every == 0

    def wants_sync(self, step: int) -> bool:
        if self.multi:  # all hosts must ask at every step (JAX's protocol)
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step + 1):
                self.preempted.add(step)
        return step in self.preempted or self._regular(step)

    def after_step(self, rec: dict) -> None:
        step = rec["step"] - 1
        if step in self.preempted or self._regular(step):
            self.save(step + 1)  # the step has finished (wants_sync): params are its own
        if step in self.preempted:
            self.mgr.wait_until_finished()
            raise LarkError(f"preempted (SIGTERM): every process stopped after step {step + 1}, "
                            "whose checkpoint is saved; rerun the same command with --resume")

    def finish(self, total: int) -> None:
        """The final checkpoint (unless the last step saved one), written to disk."""
        if self.mgr.latest_step() != total:
            self.save(total)
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


__all__ = ["Checkpointer", "Hook", "LoopResult", "LossGuard", "MetricsWriter", "Progress",
           "run_steps", "train_loop", "write_metrics"]
