"""Selection: closed form vs its per-problem oracle, χ² solvers vs KKT / bisection oracles,
baselines vs brute force, properties (hypothesis), bad input and the ``select`` command."""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lark_jax.errors import LarkError
from lark_jax.progress import Reporter
from lark_jax.selection import select
from lark_jax.selection.baselines import RANKED, baseline, random_keys
from lark_jax.selection.closed_form import (
    STATUS_ALL_NAN,
    STATUS_OK,
    STATUS_SHORT,
    STATUS_TIE,
    closed_form,
    global_closed_form,
    global_prior,
    pad_ragged,
    reference_closed_form,
)
from lark_jax.selection.command import add_arguments, run
from lark_jax.selection.io import ScoreTable, load_scores, manifest_path
from lark_jax.selection.mirror_descent import certificate, mirror_descent, objective, solve_exact

HYP = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def ragged_energies(rng, n, kmax=9, nan_rate=0.1, tie_rate=0.3):
    """Rows of 1..kmax energies with exact ties, scattered NaNs and some all-NaN rows."""
    rows = []
    for _ in range(n):
        k = int(rng.integers(1, kmax + 1))
        e = rng.normal(size=k) * 0.1
        if rng.random() < tie_rate:
            e = np.round(e * 20) / 20  # few distinct values: ties, also at the threshold
        if rng.random() < nan_rate:
            e[rng.random(k) < 0.5] = np.nan
        if rng.random() < 0.03:
            e[:] = np.nan
        rows.append(e)
    return rows


def bisection_oracle(e, p, tau):
    """χ² solution by bisection on θ (an algorithm independent of the sorted threshold)."""
    ok = np.isfinite(e)
    p = np.where(ok, p, 0.0)
    p = p / p.sum()
    e0 = np.where(ok, e, 0.0)

    def mass(theta):
        return np.sum(p * np.maximum(0.0, 1 + (e0 - theta) / (2 * tau)))

    lo, hi = e0[ok].min() - 2 * tau, e0[ok].max() + 2 * tau  # mass(lo) >= 1 >= mass(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return p * np.maximum(0.0, 1 + (e0 - 0.5 * (lo + hi)) / (2 * tau))


# -- closed form ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pairwise", "sort"])
def test_closed_form_matches_reference_loop(method):
    rng = np.random.default_rng(0)
    rows = ragged_energies(rng, 400)
    e, mask = pad_ragged(rows)
    for budget in (1, 2, 3, 5, 9):
        cf = closed_form(e, budget, mask, method=method)
        w, sel, status = np.asarray(cf.weights), np.asarray(cf.selected), np.asarray(cf.status)
        for i, r in enumerate(rows):
            q_ref, chosen = reference_closed_form(r, budget)
            np.testing.assert_allclose(w[i, :len(r)], q_ref, rtol=0, atol=1e-12)
            assert sorted(np.flatnonzero(sel[i]).tolist()) == sorted(chosen)
            assert not w[i, len(r):].any() and not sel[i, len(r):].any()
        assert {STATUS_OK, STATUS_SHORT, STATUS_TIE, STATUS_ALL_NAN} >= set(status.tolist())
    # the random rows exercised every branch
    statuses = set()
    for budget in (1, 2, 5):
        statuses |= set(np.asarray(closed_form(e, budget, mask).status).tolist())
    assert statuses == {STATUS_OK, STATUS_SHORT, STATUS_TIE, STATUS_ALL_NAN}


def test_closed_form_hand_cases():
    # Regular: t = 0.2, mean_A = 0.4 -> q = (0.5 − 0.2, 0.3 − 0.2) / (2 · 0.2).
    cf = closed_form(np.array([[0.5, 0.2, 0.3, 0.1]]), 2)
    np.testing.assert_allclose(np.asarray(cf.weights)[0], [0.75, 0, 0.25, 0], atol=1e-15)
    assert float(cf.tau[0]) == pytest.approx(2 * 0.2 / (2 * 4))
    # A tie at the threshold: A = {0, 1} (lower key first), candidate 1 gets weight 0.
    cf = closed_form(np.array([[0.5, 0.2, 0.2, 0.1]]), 2)
    np.testing.assert_allclose(np.asarray(cf.weights)[0], [1, 0, 0, 0], atol=1e-15)
    assert np.asarray(cf.selected)[0].tolist() == [True, True, False, False]
    # Keys, not positions, break ties: key 5 beats key 7.
    cf = closed_form(np.array([[0.2, 0.5, 0.2]]), 2, keys=np.array([[7, 3, 5]]))
    assert np.asarray(cf.selected)[0].tolist() == [False, True, True]
    # All of the top B+1 equal: uniform over A.
    cf = closed_form(np.array([[0.3, 0.3, 0.3]]), 2)
    np.testing.assert_allclose(np.asarray(cf.weights)[0], [0.5, 0.5, 0])
    assert int(cf.status[0]) == STATUS_TIE and float(cf.tau[0]) == 0
    # Fewer than B+1 valid: t = min − 1e-8.
    cf = closed_form(np.array([[0.3, np.nan, 0.1]]), 2)
    den = 2 * (0.1 + 1e-8)  # B (mean_A − t) with mean_A = 0.2, t = 0.1 − 1e-8
    np.testing.assert_allclose(np.asarray(cf.weights)[0], [(0.2 + 1e-8) / den, 0, 1e-8 / den],
                               rtol=0, atol=1e-15)  # 0.1 − (0.1 − 1e-8) rounds
    assert int(cf.status[0]) == STATUS_SHORT
    # All NaN: uniform over every candidate (and a NaN row does not disturb its neighbours).
    cf = closed_form(np.array([[np.nan] * 4, [1.0, 0.0, np.nan, np.nan]]),
                     1, np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool))
    np.testing.assert_allclose(np.asarray(cf.weights), [[1 / 3] * 3 + [0], [1, 0, 0, 0]])
    assert np.asarray(cf.status).tolist() == [STATUS_ALL_NAN, STATUS_OK]


def test_closed_form_float32_close_to_float64():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(200, 8))  # well separated energies: no ill-conditioned rows
    w64 = np.asarray(closed_form(e, 3).weights)
    w32 = np.asarray(closed_form(e.astype(np.float32), 3).weights)
    assert w32.dtype == np.float32
    np.testing.assert_allclose(w32, w64, atol=1e-4)


def test_closed_form_leaves_numpy_input_untouched():
    """The weights reuse the device copy's buffer; a NumPy input (which JAX may alias when it
    is aligned) must come out unchanged."""
    rng = np.random.default_rng(9)
    buf = np.empty(512 * 8 * 8 + 4096, np.uint8)
    off = -buf.ctypes.data % 4096
    aligned = buf[off:off + 512 * 8 * 8].view(np.float64).reshape(512, 8)
    for e in (aligned, np.empty((512, 8))):
        e[:] = rng.normal(size=e.shape)
        before = e.copy()
        w = np.asarray(closed_form(e, 2).weights)
        np.testing.assert_array_equal(e, before)
        np.testing.assert_allclose(w, np.asarray(closed_form(jax.device_put(before), 2).weights))


def test_implied_tau_is_a_chi2_solution():
    """At τ_B = B(mean_A − t)/(2K') the exact χ² solution is the closed form."""
    rng = np.random.default_rng(2)
    rows = ragged_energies(rng, 300, tie_rate=0.0)
    e, mask = pad_ragged(rows)
    for budget in (1, 2, 4):
        cf = closed_form(e, budget, mask)
        status = np.asarray(cf.status)
        for i, r in enumerate(rows[:50]):
            if status[i] != STATUS_OK:
                continue
            ok = np.isfinite(r)
            s = np.sort(r[ok])[::-1]
            expected = budget * (s[:budget].mean() - s[budget]) / (2 * ok.sum())
            assert float(cf.tau[i]) == pytest.approx(expected, rel=1e-12)
        rows_ok = (status == STATUS_OK) | (status == STATUS_SHORT)
        tau = np.where(rows_ok, np.asarray(cf.tau), 1.0)
        ex = solve_exact(e, tau, mask)
        np.testing.assert_allclose(np.asarray(ex.weights)[rows_ok],
                                   np.asarray(cf.weights)[rows_ok], atol=1e-8)


def test_global_closed_form():
    e = np.array([[0.5, 0.1, np.nan], [0.4, 0.3, 0.2], [0.05, 0, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], bool)
    prior = np.asarray(global_prior(mask))
    np.testing.assert_allclose(prior[0], [1 / 6, 1 / 6, 0])
    np.testing.assert_allclose(prior[1], [1 / 9] * 3)
    g = global_closed_form(e, 3, mask)
    # top 3 of the pool: 0.5, 0.4, 0.3; t = 0.2; Q ∝ P (e − t)
    expected = np.zeros((3, 3))
    expected[0, 0], expected[1, 0], expected[1, 1] = 0.3 / 6, 0.2 / 9, 0.1 / 9
    expected /= expected.sum()
    np.testing.assert_allclose(np.asarray(g.weights), expected, atol=1e-14)
    assert np.asarray(g.selected).sum() == 3 and not np.asarray(g.selected)[2].any()
    tau = float(g.tau)  # the exact χ² solution over the pool at τ_M is the same distribution
    ex = solve_exact(e.reshape(1, -1), tau, mask.reshape(1, -1), prior=prior.reshape(1, -1))
    np.testing.assert_allclose(np.asarray(ex.weights).reshape(3, 3), expected, atol=1e-12)
    # one problem: global == per problem
    one = np.array([[0.3, 0.1, 0.25, 0.0]])
    np.testing.assert_allclose(np.asarray(global_closed_form(one, 2).weights),
                               np.asarray(closed_form(one, 2).weights), atol=1e-15)


# -- χ² solvers -------------------------------------------------------------------------


def random_problems(rng, n, k=8, alpha=0.7, log_tau=(-5, 2)):
    e = rng.normal(size=(n, k))
    e[rng.random((n, k)) < 0.05] = np.nan
    prior = rng.dirichlet(np.full(k, alpha), size=n) + 1e-6
    tau = np.exp(rng.uniform(*log_tau, size=n))
    return e, prior, tau


def test_exact_solver_matches_bisection_and_kkt():
    rng = np.random.default_rng(3)
    e, prior, tau = random_problems(rng, 200)
    sol = solve_exact(e, tau, prior=prior)
    q = np.asarray(sol.weights)
    for i in range(len(e)):
        np.testing.assert_allclose(q[i], bisection_oracle(e[i], prior[i], tau[i]), atol=1e-9)
    # KKT written out independently: g_k = θ on the support, g_k <= θ off it.
    ok = np.isfinite(e)
    p = np.where(ok, prior, 0) / np.where(ok, prior, 0).sum(1, keepdims=True)
    g = np.where(ok, np.nan_to_num(e) - 2 * tau[:, None] * (q - p) / np.where(ok, p, 1), 0)
    for i in range(len(e)):
        on = q[i] > 0
        theta = g[i, on].mean()
        np.testing.assert_allclose(g[i, on], theta, atol=1e-8 * max(1, abs(theta)))
        assert (g[i, ok[i] & ~on] <= theta + 1e-9).all()
    assert np.all(q >= 0) and np.allclose(q.sum(1), 1) and not q[~ok].any()
    assert float(np.max(sol.kkt)) < 1e-9 and float(np.max(np.abs(sol.gap))) < 1e-9


@pytest.mark.parametrize("geometry,iters,tol", [("hybrid", 200, 1e-10), ("entropy", 3000, 1e-7)])
def test_mirror_descent_matches_exact_with_nonuniform_priors(geometry, iters, tol):
    rng = np.random.default_rng(4)
    if geometry == "hybrid":
        e, prior, tau = random_problems(rng, 150)
    else:  # plain EG is only fast on well-conditioned priors with an interior optimum
        e, prior, tau = random_problems(rng, 150, alpha=5.0, log_tau=(1, 2))
    ex = np.asarray(solve_exact(e, tau, prior=prior).weights)
    md = mirror_descent(e, tau, prior=prior, geometry=geometry, max_iters=iters, tol=tol)
    assert bool(np.all(md.converged)), np.asarray(md.kkt).max()
    q = np.asarray(md.weights)
    np.testing.assert_allclose(q, ex, atol=1e-6 if geometry == "entropy" else 1e-8)
    assert np.asarray(md.iterations).max() <= iters and np.asarray(md.iterations).min() >= 1
    # Weak duality: the reported gap bounds the true suboptimality from above.
    sub = np.asarray(objective(e, ex, tau, prior=prior)) - np.asarray(
        objective(e, q, tau, prior=prior))
    assert np.all(np.asarray(md.gap) >= sub - 1e-12)


def test_mirror_descent_lands_on_closed_form_at_implied_tau():
    rng = np.random.default_rng(5)
    rows = ragged_energies(rng, 400)
    e, mask = pad_ragged(rows)
    for budget in (1, 2, 3, 5):
        cf = closed_form(e, budget, mask)
        status = np.asarray(cf.status)
        rows_ok = (status == STATUS_OK) | (status == STATUS_SHORT)
        md = mirror_descent(e, np.where(rows_ok, np.asarray(cf.tau), 1.0), mask)
        dq = np.abs(np.asarray(md.weights) - np.asarray(cf.weights))[rows_ok]
        assert dq.max() <= 1e-4, dq.max()
        assert dq.max() <= 1e-8  # in fact far below the bar: convergence is linear
        assert bool(np.all(np.asarray(md.converged)[rows_ok]))
        assert np.asarray(md.iterations).max() <= 60


def test_certificates_detect_suboptimal_points():
    rng = np.random.default_rng(6)
    e, prior, tau = random_problems(rng, 50)
    e = np.nan_to_num(e, nan=-1.0)
    q_star = np.asarray(solve_exact(e, tau, prior=prior).weights)
    kkt0, gap0 = certificate(e, q_star, tau, prior=prior)
    assert float(np.max(kkt0)) < 1e-9 and float(np.max(np.abs(gap0))) < 1e-9
    q_bad = 0.7 * q_star + 0.3 * rng.dirichlet(np.ones(8), size=50)
    kkt, gap = certificate(e, q_bad, tau, prior=prior)
    sub = np.asarray(objective(e, q_star, tau, prior=prior) - objective(e, q_bad, tau,
                                                                        prior=prior))
    assert np.all(sub > 0) and np.all(np.asarray(gap) >= sub - 1e-12)
    assert np.all(np.asarray(kkt) > 1e-6)


def test_solver_trivial_rows():
    e = np.array([[np.nan, np.nan, np.nan], [0.2, 0.5, 0.5]])
    for sol in (solve_exact(e, [1.0, 0.0]), mirror_descent(e, [1.0, 0.0])):
        # all NaN: uniform; τ = 0: the τ -> 0 limit, prior on the argmax set
        np.testing.assert_allclose(np.asarray(sol.weights), [[1 / 3] * 3, [0, 0.5, 0.5]])
        assert np.asarray(sol.iterations).tolist() == [0, 0]


# -- properties ---------------------------------------------------------------------------

N_ROWS, K_MAX = 6, 8  # fixed padded shape: one compilation for all hypothesis examples

energy = st.one_of(st.floats(-1, 1, allow_nan=False), st.sampled_from([0.0, 0.25, np.nan]))
problems = st.lists(st.lists(energy, min_size=1, max_size=K_MAX), min_size=1, max_size=N_ROWS)


def padded(rows):
    e, mask = np.full((N_ROWS, K_MAX), np.nan), np.zeros((N_ROWS, K_MAX), bool)
    for i, r in enumerate(rows):
        e[i, :len(r)], mask[i, :len(r)] = r, True
    return e, mask


def permute_columns(rng, e, mask, keys):
    perm = np.stack([rng.permutation(K_MAX) for _ in range(N_ROWS)])
    take = lambda a: np.take_along_axis(a, perm, 1)  # noqa: E731
    return take(e), take(mask), take(keys), perm


@settings(HYP, max_examples=20)
@given(rows=problems, budget=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_weights_are_distributions_and_order_free(rows, budget, seed):
    e, mask = padded(rows)
    real = mask.any(1)
    keys = np.broadcast_to(np.arange(K_MAX), e.shape).copy()
    rng = np.random.default_rng(seed)
    e2, mask2, keys2, perm = permute_columns(rng, e, mask, keys)
    cf = closed_form(e, budget, mask, keys=keys)
    cf2 = closed_form(e2, budget, mask2, keys=keys2)
    rows_ok = np.isin(np.asarray(cf.status), [STATUS_OK, STATUS_SHORT])
    tau = np.where(rows_ok, np.asarray(cf.tau), 0.3)
    results = [(cf.weights, cf2.weights)]
    for solve in (solve_exact, mirror_descent):
        results.append((solve(e, tau, mask).weights, solve(e2, tau, mask2).weights))
    for w, w2 in results:
        w, w2 = np.asarray(w), np.asarray(w2)
        assert np.all(w >= 0) and not w[~mask].any()
        np.testing.assert_allclose(w.sum(1)[real], 1, atol=1e-12)
        np.testing.assert_allclose(np.take_along_axis(w, perm, 1), w2, atol=1e-9)
    sel2 = np.asarray(cf2.selected)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(cf.selected), perm, 1), sel2)
    # global mode on the same pool: one distribution over all trajectories
    g = global_closed_form(e, budget, mask)
    w = np.asarray(g.weights)
    assert np.all(w >= 0) and not w[~mask].any() and w.sum() == pytest.approx(1, abs=1e-12)
    if int(g.status) in (STATUS_OK, STATUS_SHORT):
        prior = np.asarray(global_prior(mask)).reshape(1, -1)
        md = mirror_descent(e.reshape(1, -1), float(g.tau), mask.reshape(1, -1), prior=prior)
        np.testing.assert_allclose(np.asarray(md.weights).reshape(e.shape), w, atol=1e-7)


def table_from(rows, shuffle_rng=None, **extra):
    """A ScoreTable from energy rows, candidate ids 10·k; optionally shuffled dict order.

    Rows carry their pool position (pool_line, in problem then candidate order), so the
    tie order does not depend on the order the scores file lists them in."""
    problems = {}
    for pid, r in enumerate(rows):
        cands = [{"candidate_id": 10 * k, "teacher": f"t{k}", "pool_line": 1000 * pid + k,
                  "g_hat": None if np.isnan(x) else float(x),
                  **{f: float(v[pid][k]) for f, v in extra.items()}} for k, x in enumerate(r)]
        if shuffle_rng is not None:
            shuffle_rng.shuffle(cands)
        problems[str(pid)] = cands
    items = list(problems.items())
    if shuffle_rng is not None:
        shuffle_rng.shuffle(items)
    return ScoreTable.from_problems(dict(items), need=("g_hat",), optional=tuple(extra))


# Full rows (NaNs still allowed): every example has one table shape, one compilation.
full_problems = st.lists(st.lists(energy, min_size=K_MAX, max_size=K_MAX), min_size=N_ROWS,
                         max_size=N_ROWS)


@settings(HYP, max_examples=25)
@given(rows=full_problems, budget=st.integers(1, 12), seed=st.integers(0, 2 ** 16))
def test_global_mode_distribution_and_order_free(rows, budget, seed):
    a = select(table_from(rows), global_budget=budget)
    b = select(table_from(rows, np.random.default_rng(seed)), global_budget=budget)
    assert np.all(a.weights >= 0)
    assert a.weights.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-15)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    valid = np.isfinite(a.score)
    if valid.sum() > budget and a.info["status"].get("tie", 0) == 0:
        # the support is the global top M (weights may be 0 for a member tied with e_(M+1))
        assert a.chosen.sum() == budget
        assert a.score[a.chosen].min() >= np.max(a.score[valid & ~a.chosen])


# -- baselines --------------------------------------------------------------------------


def brute_force(values, cids, budget, lower):
    """Pick by sorting (criterion, candidate id) tuples in Python; NaN last."""
    def key(k):
        v = values[k]
        return (math.isnan(v), (v if lower else -v) if not math.isnan(v) else 0, cids[k])
    return sorted(sorted(range(len(values)), key=key)[:budget])


def test_baselines_match_brute_force():
    rng = np.random.default_rng(7)
    n, k = 60, 6
    rows = [rng.normal(size=rng.integers(1, k + 1)) for _ in range(n)]
    stats = {f: [np.round(rng.normal(size=len(r)), 1) for r in rows]  # ties
             for f in ("L", "rsr", "tokens")}
    stats["rsr"][0][:] = np.nan
    table = table_from(rows, **stats)
    for policy, (field, lower) in RANKED.items():
        for budget in (1, 2, 7):
            sel = baseline(table, policy, budget)
            for i in range(n):
                m = table.mask[i]
                vals = table.fields[field][i, m]
                want = brute_force(vals, table.candidate_ids[i, m], budget, lower)
                assert np.flatnonzero(sel.chosen[i]).tolist() == want, (policy, i)
                np.testing.assert_allclose(sel.weights[i, want], 1 / len(want))
                assert sel.weights[i].sum() == pytest.approx(1)
    sel = baseline(table, "all", 2)
    np.testing.assert_array_equal(sel.chosen, table.mask)
    np.testing.assert_allclose(sel.weights.sum(1), 1)


def test_random_baseline_is_seeded_and_order_free():
    rng = np.random.default_rng(8)
    rows = [rng.normal(size=8) for _ in range(200)]
    a = baseline(table_from(rows), "random", 2, seed=1)
    b = baseline(table_from(rows, np.random.default_rng(3)), "random", 2, seed=1)
    c = baseline(table_from(rows), "random", 2, seed=2)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    assert (a.chosen != c.chosen).any()
    assert (a.chosen.sum(1) == 2).all()
    # the keys look uniform: each position is chosen about 2/8 of the time
    freq = a.chosen.mean(0)
    assert np.all(np.abs(freq - 0.25) < 0.12)
    keys = random_keys(5, np.arange(1000), np.zeros(1000, np.int64))
    assert 0 <= keys.min() and keys.max() < 1 and abs(keys.mean() - 0.5) < 0.05


# -- the command ------------------------------------------------------------------------


def write_inputs(tmp_path, energies, extra_rows=()):
    pool = tmp_path / "pool.jsonl"
    scores = {}
    with open(pool, "w", encoding="utf-8") as f:
        for pid, r in enumerate(energies):
            for cid, x in enumerate(r):
                msgs = [{"role": "user", "content": f"problem {pid}"},
                        {"role": "assistant", "content": f"answer {pid}.{cid}"}]
                f.write(json.dumps({"problem_id": pid, "candidate_id": cid, "teacher": f"t{cid}",
                                    "messages": msgs}) + "\n")
                scores.setdefault(str(pid), []).append(
                    {"candidate_id": cid, "teacher": f"t{cid}", "L": 1.0 + cid, "Brier": 0.5,
                     "rho": 0.5, "g_hat": x, "tokens": 10 * (cid + 1), "rsr": float(cid)})
        for row in extra_rows:
            f.write(json.dumps(row) + "\n")
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"method": "lark_ghat", "student_model": "tiny", "top_k": 50,
                                "scores": scores}))
    return pool, path


def run_select(tmp_path, pool, scores, *extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "sub" / "train.jsonl"
    args = p.parse_args(["--scores", str(scores), "--pool", str(pool), "--out", str(out),
                         *extra])
    run(args, Reporter(quiet=True))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, json.loads(manifest_path(out).read_text())


ENERGIES = [[0.3, 0.1, 0.2, 0.05], [0.11, 0.31, 0.21], [math.nan] * 2, [0.4]]


def test_command_end_to_end(tmp_path, capsys):
    pool, scores = write_inputs(tmp_path, ENERGIES)
    records, manifest = run_select(tmp_path, pool, scores, "--budget", "2")
    assert "selected 7 trajectories of 4/4 problems" in capsys.readouterr().out
    got = {(r["meta"]["problem_id"], r["meta"]["candidate_id"]): r for r in records}
    for pid, e in enumerate(ENERGIES):
        q, chosen = reference_closed_form(e, 2)
        assert sorted(c for p, c in got if p == pid) == sorted(chosen)
        for c in chosen:
            r = got[(pid, c)]
            assert r["meta"]["train_weight"] == pytest.approx(q[c], abs=1e-12)
            assert r["messages"][-1]["content"] == f"answer {pid}.{c}"
            assert r["meta"]["teacher"] == f"t{c}" and r["meta"]["policy"] == "lark"
            assert r["meta"]["budget"] == 2
            assert r["meta"]["score"] == (None if math.isnan(e[c]) else e[c])
    assert manifest["n_records"] == 7 and manifest["solver"] == "closed-form"
    assert manifest["selected_tokens"] == sum(10 * (c + 1) for _, c in got)
    assert manifest["train_weight_sum"] == pytest.approx(4)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "train.jsonl", "train.jsonl.manifest.json"]  # no temporary files left behind

    md, _ = run_select(tmp_path, pool, scores, "--budget", "2", "--solver", "mirror-descent")
    assert [r["meta"]["candidate_id"] for r in md] == [r["meta"]["candidate_id"]
                                                       for r in records]
    for a, b in zip(md, records, strict=True):
        assert abs(a["meta"]["train_weight"] - b["meta"]["train_weight"]) <= 1e-4

    glob, gm = run_select(tmp_path, pool, scores, "--global-budget", "3")
    assert gm["mode"] == "global" and len(glob) == 3
    assert sum(r["meta"]["train_weight"] for r in glob) == pytest.approx(4)  # N problems
    assert sorted(r["meta"]["score"] for r in glob) == [0.3, 0.31, 0.4]

    # a given temperature: each problem keeps the χ² solution's support
    ex, em = run_select(tmp_path, pool, scores, "--solver", "exact", "--tau", "0.01")
    assert em["tau"] == 0.01
    for pid in (0, 1, 3):  # (problem 2 is all NaN)
        e = ENERGIES[pid]
        q = bisection_oracle(np.array(e), np.ones(len(e)), 0.01)
        got_q = {r["meta"]["candidate_id"]: r["meta"]["train_weight"] for r in ex
                 if r["meta"]["problem_id"] == pid}
        assert sorted(got_q) == np.flatnonzero(q > 0).tolist()
        for c, w in got_q.items():
            assert w == pytest.approx(q[c], abs=1e-9)

    longest, _ = run_select(tmp_path, pool, scores, "--policy", "longest")
    assert [(r["meta"]["problem_id"], r["meta"]["candidate_id"]) for r in longest] == [
        (0, 3), (1, 2), (2, 1), (3, 0)]


@pytest.mark.parametrize("case,extra,message", [
    ("budget", ["--budget", "0"], "--budget must be >= 1"),
    ("tau-closed", ["--tau", "0.1"], "--tau needs --solver"),
    ("tau-neg", ["--solver", "exact", "--tau", "-1"], "--tau must be a positive"),
    ("baseline-solver", ["--policy", "rsr", "--solver", "exact"], "only applies to --policy lark"),
])
def test_command_rejects_bad_options(tmp_path, case, extra, message):
    pool, scores = write_inputs(tmp_path, ENERGIES)
    with pytest.raises(LarkError, match=message):
        run_select(tmp_path, pool, scores, *extra)


def test_command_rejects_bad_files(tmp_path):
    pool, scores = write_inputs(tmp_path, ENERGIES)
    bad = tmp_path / "bad.json"
    bad.write_text('{"scores": {"0": [{"candidate_id": 0, "g_hat": 0.1},]}}')
    with pytest.raises(LarkError, match=r"bad\.json.*malformed JSON.*line 1"):
        run_select(tmp_path, pool, bad)
    bad.write_text(json.dumps({"scores": {"0": [{"candidate_id": 0, "L": 1.0}]}}))
    with pytest.raises(LarkError, match=r"bad\.json \(problem 0\), row 0.*'g_hat'"):
        run_select(tmp_path, pool, bad)
    with pytest.raises(LarkError, match=r"'tokens'"):
        run_select(tmp_path, pool, bad, "--policy", "shortest")
    bad.write_text(json.dumps({"scores": {"x1": [{"candidate_id": 0, "g_hat": 0.1}]}}))
    with pytest.raises(LarkError, match="problem id 'x1' is not an integer"):
        run_select(tmp_path, pool, bad)
    bad.write_text(json.dumps({"scores": {"0": [{"candidate_id": 0, "g_hat": 0.1},
                                                {"candidate_id": 0, "g_hat": 0.2}]}}))
    with pytest.raises(LarkError, match="duplicate candidate_id 0"):
        run_select(tmp_path, pool, bad)
    bad.write_text(json.dumps({"scores": {"0": [{"candidate_id": 0, "g_hat": "high"}]}}))
    with pytest.raises(LarkError, match="'g_hat' must be a number"):
        run_select(tmp_path, pool, bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(LarkError, match="expected a JSON object"):
        run_select(tmp_path, pool, bad)
    # scores naming a candidate the pool lacks
    bad.write_text(json.dumps({"scores": {"0": [{"candidate_id": 0, "g_hat": 0.1}],
                                          "7": [{"candidate_id": 3, "g_hat": 0.1}]}}))
    with pytest.raises(LarkError, match=r"bad\.json.*1 scored candidate.*problem 7, "
                                        r"candidate 3"):
        run_select(tmp_path, pool, bad)
    with pytest.raises(LarkError, match="scores file not found"):
        run_select(tmp_path, pool, tmp_path / "missing.json")
    assert not (tmp_path / "sub" / "train.jsonl").exists()  # nothing half-written


def test_global_mode_all_nan_pool(tmp_path):
    pool, scores = write_inputs(tmp_path, [[math.nan] * 2, [math.nan] * 3])
    records, manifest = run_select(tmp_path, pool, scores, "--global-budget", "2")
    assert len(records) == 5  # no valid energy anywhere: the prior over the whole pool
    weights = sorted(r["meta"]["train_weight"] for r in records)
    np.testing.assert_allclose(weights, [2 / 6] * 3 + [2 / 4] * 2)  # N · P
    assert manifest["info"]["tau_implied"] is None


def test_unscored_pool_records_are_counted_not_selected(tmp_path):
    extra = {"problem_id": 9, "candidate_id": 0, "teacher": "x",
             "messages": [{"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}
    pool, scores = write_inputs(tmp_path, ENERGIES, [extra])
    records, manifest = run_select(tmp_path, pool, scores)
    assert manifest["n_pool_records_unscored"] == 1
    assert all(r["meta"]["problem_id"] != 9 for r in records)


def test_load_scores_reads_nan_literals(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"scores": {"3": [{"candidate_id": 1, "g_hat": NaN}, '
                    '{"candidate_id": 0, "g_hat": 0.5}]}}')
    t = load_scores(path, need=("g_hat",))
    assert t.candidate_ids.tolist() == [[0, 1]]
    assert t.fields["g_hat"][0, 0] == 0.5 and np.isnan(t.fields["g_hat"][0, 1])


@pytest.mark.parametrize("layout", ["pool_line", "scores file order", "pool file (re-read)"])
def test_ties_break_by_position_in_the_pool_file(tmp_path, layout):
    """Equal ĝ for candidates 0, 2, 3, listed in the pool as 3, 1, 2, 0: the reference
    (a stable sort of pool-ordered rows by ĝ) keeps 3 first, then 2; candidate-id order
    would keep 0. The scores may carry pool_line (lark-jax's scorer), list rows in pool
    order (the reference's scorer), or neither (then select re-reads the pool's order)."""
    e = {0: 0.5, 1: 0.2, 2: 0.5, 3: 0.5}
    pool_order = [3, 1, 2, 0]
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for cid in pool_order:
            f.write(json.dumps({"problem_id": 7, "candidate_id": cid, "teacher": f"t{cid}",
                                "messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": f"a{cid}"}]})
                    + "\n")
    listed = pool_order if layout == "scores file order" else sorted(e)
    rows = [{"candidate_id": c, "teacher": f"t{c}", "L": 1.0, "Brier": 0.5, "rho": 0.5,
             "g_hat": e[c], **({"pool_line": pool_order.index(c) + 1}
                               if layout == "pool_line" else {})} for c in listed]
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"method": "lark_ghat", "scores": {"7": rows}}))
    # The reference's rule, written out: stable sort of the pool-ordered rows by -ĝ.
    ranked = sorted(pool_order, key=lambda c: -e[c])
    for budget, extra in ((1, ()), (2, ()), (2, ("--global-budget", "2"))):
        records, manifest = run_select(tmp_path, pool, scores, "--budget", str(budget), *extra)
        got = {r["meta"]["candidate_id"]: r["meta"]["train_weight"] for r in records}
        assert list(got) == sorted(ranked[:budget]) and ranked[:2] == [3, 2]
        assert all(w == pytest.approx(1 / budget) for w in got.values())  # the tie rule
        # the global mode needs the order across problems: pool_line, or the pool re-read
        expect = layout if not extra or layout == "pool_line" else "pool file (re-read)"
        assert expect in manifest["tie_order"] and "earlier in the pool file" in \
            manifest["tie_order"]
