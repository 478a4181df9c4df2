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
    cfg = demo_config()
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


def test_the_never_run_full_preset_is_not_offered():
    with pytest.raises(LarkError, match="no larger demo preset"):
        demo_config(quick=False)
    assert demo_config().preset == "quick"
