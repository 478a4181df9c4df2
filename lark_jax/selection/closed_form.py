"""The reference's χ² selection rule in closed form (docs/method.md, step 3).

Per problem, with energies e = ĝ (NaN or ±inf: never selected) and budget B:

    A      = the top-B valid candidates by e (ties: lower key first; select passes
             the candidates' positions in the pool file, as the reference orders them)
    t      = e_(B+1), the energy of the best excluded valid candidate, or, when there are
             fewer than B+1 valid candidates, min_A e − 1e-8 (just below the lowest selected)
    mean_A = mean of e over A
    q_k    = (e_k − t) / (B · (mean_A − t))     for k in A, else 0
    ties:    mean_A − t <= 1e-12  ->  q_k = 1/B on A
    all NaN: q_k = 1/K on every candidate of the problem

Throughout, B means ``min(B, number of valid candidates)`` so that q always sums to 1 (with
fewer valid candidates than the budget every valid one is selected).

Why this is the χ² policy: the solution of ``max_q <q,e> − τ Σ_k (q_k − p_k)²/p_k`` over the
simplex is ``q_k = p_k max(0, 1 + (e_k − θ)/(2τ))`` (stationarity; θ normalises). With the
prior p uniform over the K' valid candidates, the closed form above is that solution exactly
when ``θ − 2τ = t`` and ``p_k/(2τ) = 1/(B(mean_A − t))``, i.e. at the *implied temperature*

    τ_B = B (mean_A − t) / (2 K').

More generally, for any prior p (renormalised over the valid entries, p̃), keeping exactly the
top-B entries means ``θ − 2τ = t`` and normalisation gives ``τ_B = Σ_{k∈A} p̃_k (e_k − t) / 2``
and ``q_k = p̃_k (e_k − t) / Σ_{j∈A} p̃_j (e_j − t)``; with the ties rule ``q ∝ p̃`` on A. That
prior-weighted form is what :func:`closed_form` computes (uniform prior by default), and what
the global mode uses with one prior over the whole pool (:func:`global_closed_form`).

Everything runs vectorised over all problems at once: ragged candidate counts are padded to
``[N, Kmax]`` with a mask. :func:`reference_closed_form` is the plain per-problem NumPy
version, kept as the test oracle and the benchmark's baseline loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TIE_EPS = 1e-12  # mean_A − t at or below this is a tie (reference rule)
BELOW_MIN = 1e-8  # with fewer than B+1 valid candidates, t = min_A e − BELOW_MIN

# Per-problem status codes (``ClosedForm.status``).
STATUS_OK = 0  # at least B+1 valid candidates, regular formula
STATUS_SHORT = 1  # fewer than B+1 valid candidates: t = min_A − 1e-8
STATUS_TIE = 2  # mean_A − t <= 1e-12: uniform over A (no finite χ² temperature gives this)
STATUS_ALL_NAN = 3  # no valid energy: uniform over every candidate (prior-weighted)
STATUS_EMPTY = 4  # padding-only row (no candidates at all): weights are zero

PAIRWISE_MAX_K = 32  # up to this row length ranks come from pairwise comparisons, not a sort


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClosedForm:
    """Result over a batch of problems (arrays shaped like the input's leading axes)."""

    weights: jax.Array  # [..., K] q, sums to 1 per row (0 on padding)
    selected: jax.Array  # [..., K] bool: A (the records the reference writes); all-NaN: all
    tau: jax.Array  # [...] implied temperature τ_B (0 for ties, NaN for all-NaN / empty rows)
    threshold: jax.Array  # [...] t (NaN for all-NaN / empty rows)
    status: jax.Array  # [...] int32, STATUS_*


def pad_ragged(rows: Sequence[Sequence[float]], dtype=np.float64,
               fill: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged rows into ``(values [N, Kmax], mask [N, Kmax])``; padding gets ``fill``."""
    n = len(rows)
    kmax = max((len(r) for r in rows), default=0)
    values = np.full((n, max(kmax, 1)), fill, dtype=dtype)
    mask = np.zeros((n, max(kmax, 1)), dtype=bool)
    for i, r in enumerate(rows):
        values[i, :len(r)] = r
        mask[i, :len(r)] = True
    return values, mask


def reference_closed_form(energies: Sequence[float], budget: int,
                          keys: Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """One problem, plain Python/NumPy float64: returns ``(q [K], selected indices)``.

    This is the rule of the module docstring written the way one would by hand, a problem at
    a time; the vectorised :func:`closed_form` must agree with it.
    """
    e = np.asarray(energies, dtype=np.float64)
    k_all = len(e)
    keys = list(range(k_all)) if keys is None else list(keys)
    if budget < 1:
        raise ValueError("budget must be >= 1")
    valid = [k for k in range(k_all) if np.isfinite(e[k])]
    if not valid:
        return np.full(k_all, 1.0 / k_all), sorted(range(k_all), key=lambda k: keys[k])
    ranked = sorted(valid, key=lambda k: (-e[k], keys[k]))
    b = min(budget, len(ranked))
    chosen = ranked[:b]
    if len(ranked) > budget:
        t = e[ranked[budget]]
    else:
        t = min(e[k] for k in chosen) - BELOW_MIN
    mean_a = sum(e[k] for k in chosen) / b
    q = np.zeros(k_all)
    for k in chosen:
        q[k] = 1.0 / b if mean_a - t <= TIE_EPS else (e[k] - t) / (b * (mean_a - t))
    return q, chosen


_REDUCERS = {"sum": (jnp.add, jnp.sum), "max": (jnp.maximum, jnp.max),
             "min": (jnp.minimum, jnp.min)}


def row_reduce(kind: str, x: jax.Array) -> jax.Array:
    """Reduce over the last axis ("sum", "max", "min"), broadcast back to ``x.shape``.

    For short rows the reduction is unrolled over broadcast column slices: every entry of a
    row recomputes the row's value, K-fold redundant work, but it stays one elementwise loop
    that XLA:CPU fuses and vectorises, where a reduction over a minor axis of 8 with a fused
    producer runs several times slower. Long rows use the ordinary reduction.
    """
    op, reducer = _REDUCERS[kind]
    k = x.shape[-1]
    if k > PAIRWISE_MAX_K:
        return jnp.broadcast_to(reducer(x, axis=-1, keepdims=True), x.shape)
    acc = jnp.broadcast_to(x[..., :1], x.shape)
    for j in range(1, k):
        acc = op(acc, x[..., j:j + 1])
    return acc


def top_membership(e: jax.Array, valid: jax.Array, keys: jax.Array, count: jax.Array,
                   method: str = "auto") -> jax.Array:
    """Mask of the ``count`` best valid entries of each row under the order (e desc, key asc).

    ``count`` is per entry (broadcast to ``e.shape``; the same value across a row). Keys
    must be distinct within a row. ``method`` picks pairwise comparisons (O(K²) work per row,
    fastest for the short rows of per-problem selection) or a sort (long rows, e.g. the
    global pool); "auto" chooses by row length.
    """
    k = e.shape[-1]
    if method == "auto":
        method = "pairwise" if k <= PAIRWISE_MAX_K else "sort"
    e = jnp.where(valid, e, 0)  # comparisons never see NaN; invalid entries are gated below
    if method == "pairwise":
        # rank_k = number of valid entries ordered before k, unrolled over j (one fused loop).
        rank = jnp.zeros(e.shape, jnp.int32)
        for j in range(k):
            ej, kj, vj = e[..., j:j + 1], keys[..., j:j + 1], valid[..., j:j + 1]
            rank = rank + (vj & ((ej > e) | ((ej == e) & (kj < keys)))).astype(jnp.int32)
        return valid & (rank < count)
    if method != "sort":
        raise ValueError(f"unknown method {method!r}")
    neg = jnp.where(valid, -e, jnp.inf)
    neg_s, key_s = lax.sort((neg, keys), dimension=e.ndim - 1, num_keys=2)
    idx = jnp.maximum(count[..., :1] - 1, 0)
    last_e = -jnp.take_along_axis(neg_s, idx, axis=-1)
    last_k = jnp.take_along_axis(key_s, idx, axis=-1)
    return valid & (count > 0) & ((e > last_e) | ((e == last_e) & (keys <= last_k)))


# The closed form runs as three jitted stages. As one program, XLA:CPU fuses the O(K²)
# ranking and the row reductions into every consumer and recomputes them there (several
# times slower); the stage boundaries materialise them once (an [N, K] bool and a few [N]
# vectors). mask / prior / keys may be None (all real, uniform, by position): they are then
# built inside from constants and iotas instead of being read from [N, K] arrays.


def _valid(e, mask):
    valid = jnp.isfinite(e) if mask is None else mask & jnp.isfinite(e)
    return valid, jnp.where(valid, e, 0)


@functools.partial(jax.jit, static_argnames=("method",))
def _rank_stage(e, mask, keys, budget, method):
    """A (the top min(B, K') valid entries) and K' per row."""
    valid, e0 = _valid(e, mask)
    if keys is None:
        keys = lax.broadcasted_iota(jnp.int32, e.shape, e.ndim - 1)
    n_valid = row_reduce("sum", valid.astype(jnp.int32))
    in_a = top_membership(e0, valid, keys, jnp.minimum(budget, n_valid), method)
    return in_a, n_valid[..., 0]


@jax.jit
def _row_stage(e, mask, prior, in_a, n_valid, budget):
    """Per row: t, mean_A − t, the denominator, Σ_A w, Σ_valid w, Σ_mask w, and K_n.

    With the uniform prior the denominator is the reference's own arithmetic, B (mean_A − t)
    with mean_A = Σ_A e / B; with a prior w it is Σ_A w (e − t), the sum of the numerators,
    so that the weights sum to 1 to rounding even where mean_A − t is tiny.
    """
    dt = e.dtype
    valid, e0 = _valid(e, mask)
    first = (..., 0)
    short = n_valid <= budget
    best_out = row_reduce("max", jnp.where(valid & ~in_a, e0, -jnp.inf))[first]
    min_a = row_reduce("min", jnp.where(in_a, e0, jnp.inf))[first]
    t = jnp.where(short, min_a - BELOW_MIN, best_out)
    k_n = (jnp.full(n_valid.shape, e.shape[-1], jnp.int32) if mask is None
           else row_reduce("sum", mask.astype(jnp.int32))[first])
    if prior is None:  # uniform: the masses are counts
        mass_a = jnp.minimum(budget, n_valid).astype(dt)
        safe = jnp.where(mass_a > 0, mass_a, 1)
        gap = row_reduce("sum", jnp.where(in_a, e0, 0))[first] / safe - t
        return t, gap, mass_a * gap, mass_a, n_valid.astype(dt), k_n.astype(dt), k_n
    w = jnp.where(valid, prior, 0)
    w_a = jnp.where(in_a, w, 0)
    mass_a = row_reduce("sum", w_a)[first]
    safe = jnp.where(mass_a > 0, mass_a, 1)
    gap = row_reduce("sum", w_a * e0)[first] / safe - t  # prior-weighted mean_A − t
    denom = row_reduce("sum", jnp.where(in_a, w * (e0 - t[..., None]), 0))[first]
    all_w = prior if mask is None else jnp.where(mask, prior, 0)
    return (t, gap, denom, mass_a, row_reduce("sum", w)[first], row_reduce("sum", all_w)[first],
            k_n)


def _weight_stage(e, mask, prior, in_a, n_valid, t, gap, denom, mass_a, mass_valid, mass_all):
    """The weights and the per-row outputs of :class:`ClosedForm`."""
    dt = e.dtype
    valid, e0 = _valid(e, mask)
    # The prior enters only through ratios, so it is used unnormalised.
    if prior is None:
        w = valid.astype(dt)
        w_all = jnp.ones(e.shape, dt) if mask is None else mask.astype(dt)
    else:
        w = jnp.where(valid, prior, 0)
        w_all = prior if mask is None else jnp.where(mask, prior, 0)
    tie = gap <= TIE_EPS
    all_nan = n_valid == 0
    col = (..., None)
    w_a = jnp.where(in_a, w, 0)
    q_main = jnp.where(in_a, w * (e0 - t[col]), 0) / jnp.where(tie, 1, denom)[col]
    q_tie = w_a / jnp.where(mass_a > 0, mass_a, 1)[col]
    q_nan = w_all / jnp.where(mass_all > 0, mass_all, 1)[col]  # no valid energy: the prior
    weights = jnp.where(all_nan[col], q_nan, jnp.where(tie[col], q_tie, q_main))
    selected = jnp.where(all_nan[col], True if mask is None else mask, in_a)
    # τ_B = Σ_A p̃ (e − t) / 2 with p̃ = w / Σ_valid w.
    nan = jnp.array(jnp.nan, dt)
    tau_b = denom / (2 * jnp.maximum(mass_valid, jnp.finfo(dt).tiny))
    tau = jnp.where(all_nan, nan, jnp.where(tie, 0, tau_b))
    threshold = jnp.where(all_nan, nan, t)
    return weights, selected, tau, threshold, tie, all_nan


_weight_stage_keep = jax.jit(_weight_stage)
# When the energies are a device copy made here, the weights are written into its buffer
# (they have its shape and dtype): a fresh [N, K] output costs as much as the arithmetic.
_weight_stage_donate = jax.jit(_weight_stage, donate_argnums=0)


def _closed_form(e, mask, prior, keys, budget, method, donate=False):
    in_a, n_valid = _rank_stage(e, mask, keys, budget, method)
    *rows, k_n = _row_stage(e, mask, prior, in_a, n_valid, budget)
    stage = _weight_stage_donate if donate else _weight_stage_keep
    weights, selected, tau, threshold, tie, all_nan = stage(e, mask, prior, in_a, n_valid, *rows)
    status = jnp.where(n_valid <= budget, STATUS_SHORT, STATUS_OK)
    status = jnp.where(tie, STATUS_TIE, status)
    status = jnp.where(all_nan, STATUS_ALL_NAN, status)
    status = jnp.where(k_n > 0, status, STATUS_EMPTY).astype(jnp.int32)
    return ClosedForm(weights, selected, tau, threshold, status)


def _as_inputs(e, mask, prior, keys):
    """Arrays on the device, None stays None; also whether ``e`` is a copy made here."""
    owned = not isinstance(e, jax.Array)
    e = jax.device_put(e) if isinstance(e, np.ndarray) else jnp.asarray(e)
    if not jnp.issubdtype(e.dtype, jnp.floating):
        e, owned = e.astype(jnp.result_type(float)), True
    mask = None if mask is None else jnp.asarray(mask, bool)
    prior = None if prior is None else jnp.asarray(prior, e.dtype)
    keys = None if keys is None else jnp.asarray(keys)
    for name, x in (("mask", mask), ("prior", prior), ("keys", keys)):
        if x is not None and x.shape != e.shape:
            raise ValueError(f"shape mismatch: e {e.shape}, {name} {x.shape}")
    return e, mask, prior, keys, owned


def closed_form(e, budget: int, mask=None, *, keys=None, prior=None,
                method: str = "auto") -> ClosedForm:
    """The closed form for every row of ``e [N, K]`` (or a single row ``[K]``) at once.

    ``mask`` marks real candidates (padding False); ``keys`` breaks ties (distinct per row,
    default: position, so pass candidate ids); ``prior`` defaults to uniform, which is the
    reference. Computation follows ``e``'s dtype: pass float64 under ``jax.enable_x64`` to
    reproduce the reference to rounding (its 1e-8 and 1e-12 constants are below float32's
    resolution for energies of order one).
    """
    if budget < 1:
        raise ValueError("budget must be >= 1")
    e, mask, prior, keys, owned = _as_inputs(e, mask, prior, keys)
    return _closed_form(e, mask, prior, keys, jnp.asarray(budget, jnp.int32), method, owned)


def global_prior(mask) -> jax.Array:
    """The global mode's prior: uniform over problems (rows with a candidate), then uniform
    over each problem's candidates: ``P[n, k] = 1 / (N · K_n)``, 0 on padding."""
    mask = jnp.asarray(mask, bool)
    k_n = mask.sum(-1, keepdims=True)
    n = (k_n > 0).sum()
    return jnp.where(mask, 1.0 / (jnp.maximum(n, 1) * jnp.maximum(k_n, 1)), 0.0)


def global_closed_form(e, budget: int, mask=None, *, prior=None, keys=None) -> ClosedForm:
    """One χ² distribution over every trajectory of the pool keeping the global top ``budget``.

    Solves ``max_Q <Q, e> − τ D_χ²(Q ‖ P)`` over the simplex of all trajectories (``[N, K]``
    flattened), with P = :func:`global_prior` unless given, and τ = τ_M chosen so that the
    support is exactly the global top-M by energy (M = ``budget``): ``t = e_(M+1)``,
    ``Q_i = P_i (e_i − t) / Σ_{j∈A} P_j (e_j − t)``; the same edge rules as per problem.
    Ties are broken by ``keys`` (``[N, K]``, distinct over the whole pool; default: position
    in row-major order, rows by problem id and candidates by candidate id). Returns weights
    ``[N, K]`` summing to 1 over the whole pool, and scalar ``tau``/``threshold``/``status``.
    """
    if budget < 1:
        raise ValueError("budget must be >= 1")
    e = jnp.asarray(e)
    mask = jnp.ones(e.shape, bool) if mask is None else jnp.asarray(mask, bool)
    prior = global_prior(mask).astype(e.dtype) if prior is None else jnp.asarray(prior, e.dtype)
    keys = (jnp.arange(e.size, dtype=jnp.int32) if keys is None
            else jnp.asarray(keys)).reshape(1, -1)
    flat = (e.reshape(1, -1), mask.reshape(1, -1), prior.reshape(1, -1), keys)
    cf = _closed_form(*flat, jnp.asarray(budget, jnp.int32), "sort")
    return ClosedForm(cf.weights.reshape(e.shape), cf.selected.reshape(e.shape), cf.tau[0],
                      cf.threshold[0], cf.status[0])
