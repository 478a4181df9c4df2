"""Baseline selection policies (docs/method.md, "Baselines") behind the LARK policy's interface.

Every baseline keeps, per problem, the best ``B' = min(B, K_n)`` candidates by one statistic
with uniform weights ``1/B'``:

    random     a seeded pseudo-random key per (seed, problem_id, candidate_id): the choice of
               one problem depends neither on the others nor on the order of the files
    all        every candidate, weight 1/K_n (the budget is not used)
    min-loss   lowest L (the student's most confident trajectories)
    max-loss   highest L
    rsr        lowest Rank-Surprisal Ratio (arXiv 2601.14249)
    shortest   fewest assistant tokens ("tokens", as written by ``lark-jax score``)
    longest    most assistant tokens

Ties go to the lower candidate id; a NaN statistic ranks last. ``meta.score`` is the
statistic ranked on; for random and all it is ĝ when the scores carry it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lark_jax.selection.io import ScoreTable

POLICIES = ("lark", "random", "all", "min-loss", "max-loss", "rsr", "shortest", "longest")

# policy -> (scores field, True if lower is better)
RANKED = {
    "min-loss": ("L", True),
    "max-loss": ("L", False),
    "rsr": ("rsr", True),
    "shortest": ("tokens", True),
    "longest": ("tokens", False),
}


def needed_fields(policy: str) -> tuple[str, ...]:
    """Score fields a policy cannot run without."""
    if policy == "lark":
        return ("g_hat",)
    if policy in RANKED:
        return (RANKED[policy][0],)
    if policy in ("random", "all"):
        return ()
    raise ValueError(f"unknown policy {policy!r}")


@dataclasses.dataclass
class Selection:
    """What a policy chose, as ``[N, K]`` arrays aligned with the :class:`ScoreTable`.

    ``weights`` is the distribution q (sums to 1 over each problem, or over the whole pool in
    global mode); the trajectory's ``meta.train_weight`` is ``weights * train_scale``.
    ``chosen`` marks the records to write.
    """

    weights: np.ndarray
    chosen: np.ndarray
    score: np.ndarray
    policy: str
    budget: int
    mode: str = "per-problem"  # or "global"
    solver: str | None = None
    train_scale: float = 1.0
    info: dict = dataclasses.field(default_factory=dict)


def top_by(values: np.ndarray, mask: np.ndarray, candidate_ids: np.ndarray, count,
           lower_is_better: bool) -> np.ndarray:
    """Mask of the ``count`` best real entries of each row (NaN last, ties: lower id)."""
    values = np.asarray(values, np.float64)
    real = np.asarray(mask, bool)
    known = real & ~np.isnan(values)
    primary = np.where(known, 0, np.where(real, 1, 2))  # known, then NaN, then padding
    v = np.where(known, values if lower_is_better else -values, 0.0)
    order = np.lexsort((candidate_ids, v, primary), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[-1])[None, :], axis=-1)
    count = np.broadcast_to(np.asarray(count), values.shape[:-1])[..., None]
    return real & (rank < count)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrap-around arithmetic intended)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_keys(seed: int, problem_ids: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) keys, a pure function of (seed, problem_id, candidate_id)."""
    with np.errstate(over="ignore"):
        s = _splitmix64(np.full(np.shape(problem_ids), seed, np.int64).astype(np.uint64))
        h = _splitmix64(s ^ np.asarray(problem_ids, np.int64).astype(np.uint64))
        h = _splitmix64(h ^ np.asarray(candidate_ids, np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def baseline(table: ScoreTable, policy: str, budget: int, seed: int = 0) -> Selection:
    """Run one baseline policy over every problem of ``table``."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    mask = table.mask
    k_n = mask.sum(-1)
    lark_score = table.fields.get("g_hat", np.full(mask.shape, np.nan))
    if policy == "all":
        chosen = mask.copy()
        score = lark_score
    elif policy == "random":
        pids = np.broadcast_to(table.problem_ids[:, None], mask.shape)
        keys = random_keys(seed, pids, table.candidate_ids)
        chosen = top_by(keys, mask, table.candidate_ids, np.minimum(budget, k_n), True)
        score = lark_score
    elif policy in RANKED:
        field, lower = RANKED[policy]
        score = table.fields[field]
        chosen = top_by(score, mask, table.candidate_ids, np.minimum(budget, k_n), lower)
    else:
        raise ValueError(f"not a baseline policy: {policy!r}")
    n_chosen = chosen.sum(-1, keepdims=True)
    weights = np.where(chosen, 1.0 / np.maximum(n_chosen, 1), 0.0)
    return Selection(weights, chosen, np.where(mask, score, np.nan), policy, budget,
                     info={"seed": seed} if policy == "random" else {})
