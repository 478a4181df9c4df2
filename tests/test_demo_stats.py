"""The demo's bootstrap against brute force: the exact resampling distribution of a tiny
[seeds, problems] table, enumerated, and an explicit loop over index draws."""

import itertools
import math

import numpy as np
import pytest

from lark_jax.demo.stats import (
    bootstrap_means,
    mean_ci,
    paired_difference,
    resample_counts,
    spearman,
)


def test_count_form_equals_explicit_index_resamples():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, size=(3, 7)).astype(float)
    s_idx = rng.integers(0, 3, size=(50, 3))
    p_idx = rng.integers(0, 7, size=(50, 7))
    cs = np.stack([np.bincount(r, minlength=3) for r in s_idx]).astype(float)
    cp = np.stack([np.bincount(r, minlength=7) for r in p_idx]).astype(float)
    loop = [x[np.ix_(s, p)].mean() for s, p in zip(s_idx, p_idx, strict=True)]
    np.testing.assert_allclose(bootstrap_means(x, (cs, cp)), loop, rtol=0, atol=1e-12)


def _exact_distribution(x):
    """Every (seed draw, problem draw) with its probability: the bootstrap's exact law."""
    s, p = x.shape
    law: dict[float, float] = {}
    for si in itertools.product(range(s), repeat=s):
        for pj in itertools.product(range(p), repeat=p):
            m = round(float(x[np.ix_(si, pj)].mean()), 12)
            law[m] = law.get(m, 0.0) + 1.0 / (s ** s * p ** p)
    return law


def test_bootstrap_matches_the_enumerated_resampling_law():
    x = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], float)  # 2 seeds x 4 problems
    law = _exact_distribution(x)
    n = 200_000
    b = np.round(bootstrap_means(x, resample_counts(2, 4, n, seed=1)), 12)
    values, freq = np.unique(b, return_counts=True)
    assert set(values.tolist()) <= set(law)
    for v, prob in law.items():  # every atom within 5 standard errors
        got = freq[values == v].sum() / n if v in values else 0.0
        assert abs(got - prob) < 5 * math.sqrt(prob * (1 - prob) / n) + 1e-9, (v, got, prob)
    # The interval is the law's 2.5/97.5 % quantiles (up to the atom the draw lands on).
    atoms = sorted(law)
    cdf = np.cumsum([law[a] for a in atoms])
    lo, hi = mean_ci(x, resample_counts(2, 4, n, seed=2))["ci95"]
    exact_lo = atoms[int(np.searchsorted(cdf, 0.025))]
    exact_hi = atoms[int(np.searchsorted(cdf, 0.975))]
    i_lo, i_hi = atoms.index(exact_lo), atoms.index(exact_hi)
    assert atoms[max(i_lo - 1, 0)] <= lo <= atoms[min(i_lo + 1, len(atoms) - 1)]
    assert atoms[max(i_hi - 1, 0)] <= hi <= atoms[min(i_hi + 1, len(atoms) - 1)]


def test_paired_difference_uses_the_same_draws_and_says_when_resolved():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(3, 500)).astype(float)
    same = paired_difference(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and not same["resolved"]
    better = np.maximum(a, rng.random((3, 500)) < 0.3)  # a plus ~15 % more solved
    d = paired_difference(better, a)
    assert d["resolved"] and d["ci95"][0] > 0
    assert d["mean"] == pytest.approx((better - a).mean())
    # Pairing is what resolves it: the two unpaired intervals overlap.
    ca, cb = mean_ci(a)["ci95"], mean_ci(better)["ci95"]
    assert d["ci95"][1] - d["ci95"][0] < (ca[1] - ca[0]) + (cb[1] - cb[0])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 2], [3, 4]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, float("nan"), 3, 4], [1, 2, 5, 3, 4]) == pytest.approx(1.0)


def test_guess_floor_is_the_commonest_answer_set_and_counts_its_hits():
    """Against brute force: the chosen k answers have the largest total training count of
    all k-subsets, ties go to the smaller text, and the outcomes are membership tests."""
    from lark_jax.demo.stats import guess_floor

    rng = np.random.default_rng(3)
    train = [str(x) for x in rng.integers(1, 8, size=40)]
    bench = [str(x) for x in rng.integers(1, 9, size=25)]  # "8" never in training
    counts = {a: train.count(a) for a in set(train)}
    for k in (1, 2, 4):
        guesses, hits = guess_floor(train, bench, k)
        best = max(sum(counts[a] for a in c) for c in itertools.combinations(counts, k))
        assert len(set(guesses)) == k and sum(counts[a] for a in guesses) == best
        edge = min(counts[a] for a in guesses)
        assert all(a > max(g for g in guesses if counts[g] == edge)
                   for a in counts if a not in guesses and counts[a] == edge)
        assert hits.tolist() == [float(b in guesses) for b in bench]
    assert guess_floor(["3"], ["3", "4"], 5)[0] == ["3"]  # fewer distinct answers than k
