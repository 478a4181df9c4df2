"""The demo's bootstrap against brute force: the exact resampling distribution of a tiny
[seeds, problems] table, enumerated, and an explicit loop over index draws."""

import itertools
import math

import numpy as np
import pytest

from lark_jax.demo.stats import (
    bootstrap_means,
    correlation_ci,
    mean_ci,
    paired_difference,
    partial_spearman,
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


def _py_ranks(values):
    """Average ranks by counting, in plain Python floats."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2
            for v in values]


def _py_residuals(a, b):
    """a minus its least-squares line on b, by the normal equations written out."""
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    slope = (sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
             / sum((y - mb) ** 2 for y in b))
    return [x - ma - slope * (y - mb) for x, y in zip(a, b, strict=True)]


def _py_pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_partial_spearman_is_the_correlation_of_rank_residuals():
    """The oracle: rank each variable, regress z's ranks out of x's and y's, correlate the
    residuals (a different computation from the closed formula)."""
    rng = np.random.default_rng(4)
    for n in (5, 12, 60):
        z = rng.integers(0, 6, size=n).astype(float)  # ties
        x = z + rng.normal(size=n)
        y = np.round(z - x + rng.normal(size=n), 1)
        rx, ry, rz = _py_ranks(list(x)), _py_ranks(list(y)), _py_ranks(list(z))
        want = _py_pearson(_py_residuals(rx, rz), _py_residuals(ry, rz))
        assert partial_spearman(x, y, z) == pytest.approx(want, abs=1e-12)
        assert spearman(x, y) == pytest.approx(_py_pearson(rx, ry), abs=1e-12)
    # By hand: x and y both follow z, and given z they are unrelated.
    z = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert math.isnan(partial_spearman(x, [2.0, 1.0, 4.0, 3.0, 6.0, 5.0], z))  # r_xz = 1
    x = [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]
    y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0][::-1]
    # ranks: rx = (1,0,3,2,5,4), ry = (5,...,0), rz = (0,...,5): r_xz = 29/35, r_yz = −1.
    assert math.isnan(partial_spearman(x, y, z))
    # By hand, 1 − 6 Σd² / (n(n² − 1)) with rank differences d: Σd² = 6, 2, 4.
    y = [1.0, 2.0, 3.0, 4.0, 6.0, 5.0]
    r_xz, r_yz, r_xy = 29 / 35, 33 / 35, 31 / 35
    want = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    assert spearman(x, z) == pytest.approx(r_xz) and spearman(y, z) == pytest.approx(r_yz)
    assert spearman(x, y) == pytest.approx(r_xy)
    assert partial_spearman(x, y, z) == pytest.approx(want)
    assert partial_spearman(x + [np.nan], y + [0.0], z + [1.0]) == pytest.approx(want)


def test_correlation_interval_brackets_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(5)
    widths = {}
    for n in (40, 2000):
        z = rng.normal(size=n)
        x = z + rng.normal(size=n)
        y = 0.5 * x + z + rng.normal(size=n)
        for given in (None, z):
            c = correlation_ci(x, y, given, n_boot=400)
            lo, hi = c["ci95"]
            assert lo <= c["r"] <= hi and c["n"] == n and c["n_boot"] == 400
            want = spearman(x, y) if given is None else partial_spearman(x, y, z)
            assert c["r"] == pytest.approx(want)
            widths[n, given is None] = hi - lo
    # the interval's width falls like 1/sqrt(n): 50x the cases, about 1/7 the width
    for plain in (True, False):
        assert widths[2000, plain] < widths[40, plain] / 3
    # The truth of a clear relation is inside its interval (y = x + noise, rho ~ 0.7).
    x = rng.normal(size=500)
    y = x + rng.normal(size=500)
    lo, hi = correlation_ci(x, y)["ci95"]
    assert lo < 6 / math.pi * math.asin(1 / math.sqrt(2) / 2) < hi
    flat = correlation_ci([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert flat == {"r": None, "ci95": None, "n": 4, "n_boot": 0}


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
