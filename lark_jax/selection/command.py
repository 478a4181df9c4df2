"""``lark-jax select``: scores + pool -> weighted training JSONL (+ manifest)."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time

import numpy as np

from lark_jax._version import __version__
from lark_jax.data.reader import add_pool_arguments, pool_options
from lark_jax.errors import LarkError
from lark_jax.progress import Reporter
from lark_jax.selection import POLICIES, SOLVERS, select
from lark_jax.selection.baselines import needed_fields
from lark_jax.selection.io import (
    gather_pool,
    json_number,
    load_scores,
    pool_order_agrees,
    write_selection,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, help="scores JSON written by `lark-jax score`")
    p.add_argument("--pool", required=True,
                   help="the trajectory pool that was scored (any source `score` reads, "
                        "read with the same --columns/--layout/--split)")
    add_pool_arguments(p, filters=False)
    p.add_argument("--out", required=True,
                   help="training data to write: JSONL, or parquet when OUT ends in .parquet "
                        "(a manifest goes to OUT.manifest.json)")
    p.add_argument("--policy", default="lark", choices=POLICIES,
                   help="lark (chi-square policy on g_hat) or a baseline (default: lark)")
    p.add_argument("--budget", type=int, default=1,
                   help="trajectories kept per problem, B (default: 1)")
    p.add_argument("--global-budget", type=int, default=None, metavar="N",
                   help="lark only: one chi-square distribution over the whole pool keeping "
                        "the global top N (train_weight = n_problems * Q)")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help="lark only: closed-form (the reference, default), exact "
                        "(sorted threshold) or mirror-descent; without --tau the last two use "
                        "the budget's implied temperature and reproduce the closed form")
    p.add_argument("--tau", type=float, default=None,
                   help="chi-square temperature for --solver exact|mirror-descent (instead "
                        "of the budget's implied one); keeps the solution's support")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument("--tol", type=float, default=None,
                   help="mirror descent: KKT residual to stop at (default 1e-10)")
    p.add_argument("--max-iters", type=int, default=200,
                   help="mirror descent: step limit per problem (default 200)")
    p.add_argument("--in-memory", action="store_true",
                   help="hold the scores table whole instead of streaming scores and pool "
                        "in partitions (the global mode and the cross-problem controls "
                        "always do); the output is the same")


def _check(args) -> str:
    """Validate option combinations; returns the solver to use."""
    if args.budget < 1:
        raise LarkError(f"--budget must be >= 1, got {args.budget}")
    if args.global_budget is not None and args.global_budget < 1:
        raise LarkError(f"--global-budget must be >= 1, got {args.global_budget}")
    if args.max_iters < 1:
        raise LarkError(f"--max-iters must be >= 1, got {args.max_iters}")
    if args.tol is not None and not args.tol > 0:
        raise LarkError(f"--tol must be > 0, got {args.tol}")
    lark_only = [name for name, val in (("--solver", args.solver), ("--tau", args.tau),
                                        ("--global-budget", args.global_budget))
                 if val is not None]
    if args.policy != "lark" and lark_only:
        verb = "applies" if len(lark_only) == 1 else "apply"
        raise LarkError(f"{', '.join(lark_only)} only {verb} to --policy lark")
    solver = args.solver or "closed-form"
    if args.tau is not None:
        if not (math.isfinite(args.tau) and args.tau > 0):
            raise LarkError(f"--tau must be a positive number, got {args.tau}")
        if solver == "closed-form":
            raise LarkError("--tau needs --solver exact or mirror-descent (the closed form "
                            "takes its temperature from the budget)")
    return solver


# Policies that decide each problem from its own candidates: select streams them
# (selection.stream). The others compare problems or teachers across the pool.
PER_PROBLEM = ("lark", "random", "all", "min-loss", "max-loss", "rsr", "shortest", "longest",
               "verified")


def _manifest(args, solver_name, policy, mode, tie_order, options, header, counts, info,
              train_scale) -> dict:
    return {
        "format": "lark-jax selection manifest v1",
        "policy": policy,
        "mode": mode,
        "budget": args.budget,
        "global_budget": args.global_budget,
        "solver": solver_name,
        "tau": args.tau if args.tau is not None else ("implied" if policy == "lark"
                                                      else None),
        "seed": args.seed,
        "tie_order": ("equal scores: the candidate earlier in the pool file first "
                      f"(taken from: {tie_order})" if args.policy == "lark"
                      else "equal scores: lower candidate_id first"),
        "scores": os.fspath(args.scores),
        "pool": os.fspath(args.pool),
        "out": os.fspath(args.out),
        **counts,
        "pool_options": options.describe(),
        "pool_filters": header.get("pool_filters"),
        "train_weight_scale": train_scale,
        "info": info,
        "lark_jax_version": __version__,
        "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _summary(rep, args, t0, n_records, n_selected, n_problems, policy, solver_name, mode,
             info) -> None:
    mode = (f"global budget {args.global_budget}" if mode == "global"
            else f"budget {args.budget}")
    how = f", {solver_name}" if policy == "lark" else ""
    unconverged = info.get("solver", {}).get("unconverged", 0)
    if unconverged:
        how += f", {unconverged} problem(s) short of the KKT tolerance: raise --max-iters"
    rep.summary(f"selected {n_records} trajectories of {n_selected}/{n_problems} problems "
                f"({policy}{how}, {mode}) in {time.perf_counter() - t0:.1f}s -> {args.out}")


def _run_streaming(args, rep: Reporter, solver: str, optional, t0: float) -> None:
    from lark_jax.selection.stream import select_streaming

    options = pool_options(args)
    bars = {}

    def progress(stage):
        for b in bars.values():  # one bar at a time: the previous stage is over
            b.__exit__(None, None, None)
        bars.clear()
        bars[stage] = rep.bar(None, stage, unit="rec")
        return bars[stage].__enter__()

    def manifest(r):
        counts = {"n_problems": r.n_problems, "n_problems_empty": r.n_empty,
                  "n_candidates": r.n_candidates, "n_pool_records_unscored": r.unscored,
                  "n_records": r.n_records, "n_problems_selected": r.n_problems_selected,
                  "selected_tokens": r.selected_tokens,
                  "train_weight_sum": r.train_weight_sum}
        return _manifest(args, r.solver, r.policy, "per-problem", r.tie_order, options,
                         r.header, counts, r.info, r.train_scale)

    try:
        r = select_streaming(
            args.scores, args.pool, args.out, manifest, policy=args.policy,
            budget=args.budget, need=needed_fields(args.policy), optional=optional,
            options=options, progress=progress,
            select_kwargs=dict(solver=solver, tau=args.tau, seed=args.seed, tol=args.tol,
                               max_iters=args.max_iters))
    finally:
        for b in bars.values():
            b.__exit__(None, None, None)
    _summary(rep, args, t0, r.n_records, r.n_problems_selected, r.n_problems, r.policy,
             r.solver, "per-problem", r.info)


def run(args, rep: Reporter) -> None:
    t0 = time.perf_counter()
    solver = _check(args)
    optional = ("tokens",) if args.policy == "lark" else ("tokens", "g_hat")
    if args.policy in PER_PROBLEM and args.global_budget is None and not args.in_memory:
        return _run_streaming(args, rep, solver, optional, t0)
    table = load_scores(args.scores, need=needed_fields(args.policy), optional=optional)
    rep.info(f"{table.n_problems} problems, {table.n_candidates} scored candidates")
    def run_policy():
        try:
            return select(table, args.policy, args.budget, solver=solver, tau=args.tau,
                          global_budget=args.global_budget, seed=args.seed, tol=args.tol,
                          max_iters=args.max_iters)
        except ValueError as e:  # a policy's check of the scores (verified's values)
            raise LarkError(str(e), where=str(args.scores)) from None

    sel = run_policy()

    def chosen_keys(sel):
        rows, cols = np.nonzero(sel.chosen)  # row-major: problem order, then candidate id
        pids = table.problem_ids[rows].tolist()
        cids = table.candidate_ids[rows, cols].tolist()
        return rows, cols, pids, cids, set(zip(pids, cids, strict=True))

    rows, cols, pids, cids, wanted = chosen_keys(sel)
    positions: list = []
    options, source_ids = pool_options(args), {}
    with rep.bar(None, "read pool", unit="rec") as advance:
        found, unscored = gather_pool(args.pool, table, wanted, progress=advance,
                                      positions=positions, options=options,
                                      source_ids=source_ids)
    tie_order = table.order_source
    cross_problem = args.global_budget is not None and table.order_source != "pool_line"
    if args.policy == "lark" and (cross_problem or not pool_order_agrees(table, positions[0])):
        # The scores list candidates in another order than this pool file (a re-ordered
        # pool, or scores from elsewhere), or the global mode needs the order across
        # problems, which only pool_line gives: select again with the pool's own order.
        table.order, tie_order = positions[0], "pool file (re-read)"
        sel = run_policy()
        rows, cols, pids, cids, wanted = chosen_keys(sel)
        if not wanted <= found.keys():
            with rep.bar(None, "read pool again", unit="rec") as advance:
                found, unscored = gather_pool(args.pool, table, wanted, progress=advance,
                                              options=options, source_ids=source_ids)

    train_w = sel.weights[rows, cols] * sel.train_scale
    scores = sel.score[rows, cols]
    budget = args.global_budget if sel.mode == "global" else args.budget

    def records():
        for pid, cid, w, s in zip(pids, cids, train_w.tolist(), scores.tolist(), strict=True):
            teacher, messages = found[(pid, cid)]
            yield {"messages": list(messages),
                   "meta": {"problem_id": pid, "candidate_id": cid, "teacher": teacher,
                            "policy": sel.policy, "budget": budget, "score": json_number(s),
                            "train_weight": float(w),
                            **({"source_id": source_ids[pid, cid]}
                               if (pid, cid) in source_ids else {})}}

    tokens = table.fields.get("tokens")
    selected_tokens = int(np.nansum(np.where(sel.chosen, tokens, 0))) if tokens is not None \
        else None
    counts = {"n_problems": table.n_problems, "n_problems_empty": table.n_empty,
              "n_candidates": table.n_candidates, "n_pool_records_unscored": unscored,
              "n_records": len(pids), "n_problems_selected": int(sel.chosen.any(-1).sum()),
              "selected_tokens": selected_tokens, "train_weight_sum": float(train_w.sum())}
    manifest = _manifest(args, sel.solver, sel.policy, sel.mode, tie_order, options,
                         table.header, counts, sel.info, sel.train_scale)
    write_selection(args.out, records(), manifest)
    _summary(rep, args, t0, len(pids), counts["n_problems_selected"], table.n_problems,
             sel.policy, sel.solver, sel.mode, sel.info)
