"""The demo's time estimate: the plan it counts is the one the committed quick run trained,
and the estimate of that run is its measured time (the costs were derived from it)."""

import collections
import json
from pathlib import Path

import pytest

from lark_jax import LarkError
from lark_jax.demo.config import demo_config
from lark_jax.demo.estimate import estimate, fine_tunes, student_params
from lark_jax.demo.task import build_task

RUN = Path(__file__).resolve().parents[1] / "benchmarks/results/demo_quick_2026-12-05_hostmem"


def quick_sizes():
    # The committed run predates the per-teacher evaluations and the first-order fine-tune.
    cfg = demo_config(utility_eval_problems=0, first_order_steps=0)
    task = build_task(cfg.task)
    return cfg, len(task.pool), dict(collections.Counter(r["teacher"] for r in task.pool))


def test_the_plan_counted_is_the_committed_runs():
    results = json.loads((RUN / "results.json").read_text())
    cfg, n, per_teacher = quick_sizes()
    assert student_params(cfg) == results["student"]["num_params"]
    steps, evals, measured = fine_tunes(cfg, n, per_teacher)
    # Methods: each seed trains every method once, except those that shared a training.
    trained = [m for m in results["methods"] if not m.get("same_training_as")
               or not any(m["same_training_as"])]
    assert evals == sum(m["n_seeds"] for m in trained) == 15
    method_steps = sum(m["steps"] * m["n_seeds"] for m in trained)
    utility_steps = sum(cfg.run_steps(k) for k in per_teacher.values())
    assert steps == method_steps + utility_steps == 17_600
    assert measured == evals + len(per_teacher)


def test_the_estimate_of_the_committed_run_is_its_time():
    results = json.loads((RUN / "results.json").read_text())
    cfg, n, per_teacher = quick_sizes()
    est = estimate(cfg, n, per_teacher, student_cached=False)
    assert sum(est.values()) == pytest.approx(results["seconds"], rel=0.02)
    assert est["student"] == pytest.approx(results["timings_s"]["student"], rel=1e-3)
    assert estimate(cfg, n, per_teacher, student_cached=True)["student"] == 0.0
    # Larger work, longer estimate: twice the seeds, more fine-tune time.
    twice = estimate(demo_config(seeds=(0, 1, 2, 3, 4, 5)), n, per_teacher, False)
    assert twice["fine-tunes"] > 1.5 * est["fine-tunes"]


def test_the_new_diagnostics_and_the_controls_are_counted():
    old, n, per_teacher = quick_sizes()
    now = demo_config()
    a, b = estimate(old, n, per_teacher, True), estimate(now, n, per_teacher, True)
    one_eval = b["base eval"]
    share = now.utility_eval_problems / now.task.n_bench
    assert b["fine-tunes"] - a["fine-tunes"] == pytest.approx(
        len(per_teacher) * share * one_eval)
    # the first-order run: one more scoring of the pool plus its steps, linear in them
    d = {k: estimate(demo_config(first_order_steps=k), n, per_teacher, True)["diagnostics"]
         for k in (0, 16, 32)}
    assert d[0] == pytest.approx(a["diagnostics"])
    assert d[16] - d[0] - a["score"] == pytest.approx(d[32] - d[16])
    assert d[32] > d[16] > d[0] + a["score"]
    # controls: random-matched and verified hold a budget-B selection's records,
    # best-teacher the largest teacher's (which teacher is known only after scoring)
    ctl = demo_config(methods=("lark", "random-matched", "best-teacher", "verified"),
                      utility=False, seeds=(0,))
    steps, evals, _ = fine_tunes(ctl, n, per_teacher)
    assert evals == 4
    assert steps == 3 * ctl.run_steps(ctl.task.n_pool) + ctl.run_steps(max(per_teacher.values()))


def test_the_never_run_full_preset_is_not_offered():
    with pytest.raises(LarkError, match="no larger demo preset"):
        demo_config(quick=False)
    assert demo_config().preset == "quick"


def test_an_iterative_method_counts_its_rescorings():
    """lark-iterative trains as long as LARK and scores the pool once more per seed and
    round after the first: quick (4 epochs) at one round per epoch, 3 x 3 scorings."""
    _, n, per_teacher = quick_sizes()
    plain = demo_config(methods=("lark", "random"), utility=False)
    it = demo_config(methods=("lark", "lark-iterative"), utility=False)
    a, b = estimate(plain, n, per_teacher, True), estimate(it, n, per_teacher, True)
    assert fine_tunes(plain, n, per_teacher) == fine_tunes(it, n, per_teacher)
    assert b["fine-tunes"] - a["fine-tunes"] == pytest.approx(9 * a["score"])
    two = estimate(demo_config(methods=("lark", "lark-iterative"), utility=False,
                               iterative_epochs=2), n, per_teacher, True)
    assert two["fine-tunes"] - a["fine-tunes"] == pytest.approx(3 * a["score"])
