"""Statistics of the demo's table: rank correlation and bootstrap intervals.

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


def spearman(x, y) -> float:
    """Spearman rank correlation of the finite pairs (average ranks for ties); NaN when fewer
    than three pairs or either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan

    def ranks(a):
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=np.float64)
        _, inv = np.unique(a, return_inverse=True)
        return (np.bincount(inv, r) / np.bincount(inv))[inv]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


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
