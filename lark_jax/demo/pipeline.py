"""The demo pipeline: task -> student -> score -> select -> fine-tune -> evaluate -> report.

``run_demo(out_dir, quick=...)`` runs the whole LARK recipe on the embedded task with the
project's own stages (``score_pool``, ``selection.select``, ``train``, ``run_eval``) and
writes ``results.md``, ``results.json`` and two PNG plots. What is measured:

Per method (LARK and the baselines, one selection per seed, budget B per problem; all
methods fine-tune the same cached student for the same number of optimizer steps):

* ``acc@k`` and ``pass@1`` on the held-out benchmark: k samples per problem at temperature
  ``temperature`` / ``top_p``, first ``\\boxed{}`` answer (or last number) checked with
  ``is_equivalent`` (``lark_jax.evaluation.run_eval``).
* ``ref_loss``: mean cross-entropy per assistant token of the fine-tuned student on the
  benchmark's *reference solutions* (one ``a op b = r.`` per operation, then the boxed
  answer; no teacher writes exactly this). Lower is better. It measures style as well as
  arithmetic: fine-tuning towards any one teacher's style can raise it.
* ``step_acc``: share of intermediate results ``r`` of those reference solutions that the
  student predicts exactly (greedy, teacher-forced on the reference prefix): can it do the
  arithmetic, whatever it would write on its own. Informative when ACC@k is near 0.

Diagnostics (the paper's two plots):

* SFT loss curves of every method (seed of the first run) on one chart.
* LARK score vs measured training utility. Per teacher: the LARK score is the mean ĝ of the
  teacher's trajectories; its *utility* is the drop of ``ref_loss`` (base student minus
  student fine-tuned only on that teacher's pool trajectories, same steps, lr and batch as
  the methods, first seed). Per trajectory: ρ_k = Brier/L, LARK's predicted rate of loss
  decrease, against the measured rate ``log(L_before / L_after)`` of the same trajectory
  after the ``all`` run (fine-tuning on the whole pool). Spearman correlations of both.

Seeds vary the training data order, the random baseline's choice and the evaluation's
sampling; the task, the student and the scores are the same for every seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from lark_jax import fsio
from lark_jax.demo.student import StudentRecipe, build_student, cache_root
from lark_jax.demo.task import TEACHERS, TaskConfig, build_task
from lark_jax.errors import LarkError
from lark_jax.shapes import pow2_length

METHODS = ("lark", "random", "all", "min-loss", "max-loss", "rsr", "shortest", "longest")
MARKER = "demo.json"  # identifies a directory written by run_demo (safe to overwrite)
OWNED = ("task", "scores.json", "selections", "runs", "evals", "utility", "diagnostics",
         "plots", "results.md", "results.json", MARKER)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything a demo run depends on. Build one with :func:`demo_config`."""

    preset: str
    task: TaskConfig
    student: StudentRecipe
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    budget: int = 1  # trajectories per problem (LARK's B; every baseline gets the same)
    steps: int = 60  # optimizer steps of every fine-tune
    batch_size: int = 16
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    top_k: int = 50  # Brier top-K of the scores (the reference's default)
    eval_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 200  # the longest teacher (rambler) writes under 190 tokens
    utility: bool = True  # per-teacher fine-tunes for the utility diagnostic
    max_length: int = 512
    row_length: int = 256

    def validate(self) -> None:
        self.task.validate()
        self.student.validate()
        if not self.seeds:
            raise LarkError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise LarkError(f"seeds must be distinct, got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise LarkError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if "lark" not in self.methods:
            raise LarkError("the demo compares LARK with baselines: 'lark' must be a method")
        for name in ("budget", "steps", "batch_size", "eval_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise LarkError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise LarkError("lr must be > 0")


def demo_config(quick: bool = False, *, tiny: bool = False, seeds=None, **overrides
                ) -> DemoConfig:
    """The presets: full (default), ``quick`` (one seed, smaller), ``tiny`` (tests and CI).

    full   400-problem pool, 128-problem benchmark, 3.1M-parameter Llama student (hidden 256,
           4 layers) pre-trained 600 steps, 80-step fine-tunes, ACC@5, seeds 0, 1, 2.
    quick  160-problem pool, 64-problem benchmark, 0.8M-parameter student (hidden 128, 4
           layers) pre-trained 200 steps, 30-step fine-tunes, ACC@4, seed 0.
    tiny   a few problems and steps: checks that everything runs, measures nothing.
    """
    if tiny:
        cfg = DemoConfig(
            preset="tiny",
            task=TaskConfig(n_pool=12, n_bench=6, n_pretrain=48),
            student=StudentRecipe(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=128, vocab_size=320, pretrain_steps=6,
                                  batch_size=8),
            seeds=(0,), steps=3, batch_size=8, eval_samples=2, max_new_tokens=24)
    elif quick:
        cfg = DemoConfig(
            preset="quick",
            task=TaskConfig(n_pool=160, n_bench=64, n_pretrain=1200),
            student=StudentRecipe(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                  intermediate_size=352, pretrain_steps=200, batch_size=16),
            seeds=(0,), steps=30, eval_samples=4)
    else:
        cfg = DemoConfig(
            preset="full",
            task=TaskConfig(n_pool=400, n_bench=128, n_pretrain=3000),
            student=StudentRecipe(pretrain_steps=600, batch_size=32),
            seeds=(0, 1, 2), steps=80, eval_samples=5)
    if seeds is not None:
        overrides["seeds"] = tuple(int(s) for s in seeds)
    return dataclasses.replace(cfg, **overrides)


# -- small helpers -----------------------------------------------------------------------


class _Silent:
    """The reporter used when none is given: no output at all."""

    @contextlib.contextmanager
    def bar(self, total, desc, unit="it"):
        yield lambda n=1, total=None, **postfix: None

    def info(self, msg: str) -> None:
        pass


def spearman(x, y) -> float:
    """Spearman rank correlation of the finite pairs (average ranks for ties); NaN when fewer
    than three pairs or either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan

    def ranks(a):
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=np.float64)
        _, inv = np.unique(a, return_inverse=True)
        return (np.bincount(inv, r) / np.bincount(inv))[inv]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def _num(x):
    """A JSON-safe number: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _write_text(path: Path, text: str) -> None:
    fsio.atomic_write(path, text)


def _write_jsonl(path: Path, rows) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def compilation_cache(path: Path | None):
    """Use JAX's persistent compilation cache in ``path`` for the duration (unless the user
    configured one already): the demo's many fine-tunes and evaluations compile the same
    programs again and again, and XLA compilation dominates their time on a CPU."""
    if path is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        cc.reset_cache()


def _prepare_out(out: Path) -> None:
    """Create ``out``; a directory from an earlier demo run is cleared, anything else refused."""
    if out.is_symlink():
        raise LarkError("refusing to write through a symbolic link", where=str(out))
    if out.exists() and not out.is_dir():
        raise LarkError("output path exists and is not a directory", where=str(out))
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise LarkError("output directory is not empty and holds no earlier demo run; "
                            "choose another --out", where=str(out))
        for name in OWNED:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -- held-out metrics on fixed texts -------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_stats(graphdef, state, ids):
    """Per position t >= 1: CE of token t given tokens < t, and whether argmax hits it."""
    import jax.numpy as jnp
    from flax import nnx

    z = nnx.merge(graphdef, state)(ids).astype(jnp.float32)[:, :-1]
    y = ids[:, 1:]
    ce = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]
    return ce, jnp.argmax(z, axis=-1) == y


@dataclasses.dataclass
class HeldOut:
    """Fixed chat records whose assistant tokens we evaluate, with marked answer spans."""

    ids: list[np.ndarray]
    start: list[int]  # first assistant token
    marks: list[list[list[int]]]  # per record, per marked number: its token indices


def prepare_heldout(tokenizer, records: list[dict], mark=r"= (\d+)") -> HeldOut:
    """Tokenize records as the scorer and trainer do; mark the tokens of every number that
    ``mark`` (group 1) finds in the assistant text."""
    from lark_jax.data.chat import tokenize_record

    ids, starts, marks = [], [], []
    for r in records:
        msgs = r["messages"]
        tok = tokenize_record(tokenizer, msgs, 1 << 20)
        prompt = tokenizer.apply_chat_template([m for m in msgs if m["role"] != "assistant"],
                                               tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != tok.ids.tolist():
            raise LarkError("tokenizer offsets disagree with the chat tokenization")
        offsets = enc["offset_mapping"]
        content = msgs[-1]["content"]
        base = len(prompt)
        rec_marks = []
        for m in re.finditer(mark, content):
            a, b = base + m.start(1), base + m.end(1)
            toks = [j for j, (s, e) in enumerate(offsets) if s < b and e > a and j >= tok.start]
            if toks:
                rec_marks.append(toks)
        ids.append(tok.ids)
        starts.append(tok.start)
        marks.append(rec_marks)
    return HeldOut(ids, starts, marks)


def heldout_metrics(student, held: HeldOut, batch: int = 32) -> dict:
    """``loss``: Σ CE / Σ tokens over the assistant tokens; ``marked_acc``: share of marked
    numbers whose every token is the student's argmax (teacher-forced); ``per_record``: mean
    CE of each record."""
    from flax import nnx

    graphdef, state = nnx.split(student.model)
    pad = student.tokenizer.pad_token_id or 0
    num = den = 0.0
    hit = total = 0
    per_record = []
    for s in range(0, len(held.ids), batch):
        chunk = held.ids[s:s + batch]
        length = pow2_length(max(len(x) for x in chunk))
        arr = np.full((batch, length), pad, np.int32)
        for i, x in enumerate(chunk):
            arr[i, :len(x)] = x
        ce, ok = jax.device_get(_token_stats(graphdef, state, arr))
        for i, x in enumerate(chunk):
            r = s + i
            js = np.arange(max(held.start[r], 1), len(x))  # predicted tokens
            c = ce[i, js - 1].astype(np.float64)
            num += c.sum()
            den += len(js)
            per_record.append(float(c.mean()) if len(js) else math.nan)
            for toks in held.marks[r]:
                total += 1
                hit += bool(all(ok[i, j - 1] for j in toks))
    return {"loss": num / den if den else math.nan,
            "marked_acc": hit / total if total else math.nan, "per_record": per_record}


# -- the pipeline ---------------------------------------------------------------------------


@dataclasses.dataclass
class DemoResult:
    out_dir: Path
    results: dict  # what results.json holds
    markdown: str  # what results.md holds
    plots: dict[str, Path]
    seconds: float


def _selection_records(table, sel, found) -> tuple[list[dict], dict]:
    """Training records of a Selection (as ``lark-jax select`` writes them) and the share of
    train weight per teacher."""
    from lark_jax.selection.io import json_number

    rows, cols = np.nonzero(sel.chosen)
    recs, mix = [], {t: 0.0 for t in TEACHERS}
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        pid, cid = int(table.problem_ids[r]), int(table.candidate_ids[r, c])
        teacher, messages = found[(pid, cid)]
        w = float(sel.weights[r, c] * sel.train_scale)
        recs.append({"messages": list(messages),
                     "meta": {"problem_id": pid, "candidate_id": cid, "teacher": teacher,
                              "policy": sel.policy, "budget": sel.budget,
                              "score": json_number(sel.score[r, c]), "train_weight": w}})
        mix[teacher] = mix.get(teacher, 0.0) + w
    total = sum(mix.values()) or 1.0
    return recs, {t: v / total for t, v in mix.items()}


def run_demo(out_dir: str | os.PathLike = "lark-jax-demo", *, quick: bool = False,
             tiny: bool = False, seeds=None, config: DemoConfig | None = None, mesh=None,
             cache_dir: str | os.PathLike | None = None, rebuild_student: bool = False,
             reporter=None, persistent_compilation_cache: bool = True) -> DemoResult:
    """Run the demo end to end and write its results into ``out_dir``.

    Args:
      out_dir: output directory (created; a directory of an earlier demo run is cleared).
      quick / tiny / seeds: preset choice (see :func:`demo_config`); ``config`` overrides them.
      mesh: the device mesh for every stage (default: all devices on "data").
      cache_dir: where the student is cached (default ``$LARK_JAX_CACHE`` or
        ``~/.cache/lark-jax``).
      rebuild_student: build the student even if a cached one exists.
      reporter: an object with ``bar(total, desc, unit)`` (a context manager yielding
        ``advance(n, total=None, **postfix)``) and ``info(msg)``, such as
        ``lark_jax.progress.Reporter``; default silent.
      persistent_compilation_cache: cache compiled XLA programs under the cache directory
        while the demo runs (see :func:`compilation_cache`); a cache the user configured
        is used as is.
    """
    cfg = config if config is not None else demo_config(quick, tiny=tiny, seeds=seeds)
    cfg.validate()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    with compilation_cache(root / "jax-compilation-cache" if persistent_compilation_cache
                           else None):
        return _run_demo(out_dir, cfg, mesh, cache_dir, rebuild_student, reporter)


def _run_demo(out_dir, cfg: DemoConfig, mesh, cache_dir, rebuild_student,
              reporter) -> DemoResult:
    from lark_jax.evaluation import EvalConfig, load_benchmark, run_eval
    from lark_jax.learnability.runner import ScoreConfig, score_pool
    from lark_jax.models import load_student
    from lark_jax.parallel import make_mesh, mesh_summary
    from lark_jax.selection import load_scores, select
    from lark_jax.selection.io import gather_pool, write_selection
    from lark_jax.training.trainer import TrainConfig, train

    t_start = time.perf_counter()
    rep = reporter if reporter is not None else _Silent()
    out = Path(out_dir)
    _prepare_out(out)
    _write_text(out / MARKER, json.dumps({"lark_jax_demo": 1, "preset": cfg.preset}) + "\n")
    mesh = mesh if mesh is not None else make_mesh()
    rep.info(f"lark-jax demo ({cfg.preset}) on {mesh_summary(mesh)} -> {out}")
    timings: dict[str, float] = {}

    # 1. task
    t0 = time.perf_counter()
    task = build_task(cfg.task)
    files = task.write(out / "task")
    rep.info(f"task: {cfg.task.n_pool} pool problems x {len(task.pool) // cfg.task.n_pool} "
             f"candidates, {cfg.task.n_bench} benchmark problems, "
             f"{cfg.task.n_pretrain} pre-training problems")
    timings["task"] = time.perf_counter() - t0

    # 2. student
    with rep.bar(cfg.student.pretrain_steps, "build student", unit="step") as advance:
        built = build_student(
            cfg.student, task.pretrain, cfg.task.corpus_recipe(), cache_dir=cache_dir,
            mesh=mesh, rebuild=rebuild_student, info=rep.info,
            progress=lambda step, total, loss, tok_s: advance(1, loss=f"{loss:.3f}"))
    timings["student"] = built.seconds
    rep.info(f"student: {built.num_params:,} parameters, vocabulary {built.vocab_size}, "
             f"{'cached' if built.cached else 'built'} in {built.seconds:.0f}s: {built.path}")
    base = load_student(built.path, mesh=mesh)
    reference = prepare_heldout(base.tokenizer, task.reference)
    teacher_held = {t: prepare_heldout(base.tokenizer, [
        {"messages": r["messages"]} for r in task.bench_trajectories if r["teacher"] == t])
        for t in TEACHERS}

    def heldout(student, teachers: bool = False) -> dict:
        ref = heldout_metrics(student, reference)
        res = {"ref_loss": ref["loss"], "step_acc": ref["marked_acc"]}
        if teachers:  # each teacher's own held-out trajectories (utility diagnostics)
            res["teacher_loss"] = {t: heldout_metrics(student, h)["loss"]
                                   for t, h in teacher_held.items()}
        return res

    # 3. score the pool with the untouched student
    t0 = time.perf_counter()
    score_cfg = ScoreConfig(top_k=cfg.top_k, max_length=cfg.max_length,
                            row_length=cfg.row_length, batch_tokens=16 * cfg.row_length)
    scores_path = out / "scores.json"
    with rep.bar(len(task.pool), "score pool", unit="traj") as advance:
        score_pool(base, files["pool"], scores_path, score_cfg, student_name="demo-student",
                   progress=lambda n, tokens: advance(n))
    timings["score"] = time.perf_counter() - t0

    # 4. the untouched student on the benchmark
    bench = load_benchmark(files["benchmark"])
    eval_cfg = dict(samples=cfg.eval_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, system_prompt="",
                    batch_size=min(256, cfg.eval_samples * len(bench.problems)))

    def evaluate(student, name: str, seed: int) -> dict:
        with rep.bar(cfg.eval_samples * len(bench.problems), f"eval {name}",
                     unit="sample") as advance:
            res = run_eval(student, bench, out / "evals" / name,
                           EvalConfig(seed=seed, **eval_cfg), model_name=name,
                           progress=advance)
        s = res.summary
        acc = next(v for k, v in s.items() if re.fullmatch(r"acc@\d+", k))
        return {"acc": acc, "pass@1": s["pass@1"], "no_answer": s["no_answer_samples"]
                / (cfg.eval_samples * len(bench.problems))}

    t0 = time.perf_counter()
    base_metrics = {**evaluate(base, "base", cfg.seeds[0]), **heldout(base, teachers=True)}
    timings["eval_base"] = time.perf_counter() - t0

    # 5. select, fine-tune, evaluate: every method, every seed
    table = load_scores(scores_path, need=("g_hat", "L", "rho", "rsr", "tokens"))
    found, _ = gather_pool(files["pool"], table, set(table.keys()))
    row_tokens = cfg.row_length * 8

    def finetune(data: Path, run: Path, seed: int, desc: str) -> tuple[dict, object]:
        tcfg = TrainConfig(epochs=10**6, max_steps=cfg.steps, lr=cfg.lr,
                           batch_size=cfg.batch_size, max_length=cfg.max_length,
                           warmup_ratio=cfg.warmup_ratio, micro_batch_tokens=row_tokens,
                           seed=seed, keep=1)
        with rep.bar(cfg.steps, desc, unit="step") as advance:
            s = train(built.path, data, run, tcfg, mesh=mesh,
                      progress=lambda step, total, loss, tok_s: advance(1, loss=f"{loss:.3f}"))
        # The orbax checkpoints are only for resuming; the exported final/ is what we keep.
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        tuned = load_student(s.final_dir, mesh=mesh)
        return {"final_train_loss": s.final_loss, "train_seconds": s.seconds}, tuned

    runs: dict[str, dict[int, dict]] = {m: {} for m in cfg.methods}
    mixes: dict[str, dict] = {}
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        for method in cfg.methods:
            sel = select(table, method, cfg.budget, seed=seed)
            recs, mix = _selection_records(table, sel, found)
            mixes.setdefault(method, mix)
            data = out / "selections" / f"{method}-s{seed}.jsonl"
            write_selection(data, recs, {"policy": method, "budget": cfg.budget, "seed": seed,
                                         "n_records": len(recs), "teacher_mix": mix})
            name = f"{method}-s{seed}"
            info, tuned = finetune(data, out / "runs" / name, seed, f"train {name}")
            info.update(n_records=len(recs), teacher_mix=mix)
            info.update(evaluate(tuned, name, seed))
            info.update(heldout(tuned))
            runs[method][seed] = info
            rep.info(f"{name}: acc {info['acc']:.3f}  ref_loss {info['ref_loss']:.3f}  "
                     f"step_acc {info['step_acc']:.3f}")
    timings["methods"] = time.perf_counter() - t0

    # 6. diagnostics: per-teacher utility and per-trajectory rates
    t0 = time.perf_counter()
    diagnostics = _diagnostics(cfg, task, table, files, out, base_metrics, heldout, finetune,
                               runs, score_pool, score_cfg, mesh, rep)
    timings["diagnostics"] = time.perf_counter() - t0

    # 7. report
    plots = _plots(cfg, out, runs, diagnostics)
    results = _results(cfg, built, base_metrics, runs, diagnostics, timings, t_start)
    markdown = render_markdown(results)
    _write_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    _write_text(out / "results.md", markdown)
    return DemoResult(out, results, markdown, plots, time.perf_counter() - t_start)


def _diagnostics(cfg, task, table, files, out, base_metrics, heldout, finetune, runs,
                 score_pool, score_cfg, mesh, rep) -> dict:
    from lark_jax.models import load_student
    from lark_jax.selection import load_scores

    g = table.fields["g_hat"]
    rho = table.fields["rho"]
    loss0 = table.fields["L"]
    teacher_of = np.array([[t for t in row] + [""] * (g.shape[1] - len(row))
                           for row in table.teachers])
    per_teacher = {}
    seed = cfg.seeds[0]
    for t in TEACHERS:
        sel = table.mask & (teacher_of == t)
        per_teacher[t] = {"lark_score": float(np.nanmean(np.where(sel, g, np.nan))),
                          "rho": float(np.nanmean(np.where(sel, rho, np.nan))),
                          "L": float(np.nanmean(np.where(sel, loss0, np.nan)))}
    if cfg.utility:
        for t in TEACHERS:
            data = out / "utility" / f"{t}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            _write_jsonl(data, ({"messages": r["messages"],
                                 "meta": {"problem_id": r["problem_id"],
                                          "candidate_id": r["candidate_id"], "teacher": t,
                                          "train_weight": 1.0}}
                                for r in task.pool if r["teacher"] == t))
            info, tuned = finetune(data, out / "utility" / t, seed, f"utility {t}")
            h = heldout(tuned, teachers=True)
            per_teacher[t].update(
                utility=base_metrics["ref_loss"] - h["ref_loss"],
                step_acc_gain=h["step_acc"] - base_metrics["step_acc"],
                own_rate=math.log(base_metrics["teacher_loss"][t] / h["teacher_loss"][t]),
                final_train_loss=info["final_train_loss"])
            rep.info(f"utility {t}: mean g_hat {per_teacher[t]['lark_score']:+.4f}  "
                     f"ref_loss drop {per_teacher[t]['utility']:+.4f}")
    teachers = list(TEACHERS)
    col = lambda k: [per_teacher[t].get(k, math.nan) for t in teachers]  # noqa: E731
    diag = {"per_teacher": per_teacher,
            "spearman_teacher_utility": spearman(col("lark_score"), col("utility")),
            "spearman_teacher_step_acc": spearman(col("lark_score"), col("step_acc_gain")),
            "spearman_teacher_rho_own_rate": spearman(col("rho"), col("own_rate"))}
    # Per trajectory: rescore the pool with the student fine-tuned on all of it.
    if "all" in runs and seed in runs["all"]:
        after = out / "diagnostics" / "scores_after_all.json"
        tuned = load_student(out / "runs" / f"all-s{seed}" / "final", mesh=mesh)
        with rep.bar(len(task.pool), "rescore pool", unit="traj") as advance:
            score_pool(tuned, files["pool"], after, score_cfg, student_name="all-finetuned",
                       progress=lambda n, tokens: advance(n))
        t2 = load_scores(after, need=("L",))
        if not (np.array_equal(t2.candidate_ids, table.candidate_ids)
                and np.array_equal(t2.problem_ids, table.problem_ids)):
            raise LarkError("the rescored pool does not match the original scores")
        rate = np.log(loss0 / t2.fields["L"])
        m = table.mask
        diag["per_trajectory"] = {
            "teacher": teacher_of[m].tolist(), "rho": rho[m].tolist(), "g_hat": g[m].tolist(),
            "L_before": loss0[m].tolist(), "L_after": t2.fields["L"][m].tolist(),
            "rate": rate[m].tolist()}
        diag["spearman_traj_rho_rate"] = spearman(rho[m], rate[m])
        diag["spearman_traj_ghat_rate"] = spearman(g[m], rate[m])
    return diag


# -- report -----------------------------------------------------------------------------------

_TEACHER_COLORS = {"stepwise": "tab:blue", "terse": "tab:orange", "stack": "tab:green",
                   "careless": "tab:red", "rambler": "tab:purple", "answer_only": "tab:brown"}


def _plots(cfg, out: Path, runs, diag) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lark_jax.training.trainer import plot_loss

    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seeds[0]
    loss_png = plots_dir / "sft_loss.png"
    methods = [m for m in cfg.methods if seed in runs[m]]
    plot_loss([out / "runs" / f"{m}-s{seed}" / "metrics.jsonl" for m in methods], loss_png,
              labels=methods)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    pt = diag["per_teacher"]
    for t, v in pt.items():
        y = v.get("utility", math.nan)
        ax.scatter(v["lark_score"], y, color=_TEACHER_COLORS.get(t), s=50)
        ax.annotate(t, (v["lark_score"], y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("LARK score (mean ĝ of the teacher's trajectories)")
    ax.set_ylabel("utility: drop of held-out reference loss")
    ax.set_title(f"per teacher, Spearman {_fmt_r(diag['spearman_teacher_utility'])}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax = axes[1]
    traj = diag.get("per_trajectory")
    if traj:
        teach = np.array(traj["teacher"])
        for t in TEACHERS:
            sel = teach == t
            ax.scatter(np.array(traj["rho"])[sel], np.array(traj["rate"])[sel], s=6,
                       alpha=0.6, color=_TEACHER_COLORS.get(t), label=t)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_title(f"per trajectory, Spearman {_fmt_r(diag['spearman_traj_rho_rate'])}")
    else:
        ax.set_title("per trajectory: needs the 'all' method")
    ax.set_xlabel("ρ = Brier / L (LARK's predicted rate)")
    ax.set_ylabel("measured rate log(L_before / L_after), 'all' run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    util_png = plots_dir / "lark_vs_utility.png"
    with fsio.atomic_file(util_png, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return {"sft_loss": loss_png, "lark_vs_utility": util_png}


def _fmt_r(r) -> str:
    return "n/a" if r is None or not math.isfinite(r) else f"{r:+.2f}"


_METRICS = (("acc", "ACC@k", 100.0, True), ("pass@1", "pass@1", 100.0, True),
            ("ref_loss", "ref loss", 1.0, False), ("step_acc", "step acc", 100.0, True))


def _results(cfg, built, base_metrics, runs, diag, timings, t_start) -> dict:
    rows = []
    for m in cfg.methods:
        seeds = sorted(runs[m])
        row = {"method": m, "n_seeds": len(seeds),
               "n_records": runs[m][seeds[0]]["n_records"],
               "teacher_mix": runs[m][seeds[0]]["teacher_mix"]}
        for key, _, _, _ in _METRICS + (("final_train_loss", "", 1, False),):
            mean, std = _mean_std([runs[m][s][key] for s in seeds])
            row[key] = {"mean": _num(mean), "std": _num(std),
                        "per_seed": [_num(runs[m][s][key]) for s in seeds]}
        rows.append(row)
    base = {k: _num(base_metrics[k]) for k in ("acc", "pass@1", "ref_loss", "step_acc")}

    def best(key, higher):
        """The best method by mean, or "tie: a, b" ("all tied") when several share it."""
        vals = [(r[key]["mean"], r["method"]) for r in rows if r[key]["mean"] is not None]
        if not vals:
            return None
        top = (max if higher else min)(v for v, _ in vals)
        tied = [m for v, m in vals if v == top]
        if len(tied) == 1:
            return tied[0]
        return "all tied" if len(tied) == len(vals) else "tie: " + ", ".join(tied)

    winners = {key: best(key, higher) for key, _, _, higher in _METRICS}
    per_traj = diag.get("per_trajectory")
    return {
        "preset": cfg.preset,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "student": {"path": str(built.path), "num_params": built.num_params,
                    "vocab_size": built.vocab_size, "pretrain_steps": built.pretrain_steps,
                    "pretrain_final_loss": _num(built.final_loss), "cached": built.cached,
                    "seconds": built.seconds},
        "k": cfg.eval_samples,
        "base": base,
        "methods": rows,
        "best": winners,
        "lark_wins": {k: v == "lark" for k, v in winners.items()},
        "diagnostics": {
            "per_teacher": {t: {k: _num(v) for k, v in d.items()}
                            for t, d in diag["per_teacher"].items()},
            "spearman_teacher_utility": _num(diag["spearman_teacher_utility"]),
            "spearman_teacher_step_acc": _num(diag["spearman_teacher_step_acc"]),
            "spearman_teacher_rho_own_rate": _num(diag["spearman_teacher_rho_own_rate"]),
            "spearman_traj_rho_rate": _num(diag.get("spearman_traj_rho_rate")),
            "spearman_traj_ghat_rate": _num(diag.get("spearman_traj_ghat_rate")),
            "n_trajectories": len(per_traj["rho"]) if per_traj else 0,
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _cell(stat: dict, scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    s = f"{stat['mean'] * scale:.{digits}f}"
    if len(stat["per_seed"]) > 1 and stat["std"] is not None:
        s += f" ± {stat['std'] * scale:.{digits}f}"
    return s


def render_markdown(results: dict) -> str:
    """The results table and diagnostics as markdown (what ``results.md`` holds)."""
    cfg = results["config"]
    k = results["k"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    seeds_note = (f"Mean ± std over seeds {seeds}." if len(cfg["seeds"]) > 1
                  else f"One seed ({seeds}): no spread.")
    lines = [f"# lark-jax demo results ({results['preset']})", ""]
    st = results["student"]
    lines += [
        f"Student: {st['num_params']:,}-parameter {cfg['student']['family']} "
        f"(hidden {cfg['student']['hidden_size']}, {cfg['student']['num_layers']} layers, "
        f"vocabulary {st['vocab_size']}), pre-trained {st['pretrain_steps']} steps. "
        f"Pool: {cfg['task']['n_pool']} problems x 8 candidates from 6 teachers; benchmark: "
        f"{cfg['task']['n_bench']} held-out problems. Every method: budget "
        f"{cfg['budget']} per problem ('all' keeps every candidate), {cfg['steps']} "
        f"optimizer steps of {cfg['batch_size']} records, lr {cfg['lr']:g}. " + seeds_note,
        "",
        f"| method | ACC@{k} (%) | pass@1 (%) | ref loss ↓ | step acc (%) | final SFT loss |",
        "|---|---|---|---|---|---|",
    ]
    b = results["base"]
    fmt = lambda x, s, d: "n/a" if x is None else f"{x * s:.{d}f}"  # noqa: E731
    lines.append(f"| base (no fine-tuning) | {fmt(b['acc'], 100, 1)} | "
                 f"{fmt(b['pass@1'], 100, 1)} | {fmt(b['ref_loss'], 1, 3)} | "
                 f"{fmt(b['step_acc'], 100, 1)} | - |")
    for r in results["methods"]:
        name = f"**{r['method']}**" if r["method"] == "lark" else r["method"]
        lines.append(f"| {name} | {_cell(r['acc'], 100, 1)} | {_cell(r['pass@1'], 100, 1)} | "
                     f"{_cell(r['ref_loss'], 1, 3)} | {_cell(r['step_acc'], 100, 1)} | "
                     f"{_cell(r['final_train_loss'], 1, 3)} |")
    best = results["best"]
    lines += ["", "Best method per column: " + ", ".join(
        f"{label} {best[key]}" for key, label, _, _ in _METRICS) + ". "
        + ("LARK is best on " + ", ".join(label for key, label, _, _ in _METRICS
                                          if results['lark_wins'][key]) + "."
           if any(results["lark_wins"].values()) else "LARK is best on none of them."), ""]
    lines += [f"One benchmark problem is {100 / cfg['task']['n_bench']:.1f} points of ACC@{k}: "
              "differences of a few points are within sampling noise"
              + (" (one seed, no spread to judge them by)." if len(cfg["seeds"]) == 1
                 else "."), ""]
    accs = [r["acc"]["mean"] for r in results["methods"] if r["acc"]["mean"] is not None]
    if not accs or max(accs) < 0.05:
        lines += [f"ACC@{k} is near 0 for every method (a tiny CPU student): compare the "
                  "held-out reference loss and step accuracy instead.", ""]
    lines += ["Teacher mix of each selection (share of train weight):", "",
              "| method | " + " | ".join(TEACHERS) + " |",
              "|---|" + "---|" * len(TEACHERS)]
    for r in results["methods"]:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{100 * r['teacher_mix'].get(t, 0):.0f}%" for t in TEACHERS) + " |")
    d = results["diagnostics"]
    lines += ["", "Diagnostics (plots/lark_vs_utility.png):", "",
              "| teacher | mean ĝ (LARK score) | mean ρ | mean L | utility (ref-loss drop) | "
              "step-acc gain | own held-out rate |", "|---|---|---|---|---|---|---|"]
    for t, v in d["per_teacher"].items():
        f = lambda x, dg=4: "n/a" if x is None else f"{x:+.{dg}f}"  # noqa: E731
        plain = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {t} | {f(v.get('lark_score'))} | {plain(v.get('rho'))} | "
                     f"{plain(v.get('L'))} | {f(v.get('utility'))} | "
                     f"{f(v.get('step_acc_gain'), 3)} | {f(v.get('own_rate'), 3)} |")
    lines += ["",
              f"- Spearman(LARK score, utility) over teachers: "
              f"{_fmt_r(d['spearman_teacher_utility'])}; with the step-accuracy gain: "
              f"{_fmt_r(d['spearman_teacher_step_acc'])}; mean ρ vs the teacher's own "
              f"held-out loss-decrease rate: {_fmt_r(d['spearman_teacher_rho_own_rate'])}.",
              f"- Spearman(ρ_k, measured rate log(L_before/L_after)) over "
              f"{d['n_trajectories']} trajectories (after the 'all' run): "
              f"{_fmt_r(d['spearman_traj_rho_rate'])}; with ĝ_k: "
              f"{_fmt_r(d['spearman_traj_ghat_rate'])}.",
              "",
              "Definitions: ACC@k = share of benchmark problems with a correct answer among k "
              f"samples (temperature {cfg['temperature']}, top-p {cfg['top_p']}). ref loss = "
              "mean CE per assistant token on the benchmark's reference solutions (it "
              "measures style as well as arithmetic). step acc = share of the reference "
              "solutions' intermediate results predicted exactly, teacher-forced. Utility of "
              "a teacher = ref loss of the untouched student minus ref loss after fine-tuning "
              "on that teacher's pool trajectories only (same steps, lr and batch; first "
              "seed). Own held-out rate = log of the ratio of the teacher's held-out "
              "trajectory loss before/after that fine-tune.",
              "", f"Wall time {results['seconds']:.0f}s "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in results['timings_s'].items())}).", ""]
    return "\n".join(lines)
