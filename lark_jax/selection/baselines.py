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

Three controls ask what LARK adds beyond the obvious (each a function below, with its
definition in its docstring):

    random-matched  random trajectories with LARK's per-problem counts and exactly LARK's
                    count in every (teacher, length bin) stratum (:func:`random_matched`)
    best-teacher    every trajectory of the teacher with the highest mean ĝ
                    (:func:`best_teacher`; the budget is not used)
    verified        random among the trajectories marked correct (the ``correct`` field:
                    1 correct, 0 wrong, NaN unknown), B' = min(B, correct ones) per problem
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lark_jax.selection.closed_form import closed_form
from lark_jax.selection.io import ScoreTable

POLICIES = ("lark", "random", "all", "min-loss", "max-loss", "rsr", "shortest", "longest",
            "random-matched", "best-teacher", "verified")
LENGTH_BINS = 4  # random-matched: length bins per teacher (its quartiles of "tokens")

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
    if policy in ("random-matched", "best-teacher"):
        return ("g_hat",)
    if policy == "verified":
        return ("correct",)
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
    elif policy in CONTROLS:
        for field in needed_fields(policy):
            if field not in table.fields:
                raise ValueError(f"policy {policy!r} needs the scores field {field!r}"
                                 + (" (1 correct, 0 wrong, NaN unknown per candidate)"
                                    if field == "correct" else ""))
        chosen, info = CONTROLS[policy](table, budget, seed)
        return _uniform(table, chosen, lark_score, policy, budget, info)
    else:
        raise ValueError(f"not a baseline policy: {policy!r}")
    return _uniform(table, chosen, score, policy, budget,
                    {"seed": seed} if policy == "random" else {})


def _uniform(table, chosen, score, policy, budget, info) -> Selection:
    """Weights 1/|chosen| within each problem (rows with nothing chosen stay 0)."""
    n_chosen = chosen.sum(-1, keepdims=True)
    weights = np.where(chosen, 1.0 / np.maximum(n_chosen, 1), 0.0)
    return Selection(weights, chosen, np.where(table.mask, score, np.nan), policy, budget,
                     info=info)


# -- controls ---------------------------------------------------------------------------------


def tie_keys(table: ScoreTable) -> np.ndarray:
    """LARK's tie order for equal ĝ: the candidate earlier in the pool file first
    (``ScoreTable.order``), else the lower candidate id."""
    return table.candidate_ids if table.order is None else table.order


def lark_chosen(table: ScoreTable, budget: int) -> np.ndarray:
    """[N, K] the records LARK's per-problem closed form writes at ``budget`` (what
    ``select(table, "lark", budget)`` chooses)."""
    e = np.asarray(table.fields["g_hat"], np.float64)
    with jax.enable_x64(True):
        cf = closed_form(e, budget, table.mask, keys=tie_keys(table))
        return np.asarray(cf.selected) & table.mask


def teacher_grid(table: ScoreTable) -> np.ndarray:
    """[N, K] each candidate's teacher name ("" on padding)."""
    k = table.mask.shape[1]
    return np.array([list(row) + [""] * (k - len(row)) for row in table.teachers], dtype=object)


def length_strata(table: ScoreTable, bins: int = LENGTH_BINS) -> tuple[np.ndarray, list]:
    """Stratum of every candidate, ``([N, K] int, -1 on padding; [(teacher, bin)] names)``.

    A stratum is a teacher and a length bin of that teacher: with the ``tokens`` field, the
    bin of a candidate of teacher t is the number of t's interior quantile edges
    ``Q_t(j / bins)``, j = 1..bins−1, over all of t's candidates in the table, that are
    <= its length (so equal lengths share a bin; NaN lengths get a bin of their own, -1).
    Without ``tokens`` (or with ``bins`` = 1) a stratum is a teacher. Depends on the set of
    candidates only, not on their order.
    """
    teach = teacher_grid(table)
    mask = table.mask
    tokens = table.fields.get("tokens")
    strata = np.full(mask.shape, -1, np.int64)
    names: list = []
    for t in sorted(set(teach[mask].tolist())):
        of_t = mask & (teach == t)
        if tokens is None or bins <= 1:
            bin_of = np.zeros(mask.shape, np.int64)
        else:
            n_t = tokens[of_t]
            finite = n_t[np.isfinite(n_t)]
            edges = (np.quantile(finite, np.arange(1, bins) / bins) if finite.size
                     else np.zeros(0))
            bin_of = np.where(np.isfinite(tokens),
                              np.searchsorted(edges, np.nan_to_num(tokens), side="right"), -1)
        for b in sorted(set(bin_of[of_t].tolist())):
            strata[of_t & (bin_of == b)] = len(names)
            names.append((t, int(b)))
    return strata, names


def random_matched(table: ScoreTable, budget: int, seed: int = 0,
                   bins: int = LENGTH_BINS, lark: np.ndarray | None = None
                   ) -> tuple[np.ndarray, dict]:
    """Random trajectories with LARK's composition: ``(chosen [N, K], info)``.

    Let A be LARK's selection at ``budget`` (``lark``, default :func:`lark_chosen`), b_n its
    record count in problem n (min(B, K'_n), K'_n the candidates with a finite ĝ; every
    candidate where none has one), and c_s its count in stratum s (:func:`length_strata`:
    teacher × length bin). The control chooses a set R with

        |R ∩ problem n| = b_n  for every n,     |R ∩ stratum s| = c_s  for every s,

    so it has exactly LARK's records per problem and per teacher, and its length
    distribution equals LARK's at the resolution of each teacher's length quartiles (the
    exact multiset of bins; within a bin lengths are random). Such an R always exists (A
    is one), so the counts are met exactly; ``info["shortfall"]`` would count the records
    missing if the repair below ever failed, and is 0.

    Which R: every candidate has a uniform key u = splitmix(seed, problem_id, candidate_id)
    (:func:`random_keys`) and every problem one from the same hash; problems are visited in
    key order, and each takes, in key order, its candidates whose stratum still has quota,
    up to b_n. Problems left short are then completed by augmenting paths (a short problem
    takes a candidate of stratum s₁, a problem holding s₁ gives it up for s₂, ..., until a
    stratum with quota left; breadth-first over strata, fewest exchanges first; each
    exchange is made by the lowest-key problem able to, taking its lowest-key free candidate
    and giving up its highest-key chosen one).
    So each problem's picks are uniform among its candidates in the strata it may still
    use; the law over R is that of this randomised greedy, not uniform over all R. The
    choice is a pure function of (seed, the scores' set of rows); LARK's own ties follow
    its tie order (:func:`tie_keys`).

    ``info``: per-teacher counts (equal to LARK's), the mean length of both selections where
    the scores carry ``tokens``, ``same_as_lark`` (share of R also in A: where the quotas
    leave no freedom the control coincides with LARK), the records the greedy left short and
    the augmenting paths that completed them.
    """
    mask = table.mask
    chosen_lark = lark_chosen(table, budget) if lark is None else np.asarray(lark, bool) & mask
    strata, names = length_strata(table, bins)
    n_strata = len(names)
    quota = np.bincount(strata[chosen_lark], minlength=n_strata)
    need = chosen_lark.sum(1)
    pids = np.broadcast_to(table.problem_ids[:, None], mask.shape)
    keys = np.where(mask, random_keys(seed, pids, table.candidate_ids), np.inf)
    # A problem's visiting key: the same hash with candidate id 2^64 − 1, which no
    # candidate has (ids are >= 0).
    pkeys = random_keys(seed, table.problem_ids, np.full(table.n_problems, -1, np.int64))
    cand_order = np.argsort(keys, axis=1, kind="stable")
    left = quota.copy()
    chosen = np.zeros(mask.shape, bool)
    for i in np.argsort(pkeys, kind="stable").tolist():
        got = 0
        for j in cand_order[i].tolist():
            if got == need[i] or not mask[i, j]:
                break
            s = strata[i, j]
            if left[s] > 0:
                chosen[i, j] = True
                left[s] -= 1
                got += 1
    short_after_greedy = int((need - chosen.sum(1)).sum())
    paths = 0
    short = np.flatnonzero(chosen.sum(1) < need)
    if short.size:
        state = _Exchange(chosen, strata, n_strata, keys, pkeys, left)
        for i in short.tolist():
            while chosen[i].sum() < need[i] and state.augment(i):
                paths += 1
    shortfall = int((need - chosen.sum(1)).sum())
    stratum_teacher = np.array([t for t, _ in names] or [""], dtype=object)
    teach = np.where(strata >= 0, stratum_teacher[np.maximum(strata, 0)], "")
    info: dict = {
        "seed": seed, "length_bins": bins if "tokens" in table.fields else 1,
        "strata": n_strata,
        "teacher_counts": _counts(teach[chosen]),
        "lark_teacher_counts": _counts(teach[chosen_lark]),
        "same_as_lark": float((chosen & chosen_lark).sum() / max(int(chosen.sum()), 1)),
        "short_after_greedy": short_after_greedy, "augmenting_paths": paths,
        "shortfall": shortfall,
        "problems_below_budget": int((need < np.minimum(budget, mask.sum(1))).sum()),
    }
    if "tokens" in table.fields:
        tok = table.fields["tokens"]
        info["tokens_mean"] = {"lark": _mean(tok[chosen_lark]), "matched": _mean(tok[chosen])}
    return chosen, info


class _Exchange:
    """The state of :func:`random_matched`'s repair: ``held`` / ``free`` [N, S], each
    problem's chosen / unchosen candidates per stratum, and ``pairs`` [S, S], how many
    problems hold s and could take s' instead (the edges of the strata's exchange graph)."""

    def __init__(self, chosen, strata, n_strata, keys, pkeys, left):
        self.chosen, self.strata, self.keys, self.pkeys, self.left = (chosen, strata, keys,
                                                                     pkeys, left)
        n = chosen.shape[0]
        rows = np.broadcast_to(np.arange(n)[:, None], chosen.shape)
        real = strata >= 0
        # Column-major: a path's step scans one stratum's column over every problem.
        self.held = np.zeros((n, n_strata), np.int64, order="F")
        self.free = np.zeros_like(self.held)
        np.add.at(self.held, (rows[chosen], strata[chosen]), 1)
        np.add.at(self.free, (rows[real & ~chosen], strata[real & ~chosen]), 1)
        self.pairs = (self.held > 0).T.astype(np.int64) @ (self.free > 0).astype(np.int64)

    def _move(self, n: int, take: int, give: int | None) -> None:
        """Problem n takes its lowest-key free candidate of stratum ``take`` and gives up its
        highest-key chosen one of ``give``."""
        self.pairs -= np.outer(self.held[n] > 0, self.free[n] > 0)
        row, strata = self.chosen[n], self.strata[n]
        cand = np.flatnonzero(~row & (strata == take))
        row[cand[np.argmin(self.keys[n, cand])]] = True
        self.held[n, take] += 1
        self.free[n, take] -= 1
        if give is not None:
            cand = np.flatnonzero(row & (strata == give))
            row[cand[np.argmax(self.keys[n, cand])]] = False
            self.held[n, give] -= 1
            self.free[n, give] += 1
        self.pairs += np.outer(self.held[n] > 0, self.free[n] > 0)

    def augment(self, i: int) -> bool:
        """One augmenting path from problem i; False if none. Breadth-first over strata:
        from those i has a free candidate in, along exchange edges, to one with quota left.
        Walking back from that end, each edge s -> s' is made by the lowest-key problem that
        holds s and has s' free (one that did when the path was found still does: the walk
        only frees candidates of s' before it needs them, and touches s after)."""
        parent: dict[int, int | None] = {s: None for s in
                                         np.flatnonzero(self.free[i] > 0).tolist()}
        queue, end = list(parent), None
        while queue:
            s = queue.pop(0)
            if self.left[s] > 0:
                end = s
                break
            for s2 in np.flatnonzero(self.pairs[s] > 0).tolist():
                if s2 not in parent:
                    parent[s2] = s
                    queue.append(s2)
        if end is None:
            return False
        self.left[end] -= 1
        cur = end
        while (prev := parent[cur]) is not None:
            ok = (self.held[:, prev] > 0) & (self.free[:, cur] > 0)
            self._move(int(np.argmin(np.where(ok, self.pkeys, np.inf))), cur, prev)
            cur = prev
        self._move(i, cur, None)
        return True


def _counts(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in names.tolist():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def teacher_means(table: ScoreTable) -> dict[str, float]:
    """Mean ĝ of each teacher over its candidates with a finite ĝ (NaN if none), by name."""
    g = table.fields["g_hat"]
    teach = teacher_grid(table)
    out = {}
    for t in sorted(set(teach[table.mask].tolist())):
        v = g[table.mask & (teach == t)]
        v = v[np.isfinite(v)]
        out[t] = float(v.mean()) if v.size else float("nan")
    return out


def best_teacher(table: ScoreTable, budget: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Every candidate of the teacher t* = argmax_t mean ĝ_t (:func:`teacher_means`; ties:
    the name first in sorting order): ``(chosen [N, K], info)``. The budget is not used;
    a problem without a trajectory of t* gets none."""
    means = teacher_means(table)
    best = None
    for t, m in means.items():  # sorted by name: a later equal mean does not replace it
        if np.isfinite(m) and (best is None or m > means[best]):
            best = t
    if best is None:
        raise ValueError("best-teacher: no teacher has a finite g_hat")
    chosen = table.mask & (teacher_grid(table) == best)
    return chosen, {"teacher": best, "teacher_mean_g_hat": means,
                    "problems_without_selection": int((~chosen.any(1)).sum())}


def verified(table: ScoreTable, budget: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Random among the correct candidates (``correct`` == 1): per problem the
    min(B, C_n) with the lowest :func:`random_keys` key, C_n its correct candidates; wrong
    (0) and unknown (NaN) ones are never chosen, and a problem without a correct one gets
    none. ``(chosen [N, K], info)``."""
    c = np.asarray(table.fields["correct"], np.float64)
    mask = table.mask
    bad = mask & np.isfinite(c) & (c != 0.0) & (c != 1.0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"verified: 'correct' must be 1, 0 or NaN, got {float(c[i, j])!r} "
                         f"(problem {int(table.problem_ids[i])}, candidate "
                         f"{int(table.candidate_ids[i, j])})")
    ok = mask & (c == 1.0)
    pids = np.broadcast_to(table.problem_ids[:, None], mask.shape)
    keys = random_keys(seed, pids, table.candidate_ids)
    chosen = top_by(keys, ok, table.candidate_ids, np.minimum(budget, ok.sum(1)), True)
    return chosen, {"seed": seed, "problems_without_selection": int((~chosen.any(1)).sum()),
                    "incorrect": int((mask & (c == 0.0)).sum()),
                    "unknown": int((mask & np.isnan(c)).sum())}


CONTROLS = {"random-matched": random_matched, "best-teacher": best_teacher,
            "verified": verified}
