"""The embedded demo: task generator (determinism, answers, wrong rate), student cache, and
the whole pipeline end to end in its tiny configuration; the notebook headless (slow)."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_device

from lark_jax import LarkError
from lark_jax.data.reader import iter_pool
from lark_jax.demo import METHODS, TEACHERS, TaskConfig, build_task, demo_config, run_demo
from lark_jax.demo.stages import answer_styles, is_bare_answer
from lark_jax.demo.task import SAMPLES, expression
from lark_jax.evaluation import extract_answer, is_equivalent

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


# -- task -----------------------------------------------------------------------------------


def test_task_is_deterministic_by_seed(tmp_path):
    cfg = TaskConfig(n_pool=40, n_bench=10, n_pretrain=20, seed=3)
    a = build_task(cfg).write(tmp_path / "a")
    b = build_task(cfg).write(tmp_path / "b")
    for name in ("pool", "benchmark", "reference", "pretrain"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    c = build_task(TaskConfig(n_pool=40, n_bench=10, n_pretrain=20, seed=4)).write(tmp_path / "c")
    assert a["pool"].read_bytes() != c["pool"].read_bytes()
    # The pool is in the reference format and passes the project's own validation.
    recs = list(iter_pool(a["pool"]))
    assert len(recs) == 40 * sum(SAMPLES.values())
    assert {r.teacher for r in recs} == set(TEACHERS)
    assert [m["role"] for m in recs[0].messages] == ["user", "assistant"]
    bench = json.loads(a["benchmark"].read_text())
    assert all(set(b) == {"problem", "answer", "level"} for b in bench)
    assert all(2 <= b["level"] <= 4 for b in bench)


def test_problems_are_disjoint_and_the_corpus_independent_of_pool_size():
    t = build_task(TaskConfig(n_pool=50, n_bench=20, n_pretrain=60))
    pools = {p.statement for p in t.problems["pool"]}
    bench = {p.statement for p in t.problems["bench"]}
    pre = {p.statement for p in t.problems["pretrain"]}
    assert not (pools & bench or pools & pre or bench & pre)
    other = build_task(TaskConfig(n_pool=10, n_bench=5, n_pretrain=60))
    assert other.pretrain == t.pretrain  # so the cached student serves any pool size


def test_corpus_has_every_teachers_words_but_no_solution_and_no_wrong_fact():
    import re

    from lark_jax.demo.task import SNIPPETS_PROMPT, trajectories

    t = build_task(TaskConfig(n_pool=5, n_bench=5, n_pretrain=200))
    texts = [r["messages"][-1]["content"] for r in t.pretrain]
    # Every equation the student reads in pre-training is true (the rambler's slips are cut).
    for m in re.finditer(r"(\d+) ([-+*/]) (\d+) = (\d+)", "\n".join(texts)):
        a, op, b, r = m.groups()
        assert eval(f"{a} {op.replace('/', '//')} {b}") == int(r), m.group()  # noqa: S307
        assert op != "/" or int(a) % int(b) == 0, m.group()
    snips = [ln for r in t.pretrain if r["messages"][0]["content"] == SNIPPETS_PROMPT
             for ln in r["messages"][-1]["content"].split("\n")]
    assert snips and max(len(s.split()) for s in snips) <= 6
    corpus = "\n".join(texts)
    for word in ("Step", "⊕", "↦", "First,", "Hmm,", "\\boxed{"):  # each teacher's words
        assert word in corpus, word
    # ... but no whole solution of any corpus problem, in any teacher's words.
    rng = random.Random(0)
    for p in t.problems["pretrain"][:50]:
        for _, text, _ in trajectories(p, rng, 0.0):
            if len(text.split()) > 6:
                assert text not in corpus


def test_teachers_answer_correctly_except_careless_at_its_rate():
    rate = 0.3
    t = build_task(TaskConfig(n_pool=400, n_bench=30, n_pretrain=0, wrong_rate=rate))
    wrong = total = 0
    for r in t.pool:
        gold = r["meta"]["answer"]
        text = r["messages"][-1]["content"]
        assert "\\boxed{" in text
        ok = is_equivalent(extract_answer(text), gold)
        assert ok == r["meta"]["correct"], (r["teacher"], text, gold)
        if r["teacher"] == "careless":
            total += 1
            wrong += not ok
        else:
            assert ok, (r["teacher"], text, gold)
    assert total == 400 * SAMPLES["careless"]
    # Binomial(800, 0.3): standard deviation 0.016; allow about 4 of them.
    assert abs(wrong / total - rate) < 0.065, wrong / total
    for p, ref in zip(t.problems["bench"], t.reference, strict=True):
        assert is_equivalent(extract_answer(ref["messages"][-1]["content"]), str(p.answer))
        # The terse teacher's expression evaluates to the answer (Python precedence agrees).
        assert eval(expression(p).replace("/", "//")) == p.answer  # noqa: S307
    for b, p in zip(t.bench, t.problems["bench"], strict=True):
        assert b["answer"] == str(p.answer) and int(b["answer"]) >= 0


def test_wrong_rate_extremes():
    never = build_task(TaskConfig(n_pool=30, n_bench=2, n_pretrain=0, wrong_rate=0.0))
    assert all(r["meta"]["correct"] for r in never.pool)
    always = build_task(TaskConfig(n_pool=30, n_bench=2, n_pretrain=0, wrong_rate=1.0))
    assert not any(r["meta"]["correct"] for r in always.pool if r["teacher"] == "careless")


def test_bad_options_raise_lark_error(tmp_path):
    with pytest.raises(LarkError, match="wrong_rate"):
        build_task(TaskConfig(wrong_rate=1.5))
    with pytest.raises(LarkError, match="seed"):
        demo_config(tiny=True, seeds=()).validate()
    with pytest.raises(LarkError, match="unknown method"):
        demo_config(tiny=True, methods=("lark", "best")).validate()
    with pytest.raises(LarkError, match="steps"):
        demo_config(tiny=True, steps=0).validate()
    with pytest.raises(LarkError, match="epochs"):
        demo_config(tiny=True, epochs=0).validate()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me")
    with pytest.raises(LarkError, match="not empty"):
        run_demo(busy, tiny=True, cache_dir=tmp_path / "cache", mesh=one_device())
    assert (busy / "precious.txt").read_text() == "keep me"


def test_run_length_is_epochs_of_each_selection_or_one_step_count():
    # The published rule: steps = ceil(N / batch) x epochs.
    cfg = demo_config(quick=True)
    assert (cfg.epochs, cfg.batch_size) == (4, 8)
    assert [cfg.run_steps(n) for n in (800, 6400, 801, 1)] == [400, 3200, 404, 4]
    # A step count given instead replaces the preset's epochs: every run the same length.
    fixed = demo_config(quick=True, steps=70)
    assert fixed.epochs is None and {fixed.run_steps(n) for n in (1, 800, 6400)} == {70}
    assert demo_config(quick=True, steps=70, epochs=2).run_steps(800) == 200


def test_command_options(tmp_path):
    import argparse

    from lark_jax.demo import command
    from lark_jax.progress import Reporter

    p = argparse.ArgumentParser(prog="lark-jax demo")
    command.add_arguments(p)
    quiet = Reporter(quiet=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(LarkError, match="not empty"):
        command.run(p.parse_args(["--tiny", "--out", str(busy)]), quiet)
    with pytest.raises(LarkError, match="steps"):
        command.run(p.parse_args(["--tiny", "--steps", "0", "--out", str(tmp_path / "o")]),
                    quiet)
    with pytest.raises(LarkError, match="epochs"):
        command.run(p.parse_args(["--tiny", "--epochs", "0", "--out", str(tmp_path / "o")]),
                    quiet)
    with pytest.raises(SystemExit):  # one or the other
        p.parse_args(["--tiny", "--epochs", "2", "--steps", "9"])
    with pytest.raises(LarkError, match="seeds"):
        command.run(p.parse_args(["--tiny", "--seeds", "1,x"]), quiet)
    with pytest.raises(LarkError, match="distinct"):
        command.run(p.parse_args(["--tiny", "--seeds", "1,1", "--out", str(tmp_path / "o")]),
                    quiet)
    assert command._seeds("0, 2") == (0, 2)
    with pytest.raises(SystemExit):
        p.parse_args(["--quick", "--tiny"])
    # The help lists every method and the quick preset's, in order (the CLI does not import
    # the demo package, which imports JAX, to print its help).
    from lark_jax.demo.config import QUICK_METHODS

    help_text = " ".join(next(a.help for a in p._actions if a.dest == "methods").split())
    assert f"from {', '.join(METHODS)} (default" in help_text
    assert f"--quick: {', '.join(QUICK_METHODS)});" in help_text


def test_answer_styles_separate_bare_answers_from_worked_ones(tmp_path):
    bare = ["\\boxed{12}", " \\boxed{7}.\n", "\\boxed{}"]
    worked = ["8 + 4 = 12. \\boxed{12}", "\\boxed{12} because 8 + 4 = 12", "12", "",
              "\\boxed{\\boxed{3}}"]
    assert [is_bare_answer(c) for c in bare] == [True] * 3
    assert [is_bare_answer(c) for c in worked] == [False] * 5
    # An eval's files: 2 problems x 3 samples; bare samples 0/2 right, worked 3/4 right.
    rows = [(0, 0, "\\boxed{3}", False), (0, 1, "1 + 2 = 3. \\boxed{3}", True),
            (0, 2, "1 + 2 = 4. \\boxed{4}", False), (1, 0, "\\boxed{5}", False),
            (1, 1, "2 + 3 = 5. \\boxed{5}", True), (1, 2, "Step 1: 5. \\boxed{5}", True)]
    (tmp_path / "generations.jsonl").write_text("".join(
        json.dumps({"problem": p, "sample": s, "completion": c}) + "\n"
        for p, s, c, _ in rows))
    (tmp_path / "answers.jsonl").write_text("".join(  # another order: joined by key
        json.dumps({"problem": p, "sample": s, "correct": ok}) + "\n"
        for p, s, _, ok in reversed(rows)))
    styles = answer_styles(tmp_path)
    assert styles["bare"] == pytest.approx(2 / 6)
    assert styles["worked_pass@1"] == pytest.approx(3 / 4)


# -- the pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One student (and compilation) cache for the module's runs, as a user would have."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache):
    """The tiny demo from the CLI, in its own process with one CPU device, as a user runs
    it. (This session has 8 simulated devices; compiled programs are cached per device
    count, so the notebook's kernel, also one device, then reuses these compilations.)"""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run([sys.executable, "-m", "lark_jax", "demo", "--out", str(out),
                           "--cache-dir", str(demo_cache)],
                          env={**os.environ, "LARK_JAX_DEMO_TINY": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, demo_cache


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_demo_end_to_end_outputs(demo_run):
    out, _ = demo_run
    cfg = demo_config(tiny=True)
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == list(METHODS)
    for m, r in rows.items():
        for key in ("acc", "pass@1", "ref_loss", "step_acc", "final_train_loss"):
            v = r[key]["mean"]
            assert v is not None and math.isfinite(v), (m, key)
        assert 0 <= r["acc"]["mean"] <= 1 and 0 <= r["step_acc"]["mean"] <= 1
        assert r["ref_loss"]["mean"] > 0
        assert sum(r["teacher_mix"].values()) == pytest.approx(1.0)
        # Same number of epochs for every method (tiny: 2 epochs of batches of 8), so 'all'
        # (96 records) takes 24 steps and a budget-1 selection (12 records) 4; except
        # all-equal-steps: every candidate for a budget-1 selection's 4 steps.
        lines = (out / "runs" / f"{m}-s0" / "metrics.jsonl").read_text().splitlines()
        own = m != "all-equal-steps"
        n_run = r["n_records"] if own else cfg.task.n_pool
        assert len(lines) == r["steps"] == math.ceil(n_run / 8) * cfg.epochs
        assert json.loads(lines[-1])["epoch"] == (cfg.epochs if own else 1)
        evaluated = r["same_training_as"][0] or f"{m}-s0"  # a shared eval is its twin's
        assert (out / "evals" / evaluated / "summary.json").is_file()
    # Budget 1: one record per problem, except "all" which keeps every candidate.
    assert rows["lark"]["n_records"] == cfg.task.n_pool
    assert rows["all"]["n_records"] == cfg.task.n_pool * 8
    assert rows["all-equal-steps"]["n_records"] == cfg.task.n_pool * 8
    assert rows["all-equal-steps"]["steps"] == rows["lark"]["steps"] < rows["all"]["steps"]
    assert rows["shortest"]["teacher_mix"]["answer_only"] == pytest.approx(1.0)
    assert results["n_bench_problems"] == cfg.task.n_bench and results["seeds"] == [0]
    assert rows["lark"]["objective"] == "record"
    assert rows["lark-reference"]["objective"] == "reference"
    assert rows["lark-reference"]["n_records"] == rows["lark"]["n_records"]
    # Budget 1: every chosen record weighs the same, so both objectives compute the same
    # steps: trained and evaluated once, and the report says so.
    assert rows["lark-reference"]["same_training_as"] == ["lark-s0"]
    assert rows["lark"]["same_training_as"] == [None]
    assert rows["lark-reference"]["acc"] == rows["lark"]["acc"]
    assert "trained once and evaluated once" in (out / "results.md").read_text()
    for r in rows.values():  # the interval brackets the mean, both in [0, 1]
        lo, hi = r["acc"]["ci95"]
        assert 0 <= lo <= r["acc"]["mean"] <= hi <= 1
    for r in [*rows.values(), {k: {"mean": v} for k, v in results["base"].items()}]:
        assert 0 <= r["bare"]["mean"] <= 1
        assert r["worked_pass@1"]["mean"] is None or 0 <= r["worked_pass@1"]["mean"] <= 1
    # The guess floor: the k commonest answers of the pool's problems, scored on the bench.
    bench = json.loads((out / "task" / "benchmark.json").read_text())
    pool = [json.loads(x) for x in (out / "task" / "pool.jsonl").read_text().splitlines()]
    g = results["guess"]
    assert len(g["answers"]) == min(cfg.eval_samples, len({r["meta"]["answer"] for r in pool}))
    assert g["acc"] == pytest.approx(np.mean([b["answer"] in g["answers"] for b in bench]))
    assert g["acc_ci95"][0] <= g["acc"] <= g["acc_ci95"][1]
    assert f"| guess {', '.join(g['answers'])} (no model) |" in (out / "results.md").read_text()
    for key in ("lark - random", "lark - all", "lark - all-equal-steps", "lark - lark-reference"):
        p = results["paired"][key]
        a, b = key.split(" - ")
        assert p["mean"] == pytest.approx(rows[a]["acc"]["mean"] - rows[b]["acc"]["mean"])
        assert p["ci95"][0] <= p["mean"] <= p["ci95"][1]
        assert p["resolved"] == (p["ci95"][0] > 0 or p["ci95"][1] < 0)
    # Per-problem outcomes behind the intervals agree with each eval's summary.
    for m in ("lark", "all"):
        summary = json.loads((out / "evals" / f"{m}-s0" / "summary.json").read_text())
        assert summary[f"acc@{cfg.eval_samples}"] == pytest.approx(rows[m]["acc"]["mean"])
    d = results["diagnostics"]
    for key in ("spearman_teacher_utility", "spearman_traj_rho_rate", "spearman_traj_ghat_rate",
                "spearman_ghat_vs_loss", "spearman_rho_vs_loss",
                "spearman_rho_proxy_vs_gradient"):
        assert d[key] is not None and -1.0 <= d[key] <= 1.0, key
    assert set(d["per_teacher"]) == set(TEACHERS)
    assert d["n_trajectories"] == cfg.task.n_pool * 8
    for name in ("sft_loss", "lark_vs_utility", "acc_ci", "correlations"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    check_controls(out, rows, results, pool)
    check_trajectories(out, cfg, results, pool)
    check_iterative(out, cfg, rows, results)


def _selection(out, name):
    return [json.loads(x)["meta"] for x in
            (out / "selections" / f"{name}.jsonl").read_text().splitlines()]


def check_controls(out, rows, results, pool):
    """The controls' selections against what the pool and the scores say they must be."""
    lark, matched = _selection(out, "lark-s0"), _selection(out, "random-matched-s0")
    count = lambda recs: {t: sum(r["teacher"] == t for r in recs) for t in TEACHERS}  # noqa: E731
    assert count(matched) == count(lark) and len(matched) == len(lark)
    assert sorted(r["problem_id"] for r in matched) == sorted(r["problem_id"] for r in lark)
    assert rows["random-matched"]["teacher_mix"] == rows["lark"]["teacher_mix"]
    correct = {(r["problem_id"], r["candidate_id"]): r["meta"]["correct"] for r in pool}
    verified = _selection(out, "verified-s0")
    assert verified and all(correct[(r["problem_id"], r["candidate_id"])] for r in verified)
    scores = json.loads((out / "scores.json").read_text())["scores"]
    by_teacher: dict[str, list[float]] = {}
    for rows_ in scores.values():
        for r in rows_:
            by_teacher.setdefault(r["teacher"], []).append(r["g_hat"])
    best = max(sorted(by_teacher), key=lambda t: np.mean(by_teacher[t]))
    picked = _selection(out, "best-teacher-s0")
    assert {r["teacher"] for r in picked} == {best}
    assert len(picked) == len(by_teacher[best])
    for key in ("lark - random-matched", "lark - best-teacher", "lark - verified"):
        p = results["paired"][key]
        a, b = key.split(" - ")
        assert p["mean"] == pytest.approx(rows[a]["acc"]["mean"] - rows[b]["acc"]["mean"])


def check_iterative(out, cfg, rows, results):
    """lark-iterative: as long as LARK; its first round is LARK's run step for step (same
    selection, seed and schedule); each later round trains the LARK selection of the pool
    as re-scored by the student at the round's start, and that re-score is the student
    trained on the first round (recomputed here from the cached student)."""
    from lark_jax import load_student
    from lark_jax.demo.stages import _train_config, score_config
    from lark_jax.learnability.runner import score_pool
    from lark_jax.selection import load_scores, select
    from lark_jax.training.together import train_together

    it, lark = rows["lark-iterative"], rows["lark"]
    assert it["steps"] == lark["steps"] == 2 * math.ceil(cfg.task.n_pool / 8)
    rounds = it["rounds"]["0"]
    per_epoch = math.ceil(cfg.task.n_pool / 8)
    assert [r["steps"] for r in rounds] == [[0, per_epoch], [per_epoch, 2 * per_epoch]]
    assert rounds[0]["changed"] is None and 0 <= rounds[1]["changed"] <= 1
    base_scores = json.loads((out / "scores.json").read_text())["scores"]
    stack = [r["g_hat"] for rows_ in base_scores.values() for r in rows_
             if r["teacher"] == "stack"]
    assert rounds[0]["per_teacher"]["stack"]["g_hat"] == pytest.approx(np.mean(stack))
    loss = lambda name: [json.loads(x)["loss"] for x in  # noqa: E731
                         (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loss("lark-iterative-s0")[:per_epoch],
                               loss("lark-s0")[:per_epoch], rtol=1e-5)
    assert _selection(out, "lark-iterative-s0") == _selection(out, "lark-s0")
    rescored = out / "diagnostics" / "scores_lark-iterative-s0-r1.json"
    again = select(load_scores(rescored, need=("g_hat",)), "lark", cfg.budget, seed=0)
    table = load_scores(rescored, need=("g_hat",))
    r1 = {(m["problem_id"], m["candidate_id"]) for m in _selection(out, "lark-iterative-s0-r1")}
    assert r1 == {(int(table.problem_ids[i]), int(table.candidate_ids[i, j]))
                  for i, j in zip(*np.nonzero(again.chosen), strict=True)}
    # The re-scoring student: the base trained for the first round on LARK's selection.
    base = load_student(results["student"]["path"], mesh=one_device())
    first = train_together(base, [out / "selections" / "lark-iterative-s0.jsonl"],
                           [_train_config(cfg, 0, "record", it["steps"])], stop=per_epoch)
    mine = out.parent / "rescore_check.json"
    score_pool(first.student(0), out / "task" / "pool.jsonl", mine, score_config(cfg))
    want, got = load_scores(mine, need=("L",)), load_scores(rescored, need=("L",))
    np.testing.assert_allclose(got.fields["L"][got.mask], want.fields["L"][want.mask],
                               rtol=1e-4)
    base_l = load_scores(out / "scores.json", need=("L",))
    assert not np.allclose(got.fields["L"][got.mask], base_l.fields["L"][base_l.mask])
    assert results["config"]["iterative_epochs"] == 1
    for key in ("lark-iterative - lark", "lark-iterative - random"):
        p = results["paired"][key]
        a, b = key.split(" - ")
        assert p["mean"] == pytest.approx(rows[a]["acc"]["mean"] - rows[b]["acc"]["mean"])
    md = (out / "results.md").read_text()
    assert "lark-iterative: the pool re-scored" in md
    assert f"utility: ACC@{cfg.eval_samples} (%)" in md  # the rounds' lines reuse no name
    assert results["timings_s"]["rescore"] > 0  # the re-scorings are timed


def check_trajectories(out, cfg, results, pool):
    """results.json's per-trajectory arrays, and the correlations recomputed from them."""
    from lark_jax.demo.stats import partial_spearman, spearman

    tr = results["trajectories"]
    n = cfg.task.n_pool * 8
    assert all(len(v) == n for v in tr.values())
    keys = list(zip(tr["problem_id"], tr["candidate_id"], strict=True))
    assert keys == sorted((r["problem_id"], r["candidate_id"]) for r in pool)
    f = {k: np.array([np.nan if x is None else x for x in v], np.float64)
         for k, v in tr.items() if k != "teacher"}
    np.testing.assert_allclose(f["decrease_all"], np.log(f["L"] / f["L_all"]), rtol=1e-12)
    np.testing.assert_allclose(f["decrease_first_order"], np.log(f["L"] / f["L_first_order"]),
                               rtol=1e-12)
    measured = np.isfinite(f["rate_mean"])
    assert measured.sum() == min(cfg.gradient_check_problems, cfg.task.n_pool) * 8
    np.testing.assert_allclose(f["rate_sum"][measured],
                               f["tokens"][measured] * f["rate_mean"][measured], rtol=1e-6)
    correct = {(r["problem_id"], r["candidate_id"]): r["meta"]["correct"] for r in pool}
    assert f["correct"].tolist() == [float(correct[k]) for k in keys]
    teachers = np.array(tr["teacher"])
    corr = results["diagnostics"]["correlations"]
    assert set(corr) == {f"rho_vs_{y}" for y in ("rate_mean", "rate_sum",
                                                  "decrease_first_order", "decrease_all")}
    for name, c in corr.items():
        y = f[name.removeprefix("rho_vs_")]
        assert c["overall"]["r"] == pytest.approx(spearman(f["rho"], y))
        assert c["partial_given_tokens"]["r"] == pytest.approx(
            partial_spearman(f["rho"], y, f["tokens"]))
        for t, v in c["per_teacher"].items():
            want = spearman(f["rho"][teachers == t], y[teachers == t])
            assert (v["r"] is None) if math.isnan(want) else v["r"] == pytest.approx(want)
        for v in [c["overall"], c["partial_given_tokens"], *c["per_teacher"].values()]:
            if v["ci95"] is not None:
                assert v["ci95"][0] <= v["r"] <= v["ci95"][1]
    for t, v in results["diagnostics"]["per_teacher"].items():
        assert 0 <= v["utility_acc"] <= 1
        summary = json.loads((out / "evals" / f"utility-{t}" / "summary.json").read_text())
        assert summary[f"acc@{cfg.eval_samples}"] == pytest.approx(v["utility_acc"])
    import jax

    m = results["machine"]
    assert m["jax"] == jax.__version__ and m["cpu"]
    assert sum(m["devices"].values()) == 1  # the demo ran in its own one-device process
    md = (out / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in md or f"| **{m}** |" in md
    assert "Spearman" in md and "ACC@2" in md and "lark - random" in md and "95 % CI" in md


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_demo_student_is_cached_hf_directory(demo_run):
    from lark_jax.demo.student import build_student
    from lark_jax.models import load_student
    from lark_jax.models.params import count_params

    out, cache = demo_run
    st = json.loads((out / "results.json").read_text())["student"]
    path = Path(st["path"])
    assert path.parent == cache and path.name.startswith("demo-student-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    student = load_student(path, mesh=one_device())  # the ordinary loading path
    assert count_params(student.config) == st["num_params"]
    assert student.tokenizer.chat_template
    cfg = demo_config(tiny=True)
    task = build_task(cfg.task)
    again = build_student(cfg.student, task.pretrain, cfg.task.corpus_recipe(),
                          cache_dir=cache)
    assert again.cached and again.path == path
    # A number is spelt the same way wherever it appears: never merged with the space or
    # brace before it (so copying a result into \boxed{} is a copy).
    tok = student.tokenizer.tokenize
    assert tok(" 305") == ["Ġ"] + tok("305")
    assert tok("{305}") == ["{"] + tok("305") + ["}"]


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_demo_out_dir_is_reusable(demo_run, tmp_path):
    from lark_jax.demo.pipeline import MARKER, _prepare_out

    out, _ = demo_run
    assert (out / MARKER).is_file()
    d = tmp_path / "again"
    d.mkdir()
    (d / MARKER).write_text("{}")
    (d / "runs").mkdir()
    (d / "runs" / "x").write_text("old")
    _prepare_out(d)
    assert not (d / "runs").exists()


# -- the notebook ---------------------------------------------------------------------------

# A runtime without lark-jax, as on Colab: lark-jax looks uninstalled until %pip runs, which
# only records its arguments; jax.devices() can be made to answer another platform.
_COLAB_STUB = '''
import importlib.metadata, importlib.util, json, os, types
import jax
from IPython.core.magic import register_line_magic

HIDDEN, PIP, PLATFORM = True, [], None
REAL = importlib.metadata.version, importlib.util.find_spec, jax.devices

def fake_version(dist):
    if HIDDEN and dist == "lark-jax":
        raise importlib.metadata.PackageNotFoundError(dist)
    return REAL[0](dist)

def fake_find_spec(name, *a, **k):
    return None if HIDDEN and name.split(".")[0] == "lark_jax" else REAL[1](name, *a, **k)

@register_line_magic
def pip(line):
    global HIDDEN
    PIP.append(line)
    HIDDEN = False

importlib.metadata.version, importlib.util.find_spec = fake_version, fake_find_spec
jax.devices = lambda: [types.SimpleNamespace(platform=PLATFORM)] if PLATFORM else REAL[2]()
'''


def _cell_text(cell) -> str:
    return "".join(o.get("text", "") + o.get("evalue", "") for o in cell.get("outputs", []))


def _check_colab_branches(nbclient, nbformat, nb, tmp_path):
    """The setup cell where lark-jax is missing (no URL: a clear stop, no pip; a URL: pip from
    git; inside a clone: pip -e of it) and the preset cell's choice by platform."""
    src = {c.id: c.source for c in nb.cells}
    setup, preset = src["cell-01"], src["cell-05-preset"]
    url = "https://example.invalid/lark-jax"
    assert 'LARK_JAX_GIT_URL = ""' in setup
    bare, clone = tmp_path / "colab" / "bare", tmp_path / "colab" / "clone"
    (clone / "lark_jax").mkdir(parents=True)
    (clone / "notebooks").mkdir()
    (clone / "pyproject.toml").write_text("")
    bare.mkdir()
    show = "print(json.dumps(PIP))"
    with_url = setup.replace('= ""', f'= "{url}"', 1)
    runs = [(bare, setup), (bare, with_url), (clone / "notebooks", setup)]
    cells = [_COLAB_STUB, "os.environ.pop('LARK_JAX_DEMO_TINY', None)"]
    for cwd, code in runs:
        cells += [f"os.chdir({str(cwd)!r}); HIDDEN, PIP = True, []", code, show]
    cells += ["PLATFORM = None", preset, "PLATFORM = 'gpu'", preset]
    stub = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(stub, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(bare)}}).execute()
    out = [_cell_text(c) for c in stub.cells]
    errors = [o for c in stub.cells for o in c.outputs if o.output_type == "error"]
    # No URL, no clone: SystemExit naming the variable to set, nothing installed.
    assert [e.ename for e in errors] == ["SystemExit"], out
    assert "set LARK_JAX_GIT_URL" in errors[0].evalue
    assert json.loads(out[4]) == []
    assert json.loads(out[7]) == [f'install -q "lark-jax @ git+{url}"'], out[6]
    assert f"installed from git+{url}" in out[6]
    assert json.loads(out[10]) == [f'install -q -e "{clone}"'], out[9]
    assert "preset: tiny (CPU runtime" in out[12] and "preset: quick (GPU runtime)" in out[14]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, demo_cache):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("LARK_JAX_DEMO_TINY", "1")
    monkeypatch.setenv("LARK_JAX_CACHE", str(demo_cache))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    _check_colab_branches(nbclient, nbformat, nb, tmp_path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # Where lark-jax is installed (CI, this checkout) the setup cell installs nothing.
    cells = {c.id: _cell_text(c) for c in nb.cells}
    assert "installed already" in cells["cell-01"], cells["cell-01"]
    assert "preset: tiny (LARK_JAX_DEMO_TINY=1 is set)" in cells["cell-05-preset"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # run_demo's returned report (displayed by the notebook) is the one it wrote.
    md = (tmp_path / "lark-jax-demo" / "results.md").read_text()
    assert any(o.get("data", {}).get("text/markdown") == md for o in outputs)


def test_heldout_metrics_match_float64_torch_in_any_batch_order(hf_students):
    """ref loss and step acc against float64 log-softmax of the transformers model's logits,
    over records of different lengths split into several (length-sorted) batches."""
    import numpy as np
    import torch

    from lark_jax.demo.heldout import heldout_metrics, prepare_heldout
    from lark_jax.models import load_student

    d, model = hf_students["llama_tied_gqa"]
    student = load_student(d, mesh=one_device())
    texts = ["3 + 4 = 7. \\boxed{7}", "Step 1: 12 - 5 = 7.\nStep 2: 7 * 2 = 14. So 14.",
             "= 1", "A long one: 1 + 1 = 2, 2 + 2 = 4, 4 + 4 = 8, 8 + 8 = 16. Done."]
    records = [{"messages": [{"role": "user", "content": f"problem {i}"},
                             {"role": "assistant", "content": t}]}
               for i, t in enumerate(texts)]
    held = prepare_heldout(student.tokenizer, records)
    got = heldout_metrics(student, held, batch=2)
    num = den = hits = total = 0
    for r, ids in enumerate(held.ids):
        with torch.no_grad():
            z = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
        logp = torch.log_softmax(z, -1).numpy()
        js = np.arange(max(held.start[r], 1), len(ids))
        ce = -logp[js - 1, ids[js]]
        assert got["per_record"][r] == pytest.approx(ce.mean(), rel=1e-4)
        num, den = num + ce.sum(), den + len(js)
        for toks in held.marks[r]:
            total += 1
            hits += all(logp[j - 1].argmax() == ids[j] for j in toks)
    assert sum(len(m) for m in held.marks) == 8  # every "= N" of the texts was marked
    assert got["loss"] == pytest.approx(num / den, rel=1e-4)
    assert got["marked_acc"] == pytest.approx(hits / total)


def test_machine_info_names_the_cpu_devices_and_versions():
    import re

    import flax
    import jax
    import jaxlib

    from lark_jax.demo.report import machine_info

    m = machine_info()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if found:
        assert m["cpu"] == found.group(1).strip()
    assert m["cpu"]
    assert (m["jax"], m["jaxlib"], m["flax"]) == (jax.__version__, jaxlib.__version__,
                                                 flax.__version__)
    kinds = [d.device_kind for d in jax.devices()]
    assert m["devices"] == {k: kinds.count(k) for k in kinds}
    assert m["backend"] == jax.default_backend() and m["cpu_count"] == os.cpu_count()
    json.dumps(m)  # plain JSON


def test_headline_and_run_lengths_name_the_equal_steps_run_once():
    from lark_jax.demo.report import _length, headline

    def row(m, steps, twin=None):
        return {"method": m, "steps": steps, "acc": {"mean": 0.5, "ci95": [0.4, 0.6]},
                "same_training_as": [twin]}

    d = {"mean": 0.1, "ci95": [0.05, 0.15], "resolved": True}
    res = {"k": 4, "config": {"epochs": 4, "batch_size": 8, "budget": 1},
           "guess": {"acc": 0.3}, "paired": {"lark - all": d, "lark - all-equal-steps": d},
           "methods": [row("lark", 400), row("all", 3200), row("all-equal-steps", 400)]}
    assert "lark - all-equal-steps: +10.0 pts" in headline(res)
    assert _length(res).endswith("(steps = ceil(records / 8) x 4: lark 400; all 3200), except "
                                 "all-equal-steps 400: every candidate for as many steps as a "
                                 "budget-1 selection (the same compute)")
    # With one step count for every run (--steps) it is all's training: stated once.
    res["methods"][2] = row("all-equal-steps", 400, twin="all-s0")
    assert "all-equal-steps" not in headline(res) and "lark - all:" in headline(res)
