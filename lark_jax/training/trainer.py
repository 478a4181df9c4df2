"""Weighted SFT: optax AdamW, warm-up + cosine, clipping, accumulation, orbax checkpoints.

One optimizer step = the next ``batch_size`` records of the seeded epoch
permutation, packed into fixed-shape micro-batches; gradients of Σ c·CE are
accumulated over micro-batches and divided by the step's normaliser D, so the
update follows exactly the chosen objective (``training.objective``: per-record
weighted mean CE by default, the reference's plain per-record mean, or per-token
weighted CE) whatever the packing, micro-batch size or device count.

The learning rate follows HF Trainer's linear warm-up + cosine schedule: warm-up
steps W = ceil(warmup_ratio · total), lr(s) = lr · s / W for s < W (so the first
update is at lr 0), then lr · ½(1 + cos(π (s − W) / (total − W))).

Master weights and optimizer state are float32; with ``dtype="bfloat16"``
the forward/backward runs on a bfloat16 copy cast inside the differentiated
function (gradients flow back to float32). Checkpoints hold params, optimizer
state and the step; the data position is a pure function of (seed, step), so
``resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lark_jax import fsio
from lark_jax.data.prefetch import prefetch
from lark_jax.distributed import barrier, check_same_settings, gather_to_host
from lark_jax.errors import LarkError
from lark_jax.models.decoder import ATTN_IMPLS, Decoder
from lark_jax.models.io import load_student, resolve_dtype, save_student
from lark_jax.models.params import param_shardings, spec_by_attr
from lark_jax.parallel import data_sharding, logical_sharding, make_mesh, replicated
from lark_jax.runs import check_resume
from lark_jax.shapes import pow2_length
from lark_jax.training.data import (
    SYSTEM_TURNS,
    StepPlan,
    read_selection,
    step_denominator,
    step_microbatches,
)
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.objective import OBJECTIVES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 64  # records per optimizer step (the reference's global batch)
    max_length: int = 32768  # the reference's; the final <|im_end|> may be cut
    max_steps: int | None = None  # exactly this many steps, overriding epochs (HF Trainer)
    objective: str = "record"  # "record" | "reference" | "token" (training.objective)
    system_turn: str = "keep"  # "keep" | "empty" (the reference's rebuilt messages)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    micro_batch_tokens: int = 16384  # tokens per forward/backward (all devices)
    save_every: int | None = None
    keep: int = 3
    seed: int = 0
    dtype: str = "float32"
    remat: bool | None = None  # None: on when a micro-batch's activations would be large
    fsdp: bool = False
    chunk_tokens: int = 256  # positions whose [chunk, V] float32 logits exist at once
    export_dtype: str = "float32"
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None  # scale = alpha / rank (default alpha = 2 * rank)
    attention: str = "auto"  # "auto" | "dense" | "blockwise" | "flash" (models.attention)
    prefetch: int = 2  # steps a host thread packs ahead (0: inline)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "keep", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise LarkError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.lr > 0:
            raise LarkError("--lr must be > 0")
        if not 0 <= self.warmup_ratio <= 1:
            raise LarkError("--warmup-ratio must be in [0, 1]")
        if self.system_turn not in SYSTEM_TURNS:
            raise LarkError(f"--system-turn must be one of {', '.join(SYSTEM_TURNS)}")
        if self.objective not in OBJECTIVES:
            raise LarkError(f"--objective must be one of {', '.join(OBJECTIVES)}, "
                            f"got {self.objective!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LarkError("--max-steps must be >= 1")
        if self.prefetch < 0:
            raise LarkError("--prefetch must be >= 0")
        if self.lora_rank < 0:
            raise LarkError("--lora-rank must be >= 0")
        if self.save_every is not None and self.save_every < 1:
            raise LarkError("--save-every must be >= 1")
        if self.attention not in ATTN_IMPLS:
            raise LarkError(f"--attention must be one of {', '.join(ATTN_IMPLS)}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.export_dtype)


@dataclasses.dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    final_loss: float
    tokens: int
    seconds: float
    final_dir: str


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """HF Trainer's rule: ceil(warmup_ratio × total steps) (e.g. 59 at 1,170 steps)."""
    return math.ceil(cfg.warmup_ratio * total)


def make_schedule(cfg: TrainConfig, total: int):
    """HF's linear warm-up from 0 then cosine to 0 (``get_cosine_schedule_with_warmup``)."""
    w = warmup_steps(cfg, total)
    decay = max(1, total - w)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(1, w)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((s - w) / decay, 0.0, 1.0)))
        return cfg.lr * jnp.where(s < w, warm, cos)

    return schedule


# Without remat the backward pass keeps about (10·D + 3·I) float32 values per token and
# layer (projections, norms, the MLP's three I-wide tensors). Above this many bytes for one
# micro-batch, "auto" recomputes each layer instead (about a third more compute).
REMAT_AUTO_BYTES = 4 << 30


def resolve_remat(cfg: TrainConfig, model_cfg, tokens_per_microbatch: int) -> bool:
    """``cfg.remat`` when set; otherwise on when the estimate above exceeds REMAT_AUTO_BYTES."""
    if cfg.remat is not None:
        return cfg.remat
    per_token = (10 * model_cfg.hidden_size + 3 * model_cfg.intermediate_size) * 4
    return tokens_per_microbatch * model_cfg.num_layers * per_token > REMAT_AUTO_BYTES


def make_optimizer(cfg: TrainConfig, total: int):
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(make_schedule(cfg, total), b1=0.9, b2=0.999, eps=1e-8,
                    weight_decay=cfg.weight_decay))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def init_lora(base, rank: int, seed: int, specs: dict) -> dict:
    """LoRA factors for every stacked projection W [L, out, in]: A [L, r, in], B [L, out, r].

    A ~ N(0, 1/in), B = 0, so training starts exactly at the base model.
    """
    key = jax.random.key(seed)
    out = {}
    for i, name in enumerate(LORA_TARGETS):
        w = base["layers"][name]
        n_layers, d_out, d_in = w.shape
        mesh = w.sharding.mesh
        # The factors' axes come from their weight's table entry; "lora" (the rank) is
        # split by no rule, and with the trainer's (data-only) mesh they are replicated.
        out_axis, in_axis = specs[name].axes
        a = jax.random.normal(jax.random.fold_in(key, i), (n_layers, rank, d_in), jnp.float32)
        b = jnp.zeros((n_layers, d_out, rank), jnp.float32)
        out[name] = {
            "a": jax.device_put(a / np.sqrt(d_in), logical_sharding(
                mesh, ("layers", "lora", in_axis), a.shape, "model")),
            "b": jax.device_put(b, logical_sharding(
                mesh, ("layers", out_axis, "lora"), b.shape, "model"))}
    return out


def merge_lora(base, lora: dict, scale: float):
    """W' = W + scale · B A for every target; everything else is the base state."""
    merged = jax.tree.map(lambda x: x, base)  # a fresh State: the base is never mutated
    for name, f in lora.items():
        w = merged["layers"][name]
        delta = jnp.einsum("lor,lri->loi", f["b"], f["a"])
        merged["layers"][name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return merged


class Trainer:
    """Holds the compiled step functions of one run; see ``train`` for the loop."""

    def __init__(self, model: Decoder, cfg: TrainConfig, total_steps: int, mesh,
                 remat: bool | None = None, lora_path: str = "side"):
        """``lora_path``: "side" computes each LoRA projection as x·W + scale·(x·A)·B;
        "merge" forms W + scale·B·A on every micro-batch (the old way, kept for the
        benchmark's comparison)."""
        self.cfg = cfg
        remat = bool(cfg.remat) if remat is None else remat
        self.mesh = mesh
        compute = resolve_dtype(cfg.dtype)
        graphdef, params = nnx.split(model)
        self.graphdef = graphdef
        self.graphdef_c, _ = nnx.split(nnx.eval_shape(
            lambda: Decoder(model.cfg, dtype=compute, remat=remat,
                            attn_impl=model.attn_impl, mesh=mesh)))
        if cfg.fsdp:  # the parameter table's logical axes under the "fsdp" rules
            params = jax.device_put(params, param_shardings(params, model.cfg, mesh, "fsdp"))
        # With LoRA the optimiser sees only the factors; the base weights stay frozen.
        self.base = params if cfg.lora_rank else None
        scale = (cfg.lora_alpha or 2.0 * cfg.lora_rank) / max(cfg.lora_rank, 1)
        self.full = (lambda p: merge_lora(self.base, p, scale)) if cfg.lora_rank else \
            (lambda p: p)
        if cfg.lora_rank:
            params = init_lora(params, cfg.lora_rank, cfg.seed, spec_by_attr(model.cfg))
        self.params = params
        self.tx = make_optimizer(cfg, total_steps)
        self.schedule = make_schedule(cfg, total_steps)
        # Scalars such as Adam's count are created on the default device: put every
        # leaf on the mesh so that the jitted update sees one set of devices.
        self.opt_state = jax.tree.map(
            lambda x: x if getattr(x.sharding, "mesh", None) == mesh
            else jax.device_put(x, replicated(mesh)), self.tx.init(params))
        shard = jax.tree.map(lambda x: x.sharding, (self.params, self.opt_state))
        gdc, chunk = self.graphdef_c, cfg.chunk_tokens

        full = self.full
        cast = functools.partial(jax.tree.map, lambda x: x.astype(compute))

        def loss_sums(p, batch):
            if cfg.lora_rank and lora_path == "side":  # x·W + scale·(x·A)·B, never W + BA
                return weighted_ce_sums(nnx.merge(gdc, cast(self.base)), chunk_tokens=chunk,
                                        lora=(cast(p), scale), **batch)
            return weighted_ce_sums(nnx.merge(gdc, cast(full(p))), chunk_tokens=chunk, **batch)

        def first(p, batch):  # no zero accumulator: one parameter-sized buffer less
            (s, w), g = jax.value_and_grad(lambda q: loss_sums(q, batch), has_aux=True)(p)
            return g, s, w

        def accumulate(acc, p, batch):
            g, s, w = first(p, batch)
            return jax.tree.map(jnp.add, acc[0], g), acc[1] + s, acc[2] + w

        def apply(p, opt_state, acc, denom):
            g_sum, s, _ = acc
            g = jax.tree.map(lambda x: x / denom, g_sum)
            gnorm = optax.tree.norm(g)
            updates, opt_state = self.tx.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, s / denom, gnorm

        self._first = jax.jit(first, out_shardings=(shard[0], None, None))
        self._accumulate = jax.jit(accumulate, donate_argnums=(0,))
        self._apply = jax.jit(apply, donate_argnums=(0, 1), out_shardings=(*shard, None, None))
        self._loss = jax.jit(loss_sums)

    def zero_acc(self):
        zeros = jax.tree.map(jnp.zeros_like, self.params)
        return zeros, jnp.float32(0), jnp.float32(0)

    def place(self, batch: dict) -> dict:
        """This process's rows of a micro-batch -> global arrays split over "data".

        With several processes each contributes its own rows (``step_microbatches``
        with ``n_processes``); the global batch is every process's rows stacked.
        """
        sharding = data_sharding(self.mesh, 2)
        n = jax.process_count()
        if n == 1:
            return {k: jax.device_put(v, sharding) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n,
                                                                       *v.shape[1:]))
                for k, v in batch.items()}

    def step(self, microbatches, denominator: float | None = None) -> tuple[float, float, int]:
        """One optimizer step over ``microbatches``; returns (loss, grad norm, tokens).

        ``denominator`` is the step's D (``data.step_denominator``); without it the
        sum of the coefficients is used, which equals D for the ``record`` and
        ``token`` objectives but not for ``reference`` with zero-weight records.
        Waits for the step; :meth:`dispatch` does not.
        """
        loss, gnorm, tokens = self.dispatch(microbatches, denominator)
        return float(loss), float(gnorm), tokens

    def dispatch(self, microbatches, denominator: float | None = None):
        """Queue one optimizer step (see :meth:`step`) without waiting for it.

        Returns (loss, grad norm) as device scalars and the step's token count; JAX
        runs the step asynchronously, so the host can pack the next one meanwhile.
        """
        acc = None
        tokens = 0
        for mb in microbatches:
            tokens += int((mb["segments"] >= 0).sum())
            acc = (self._first(self.params, self.place(mb)) if acc is None
                   else self._accumulate(acc, self.params, self.place(mb)))
        if acc is None:  # every record of the step has coefficient 0 (reference objective)
            acc = self.zero_acc()
        denom = acc[2] if denominator is None else np.float32(denominator)
        self.params, self.opt_state, loss, gnorm = self._apply(self.params, self.opt_state, acc,
                                                               denom)
        return loss, gnorm, tokens

    def loss_of(self, batch: dict) -> float:
        s, w = self._loss(self.params, self.place(batch))
        return float(s / w)

    def model(self) -> Decoder:
        """The trained model (LoRA factors merged into the weights)."""
        return nnx.merge(self.graphdef, self.full(self.params))

    def host_model(self) -> Decoder:
        """The trained model with NumPy weights, whole on every process (a collective)."""
        return nnx.merge(self.graphdef, gather_to_host(self.full(self.params)))


def run_steps(trainer: Trainer, items, on_done: Callable[..., None], *, lag: bool = True,
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


# Settings a resumed run may change: they do not alter what is computed (remat and the
# cross-entropy chunk change how, not what).
RESUME_MAY_CHANGE = {"save_every", "keep", "remat", "chunk_tokens", "prefetch"}
RESUME_RUN_KEYS = ("student", "data", "n_examples", "total_steps")
# What a run_config.json written before a setting existed means by its absence.
RESUME_OLD_DEFAULTS = {"objective": "token", "system_turn": "keep"}


def _check_resume_settings(path: Path, new: dict) -> None:
    """Refuse ``--resume`` with other data, student or training settings than the run had."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LarkError("cannot read run_config.json to check --resume settings",
                        where=str(path)) from None

    def same_path(a, b) -> bool:
        return Path(str(a)).resolve() == Path(str(b)).resolve()

    message = "--resume with settings that differ from the run's: {diffs}"
    # What was run and on what (informational fields such as row_length are derived).
    check_resume({k: old.get(k) for k in RESUME_RUN_KEYS}, {k: new[k] for k in RESUME_RUN_KEYS},
                 same={"student": same_path, "data": same_path}, message=message,
                 where=str(path))
    check_resume(old.get("config", {}), new["config"], may_change=RESUME_MAY_CHANGE,
                 old_defaults=RESUME_OLD_DEFAULTS, name=lambda k: "--" + k.replace("_", "-"),
                 message=message, where=str(path))


def train(student_dir: str | Path, data: str | Path, out_dir: str | Path,
          cfg: TrainConfig = TrainConfig(), *, resume: bool = False, mesh=None,
          progress: Callable[..., None] | None = None) -> TrainSummary:
    """Fine-tune the student on a selection file; writes checkpoints, metrics, plot, final/.

    ``progress(step, total, loss=..., tok_s=...)`` is called after every step.

    Multi-process (after ``lark_jax.distributed.initialize``): every process runs
    this with the same arguments on a mesh over all processes' devices (the
    default). Each packs only its share of each step's records
    (``step_microbatches``), the step runs over the global batch (data parallel,
    or FSDP over the same axis), checkpoints are written by all processes
    together into ``out_dir`` (which must be on storage they all share), and
    process 0 alone writes metrics, the plot and ``final/`` (from weights
    gathered to it). Checkpoints restore onto any mesh: a run may resume on
    another number of processes or devices.
    """
    import orbax.checkpoint as ocp

    cfg.validate()
    t0 = time.perf_counter()
    out_dir = fsio.refuse_link(out_dir)
    ckpt_dir = (out_dir / "checkpoints").absolute()
    n_proc, proc = jax.process_count(), jax.process_index()
    lead = proc == 0
    check_same_settings({"student": str(student_dir), "data": str(data),
                         "out": str(out_dir), "resume": resume,
                         **{"--" + k.replace("_", "-"): v
                            for k, v in dataclasses.asdict(cfg).items()}}, "train")
    for p in (ckpt_dir, *(out_dir / f for f in ("metrics.jsonl", "run_config.json", "loss.png",
                                                "final"))):
        fsio.refuse_link(p)  # a link planted in the run directory is not followed
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
        raise LarkError("run directory already has checkpoints; pass --resume to continue or "
                        "choose a new --out", where=str(out_dir))
    mesh = mesh if mesh is not None else make_mesh()
    if n_proc > 1 and len({d.process_index for d in mesh.devices.flat}) != n_proc:
        raise LarkError("multi-process training needs one mesh over every process's devices "
                        "(make_mesh() over jax.devices())")
    student = load_student(student_dir, "float32", mesh=mesh,
                           attn_impl=cfg.attention)
    # Every process reads and tokenizes the whole selection (cheap beside training), so
    # each can compute every process's packing of a step from token counts alone.
    examples, n_skipped = read_selection(data, student.tokenizer, cfg.max_length, cfg.objective,
                                         cfg.system_turn)
    plan = StepPlan(len(examples), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.seed)
    total = plan.total_steps
    row_len = pow2_length(max(len(e.tok.ids) for e in examples), 64, cfg.max_length)
    n_data = mesh.shape["data"]
    rows = max(n_data, (cfg.micro_batch_tokens // row_len) // n_data * n_data)
    remat = resolve_remat(cfg, student.config, rows * row_len)
    trainer = Trainer(student.model, cfg, total, mesh, remat=remat)

    run_config = {"student": str(student_dir), "data": str(data), "config": dataclasses.asdict(cfg),
                  "n_examples": len(examples), "n_skipped": n_skipped, "total_steps": total,
                  "steps_per_epoch": plan.steps_per_epoch, "row_length": row_len,
                  "rows_per_microbatch": rows, "remat": remat,
                  "warmup_steps": warmup_steps(cfg, total), "devices": int(mesh.devices.size),
                  "processes": n_proc}
    if resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        _check_resume_settings(out_dir / "run_config.json", run_config)
    barrier("lark_jax_train_checked")  # every process has read run_config.json
    if lead:
        fsio.make_dir(out_dir)
        fsio.atomic_write(out_dir / "run_config.json", json.dumps(run_config, indent=2) + "\n")

    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, enable_async_checkpointing=True))
    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume and mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        tree = {"params": trainer.params, "opt_state": trainer.opt_state}
        # Restored onto this run's shardings, whatever mesh wrote the checkpoint.
        abstract = {**jax.tree.map(ocp.utils.to_shape_dtype_struct, tree),
                    "step": np.zeros((), np.int32)}
        restored = mgr.restore(start, args=ocp.args.StandardRestore(abstract))
        trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]
        if lead and metrics_path.exists():  # drop metrics of steps after the checkpoint
            done = fsio.complete_lines(metrics_path).decode("utf-8")  # cuts a torn last line
            kept = [ln for ln in done.splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
            fsio.atomic_write(metrics_path, "".join(ln + "\n" for ln in kept))
    elif lead and metrics_path.exists():
        metrics_path.unlink()

    def save(step: int) -> None:
        mgr.save(step, args=ocp.args.StandardSave(
            {"params": trainer.params, "opt_state": trainer.opt_state,
             # a host value: a device scalar would live on one process's device only
             "step": np.asarray(step, np.int32)}))

    step_tokens: dict[int, int] = {}

    def packed():
        """Each step's packed micro-batches (run by a host thread, cfg.prefetch ahead)."""
        for step in range(start, total):
            idx = plan.step_indices(step)
            # Tokens of the whole step (every process's share), for the metrics: the
            # packed records are those of weight > 0 under every objective.
            step_tokens[step] = sum(len(examples[i].tok.ids) for i in idx
                                    if examples[i].weight > 0)
            yield step, list(step_microbatches(examples, idx, row_len, rows,
                                               row_multiple=n_data, objective=cfg.objective,
                                               process=proc, n_processes=n_proc)), \
                step_denominator(examples, idx, cfg.objective)

    preempted: dict[int, bool] = {}

    def regular_checkpoint(step: int) -> bool:
        return bool(cfg.save_every) and (step + 1) % cfg.save_every == 0

    def checkpoint_step(step: int) -> bool:
        """Whether ``step`` ends with a checkpoint (asked once per step, in order, by
        run_steps, which then waits for the step so that the saved params are its own)."""
        if n_proc > 1:
            # A preemption notice (SIGTERM) on any host: every host reaches the same safe
            # step, saves it and stops. All hosts must ask at every step (JAX's protocol).
            from jax.experimental import multihost_utils

            preempted[step] = multihost_utils.reached_preemption_sync_point(step + 1)
        return preempted.get(step, False) or regular_checkpoint(step)

    last = {"loss": math.nan, "tokens": 0, "t": time.perf_counter()}

    def done(step, loss, gnorm, _local_tokens):
        now = time.perf_counter()
        dt, last["t"] = now - last["t"], now
        tokens = step_tokens.pop(step)
        last["tokens"] += tokens
        last["loss"] = loss
        rec = {"step": step + 1, "epoch": step // plan.steps_per_epoch + 1,
               "loss": loss, "lr": float(trainer.schedule(step)), "grad_norm": gnorm,
               "tokens": tokens, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        if mf is not None:
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
        if not math.isfinite(loss):
            raise LarkError(f"loss became {loss} at step {step + 1}")
        if preempted.get(step) or regular_checkpoint(step):
            save(step + 1)  # the step has finished (sync_after): params are its own
        if preempted.get(step):
            mgr.wait_until_finished()
            raise LarkError(f"preempted (SIGTERM): every process stopped after step {step + 1}, "
                            "whose checkpoint is saved; rerun the same command with --resume")
        if progress is not None:
            progress(step + 1, total, loss=loss, tok_s=rec["tokens_per_s"])

    try:
        with (fsio.open_append(metrics_path) if lead else contextlib.nullcontext()) as mf, \
                contextlib.closing(prefetch(packed(), cfg.prefetch)) as items:
            run_steps(trainer, items, done, sync_after=checkpoint_step)
        if mgr.latest_step() != total:
            save(total)
        mgr.wait_until_finished()
    finally:
        mgr.wait_until_finished()
        mgr.close()
    trainer.opt_state = None  # export needs only the weights: free Adam's two moments first
    final = out_dir / "final"
    # Several processes: every one takes part in gathering the weights; process 0 writes.
    model = trainer.model() if n_proc == 1 else trainer.host_model()
    if lead:
        save_student(model, final, student.tokenizer, dtype=resolve_dtype(cfg.export_dtype),
                     overwrite=True)
    del model
    if lead:
        plot_loss(metrics_path, out_dir / "loss.png")
    barrier("lark_jax_train_written")  # no process reports before final/ exists
    return TrainSummary(total, start, last["loss"], last["tokens"], time.perf_counter() - t0,
                        str(final))


def plot_loss(metrics_paths, out_png: Path, labels=None, steps_per_epoch=None) -> None:
    """One chart of loss vs step for one or several metrics.jsonl files; vs epoch (step /
    steps per epoch, one number per file) when ``steps_per_epoch`` is given, so that runs
    on selections of different sizes compare pass for pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(metrics_paths, str | Path):
        metrics_paths = [metrics_paths]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, p in enumerate(metrics_paths):
        recs = [json.loads(ln) for ln in Path(p).read_text().splitlines() if ln.strip()]
        per = steps_per_epoch[i] if steps_per_epoch else 1
        ax.plot([r["step"] / per for r in recs], [r["loss"] for r in recs],
                label=labels[i] if labels else None)
    ax.set_xlabel("epoch" if steps_per_epoch else "optimizer step")
    ax.set_ylabel("weighted SFT loss")
    if labels:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fsio.atomic_write(out_png, buf.getvalue())

