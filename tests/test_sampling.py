"""Sort-free top-p, the inverse-CDF draw and the repetition penalty, against oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lark_jax.models.sampling import apply_repetition_penalty, choose, draw, top_p_keep


def sort_top_p(z, top_p):
    """The sort-based definition in float64: stable sort by probability (ties by id),
    keep a token iff the mass strictly before it is < top_p. Also returns each kept
    decision's margin |mass_before - top_p| (float32 may round knife-edge cases)."""
    z = np.asarray(z, np.float64)
    keep = np.zeros(z.shape, bool)
    margin = np.zeros(z.shape)
    for i, zi in enumerate(z):
        p = np.exp(zi - zi.max())
        p /= p.sum()
        order = np.argsort(-zi, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep[i, order] = before < top_p
        margin[i, order] = np.abs(before - top_p)
    return keep, margin


@pytest.mark.parametrize("v", [7, 50, 1009, 151936])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 1.0])
def test_top_p_kept_set_equals_the_sort_definition(v, top_p):
    rng = np.random.RandomState(v)
    scale = np.array([0.05, 0.5, 2.0, 8.0])[:, None]  # flat to peaked rows
    z = (rng.randn(4, v) * scale).astype(np.float32)
    got = np.asarray(jax.jit(top_p_keep)(jnp.asarray(z), top_p))
    want, margin = sort_top_p(z, top_p)
    bad = got != want
    if top_p == 1.0:  # no filter (transformers skips it too): float64 cumsums reach 1
        assert got.all()
        return
    assert not (bad & (margin > 1e-5)).any()  # only float32 knife-edges may differ
    assert bad.sum() <= 1 and want.any(1).all()


@pytest.mark.parametrize("z,top_p,kept", [
    ([0.0, 0.0, 0.0, 0.0], 0.5, [1, 1, 0, 0]),  # dyadic ties: mass before the 3rd is 0.5
    ([0.0, 0.0, 0.0, 0.0], 0.51, [1, 1, 1, 0]),
    ([0.0, 0.0, 0.0, 0.0], 1.0, [1, 1, 1, 1]),
    ([1.0, 3.0, 3.0, 1.0, 3.0], 0.05, [0, 1, 0, 0, 0]),  # ties at the top: lowest id
    ([-np.inf, 2.0, 2.0, -np.inf], 0.6, [0, 1, 1, 0]),  # masked tokens never kept
    ([5.0, -1e30, 0.0, 5.0], 0.999, [1, 0, 1, 1]),
    ([-0.0, 0.0, -1.0, 1.0], 0.7, None),  # signed zeros
])
def test_top_p_on_adversarial_logits(z, top_p, kept):
    z = np.asarray([z], np.float32)
    got = np.asarray(top_p_keep(jnp.asarray(z), top_p))[0]
    z64 = z.astype(np.float64)
    want = sort_top_p(np.where(np.isfinite(z64), z64, -1e300), top_p)[0][0] & (z[0] > -1e29)
    np.testing.assert_array_equal(got, want)
    if kept is not None:
        np.testing.assert_array_equal(got, np.asarray(kept, bool))


def test_draw_follows_the_renormalised_nucleus():
    """Goodness of fit: 40,000 draws on a 12-token vocabulary, chi-square vs the kept
    distribution (p-value > 1e-4, so a correct sampler fails 1 run in 10,000)."""
    from scipy import stats

    z = np.array([[2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, 0.25, 1.0]],
                 np.float32)
    top_p, n = 0.9, 40_000
    keep = np.asarray(top_p_keep(jnp.asarray(z), top_p))[0]
    p = np.exp(z[0].astype(np.float64) - z[0].max()) * keep
    p /= p.sum()
    keys = jax.random.split(jax.random.key(0), n)
    f = jax.jit(jax.vmap(lambda k: choose(jnp.asarray(z), k[None], temperature=1.0,
                                          top_p=top_p, greedy=False)[0]))
    counts = np.bincount(np.asarray(f(keys)), minlength=12)
    assert counts[~keep].sum() == 0 and keep.sum() < 12
    expected = n * p[keep] / p[keep].sum()
    chi2, pval = stats.chisquare(counts[keep], expected * counts.sum() / expected.sum())
    assert pval > 1e-4, (counts, n * p)
    # u at the edges of [0, 1): the first and the last kept token
    first, last = np.nonzero(keep)[0][[0, -1]]
    zz = jnp.asarray(np.repeat(z, 2, 0))
    kk = jnp.asarray(np.repeat(keep[None], 2, 0))
    assert np.asarray(draw(zz, kk, jnp.asarray([0.0, 1.0 - 2**-24]))).tolist() == [first, last]


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.RandomState(3)
    z = rng.randn(3, 40).astype(np.float32) * 3
    ids = rng.randint(0, 40, (3, 9))
    for r in (1.1, 0.8, 1.0):
        want = RepetitionPenaltyLogitsProcessor(r)(torch.tensor(ids), torch.tensor(z)).numpy()
        seen = np.zeros(z.shape, bool)
        np.put_along_axis(seen, ids, True, axis=1)
        got = np.asarray(apply_repetition_penalty(jnp.asarray(z), jnp.asarray(seen), r))
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_prefilter_path_on_peaked_rows(top_p):
    """Every row peaked: the nucleus lies in the top 256, found with lax.top_k (ties at
    the edge included); the bisection gives the same set."""
    from lark_jax.models.sampling import _bisect_keep

    rng = np.random.RandomState(7)
    z = (rng.randn(3, 151936) * 2).astype(np.float32)
    z[:, :40] += 14.0  # 40 dominant tokens
    z[1, 3:9] = z[1, 2]  # ties among them
    zz = jnp.asarray(z)
    got = np.asarray(jax.jit(top_p_keep)(zz, top_p))
    want, margin = sort_top_p(z, top_p)
    assert not ((got != want) & (margin > 1e-5)).any() and got.sum(1).max() <= 40
    p = jax.nn.softmax(zz, -1)
    np.testing.assert_array_equal(np.asarray(_bisect_keep(zz, p, top_p)), got)


def test_a_rows_kept_set_does_not_depend_on_the_other_rows():
    """A peaked row takes the prefilter path even beside a flat row (bisection)."""
    rng = np.random.RandomState(11)
    peaked = (rng.randn(1, 151936) * 2).astype(np.float32)
    peaked[0, :30] += 14.0
    flat = (rng.randn(1, 151936) * 0.05).astype(np.float32)
    f = jax.jit(top_p_keep)
    alone = np.asarray(f(jnp.asarray(peaked), 0.9))
    mixed = np.asarray(f(jnp.asarray(np.concatenate([flat, peaked])), 0.9))
    np.testing.assert_array_equal(mixed[1], alone[0])
    assert mixed[0].sum() > 1000 and alone.sum() <= 30


def _reference_ids(z, top_p, u):
    """The previous engine's draw (frozen in tests/reference_generate.py): the kept set
    over the whole vocabulary, then the inverse-CDF draw over it."""
    import reference_generate as ref

    return np.asarray(jax.jit(lambda z, u: ref.draw(z, ref.top_p_keep(z, top_p), u))(z, u))


@pytest.mark.parametrize("v,top_p", [
    (v, p) if v < 151936 or p == 0.95 else pytest.param(v, p, marks=pytest.mark.slow)
    for v in (300, 3000, 151936) for p in (0.3, 0.95, 1.0)])
def test_sample_gives_the_previous_engines_ids(v, top_p):
    """``sample`` (top-k candidates, the exact fallback) draws the ids of the previous
    full-vocabulary draw, row for row, on rows from flat to peaked, with ties and with u
    at both ends of [0, 1); both of its paths run."""
    from lark_jax.models.sampling import sample

    rng = np.random.RandomState(v)
    f = jax.jit(lambda z, u: sample(z, top_p, u))
    paths = set()
    for scale in (0.5, 8.0, 30.0):
        z = (rng.randn(24, v) * scale).astype(np.float32)
        z[0, 5:9] = z[0].max()  # ties at the top
        z[1, :] = np.round(z[1])  # many ties
        u = rng.rand(24).astype(np.float32)
        u[2], u[3] = 0.0, 1.0 - 2**-24
        got, want = np.asarray(f(z, u)), _reference_ids(z, top_p, u)
        np.testing.assert_array_equal(got, want)
        for row in range(4, 24):  # one row at a time: which path it takes alone
            zz = jnp.asarray(z[row:row + 1])
            alone = np.asarray(f(zz, u[row:row + 1]))
            assert alone[0] == want[row]
            paths.add(_fast_path(zz, top_p))
    assert (True in paths) == (top_p < 1)  # top_p = 1: the full path (kept: π > 0)
    assert False in paths or v == 300  # flat rows of a large vocabulary: the fallback


def _fast_path(z, top_p):
    """Whether ``sample`` takes the candidate path on z (its own fits/ok test)."""
    from lark_jax.models.sampling import PREFILTER_K, _candidate_draw, _row_sum

    m = z.max(-1, keepdims=True)
    total = _row_sum(jnp.exp(z - m))[:, None]
    top_z, top_i = jax.lax.top_k(z, min(PREFILTER_K, z.shape[-1]))
    mass = jnp.exp(top_z - m) / total
    before = jnp.cumsum(mass, -1) - mass
    _, ok = _candidate_draw(z, top_z, top_i, before < top_p, jnp.zeros(z.shape[0]))
    return bool(top_p < 1 and (before[:, -1] + mass[:, -1] >= top_p).all() and ok.all())
