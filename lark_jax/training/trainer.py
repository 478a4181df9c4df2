"""Weighted SFT: the ``Trainer`` (compiled steps), ``train`` (setup, loop, export), LoRA.

One optimizer step = the next ``batch_size`` records of the seeded epoch
permutation (``data.StepPlan``), packed into fixed-shape micro-batches; the update
rule (accumulated Σ c·CE gradients over the step's normaliser D, clipping, AdamW,
HF's warm-up + cosine schedule) is ``training.step``'s, and the loop with its hooks
(metrics, checkpoints, progress) is ``training.loop``'s.

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
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
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
from lark_jax.training.loop import Checkpointer, LossGuard, MetricsWriter, Progress, train_loop
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.objective import OBJECTIVES
from lark_jax.training.step import (
    Sums,
    add_sums,
    apply_update,
    grad_sums,
    make_optimizer,
    make_schedule,
    step_tokens,
    warmup_steps,
    zero_sums,
)


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
    # Train only up to this global step of the run's schedule (a piece of the run): the
    # checkpoint and final/ hold that step's state; --resume goes on from it, on new data
    # with switch_data (iterative selection from the command line).
    stop_after: int | None = None

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
        if self.stop_after is not None and self.stop_after < 1:
            raise LarkError("--stop-after must be >= 1")
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
    """Holds the compiled step functions of one run (the rule is ``training.step``'s);
    ``train`` runs the loop."""

    def __init__(self, model: Decoder, cfg: TrainConfig, total_steps: int, mesh,
                 remat: bool | None = None):
        self.cfg = cfg
        remat = bool(cfg.remat) if remat is None else remat
        self.mesh = mesh
        self.compute = resolve_dtype(cfg.dtype)
        graphdef, params = nnx.split(model)
        self.graphdef = graphdef
        self.graphdef_c, _ = nnx.split(nnx.eval_shape(
            lambda: Decoder(model.cfg, dtype=self.compute, remat=remat,
                            attn_impl=model.attn_impl, mesh=mesh)))
        if cfg.fsdp:  # the parameter table's logical axes under the "fsdp" rules
            params = jax.device_put(params, param_shardings(params, model.cfg, mesh, "fsdp"))
        # With LoRA the optimiser sees only the factors; the base weights stay frozen.
        self.base = params if cfg.lora_rank else None
        self.lora_scale = (cfg.lora_alpha or 2.0 * cfg.lora_rank) / max(cfg.lora_rank, 1)
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
        first = functools.partial(grad_sums, self.loss_sums)

        def accumulate(acc, p, batch):
            return add_sums(acc, first(p, batch))

        # The first micro-batch's sums start the accumulator: no zero-filled buffer.
        self._first = jax.jit(first, out_shardings=Sums(shard[0], None, None))
        self._accumulate = jax.jit(accumulate, donate_argnums=(0,))
        self._apply = jax.jit(functools.partial(apply_update, self.tx),
                              donate_argnums=(0, 1), out_shardings=(*shard, None, None))
        self._loss = jax.jit(self.loss_sums)

    def cast(self, tree):
        return jax.tree.map(lambda x: x.astype(self.compute), tree)

    def full(self, p):
        """The weights the model runs with: LoRA factors merged (W + scale·B·A), else p."""
        return merge_lora(self.base, p, self.lora_scale) if self.cfg.lora_rank else p

    def loss_sums(self, p, batch: dict):
        """(Σ c·CE, Σ c) of one micro-batch; with LoRA through the side path
        x·W + scale·(x·A)·B, never forming W + B·A."""
        chunk = self.cfg.chunk_tokens
        if self.cfg.lora_rank:
            return weighted_ce_sums(nnx.merge(self.graphdef_c, self.cast(self.base)),
                                    chunk_tokens=chunk, lora=(self.cast(p), self.lora_scale),
                                    **batch)
        return weighted_ce_sums(nnx.merge(self.graphdef_c, self.cast(p)), chunk_tokens=chunk,
                                **batch)

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
            acc = zero_sums(self.params)
        denom = acc.weight if denominator is None else np.float32(denominator)
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


# Settings a resumed run may change: they do not alter what is computed (remat and the
# cross-entropy chunk change how, not what).
RESUME_MAY_CHANGE = {"save_every", "keep", "remat", "chunk_tokens", "prefetch", "stop_after"}
RESUME_RUN_KEYS = ("student", "data", "n_examples", "total_steps")
# ... and those a resume with switch_data (new records from the resumed step on) may change.
SWITCH_MAY_CHANGE = ("data", "n_examples")
# What a run_config.json written before a setting existed means by its absence.
RESUME_OLD_DEFAULTS = {"objective": "token", "system_turn": "keep"}


def _check_resume_settings(path: Path, new: dict, switch_data: bool = False) -> dict:
    """Refuse ``--resume`` with other data, student or training settings than the run had
    (other data is allowed with ``switch_data``, the schedule's length is not). Returns the
    run's earlier run_config.json."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LarkError("cannot read run_config.json to check --resume settings",
                        where=str(path)) from None
    keys = [k for k in RESUME_RUN_KEYS if not (switch_data and k in SWITCH_MAY_CHANGE)]
    if switch_data and old.get("total_steps") != new["total_steps"]:
        raise LarkError(f"--switch-data: the new data gives {new['total_steps']} steps, the run "
                        f"has {old.get('total_steps')}; fix the run's length with --max-steps "
                        "so that every piece shares one schedule", where=str(path))

    def same_path(a, b) -> bool:
        return Path(str(a)).resolve() == Path(str(b)).resolve()

    message = "--resume with settings that differ from the run's: {diffs}"
    # What was run and on what (informational fields such as row_length are derived).
    check_resume({k: old.get(k) for k in keys}, {k: new[k] for k in keys},
                 same={"student": same_path, "data": same_path},
                 message=message + ("" if switch_data else " (new records for the rest of the "
                                    "run: add --switch-data)"), where=str(path))
    check_resume(old.get("config", {}), new["config"], may_change=RESUME_MAY_CHANGE,
                 old_defaults=RESUME_OLD_DEFAULTS, name=lambda k: "--" + k.replace("_", "-"),
                 message=message, where=str(path))
    return old


@dataclasses.dataclass
class _Run:
    """What ``train`` builds before its first step: the student, the tokenized selection,
    the step plan and packing shape, the compiled trainer and run_config.json's content."""

    student: object
    examples: list
    plan: StepPlan
    row_len: int
    rows: int
    trainer: Trainer
    config: dict

    def packed(self, start: int, stop: int, tokens: dict[int, int]):
        """Each step's (step, micro-batches, D) from ``start`` to ``stop`` (run by a host
        thread, cfg.prefetch ahead); records the step's tokens over every process in
        ``tokens``."""
        cfg, n_proc = self.trainer.cfg, jax.process_count()
        for s in range(start, stop):
            idx = self.plan.step_indices(s)
            tokens[s] = step_tokens(self.examples, idx)
            yield s, list(step_microbatches(
                self.examples, idx, self.row_len, self.rows, row_multiple=self.n_data,
                objective=cfg.objective, process=jax.process_index(), n_processes=n_proc)), \
                step_denominator(self.examples, idx, cfg.objective)

    @property
    def n_data(self) -> int:
        return self.trainer.mesh.shape["data"]


def _set_up(student_dir, data, cfg: TrainConfig, mesh) -> _Run:
    """Load the student, tokenize the selection, choose the packing shape and remat, and
    compile nothing yet (the first step does)."""
    n_proc = jax.process_count()
    if n_proc > 1 and len({d.process_index for d in mesh.devices.flat}) != n_proc:
        raise LarkError("multi-process training needs one mesh over every process's devices "
                        "(make_mesh() over jax.devices())")
    student = load_student(student_dir, "float32", mesh=mesh, attn_impl=cfg.attention)
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
    config = {"student": str(student_dir), "data": str(data), "config": dataclasses.asdict(cfg),
              "n_examples": len(examples), "n_skipped": n_skipped, "total_steps": total,
              "steps_per_epoch": plan.steps_per_epoch, "row_length": row_len,
              "rows_per_microbatch": rows, "remat": remat,
              "warmup_steps": warmup_steps(cfg, total), "devices": int(mesh.devices.size),
              "processes": n_proc}
    return _Run(student, examples, plan, row_len, rows,
                Trainer(student.model, cfg, total, mesh, remat=remat), config)


def _run_dir(out_dir, resume: bool) -> tuple[Path, Path]:
    """The run directory and its checkpoints/; refuses links planted in it, and checkpoints
    left by an earlier run unless resuming."""
    out_dir = fsio.refuse_link(out_dir)
    ckpt_dir = (out_dir / "checkpoints").absolute()
    for p in (ckpt_dir, *(out_dir / f for f in ("metrics.jsonl", "run_config.json", "loss.png",
                                                "final"))):
        fsio.refuse_link(p)  # a link planted in the run directory is not followed
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
        raise LarkError("run directory already has checkpoints; pass --resume to continue or "
                        "choose a new --out", where=str(out_dir))
    return out_dir, ckpt_dir


def _export(run: _Run, out_dir: Path, cfg: TrainConfig) -> Path:
    """final/ (HF layout) and loss.png, written by process 0 from weights gathered to it."""
    run.trainer.opt_state = None  # export needs only the weights: free Adam's two moments
    final = out_dir / "final"
    # Several processes: every one takes part in gathering the weights; process 0 writes.
    model = run.trainer.model() if jax.process_count() == 1 else run.trainer.host_model()
    if jax.process_index() == 0:
        save_student(model, final, run.student.tokenizer, dtype=resolve_dtype(cfg.export_dtype),
                     overwrite=True)
    del model
    if jax.process_index() == 0:
        plot_loss(out_dir / "metrics.jsonl", out_dir / "loss.png")
    barrier("lark_jax_train_written")  # no process reports before final/ exists
    return final


def train(student_dir: str | Path, data: str | Path, out_dir: str | Path,
          cfg: TrainConfig = TrainConfig(), *, resume: bool = False, switch_data: bool = False,
          mesh=None, progress: Callable[..., None] | None = None) -> TrainSummary:
    """Fine-tune the student on a selection file; writes checkpoints, metrics, plot, final/.

    ``progress(step, total, loss=..., tok_s=...)`` is called after every step.

    In pieces (iterative selection): ``cfg.stop_after = s`` trains up to global step s of
    the run's schedule and exports that state to final/ (score the pool with it, select
    again); ``resume=True, switch_data=True`` then goes on from the checkpoint on ``data``,
    a new selection: step t >= s trains the records ``StepPlan.step_indices(t)`` of the new
    file, the weights, Adam moments and schedule go on as in one run (which needs the same
    total steps: fix it with ``max_steps``). run_config.json's ``data_history`` lists each
    file and the step it took over from. Pieces on the same file compute exactly the
    uninterrupted run.

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
    cfg.validate()
    t0 = time.perf_counter()
    out_dir, ckpt_dir = _run_dir(out_dir, resume)
    check_same_settings({"student": str(student_dir), "data": str(data),
                         "out": str(out_dir), "resume": resume, "switch_data": switch_data,
                         **{"--" + k.replace("_", "-"): v
                            for k, v in dataclasses.asdict(cfg).items()}}, "train")
    if switch_data and not resume:
        raise LarkError("--switch-data continues a run: it needs --resume")
    run = _set_up(student_dir, data, cfg, mesh if mesh is not None else make_mesh())
    history = [{"from_step": 0, "data": str(data)}]
    if resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        old = _check_resume_settings(out_dir / "run_config.json", run.config, switch_data)
        history = old.get("data_history", [{"from_step": 0, "data": old.get("data")}])
    elif switch_data:
        raise LarkError("--switch-data: the run has no checkpoint to continue from",
                        where=str(out_dir))
    barrier("lark_jax_train_checked")  # every process has read run_config.json
    lead = jax.process_index() == 0
    total, tokens = run.plan.total_steps, {}
    stop = min(cfg.stop_after or total, total)
    ckpt = Checkpointer(ckpt_dir, run.trainer, save_every=cfg.save_every, keep=cfg.keep)
    with contextlib.closing(ckpt):
        start = ckpt.restore() if resume else None
        if (start or 0) > stop:
            raise LarkError(f"the run is already at step {start}, past --stop-after {stop}",
                            where=str(out_dir))
        if switch_data:  # this file trains from the checkpoint's step on
            history = [h for h in history if h["from_step"] < start]
            history.append({"from_step": start, "data": str(data)})
        run.config["data_history"] = history
        if lead:
            fsio.make_dir(out_dir)
            fsio.atomic_write(out_dir / "run_config.json",
                              json.dumps(run.config, indent=2) + "\n")
        metrics = MetricsWriter(out_dir / "metrics.jsonl", enabled=lead, resumed_from=start)
        hooks = [metrics, LossGuard(), ckpt, Progress(progress, total)]
        with contextlib.closing(metrics), \
                contextlib.closing(prefetch(run.packed(start or 0, stop, tokens),
                                            cfg.prefetch)) as items:
            ran = train_loop(run.trainer, items, hooks, step_tokens=tokens.pop,
                             steps_per_epoch=run.plan.steps_per_epoch)
        ckpt.finish(stop)
    final = _export(run, out_dir, cfg)
    return TrainSummary(stop, start or 0, ran.loss, ran.tokens, time.perf_counter() - t0,
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

