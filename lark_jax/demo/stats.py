"""Statistics of the demo's table: rank correlations and bootstrap intervals.

Correlations (the diagnostics) are Spearman's and the rank partial correlation given a
third variable (:func:`partial_spearman`), each with a percentile bootstrap interval over
the cases (:func:`correlation_ci`).

The benchmark result of one fine-tuned student is a 0/1 outcome per held-out problem
(solved within k samples or not); a method has one such vector per seed. Its accuracy is
the mean over seeds and problems, and its uncertainty comes from both: which problems
the benchmark happened to draw, and which seed (data order, random baseline's choice,
sampling). The bootstrap resamples both, independently and with replacement:

    acc*_b = (1 / (S·P)) Σ_i Σ_j x[s_i, p_j],   s ~ U{seeds}^S,  p ~ U{problems}^P

and the 95 % interval is the 2.5 and 97.5 percentiles of acc*_b. Because the sum
factorises over the two draws, a draw is a pair of count vectors (multinomial), and
acc*_b = c_s · X · c_p / (S·P): no [S, P] array per draw is ever built.

A paired difference (LARK − random) bootstraps the per-(seed, problem) differences with
the same draws for both methods, so the variation the two share (hard problems, a
lucky seed) cancels. It is "resolved" when the interval excludes 0.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 10_000


def ranks(a) -> np.ndarray:
    """Ranks 0..n−1 of ``a`` (float64), ties sharing their average rank."""
    a = np.asarray(a, np.float64)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=np.float64)
    _, inv = np.unique(a, return_inverse=True)
    return (np.bincount(inv, r) / np.bincount(inv))[inv]


def _finite(*cols) -> list[np.ndarray]:
    cols = [np.asarray(c, np.float64) for c in cols]
    ok = np.logical_and.reduce([np.isfinite(c) for c in cols])
    return [c[ok] for c in cols]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a ** 2).sum() * (b ** 2).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman rank correlation of the finite pairs (average ranks for ties); NaN when fewer
    than three pairs or either side is constant."""
    x, y = _finite(x, y)
    if len(x) < 3:
        return math.nan
    return _pearson(ranks(x), ranks(y))


def partial_spearman(x, y, z) -> float:
    """Rank partial correlation of x and y given z over the finite triples: the Pearson
    correlation of the ranks with the ranks of z regressed out, which is

        r_xy·z = (r_xy − r_xz r_yz) / sqrt((1 − r_xz²)(1 − r_yz²)),  r = Spearman.

    NaN with fewer than four triples, a constant column, or |r_xz| or |r_yz| = 1."""
    x, y, z = _finite(x, y, z)
    if len(x) < 4:
        return math.nan
    rx, ry, rz = ranks(x), ranks(y), ranks(z)
    r_xy, r_xz, r_yz = _pearson(rx, ry), _pearson(rx, rz), _pearson(ry, rz)
    den = (1.0 - r_xz ** 2) * (1.0 - r_yz ** 2)
    if not den > 0:  # also NaN
        return math.nan
    return float((r_xy - r_xz * r_yz) / math.sqrt(den))


N_BOOT_CORR = 1000


def correlation_ci(x, y, z=None, n_boot: int = N_BOOT_CORR, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Spearman(x, y), or with ``z`` the partial Spearman given z, over the finite cases,
    with a percentile bootstrap interval: the cases (pairs or triples) resampled with
    replacement ``n_boot`` times, the statistic recomputed on each, the (1 ± level)/2
    quantiles of the draws where it is defined. ``{"r", "ci95": [lo, hi] or None, "n",
    "n_boot"}`` (``n_boot``: the draws that gave a value; no interval when under half did,
    e.g. with a handful of cases)."""
    cols = _finite(x, y) if z is None else _finite(x, y, z)
    n = len(cols[0])
    stat = spearman if z is None else partial_spearman
    r = stat(*cols)
    out = {"r": r if math.isfinite(r) else None, "ci95": None, "n": n, "n_boot": 0}
    if out["r"] is None:
        return out
    rng = np.random.default_rng(seed)
    draws = np.array([stat(*(c[idx] for c in cols))
                      for idx in rng.integers(0, n, size=(n_boot, n))])
    draws = draws[np.isfinite(draws)]
    out["n_boot"] = int(draws.size)
    if draws.size >= n_boot / 2:
        a = (1.0 - level) / 2
        lo, hi = np.quantile(draws, [a, 1.0 - a])
        out["ci95"] = [float(lo), float(hi)]
    return out


def resample_counts(n_seeds: int, n_problems: int, n_boot: int = N_BOOT, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws as counts: ([B, S], [B, P]) — how often each seed and each problem
    appears in each resample (each row sums to S, resp. P)."""
    rng = np.random.default_rng(seed)
    cs = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot)
    cp = rng.multinomial(n_problems, np.full(n_problems, 1.0 / n_problems), size=n_boot)
    return cs.astype(np.float64), cp.astype(np.float64)


def bootstrap_means(x: np.ndarray, counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """x: [S, P] outcomes -> [B] resampled means c_s · x · c_p / (S·P)."""
    cs, cp = counts
    x = np.asarray(x, np.float64)
    return np.einsum("bs,sp,bp->b", cs, x, cp) / x.size


def mean_ci(x: np.ndarray, counts=None, level: float = 0.95) -> dict:
    """{"mean", "ci95": [lo, hi]} of [S, P] outcomes (percentile bootstrap)."""
    x = np.asarray(x, np.float64)
    if counts is None:
        counts = resample_counts(*x.shape)
    b = bootstrap_means(x, counts)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(b, [a, 1.0 - a])
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)]}


def paired_difference(a: np.ndarray, b: np.ndarray, counts=None) -> dict:
    """Mean of a − b over seeds and problems with its 95 % interval, same draws for both;
    ``resolved`` when the interval excludes 0."""
    d = mean_ci(np.asarray(a, np.float64) - np.asarray(b, np.float64), counts)
    lo, hi = d["ci95"]
    return {**d, "resolved": bool(lo > 0 or hi < 0)}


def guess_floor(train_answers, bench_answers, k: int) -> tuple[list[str], np.ndarray]:
    """The blind-guess floor of ACC@k: a 'student' that answers every benchmark problem
    with the k commonest answers of its training problems (``train_answers``, one per
    problem; ties broken by the answer's text) solves exactly the problems whose answer is
    among them. Returns those answers and the [P] 0/1 outcomes.

    ACC@k near this floor is reached without reading the problem at all; gains above it are
    what fine-tuning taught beyond the answers' distribution.
    """
    counts: dict[str, int] = {}
    for a in train_answers:
        counts[a] = counts.get(a, 0) + 1
    guesses = sorted(counts, key=lambda a: (-counts[a], a))[:k]
    chosen = set(guesses)
    return guesses, np.array([a in chosen for a in bench_answers], np.float64)
