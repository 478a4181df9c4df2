"""The demo's stages, in order, each reading and filling one :class:`DemoContext`:

    make_task -> make_student -> score -> evaluate_base -> run_methods -> diagnostics

(``report`` then turns the context into results.json, results.md and the plots). Every
stage calls the project's own entry points (``score_pool``, ``selection.select``,
``run_eval``), so the demo exercises what a user runs; the fine-tunes of one length share
one compiled step (``training.together``, which equals ``train`` run by run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lark_jax import fsio
from lark_jax.demo.config import METHOD_SPECS, DemoConfig
from lark_jax.demo.heldout import HeldOut, heldout_metrics, prepare_heldout
from lark_jax.demo.stats import correlation_ci, mean_ci, spearman
from lark_jax.demo.student import BuiltStudent, build_student
from lark_jax.demo.task import TEACHERS, Task, build_task
from lark_jax.errors import LarkError


@dataclasses.dataclass
class DemoContext:
    """What the stages share. Fields after ``timings`` are filled in stage order."""

    cfg: DemoConfig
    out: Path
    mesh: Any
    rep: Any  # reporter: bar(total, desc, unit) and info(msg)
    cache_dir: Path | None = None
    rebuild_student: bool = False
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    task: Task | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    built: BuiltStudent | None = None
    base: Any = None  # the untouched Student
    reference: HeldOut | None = None  # the benchmark's reference solutions
    teacher_held: dict[str, HeldOut] = dataclasses.field(default_factory=dict)
    bench: Any = None  # evaluation.Benchmark
    table: Any = None  # selection.ScoreTable of the untouched student
    found: dict = dataclasses.field(default_factory=dict)  # (pid, cid) -> (teacher, messages)
    base_metrics: dict = dataclasses.field(default_factory=dict)
    base_solved: np.ndarray | None = None  # [1, P] 0/1: solved within k samples
    runs: dict[str, dict[int, dict]] = dataclasses.field(default_factory=dict)
    solved: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    utility: dict[str, dict] = dataclasses.field(default_factory=dict)  # per teacher
    utility_solved: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    tuned: dict[str, Any] = dataclasses.field(default_factory=dict)  # "all": first seed's
    diagnostics: dict = dataclasses.field(default_factory=dict)
    estimate: dict = dataclasses.field(default_factory=dict)  # stage -> seconds (estimate)

    _open: list = dataclasses.field(default_factory=list, repr=False)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage into ``timings[name]`` (accumulating). Exclusive: time spent in a
        stage opened inside it counts only there, so the timings add up to the wall time."""
        frame = [time.perf_counter(), 0.0]  # start, time taken by nested stages
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - frame[0]
            self.timings[name] = self.timings.get(name, 0.0) + took - frame[1]
            if self._open:
                self._open[-1][1] += took


def _write_jsonl(path: Path, rows) -> None:
    fsio.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- 1. task, 2. student ---------------------------------------------------------------------


def make_task(ctx: DemoContext) -> None:
    cfg = ctx.cfg
    with ctx.stage("task"):
        ctx.task = build_task(cfg.task)
        ctx.files = ctx.task.write(ctx.out / "task")
    ctx.rep.info(f"task: {cfg.task.n_pool} pool problems x "
                 f"{len(ctx.task.pool) // cfg.task.n_pool} candidates, {cfg.task.n_bench} "
                 f"benchmark problems, {cfg.task.n_pretrain} pre-training problems")


def make_student(ctx: DemoContext) -> None:
    from lark_jax.evaluation import load_benchmark
    from lark_jax.models import load_student

    cfg = ctx.cfg
    with ctx.stage("student"), ctx.rep.bar(cfg.student.pretrain_steps, "build student",
                                           unit="step") as advance:
        ctx.built = build_student(
            cfg.student, ctx.task.pretrain, cfg.task.corpus_recipe(), cache_dir=ctx.cache_dir,
            mesh=ctx.mesh, rebuild=ctx.rebuild_student, info=ctx.rep.info,
            progress=lambda step, total, loss, tok_s: advance(1, loss=f"{loss:.3f}"))
    b = ctx.built
    ctx.rep.info(f"student: {b.num_params:,} parameters, vocabulary {b.vocab_size}, "
                 f"{'cached' if b.cached else 'built'} in {b.seconds:.0f}s: {b.path}")
    ctx.base = load_student(b.path, mesh=ctx.mesh)
    tok = ctx.base.tokenizer
    ctx.reference = prepare_heldout(tok, ctx.task.reference)
    ctx.teacher_held = {t: prepare_heldout(tok, [
        {"messages": r["messages"]} for r in ctx.task.bench_trajectories if r["teacher"] == t])
        for t in TEACHERS}
    ctx.bench = load_benchmark(ctx.files["benchmark"])


# -- 3. scores -----------------------------------------------------------------------------


def score_config(cfg: DemoConfig, estimator: str = "proxy"):
    from lark_jax.learnability.runner import ScoreConfig

    return ScoreConfig(top_k=cfg.top_k, max_length=cfg.max_length, row_length=cfg.row_length,
                       batch_tokens=16 * cfg.row_length, estimator=estimator)


def score_with(ctx: DemoContext, student, out: Path, name: str, desc: str,
               estimator: str = "proxy", need=("L",), pool: Path | None = None):
    """Score ``pool`` (default: the whole pool) with ``student`` into ``out``; return its
    ScoreTable and the rows of the untouched student's table it matches (checked to hold
    the same candidates), or None before that table exists."""
    from lark_jax.learnability.runner import score_pool
    from lark_jax.selection import load_scores

    pool = pool if pool is not None else ctx.files["pool"]
    n = sum(1 for _ in pool.open(encoding="utf-8"))
    with ctx.rep.bar(n, desc, unit="traj") as advance:
        score_pool(student, pool, out, score_config(ctx.cfg, estimator),
                   student_name=name, progress=lambda n, tokens: advance(n))
    table = load_scores(out, need=need)
    if ctx.table is None:
        return table, None
    rows = np.searchsorted(ctx.table.problem_ids, table.problem_ids)
    if not (rows.max(initial=-1) < len(ctx.table.problem_ids)
            and np.array_equal(ctx.table.problem_ids[rows], table.problem_ids)
            and np.array_equal(ctx.table.candidate_ids[rows], table.candidate_ids)):
        raise LarkError("a rescored pool does not match the original scores", where=str(out))
    return table, rows


def score(ctx: DemoContext) -> None:
    from lark_jax.selection.io import gather_pool

    with ctx.stage("score"):
        ctx.table, _ = score_with(ctx, ctx.base, ctx.out / "scores.json", "demo-student",
                                  "score pool",
                                  need=("g_hat", "L", "Brier", "rho", "rsr", "tokens"))
        ctx.found, _ = gather_pool(ctx.files["pool"], ctx.table, set(ctx.table.keys()))
        # The demo knows whether each of its trajectories ends in the right answer: the
        # verified control's field (1 correct, 0 wrong).
        known = {(r["problem_id"], r["candidate_id"]): float(r["meta"]["correct"])
                 for r in ctx.task.pool}
        t = ctx.table
        correct = np.full(t.mask.shape, np.nan)
        for i, j in np.argwhere(t.mask):
            correct[i, j] = known[(int(t.problem_ids[i]), int(t.candidate_ids[i, j]))]
        t.fields["correct"] = correct


# -- 4. evaluation and held-out metrics --------------------------------------------------------


def heldout(ctx: DemoContext, student, teachers: bool = False) -> dict:
    ref = heldout_metrics(student, ctx.reference)
    res = {"ref_loss": ref["loss"], "step_acc": ref["marked_acc"]}
    if teachers:  # each teacher's own held-out trajectories (utility diagnostics)
        res["teacher_loss"] = {t: heldout_metrics(student, h)["loss"]
                               for t, h in ctx.teacher_held.items()}
    return res


BARE_ANSWER = re.compile(r"\s*\\boxed\{[^{}]*\}[\s.]*")


def is_bare_answer(completion: str) -> bool:
    """True when a completion is only a boxed answer (no work shown): with answers in
    1..20 such samples are right by recall or by guessing, not by solving."""
    return BARE_ANSWER.fullmatch(completion) is not None


def answer_styles(out_dir: Path) -> dict:
    """``bare``: share of an eval's samples that are only a boxed answer;
    ``worked_pass@1``: accuracy of the other samples (those that show work; None if none).
    Separates solving from answer recall or guessing (ACC alone does not)."""
    correct = {}
    for line in (out_dir / "answers.jsonl").read_text(encoding="utf-8").splitlines():
        a = json.loads(line)
        correct[(a["problem"], a["sample"])] = bool(a["correct"])
    bare, worked = 0, []
    for line in (out_dir / "generations.jsonl").read_text(encoding="utf-8").splitlines():
        g = json.loads(line)
        if is_bare_answer(g["completion"]):
            bare += 1
        else:
            worked.append(correct[(g["problem"], g["sample"])])
    n = bare + len(worked)
    return {"bare": bare / n if n else None,
            "worked_pass@1": float(np.mean(worked)) if worked else None}


def evaluate(ctx: DemoContext, student, name: str, seed: int, bench=None
             ) -> tuple[dict, np.ndarray]:
    """ACC@k, pass@1, the no-answer rate and the answer styles (:func:`answer_styles`) on
    the benchmark (``bench``, default the demo's), and per problem whether any of the k
    samples was correct (from the eval's answers.jsonl)."""
    from lark_jax.evaluation import EvalConfig, run_eval

    cfg = ctx.cfg
    bench = ctx.bench if bench is None else bench
    n = len(bench.problems)
    ecfg = EvalConfig(seed=seed, samples=cfg.eval_samples, temperature=cfg.temperature,
                      top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, system_prompt="",
                      repetition_penalty=cfg.repetition_penalty,
                      batch_size=min(256, cfg.eval_samples * n))
    with ctx.stage("eval"), ctx.rep.bar(cfg.eval_samples * n, f"eval {name}",
                                        unit="sample") as advance:
        res = run_eval(student, bench, ctx.out / "evals" / name, ecfg, model_name=name,
                       progress=advance)
    s = res.summary
    acc = next(v for k, v in s.items() if re.fullmatch(r"acc@\d+", k))
    solved = np.zeros(n)
    index = {p.index: i for i, p in enumerate(bench.problems)}
    for line in (res.out_dir / "answers.jsonl").read_text().splitlines():
        a = json.loads(line)
        solved[index[a["problem"]]] = max(solved[index[a["problem"]]], float(a["correct"]))
    if not math.isclose(solved.mean(), acc, abs_tol=1e-9):
        raise LarkError(f"per-problem outcomes ({solved.mean()}) disagree with the summary's "
                        f"ACC@k ({acc})", where=str(res.out_dir))
    return ({"acc": acc, "pass@1": s["pass@1"],
             "no_answer": s["no_answer_samples"] / (cfg.eval_samples * n),
             **answer_styles(res.out_dir)}, solved)


def evaluate_base(ctx: DemoContext) -> None:
    metrics, solved = evaluate(ctx, ctx.base, "base", ctx.cfg.seeds[0])
    with ctx.stage("heldout"):
        ctx.base_metrics = {**metrics, **heldout(ctx, ctx.base, teachers=True)}
    ctx.base_solved = solved[None]


# -- 5. select, fine-tune, evaluate -------------------------------------------------------------


def selection_records(table, sel, found) -> tuple[list[dict], dict]:
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


def _train_config(cfg: DemoConfig, seed: int, objective: str, steps: int):
    from lark_jax.training.trainer import TrainConfig

    return TrainConfig(epochs=10**6, max_steps=steps, lr=cfg.lr, batch_size=cfg.batch_size,
                       max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio,
                       micro_batch_tokens=cfg.row_length * 8, seed=seed, objective=objective)


def _utility_file(ctx: DemoContext, teacher: str) -> tuple[Path, int]:
    """Every pool trajectory of one teacher, weight 1 (the utility diagnostic's data), and
    how many there are."""
    data = ctx.out / "utility" / f"{teacher}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": r["messages"],
             "meta": {"problem_id": r["problem_id"], "candidate_id": r["candidate_id"],
                      "teacher": teacher, "train_weight": 1.0}}
            for r in ctx.task.pool if r["teacher"] == teacher]
    _write_jsonl(data, rows)
    return data, len(rows)


def _write_metrics(path: Path, together, r: int, lrs: list[float], per_epoch: int) -> None:
    """metrics.jsonl in ``train``'s record format (without the wall-time throughput)."""
    from lark_jax.training.loop import write_metrics
    from lark_jax.training.step import metrics_record

    write_metrics(path, (metrics_record(s, per_epoch, loss=float(together.losses[r, s]),
                                        lr=lrs[s], grad_norm=float(together.grad_norms[r, s]),
                                        tokens=int(together.tokens[r, s]))
                         for s in range(together.losses.shape[1])))


@dataclasses.dataclass
class _Job:
    """One fine-tune of ``run_methods``: a method's selection, or a teacher's utility run."""

    key: str  # the method, or the teacher
    seed: int
    objective: str
    data: Path
    steps: int  # optimizer steps (``DemoConfig.run_steps`` of its, or a budget-B, record count)
    info: dict  # what the results table keeps of the selection
    utility: bool = False
    iterative: bool = False  # re-scored and re-selected as it trains (train_iterative)


def run_methods(ctx: DemoContext) -> None:
    """Every method and seed: select at budget B; with the per-teacher utility runs, fine-tune
    them all together (``training.together``: one compiled step for every run); then evaluate
    each and measure its held-out metrics."""
    from lark_jax.selection import select
    from lark_jax.selection.io import write_selection
    from lark_jax.training.together import learning_rates, train_together

    cfg = ctx.cfg
    jobs: list[_Job] = []
    # Records of a budget-B selection (what a budget_steps method's run length follows).
    n_budget = int(select(ctx.table, "random", cfg.budget, seed=0).chosen.sum())
    for seed in cfg.seeds:
        for method in cfg.methods:
            policy, objective, budget_steps, _ = METHOD_SPECS[method]
            sel = select(ctx.table, policy, cfg.budget, seed=seed)
            recs, mix = selection_records(ctx.table, sel, ctx.found)
            data = ctx.out / "selections" / f"{method}-s{seed}.jsonl"
            write_selection(data, recs, {"policy": policy, "objective": objective,
                                         "budget": cfg.budget, "seed": seed,
                                         "n_records": len(recs), "teacher_mix": mix})
            steps = cfg.run_steps(n_budget if budget_steps else len(recs))
            jobs.append(_Job(method, seed, objective, data, steps,
                             {"n_records": len(recs), "teacher_mix": mix,
                              "objective": objective},
                             iterative=METHOD_SPECS[method].iterative))
    if cfg.utility:
        for t in TEACHERS:
            data, n = _utility_file(ctx, t)
            jobs.append(_Job(t, cfg.seeds[0], "record", data, cfg.run_steps(n),
                             {"n_records": n}, utility=True))
    # One train_together call per run length (its runs share one schedule): under epochs,
    # 'all' and the per-teacher runs are longer than the budget-B selections.
    trained: dict[int, tuple[Any, int, list[float]]] = {}  # job -> (result, its row, lrs)
    same_as: dict[int, int] = {}  # job -> the first job that computes the same steps
    plain = [r for r, j in enumerate(jobs) if not j.iterative]
    lengths = sorted({jobs[r].steps for r in plain})
    with ctx.stage("train"), ctx.rep.bar(sum(jobs[r].steps for r in plain),
                                         f"train {len(plain)} runs", unit="run-step") as advance:
        for steps in lengths:
            group = [r for r in plain if jobs[r].steps == steps]
            cfgs = [_train_config(cfg, jobs[r].seed, jobs[r].objective, steps) for r in group]
            n = len(group)
            together = train_together(ctx.base, [jobs[r].data for r in group], cfgs,
                                      progress=lambda step, total, n=n: advance(n))
            lrs = learning_rates(cfgs[0])
            for i, r in enumerate(group):
                trained[r] = (together, i, lrs)
                same_as[r] = group[together.same_as[i]]
    for method in {j.key for j in jobs if j.iterative}:
        group = [r for r, j in enumerate(jobs) if j.iterative and j.key == method]
        together, lrs = train_iterative(ctx, [jobs[r] for r in group])
        for i, r in enumerate(group):
            trained[r] = (together, i, lrs)
            same_as[r] = r
    ctx.runs = {m: {} for m in cfg.methods}
    ctx.solved = {m: {} for m in cfg.methods}
    n_util = cfg.utility_eval_problems
    util_bench = (None if n_util == 0 else ctx.bench if n_util is None else
                  dataclasses.replace(ctx.bench, problems=ctx.bench.problems[:n_util]))
    measured: dict[int, tuple[dict, np.ndarray]] = {}  # job -> (eval + held-out, solved)
    for r, j in enumerate(jobs):
        together, i, lrs = trained[r]
        tuned = together.student(i)
        final = {"final_train_loss": float(together.losses[i, -1]), "steps": j.steps,
                 **j.info}
        if j.utility:
            with ctx.stage("heldout"):
                ctx.utility[j.key] = {**final, **heldout(ctx, tuned, teachers=True)}
            if util_bench is not None:
                # Utility as downstream accuracy: ACC@k of the teacher's own fine-tune.
                metrics, solved = evaluate(ctx, tuned, f"utility-{j.key}", j.seed, util_bench)
                ctx.utility[j.key].update(acc=metrics["acc"], pass1=metrics["pass@1"],
                                          n_eval_problems=len(util_bench.problems))
                ctx.utility_solved[j.key] = solved
            continue
        name = f"{j.key}-s{j.seed}"
        _write_metrics(ctx.out / "runs" / name / "metrics.jsonl", together, i, lrs,
                       cfg.steps_per_epoch(j.info["n_records"]))
        first = same_as[r]
        if first != r and first in measured and jobs[first].seed == j.seed:
            # The same training (e.g. LARK at budget 1 under either objective) and the same
            # sampling seed: the same student and the same eval. Shared, not recomputed.
            metrics, solved = measured[first]
            final["same_training_as"] = f"{jobs[first].key}-s{j.seed}"
        else:
            metrics, solved = evaluate(ctx, tuned, name, j.seed)
            with ctx.stage("heldout"):
                metrics = {**metrics, **heldout(ctx, tuned)}
            measured[r] = (metrics, solved)
        final.update(metrics)
        ctx.runs[j.key][j.seed] = final
        ctx.solved[j.key][j.seed] = solved
        shared = (f"  (same training as {final['same_training_as']})"
                  if "same_training_as" in final else "")
        ctx.rep.info(f"{name}: acc {final['acc']:.3f}  ref_loss {final['ref_loss']:.3f}  "
                     f"step_acc {final['step_acc']:.3f}{shared}")
        if j.key == "all" and j.seed == cfg.seeds[0]:
            ctx.tuned["all"] = tuned


def train_iterative(ctx: DemoContext, jobs: list[_Job]) -> tuple[Any, list[float]]:
    """Iterative selection (one method, every seed together): train on the job's selection
    (made from the untouched student's scores) for ``iterative_epochs`` epochs, score the
    whole pool again with each seed's student as it is then, select again with the same
    policy and budget, and go on training on the new selection from where the run stands
    (weights, Adam state, schedule: ``train_together(resume=...)``), until the run's steps
    are done. The run is as long as the plain method's; only its data changes between
    rounds. Each round's selection is written (``selections/<method>-s<seed>-r<k>.jsonl``)
    and ``info["rounds"]`` records its steps, teacher mix and the share of problems whose
    chosen trajectories changed. Returns the whole run (the pieces' losses concatenated,
    the last piece's weights) and its learning rates."""
    from lark_jax.selection import select
    from lark_jax.selection.io import write_selection
    from lark_jax.training.together import learning_rates, train_together

    cfg = ctx.cfg
    total = jobs[0].steps
    stops = cfg.iterative_stops(jobs[0].info["n_records"])
    cfgs = [_train_config(cfg, j.seed, j.objective, total) for j in jobs]
    policy = METHOD_SPECS[jobs[0].key].policy
    files = [j.data for j in jobs]
    chosen = [_chosen_keys(ctx.table, select(ctx.table, policy, cfg.budget, seed=j.seed))
              for j in jobs]
    for j in jobs:
        j.info["rounds"] = [{"steps": [0, stops[0]], "teacher_mix": j.info["teacher_mix"],
                             "changed": None, "per_teacher": _teacher_means(ctx.table)}]
    last = None  # the latest piece (its weights and optimizer states)
    losses, gnorms, tokens = [], [], []
    for k, stop in enumerate(stops):
        if k:
            for i, j in enumerate(jobs):
                with ctx.stage("rescore"):
                    table, _ = score_with(
                        ctx, last.student(i), ctx.out / "diagnostics" /
                        f"scores_{j.key}-s{j.seed}-r{k}.json", f"{j.key}-s{j.seed}-round{k}",
                        f"rescore pool ({j.key} s{j.seed}, round {k})", need=("g_hat", "L"))
                sel = select(table, policy, cfg.budget, seed=j.seed)
                recs, mix = selection_records(table, sel, ctx.found)
                files[i] = ctx.out / "selections" / f"{j.key}-s{j.seed}-r{k}.jsonl"
                write_selection(files[i], recs, {"policy": policy, "objective": j.objective,
                                                 "budget": cfg.budget, "seed": j.seed,
                                                 "round": k, "from_step": stops[k - 1],
                                                 "n_records": len(recs), "teacher_mix": mix})
                now = _chosen_keys(table, sel)
                changed = np.mean([now[p] != chosen[i].get(p) for p in now]) if now else 0.0
                chosen[i] = now
                j.info["rounds"].append({"steps": [stops[k - 1], stop], "teacher_mix": mix,
                                         "changed": float(changed),
                                         "per_teacher": _teacher_means(table)})
        start = stops[k - 1] if k else 0
        with ctx.stage("train"), ctx.rep.bar(len(jobs) * (stop - start),
                                             f"train {jobs[0].key} round {k}",
                                             unit="run-step") as advance:
            last = train_together(ctx.base, files, cfgs, stop=stop, resume=last,
                                  progress=lambda s, t: advance(len(jobs)))
        losses.append(last.losses)
        gnorms.append(last.grad_norms)
        tokens.append(last.tokens)
    whole = dataclasses.replace(last, losses=np.concatenate(losses, 1),
                                grad_norms=np.concatenate(gnorms, 1),
                                tokens=np.concatenate(tokens, 1), steps=(0, total))
    for j in jobs:  # the run's train weight per teacher, over every round
        w = np.array([r["steps"][1] - r["steps"][0] for r in j.info["rounds"]], float)
        j.info["teacher_mix"] = {t: float(sum(wk * r["teacher_mix"].get(t, 0.0) for wk, r in
                                              zip(w, j.info["rounds"], strict=True)) / w.sum())
                                 for t in TEACHERS}
    return whole, learning_rates(cfgs[0])


def _teacher_means(table) -> dict[str, dict[str, float]]:
    """Per teacher, the mean ĝ and L of its trajectories in ``table`` (what a round's
    selection saw)."""
    teacher_of = _teacher_grid(table)
    return {t: {f: float(np.mean(table.fields[f][table.mask & (teacher_of == t)]))
                for f in ("g_hat", "L")}
            for t in TEACHERS if (table.mask & (teacher_of == t)).any()}


def _chosen_keys(table, sel) -> dict[int, frozenset]:
    """Per problem id, the candidate ids a selection keeps."""
    out: dict[int, set] = {}
    for r, c in zip(*np.nonzero(sel.chosen), strict=True):
        out.setdefault(int(table.problem_ids[r]), set()).add(int(table.candidate_ids[r, c]))
    return {p: frozenset(v) for p, v in out.items()}


# -- 6. diagnostics --------------------------------------------------------------------------


def _teacher_grid(table) -> np.ndarray:
    k = table.mask.shape[1]
    return np.array([list(row) + [""] * (k - len(row)) for row in table.teachers])


# The per-trajectory measurements the diagnostics correlate ρ with (results.json keeps
# every one, per trajectory): the exact rates of --estimator gradient and the measured
# decreases log(L_before / L_after) after a few steps and after the full 'all' run.
TARGETS = ("rate_mean", "rate_sum", "decrease_first_order", "decrease_all")


def _aligned(ctx: DemoContext, table, rows, field: str) -> np.ndarray:
    """A rescored table's field on the untouched student's [N, K] grid (NaN elsewhere)."""
    out = np.full(ctx.table.mask.shape, np.nan)
    out[rows, :table.mask.shape[1]] = np.where(table.mask, table.fields[field], np.nan)
    return out


def first_order_student(ctx: DemoContext):
    """The student after ``first_order_steps`` steps of fine-tuning on every pool trajectory
    (the 'all' selection, first seed): few enough that most trajectories have not been
    trained on yet, so their loss changes are the response to early training."""
    from lark_jax.selection import select
    from lark_jax.selection.io import write_selection
    from lark_jax.training.together import train_together

    cfg = ctx.cfg
    sel = select(ctx.table, "all", cfg.budget)
    recs, mix = selection_records(ctx.table, sel, ctx.found)
    data = ctx.out / "diagnostics" / "all.jsonl"
    write_selection(data, recs, {"policy": "all", "purpose": "first-order fine-tune",
                                 "steps": cfg.first_order_steps, "seed": cfg.seeds[0],
                                 "n_records": len(recs), "teacher_mix": mix})
    tc = _train_config(cfg, cfg.seeds[0], "record", cfg.first_order_steps)
    with ctx.stage("train"), ctx.rep.bar(cfg.first_order_steps, "first-order fine-tune",
                                         unit="step") as advance:
        together = train_together(ctx.base, [data], [tc],
                                  progress=lambda step, total: advance(1))
    return together.student(0)


def correlations(x: np.ndarray, ys: dict[str, np.ndarray], tokens: np.ndarray,
                 teachers: np.ndarray) -> dict:
    """Spearman(x, y) for each y of ``ys`` (1-D arrays over the same trajectories, NaN where
    not measured): over every trajectory, the rank partial correlation given the length T
    (``tokens``), and within each teacher; each with its bootstrap interval
    (``stats.correlation_ci``)."""
    out = {}
    for name, y in ys.items():
        if not np.isfinite(y).any():
            continue
        out[name] = {
            "overall": correlation_ci(x, y),
            "partial_given_tokens": correlation_ci(x, y, tokens),
            "per_teacher": {t: correlation_ci(x[teachers == t], y[teachers == t])
                            for t in TEACHERS if (teachers == t).any()},
        }
    return out


def diagnostics(ctx: DemoContext) -> None:
    """The paper's diagnostics and the ones that can answer them (see ``pipeline`` and
    docs/demo.md for their definitions)."""
    cfg, table = ctx.cfg, ctx.table
    g, rho, loss0, m = (table.fields["g_hat"], table.fields["rho"], table.fields["L"],
                        table.mask)
    teacher_of = _teacher_grid(table)
    diag: dict = {
        "spearman_ghat_vs_loss": spearman(g[m], loss0[m]),
        "spearman_rho_vs_loss": spearman(rho[m], loss0[m]),
    }
    per_teacher = {}
    for t in TEACHERS:
        sel = m & (teacher_of == t)
        per_teacher[t] = {"lark_score": float(np.nanmean(np.where(sel, g, np.nan))),
                          "rho": float(np.nanmean(np.where(sel, rho, np.nan))),
                          "L": float(np.nanmean(np.where(sel, loss0, np.nan)))}
    base = ctx.base_metrics
    for t, h in ctx.utility.items():  # the per-teacher runs of run_methods
        per_teacher[t].update(
            utility=base["ref_loss"] - h["ref_loss"],
            step_acc_gain=h["step_acc"] - base["step_acc"],
            own_rate=math.log(base["teacher_loss"][t] / h["teacher_loss"][t]),
            final_train_loss=h["final_train_loss"])
        if t in ctx.utility_solved:
            solved = ctx.utility_solved[t]
            per_teacher[t].update(
                utility_acc=h["acc"], utility_acc_ci95=mean_ci(solved[None])["ci95"],
                utility_acc_gain=h["acc"] - float(ctx.base_solved[0][:len(solved)].mean()))
    teachers = list(TEACHERS)
    col = lambda k: np.array([per_teacher[t].get(k, math.nan) for t in teachers])  # noqa: E731
    diag.update(per_teacher=per_teacher,
                spearman_teacher_utility=spearman(col("lark_score"), col("utility")),
                spearman_teacher_step_acc=spearman(col("lark_score"), col("step_acc_gain")),
                spearman_teacher_rho_own_rate=spearman(col("rho"), col("own_rate")),
                teacher_correlations={
                    "lark_score_vs_utility_acc": correlation_ci(col("lark_score"),
                                                                col("utility_acc")),
                    "lark_score_vs_utility_ref_loss": correlation_ci(col("lark_score"),
                                                                     col("utility"))})
    nan = np.full(m.shape, np.nan)
    after = {"first_order": nan, "all": nan}
    rate_mean = rate_sum = nan
    with ctx.stage("rescore"):
        if "all" in ctx.tuned:
            # Per trajectory: the measured decrease after fine-tuning on the whole pool.
            t2, rows = score_with(ctx, ctx.tuned["all"],
                                  ctx.out / "diagnostics" / "scores_after_all.json",
                                  "all-finetuned", "rescore pool")
            after["all"] = _aligned(ctx, t2, rows, "L")
        if cfg.first_order_steps:
            t2, rows = score_with(ctx, first_order_student(ctx),
                                  ctx.out / "diagnostics" / "scores_first_order.json",
                                  "first-order", "rescore pool (first order)")
            after["first_order"] = _aligned(ctx, t2, rows, "L")
        if cfg.gradient_check:
            # The exact rates of the same student (one backward pass per trajectory), on
            # the first problems of the pool.
            first = set(table.problem_ids[:cfg.gradient_check_problems].tolist())
            sub = ctx.out / "diagnostics" / "pool_gradient.jsonl"
            fsio.atomic_write(sub, "".join(line for r, line in zip(
                ctx.task.pool, ctx.task.pool_lines(), strict=True) if r["problem_id"] in first))
            exact, rows = score_with(ctx, ctx.base, ctx.out / "diagnostics" /
                                     "scores_gradient.json", "demo-student", "gradient rates",
                                     estimator="gradient", need=("rate_mean", "rate_sum"),
                                     pool=sub)
            rate_mean = _aligned(ctx, exact, rows, "rate_mean")
            rate_sum = _aligned(ctx, exact, rows, "rate_sum")
    with ctx.stage("correlations"):
        per_traj = {
            "problem_id": np.broadcast_to(table.problem_ids[:, None], m.shape)[m],
            "candidate_id": table.candidate_ids[m], "teacher": teacher_of[m],
            **{f: table.fields[f][m] for f in ("tokens", "L", "Brier", "rho", "g_hat",
                                               "correct")},
            "L_first_order": after["first_order"][m], "L_all": after["all"][m],
            "decrease_first_order": np.log(loss0 / after["first_order"])[m],
            "decrease_all": np.log(loss0 / after["all"])[m],
            "rate_mean": rate_mean[m], "rate_sum": rate_sum[m]}
        diag["per_trajectory"] = per_traj
        diag["correlations"] = correlations(per_traj["rho"],
                                            {f"rho_vs_{y}": per_traj[y] for y in TARGETS},
                                            per_traj["tokens"], per_traj["teacher"])
        diag["spearman_traj_rho_rate"] = spearman(per_traj["rho"], per_traj["decrease_all"])
        diag["spearman_traj_ghat_rate"] = spearman(per_traj["g_hat"], per_traj["decrease_all"])
        diag["spearman_rho_proxy_vs_gradient"] = spearman(per_traj["rho"],
                                                          per_traj["rate_mean"])
    ctx.diagnostics = diag
