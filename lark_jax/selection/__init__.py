"""Selection: which trajectories to train on, and with what weight (docs/method.md, step 3).

``select(table, policy, budget, ...)`` runs one policy over a :class:`ScoreTable` and returns
a :class:`Selection`. The LARK policy has two modes and three solvers:

Per problem (default). Energies e = ĝ, uniform prior over each problem's valid candidates.
  * ``closed-form``: the reference's rule (:mod:`.closed_form`); writes A, the top
    ``min(B, K')`` candidates, with ``train_weight = q_k`` (possibly 0 for a candidate tied
    with the best excluded one, as the reference writes it).
  * ``exact`` / ``mirror-descent``: the χ² problem solved for a temperature: without
    ``tau``, each problem's implied τ_B, so the solution is the closed form (ties and all-NaN
    problems, where no finite τ gives the reference's rule, keep the closed form's weights);
    A is written with the solver's weights renormalised over A. With ``tau``, one τ for every
    problem; the records written are the solution's support (for mirror descent: entries
    above its KKT tolerance), weights renormalised over them, so each problem keeps as many
    candidates as the χ² trade-off decides rather than B.

Global (``global_budget=M``). One distribution Q over every trajectory of the pool,

    maximise <Q, e> − τ D_χ²(Q ‖ P),   P[n, k] = 1 / (N · K_n)  (uniform over problems, then
    uniform within a problem),

so easy and hard problems compete for one budget. The support of the solution is always an
upper set of e (``e > θ − 2τ``), whatever P; the budget M maps to the temperature exactly,
no search needed: keeping the global top M means ``θ − 2τ = e_(M+1)`` and normalisation gives
``τ_M = Σ_{i∈A} P̃_i (e_i − e_(M+1)) / 2``, hence ``Q_i ∝ P_i (e_i − e_(M+1))`` on A (the
per-problem edge rules carry over). What χ² adds over a plain top-M is the weighting: Q is
linear in the margin and proportional to the prior, so a problem with many candidates does
not buy extra mass. It does *not* guarantee every problem a trajectory (D_χ² stays finite
when a problem gets Q = 0); problems left out are counted in ``info``.
Train weights in global mode: ``train_weight = N · Q`` (``train_scale = N``), so the weights
of the whole selection sum to N, the number of problems, exactly as in per-problem mode where
each problem's weights sum to 1; a run's loss scale is then comparable between modes.
``solver="exact"``/``"mirror-descent"`` solve the same global problem at τ_M (or ``tau``).

All JAX work runs in float64 (``jax.enable_x64``) so that the closed form reproduces the
reference's float64 arithmetic, its 1e-8 and 1e-12 constants included.
"""

from __future__ import annotations

import jax
import numpy as np

from lark_jax.selection.baselines import (
    POLICIES,
    Selection,
    baseline,
    best_teacher,
    needed_fields,
    random_matched,
    tie_keys,
    verified,
)
from lark_jax.selection.closed_form import (
    STATUS_ALL_NAN,
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_SHORT,
    STATUS_TIE,
    closed_form,
    global_closed_form,
    global_prior,
    reference_closed_form,
)
from lark_jax.selection.io import ScoreTable, load_scores
from lark_jax.selection.mirror_descent import default_tol, mirror_descent, solve_exact

SOLVERS = ("closed-form", "mirror-descent", "exact")

__all__ = [
    "POLICIES", "SOLVERS", "ScoreTable", "Selection", "baseline", "best_teacher",
    "closed_form", "global_closed_form", "load_scores", "mirror_descent", "needed_fields",
    "random_matched", "reference_closed_form", "select", "solve_exact", "verified",
]


def _status_counts(status: np.ndarray) -> dict:
    names = {STATUS_OK: "ok", STATUS_SHORT: "fewer_than_budget_plus_one",
             STATUS_TIE: "tie", STATUS_ALL_NAN: "all_nan", STATUS_EMPTY: "empty"}
    return {names[s]: int((status == s).sum()) for s in names if (status == s).any()}


def _solve(solver, e, tau, mask, prior, tol, max_iters):
    if solver == "exact":
        return solve_exact(e, tau, mask, prior=prior)
    return mirror_descent(e, tau, mask, prior=prior, tol=tol, max_iters=max_iters)


def _solver_info(sol, rows) -> dict:
    it = np.asarray(sol.iterations)[rows]
    kkt = np.asarray(sol.kkt)[rows]
    gap = np.asarray(sol.gap)[rows]
    conv = np.asarray(sol.converged)[rows]
    if it.size == 0:
        return {"rows_solved": 0}
    return {"rows_solved": int(it.size), "iterations_max": int(it.max()),
            "iterations_mean": float(it.mean()), "kkt_max": float(kkt.max()),
            "duality_gap_max": float(gap.max()), "unconverged": int((~conv).sum())}


def _renormalise(q: np.ndarray, keep: np.ndarray, axis=-1) -> np.ndarray:
    q = np.where(keep, np.maximum(q, 0.0), 0.0)
    s = q.sum(axis=axis, keepdims=True)
    uniform = keep / np.maximum(keep.sum(axis=axis, keepdims=True), 1)
    return np.where(s > 0, q / np.where(s > 0, s, 1), uniform)


def select(table: ScoreTable, policy: str = "lark", budget: int = 1, *,
           solver: str = "closed-form", tau: float | None = None,
           global_budget: int | None = None, seed: int = 0, tol: float | None = None,
           max_iters: int = 200) -> Selection:
    """Run ``policy`` over ``table`` (see the module docstring for the LARK modes; the
    baselines and controls, ``random-matched`` included, are :func:`baseline`'s)."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    if policy != "lark":
        return baseline(table, policy, budget, seed)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if tau is not None and solver == "closed-form":
        raise ValueError("the closed form takes its temperature from the budget; a given tau "
                         "needs solver 'exact' or 'mirror-descent'")
    if tau is not None and not tau > 0:
        raise ValueError("tau must be > 0")
    if global_budget is not None and global_budget < 1:
        raise ValueError("global_budget must be >= 1")
    e = np.asarray(table.fields["g_hat"], np.float64)
    mask = table.mask
    with jax.enable_x64(True):
        if global_budget is None:
            return _per_problem(table, e, mask, budget, solver, tau, tol, max_iters)
        return _global(table, e, mask, global_budget, solver, tau, tol, max_iters)


def _per_problem(table, e, mask, budget, solver, tau, tol, max_iters) -> Selection:
    cf = closed_form(e, budget, mask, keys=tie_keys(table))
    status = np.asarray(cf.status)
    info = {"status": _status_counts(status)}
    weights, chosen = np.asarray(cf.weights), np.asarray(cf.selected)
    if solver != "closed-form":
        if tau is None:
            # Only rows whose closed form is a χ² solution at a finite τ are solved.
            rows = (status == STATUS_OK) | (status == STATUS_SHORT)
            taus = np.where(rows, np.asarray(cf.tau), 1.0)
            sol = _solve(solver, e, taus, mask, None, tol, max_iters)
            q = np.asarray(sol.weights)
            weights = np.where(rows[:, None], _renormalise(q, chosen), weights)
            info["tau"] = "implied per problem (tau_B)"
        else:
            sol = _solve(solver, e, tau, mask, None, tol, max_iters)
            q = np.asarray(sol.weights)
            rows = status != STATUS_EMPTY
            chosen = _support(q, solver, tol) & mask
            weights = _renormalise(q, chosen)
            info["tau"] = tau
        info["solver"] = _solver_info(sol, rows)
    return Selection(weights, chosen, np.where(mask, e, np.nan), "lark", budget,
                     solver=solver, info=info)


def _support(q: np.ndarray, solver: str, tol: float | None) -> np.ndarray:
    if solver == "exact":
        return q > 0
    # Mirror descent never reaches exact zeros: entries at or below its KKT tolerance are
    # what it would drive to zero.
    return q > (default_tol(np.float64) if tol is None else tol)


def _global(table, e, mask, m, solver, tau, tol, max_iters) -> Selection:
    n = table.n_problems
    gcf = global_closed_form(e, m, mask, keys=None if table.order is None else table.order)
    chosen = np.asarray(gcf.selected)
    weights = np.asarray(gcf.weights)
    info = {"status": _status_counts(np.asarray(gcf.status)[None]),
            "tau_implied": float(gcf.tau)}
    if solver != "closed-form":
        prior = np.asarray(global_prior(mask)).reshape(1, -1)
        solvable = int(gcf.status) in (STATUS_OK, STATUS_SHORT)
        if tau is None and solvable:
            sol = _solve(solver, e.reshape(1, -1), float(gcf.tau), mask.reshape(1, -1),
                         prior, tol, max_iters)
            weights = _renormalise(np.asarray(sol.weights).reshape(e.shape), chosen, None)
            info["solver"] = _solver_info(sol, np.array([True]))
        elif tau is not None:
            sol = _solve(solver, e.reshape(1, -1), tau, mask.reshape(1, -1), prior, tol,
                         max_iters)
            q = np.asarray(sol.weights).reshape(e.shape)
            chosen = _support(q, solver, tol) & mask
            weights = _renormalise(q, chosen, None)
            info["solver"] = _solver_info(sol, np.array([True]))
            info["tau"] = tau
    info["problems_without_selection"] = int((~chosen.any(-1)).sum())
    return Selection(weights, chosen, np.where(mask, e, np.nan), "lark", m, mode="global",
                     solver=solver, train_scale=float(n), info=info)
