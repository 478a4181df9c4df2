"""How long a demo run will take: its stage sizes times per-unit costs measured once.

The costs are the quick preset's run from an empty cache
(``benchmarks/results/demo_quick_2026-12-05_hostmem/results.json``, ``timings_s``) on a
2-core AMD EPYC, divided by that run's sizes, with every cost proportional to the
student's parameter count:

    student      pre-training steps × batch × params          182.3 s
    score        pool trajectories × params                   23.3 s
    eval         samples × new tokens × params, per eval      253.6 s over 16 evals
    fine-tunes   run-steps × batch × params                   1,201.3 s over 17,600 run-steps
    held-out     fine-tunes measured × params                 48.5 s over 21 fine-tunes
    diagnostics  pool trajectories × params                   50.7 s

Measured since: the per-teacher runs' evaluations (``utility_eval_problems``, an eval's cost
times the share of the benchmark) and the first-order fine-tune (its steps, plus one more
scoring of the pool) are counted at the same unit costs, as are an iterative method's
re-scorings of the pool (one per seed and round after the first).

An estimate, not a promise: another CPU differs by up to ~3x, an accelerator by far more,
and attention's cost grows faster than linearly with length. The demo prints it at the
start and shows the time left as the stages finish (the same estimate, scaled by the
speed measured so far).
"""

from __future__ import annotations

from lark_jax.demo.config import METHOD_SPECS, DemoConfig

REFERENCE_MACHINE = "2-core AMD EPYC (the quick preset's committed run)"
_P = 803_968  # the reference run's student parameters
_S = {  # seconds per unit, units as in the module docstring (params counted once, above)
    "student": 182.3 / (2000 * 16 * _P),
    "score": 23.3 / (6400 * _P),
    "eval": 253.6 / (16 * 500 * 4 * 200 * _P),
    "train": 1201.3 / (17_600 * 8 * _P),
    "heldout": 48.5 / (21 * _P),
    "diagnostics": 50.7 / (6400 * _P),
}


def student_params(cfg: DemoConfig) -> int:
    from lark_jax.models.params import count_params
    from lark_jax.models.tiny import tiny_config

    r = cfg.student
    return count_params(tiny_config(r.family, vocab_size=r.vocab_size, hidden_size=r.hidden_size,
                                    num_layers=r.num_layers, num_heads=r.num_heads,
                                    num_kv_heads=r.num_kv_heads,
                                    intermediate_size=r.intermediate_size))


def fine_tunes(cfg: DemoConfig, n_trajectories: int, per_teacher: dict[str, int]
               ) -> tuple[int, int, int]:
    """(run-steps trained, evaluations, fine-tunes measured on held-out data) of the
    methods and utility runs, as ``stages.run_methods`` plans them: a budget-B selection
    holds n_pool × B records, 'all' every trajectory, 'best-teacher' every trajectory of
    one teacher (counted as the largest teacher's: which one is known only after scoring);
    LARK under the reference objective at budget 1 computes LARK's steps and is trained and
    evaluated once."""
    n_budget = cfg.task.n_pool * cfg.budget
    steps = evals = 0
    for method in cfg.methods:
        if method == "lark-reference" and cfg.budget == 1 and "lark" in cfg.methods:
            continue
        spec = METHOD_SPECS[method]
        n = (n_trajectories if spec.policy == "all" else
             max(per_teacher.values()) if spec.policy == "best-teacher" else n_budget)
        steps += cfg.run_steps(n_budget if spec.budget_steps else n) * len(cfg.seeds)
        evals += len(cfg.seeds)
    utility = list(per_teacher.values()) if cfg.utility else []
    steps += sum(cfg.run_steps(n) for n in utility)
    return steps, evals, evals + len(utility)


def estimate(cfg: DemoConfig, n_trajectories: int, per_teacher: dict[str, int],
             student_cached: bool) -> dict[str, float]:
    """Seconds per stage on the reference machine (see the module docstring)."""
    p = student_params(cfg)
    run_steps, evals, measured = fine_tunes(cfg, n_trajectories, per_teacher)
    one_eval = _S["eval"] * cfg.task.n_bench * cfg.eval_samples * cfg.max_new_tokens * p
    r = cfg.student
    n_util = cfg.utility_eval_problems
    util_share = (0.0 if not cfg.utility or n_util == 0 else
                  min(n_util or cfg.task.n_bench, cfg.task.n_bench) / cfg.task.n_bench)
    first_order = (_S["train"] * cfg.first_order_steps * cfg.batch_size * p
                   + _S["score"] * n_trajectories * p) if cfg.first_order_steps else 0.0
    # iterative methods: the pool scored again by each seed's student at every round
    rescores = sum((len(cfg.iterative_stops(cfg.task.n_pool * cfg.budget)) - 1)
                   * len(cfg.seeds) for m in cfg.methods if METHOD_SPECS[m].iterative)
    return {
        "student": 0.0 if student_cached else _S["student"] * r.pretrain_steps * r.batch_size * p,
        "score": _S["score"] * n_trajectories * p,
        "base eval": one_eval,
        "fine-tunes": (_S["train"] * run_steps * cfg.batch_size * p + evals * one_eval
                       + _S["heldout"] * measured * p
                       + util_share * len(per_teacher) * one_eval
                       + _S["score"] * n_trajectories * p * rescores),
        "diagnostics": _S["diagnostics"] * n_trajectories * p + first_order,
    }


__all__ = ["REFERENCE_MACHINE", "estimate", "fine_tunes", "student_params"]
