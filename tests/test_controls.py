"""The selection controls (random-matched, best-teacher, verified) against oracles computed
here in plain Python: LARK's own counts, per-teacher means, correctness flags."""

from __future__ import annotations

import json
import statistics

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lark_jax.errors import LarkError
from lark_jax.selection import POLICIES, needed_fields, select
from lark_jax.selection.baselines import length_strata, random_matched
from lark_jax.selection.io import ScoreTable

HYP = settings(max_examples=30, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def make_problems(rng, n, k=8, teachers=("alpha", "beta", "gamma", "delta"), favour="beta",
                  nan_rate=0.0):
    """{pid: [row, ...]} with random teachers, lengths, correctness and a ĝ that favours one
    teacher (so LARK's teacher mix is far from the pool's)."""
    out = {}
    for pid in range(n):
        rows = []
        for cid in range(k):
            t = teachers[int(rng.integers(len(teachers)))]
            g = float(rng.normal() + (1.5 if t == favour else 0.0))
            if rng.random() < nan_rate:
                g = None
            rows.append({"candidate_id": 3 * cid + 1, "teacher": t, "g_hat": g,
                         "tokens": int(rng.integers(5, 120)),
                         "correct": float(rng.random() < 0.6),
                         "pool_line": 100 * pid + cid})
        out[str(1000 + 7 * pid)] = rows
    return out


def table_of(problems, shuffle_rng=None):
    if shuffle_rng is not None:
        items = [(pid, list(rows)) for pid, rows in problems.items()]
        for _, rows in items:
            shuffle_rng.shuffle(rows)
        shuffle_rng.shuffle(items)
        problems = dict(items)
    return ScoreTable.from_problems(problems, need=("g_hat",), optional=("tokens", "correct"))


def chosen_keys(table, chosen):
    return {(int(table.problem_ids[i]), int(table.candidate_ids[i, j]))
            for i, j in np.argwhere(chosen)}


def oracle_bins(problems, bins=4):
    """(problem, candidate) -> (teacher, bin), the bins from statistics.quantiles, whose
    'inclusive' method is the linear interpolation the policy documents."""
    lengths: dict[str, list[float]] = {}
    for rows in problems.values():
        for r in rows:
            lengths.setdefault(r["teacher"], []).append(r["tokens"])
    edges = {t: statistics.quantiles(v, n=bins, method="inclusive") if len(v) > 1 else
             [v[0]] * (bins - 1) for t, v in lengths.items()}
    return {(int(pid), r["candidate_id"]): (r["teacher"],
                                            sum(e <= r["tokens"] for e in edges[r["teacher"]]))
            for pid, rows in problems.items() for r in rows}


def counts(keys, label):
    out: dict = {}
    for key in keys:
        out[label[key]] = out.get(label[key], 0) + 1
    return out


def test_policies_are_registered_with_their_fields():
    for p in ("random-matched", "best-teacher", "verified"):
        assert p in POLICIES
    assert needed_fields("random-matched") == ("g_hat",)
    assert needed_fields("best-teacher") == ("g_hat",)
    assert needed_fields("verified") == ("correct",)


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_random_matched_has_lark_counts_per_problem_teacher_and_length_bin(budget):
    problems = make_problems(np.random.default_rng(budget), 150)
    table = table_of(problems)
    lark = chosen_keys(table, select(table, "lark", budget).chosen)
    sel = select(table, "random-matched", budget, seed=4)
    got = chosen_keys(table, sel.chosen)
    label = oracle_bins(problems)
    teacher = {key: t for key, (t, _) in label.items()}
    assert counts(got, teacher) == counts(lark, teacher)
    assert counts(got, label) == counts(lark, label)
    per_problem = {key: key[0] for key in label}
    assert counts(got, per_problem) == counts(lark, per_problem)
    assert all(c == budget for c in counts(got, per_problem).values())  # K = 8 > B
    np.testing.assert_allclose(sel.weights.sum(1), 1.0)
    assert set(np.unique(sel.weights[sel.chosen])) == {1.0 / budget}
    assert sel.info["shortfall"] == 0
    assert sel.info["teacher_counts"] == dict(sorted(counts(lark, teacher).items()))
    # it is random, not LARK: most of LARK's picks are not repeated
    assert len(got & lark) < 0.8 * len(lark)
    other = chosen_keys(table, select(table, "random-matched", budget, seed=5).chosen)
    assert other != got


def test_random_matched_is_independent_of_file_order():
    problems = make_problems(np.random.default_rng(11), 80)
    a = select(table_of(problems), "random-matched", 2, seed=9)
    b = select(table_of(problems, np.random.default_rng(1)), "random-matched", 2, seed=9)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.weights, b.weights)


def test_random_matched_repairs_what_the_greedy_leaves_short():
    # Problem 1 has only teacher a, problem 0 has a and b; LARK takes b in problem 0 and a in
    # problem 1. Visiting problem 0 first and drawing its 'a' uses a's only quota: the
    # greedy leaves problem 1 short and one augmenting path must fix it.
    problems = {"0": [{"candidate_id": 0, "teacher": "a", "g_hat": 0.0},
                      {"candidate_id": 1, "teacher": "b", "g_hat": 1.0}],
                "1": [{"candidate_id": 0, "teacher": "a", "g_hat": 0.0}]}
    table = ScoreTable.from_problems(problems, need=("g_hat",))
    repaired = 0
    for seed in range(64):
        sel = select(table, "random-matched", 1, seed=seed)
        assert chosen_keys(table, sel.chosen) == {(0, 1), (1, 0)}  # the only matched set
        assert sel.info["shortfall"] == 0
        repaired += sel.info["short_after_greedy"] > 0
        assert sel.info["augmenting_paths"] == sel.info["short_after_greedy"]
    assert 0 < repaired < 64  # both orders of visit occur


rows_st = st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([0.0, 0.5, 1.0, np.nan]),
                             st.integers(1, 6)), min_size=1, max_size=6)


@settings(HYP)
@given(rows=st.lists(rows_st, min_size=1, max_size=10), budget=st.integers(1, 4),
       seed=st.integers(0, 2 ** 20))
def test_random_matched_counts_hold_for_any_pool(rows, budget, seed):
    problems = {str(pid): [{"candidate_id": cid, "teacher": t,
                            "g_hat": None if np.isnan(g) else g, "tokens": n}
                           for cid, (t, g, n) in enumerate(r)] for pid, r in enumerate(rows)}
    table = ScoreTable.from_problems(problems, need=("g_hat",), optional=("tokens",))
    lark = select(table, "lark", budget).chosen
    sel = select(table, "random-matched", budget, seed=seed)
    strata, _ = length_strata(table)
    assert sel.info["shortfall"] == 0
    np.testing.assert_array_equal(sel.chosen.sum(1), lark.sum(1))
    np.testing.assert_array_equal(np.bincount(strata[sel.chosen], minlength=strata.max() + 1),
                                  np.bincount(strata[lark], minlength=strata.max() + 1))
    assert not (sel.chosen & ~table.mask).any()


def test_random_matched_takes_a_given_lark_selection():
    table = table_of(make_problems(np.random.default_rng(2), 30))
    lark = select(table, "lark", 1).chosen
    chosen, info = random_matched(table, 1, seed=0, lark=lark)
    np.testing.assert_array_equal(chosen, select(table, "random-matched", 1).chosen)
    assert info["tokens_mean"]["lark"] == pytest.approx(table.fields["tokens"][lark].mean())


def test_best_teacher_is_the_argmax_of_mean_ghat():
    problems = make_problems(np.random.default_rng(3), 60, favour="gamma", nan_rate=0.1)
    table = table_of(problems)
    sums: dict[str, list[float]] = {}
    for rows in problems.values():
        for r in rows:
            if r["g_hat"] is not None:
                sums.setdefault(r["teacher"], []).append(r["g_hat"])
    means = {t: sum(v) / len(v) for t, v in sums.items()}
    best = max(means, key=means.get)
    assert best == "gamma"
    sel = select(table, "best-teacher", 1)
    want = {(int(pid), r["candidate_id"]) for pid, rows in problems.items() for r in rows
            if r["teacher"] == best}
    assert chosen_keys(table, sel.chosen) == want
    for i in range(table.n_problems):
        n = sel.chosen[i].sum()
        if n:
            np.testing.assert_allclose(sel.weights[i][sel.chosen[i]], 1.0 / n)
    assert sel.info["teacher"] == best
    assert sel.info["teacher_mean_g_hat"][best] == pytest.approx(means[best])


def test_best_teacher_ties_go_to_the_name_first_in_order():
    problems = {"0": [{"candidate_id": 0, "teacher": "zeta", "g_hat": 0.5},
                      {"candidate_id": 1, "teacher": "eta", "g_hat": 0.5},
                      {"candidate_id": 2, "teacher": "theta", "g_hat": 0.1}]}
    table = ScoreTable.from_problems(problems, need=("g_hat",))
    assert select(table, "best-teacher", 1).info["teacher"] == "eta"
    nan = {"0": [{"candidate_id": 0, "teacher": "x", "g_hat": None}]}
    with pytest.raises(ValueError, match="no teacher has a finite g_hat"):
        select(ScoreTable.from_problems(nan, need=("g_hat",)), "best-teacher", 1)


@pytest.mark.parametrize("budget", [1, 3])
def test_verified_picks_only_correct_ones(budget):
    problems = make_problems(np.random.default_rng(5), 120)
    problems["9999"] = [{"candidate_id": 0, "teacher": "alpha", "g_hat": 0.0, "tokens": 3,
                         "correct": 0.0},
                        {"candidate_id": 1, "teacher": "alpha", "g_hat": 0.0, "tokens": 3,
                         "correct": None}]
    table = table_of(problems)
    sel = select(table, "verified", budget, seed=2)
    correct = {(int(pid), r["candidate_id"]) for pid, rows in problems.items() for r in rows
               if r["correct"] == 1.0}
    got = chosen_keys(table, sel.chosen)
    assert got <= correct
    for pid, rows in problems.items():
        n_ok = sum(r["correct"] == 1.0 for r in rows)
        assert sum(1 for p, _ in got if p == int(pid)) == min(budget, n_ok)
    assert sel.info["problems_without_selection"] == 1 + sum(
        not any(r["correct"] == 1.0 for r in rows) for pid, rows in problems.items()
        if pid != "9999")
    assert sel.info["unknown"] == 1
    shuffled = select(table_of(problems, np.random.default_rng(0)), "verified", budget, seed=2)
    np.testing.assert_array_equal(shuffled.chosen, sel.chosen)


def test_verified_needs_a_correct_field_of_zeros_and_ones():
    problems = {"0": [{"candidate_id": 0, "teacher": "a", "g_hat": 0.1}]}
    table = ScoreTable.from_problems(problems, need=("g_hat",))
    with pytest.raises(ValueError, match="needs the scores field 'correct'"):
        select(table, "verified", 1)
    problems["0"][0]["correct"] = 0.5
    table = ScoreTable.from_problems(problems, need=("g_hat",), optional=("correct",))
    with pytest.raises(ValueError, match="must be 1, 0 or NaN, got 0.5"):
        select(table, "verified", 1)


def test_select_command_offers_the_controls(tmp_path):
    from tests.test_selection import run_select

    pool = tmp_path / "pool.jsonl"
    problems = make_problems(np.random.default_rng(6), 12)
    with open(pool, "w", encoding="utf-8") as f:
        for pid, rows in problems.items():
            for r in rows:
                f.write(json.dumps({
                    "problem_id": int(pid), "candidate_id": r["candidate_id"],
                    "teacher": r["teacher"], "messages": [
                        {"role": "user", "content": f"p{pid}"},
                        {"role": "assistant", "content": f"a{pid}.{r['candidate_id']}"}]})
                        + "\n")
    for r in (r for rows in problems.values() for r in rows):
        r.pop("pool_line")
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"method": "lark_ghat", "scores": problems}))
    table = table_of(problems)
    for policy in ("random-matched", "best-teacher", "verified"):
        records, manifest = run_select(tmp_path, pool, scores, "--policy", policy,
                                       "--budget", "2", "--seed", "3")
        want = chosen_keys(table, select(table, policy, 2, seed=3).chosen)
        assert {(r["meta"]["problem_id"], r["meta"]["candidate_id"]) for r in records} == want
        assert manifest["policy"] == policy
    no_correct = json.loads(scores.read_text())
    for rows in no_correct["scores"].values():
        for r in rows:
            r.pop("correct")
    scores.write_text(json.dumps(no_correct))
    with pytest.raises(LarkError, match="'correct'"):
        run_select(tmp_path, pool, scores, "--policy", "verified")
