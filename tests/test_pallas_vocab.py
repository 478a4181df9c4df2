"""The fused vocabulary-statistics kernel (lark_jax.learnability.pallas_vocab), in Pallas
interpret mode, against a float64 NumPy oracle: every statistic, ties, masks, a vocabulary
that is not a multiple of the tile (nor of the splits), 1 vs 8 devices, and the current
kernel (lark_jax.learnability.kernel)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lark_jax.errors import LarkError
from lark_jax.learnability.kernel import RANK_CLIP, _head_stats_local, token_stats
from lark_jax.learnability.pallas_vocab import segment_stats, vocab_stats
from lark_jax.parallel import make_mesh

# Small tiles so that every path runs: several row blocks, several tiles per split, a last
# tile shifted left (V = 300 is not a multiple of 64), splits of unequal length.
OPTS = dict(block_t=8, block_v=64, interpret=True)


def oracle(z, y, k):
    """float64 (ce, brier_topk, brier_full, rank) [4, T] from logits z [T, V], written from
    docs/method.md, step 1: the top K in (value desc, index asc) order."""
    z = np.asarray(z, np.float64)
    out = np.zeros((4, len(y)))
    for t, (zt, yt) in enumerate(zip(z, y, strict=True)):
        lse = zt.max() + np.log(np.exp(zt - zt.max()).sum())
        p = np.exp(zt - lse)
        top = sorted(range(len(zt)), key=lambda v: (-zt[v], v))[:k]
        q = np.exp(zt[top] - zt[top].max())
        q /= q.sum()
        p_true = q[top.index(yt)] if yt in top else 0.0
        out[:, t] = (lse - zt[yt], 1 - 2 * p_true + (q * q).sum(), 1 - 2 * p[yt] + (p * p).sum(),
                     min(1 + (zt > zt[yt]).sum(), RANK_CLIP))
    return out


def data(seed, t=37, d=32, v=300, dyadic=False, h_max=1, w_den=4):
    """(hidden, head, targets). Dyadic inputs make every logit exact in float32 (no rounding
    in the products), with many exact ties."""
    rng = np.random.default_rng(seed)
    if dyadic:
        h = rng.integers(-2 * h_max, 2 * h_max + 1, (t, d)) / 2.0
        w = rng.integers(-w_den // 2, w_den // 2 + 1, (v, d)) / w_den
    else:
        h, w = rng.normal(size=(t, d)), rng.normal(size=(v, d)) / 2
    return h.astype(np.float32), w.astype(np.float32), rng.integers(0, v, t)


def check(got, want, mask):
    got = np.asarray(got)
    assert (got[:, ~mask] == 0).all()  # masked tokens: 0 for every statistic
    np.testing.assert_allclose(got[:3, mask], want[:3, mask], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(got[3, mask], want[3, mask])


@pytest.mark.parametrize("splits", [1, 3, 8])  # 8: the last splits of V = 300 are empty
def test_every_statistic_matches_float64(splits):
    h, w, y = data(0)
    z = h.astype(np.float64) @ w.T.astype(np.float64)
    y[::3] = np.argsort(-z[::3], axis=1)[:, 4]  # ranks 5 beside random ones (mostly clipped)
    mask = np.random.default_rng(1).random(len(y)) < 0.8
    mask[8:16] = False  # a whole row block of masked tokens skips the vocabulary
    got = vocab_stats(h, w, y, mask, top_k=50, splits=splits, **OPTS)
    want = oracle(z, y, 50)
    check(got, want, mask)
    assert (want[3, mask] == RANK_CLIP).any() and (want[3, mask] < 10).any()  # clip exercised


@pytest.mark.parametrize("round_logits", [None, "bfloat16"])
def test_ties_in_logits_follow_the_lower_index(round_logits):
    # Logits in 1/32; those above 8 need more than bf16's 8 significant bits.
    h, w, y = data(2, t=64, dyadic=True, **(dict(h_max=8, w_den=16) if round_logits else {}))
    z = h.astype(np.float64) @ w.T.astype(np.float64)  # exact in float32 too
    if round_logits:
        exact = z
        z = z.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        assert (z != exact).mean() > 0.1  # the rounding is visible
    k = 20
    # Targets on purpose at the top-K boundary: a value tied with others that straddle
    # position K, the target before some of them (kept) or after (dropped).
    order = np.lexsort((np.arange(z.shape[1])[None].repeat(len(z), 0), -z), axis=1)
    y[::2] = order[::2, k - 1]
    y[1::2] = order[1::2, k]
    mask = np.ones(len(y), bool)
    want = oracle(z, y, k)
    got = vocab_stats(h, w, y, mask, top_k=k, splits=3, round_logits=round_logits, **OPTS)
    check(got, want, mask)
    assert (want[1] != oracle_untied(z, y, k)).sum() >= 5  # the tie rule decided these


def oracle_untied(z, y, k):
    """Top-K Brier if ties went to the HIGHER index: differs where the tie order matters."""
    zz = z[:, ::-1]
    return oracle(zz, z.shape[1] - 1 - np.asarray(y), k)[1]


def test_matches_the_current_kernel():
    h, w, y = data(3, t=40, v=257)
    mask = np.ones(len(y), bool)
    got = np.asarray(vocab_stats(h, w, y, mask, top_k=50, splits=2, **OPTS))
    z = jnp.asarray(h) @ jnp.asarray(w).T
    want = np.stack([np.asarray(x) for x in token_stats(z, jnp.asarray(y), 50)])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def packed(seed, b=8, length=12, d=32, v=300):
    """A packed batch as the scorer sees it: segments (-1 = padding), weights 0 or 1."""
    rng = np.random.default_rng(seed)
    h, w, _ = data(seed, t=b * length, d=d, v=v, dyadic=True)
    segments = np.repeat(np.arange(3), [5, 4, 3])[None].repeat(b, 0)
    segments[:, -2:] = -1
    weights = ((rng.random((b, length)) < 0.7) & (segments >= 0)).astype(np.float32)
    targets = rng.integers(0, v, (b, length))
    return (jnp.asarray(h.reshape(b, length, d)), jnp.asarray(targets, jnp.int32),
            jnp.asarray(weights), jnp.asarray(segments, jnp.int32), jnp.asarray(w))


def test_segment_sums_match_the_scorers_head():
    args = packed(4)
    got = segment_stats(*args, top_k=50, max_segments=3, splits=3, **OPTS)
    want = _head_stats_local(*args, top_k=50, max_segments=3, chunk_tokens=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-5)
    assert float(want[..., 4].sum()) == float(args[2].sum())


def sharded(fn, n, specs, args):
    mesh = make_mesh(devices=jax.devices()[:n])
    return np.asarray(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                                            check_vma=False))(*args))


def test_one_device_equals_eight():
    assert len(jax.devices()) >= 8
    rows = P("data")
    # Per token: rows over 8 devices, each its own kernel; exact (dyadic logits, row-wise).
    h, w, y = data(5, t=64, dyadic=True)
    mask = np.random.default_rng(5).random(len(y)) < 0.7
    def per_token(h, y, m, w):
        return vocab_stats(h, w, y, m, top_k=50, splits=3, **OPTS).T

    tok = {n: sharded(per_token, n, (rows, rows, rows, P()), (h, y, mask, w)) for n in (1, 8)}
    np.testing.assert_array_equal(tok[1], tok[8])
    # Per segment, as the scorer shards its rows: sums in another order, so float rounding.
    local = functools.partial(segment_stats, top_k=50, max_segments=3, splits=3, **OPTS)
    args = packed(5)
    seg = {n: sharded(local, n, (rows,) * 4 + (P(),), args) for n in (1, 8)}
    np.testing.assert_allclose(seg[1], seg[8], rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=301), "top_k must be in"),
    (dict(head_shape=(300, 16)), r"head \[V, d\]"),
    (dict(mask_len=5), "targets and mask must be"),
    (dict(block_d=12), "block_d = 12 does not divide"),
])
def test_bad_input_is_a_user_error(bad, match):
    h, w, y = data(6, t=8)
    bad = dict(bad)
    if "head_shape" in bad:
        w = np.zeros(bad.pop("head_shape"), np.float32)
    mask = np.ones(bad.pop("mask_len", len(y)), bool)
    with pytest.raises(LarkError, match=match):
        vocab_stats(h, w, y, mask, **{"top_k": 5, **bad}, **OPTS)


def tie_pattern(name, v=300):
    """Logits [V] with a tie group wider than the running set's free room (see below)."""
    z = np.zeros(v)
    if name == "higher-last":  # 226 ones, then 10 twos that evict ones
        z[64:] = 1.0
        z[-10:] = 2.0
    elif name == "higher-first":  # 10 twos, then 226 ones that overflow the set
        z[64:] = 1.0
        z[64:74] = 2.0
    else:  # "partial-tile": a tile of 64 ones may take only the 4 places the zeros leave
        z[4:124] = 2.0
        z[124:] = 1.0
    return z


@pytest.mark.parametrize("pattern", ["higher-last", "higher-first", "partial-tile"])
@pytest.mark.parametrize("top_k, splits", [(50, 1), (50, 3), (128, 1), (128, 3)])
def test_a_tie_group_larger_than_the_running_set(top_k, splits, pattern):
    """Equal logits in groups larger than the kernel keeps per range (128): the set must keep
    the lowest indices of a group, and in index order, however insertions and evictions
    shuffle its slots. Targets: the last kept and the first dropped of the top K."""
    z = tie_pattern(pattern)
    v = len(z)
    order = sorted(range(v), key=lambda i: (-z[i], i))
    y = np.array([order[top_k - 1], order[top_k], order[0], order[-1], 0, v - 1])
    t = len(y)
    h = np.zeros((t, 8), np.float32)
    h[:, 0] = 1.0
    w = np.random.default_rng(7).normal(size=(v, 8)).astype(np.float32)
    w[:, 0] = z  # logits = column 0 of the head, exactly
    mask = np.ones(t, bool)
    want = oracle(np.repeat(z[None], t, 0), y, top_k)
    assert z[y[0]] == z[y[1]] and want[1, 0] != want[1, 1]  # tied: one in, one out
    check(vocab_stats(h, w, y, mask, top_k=top_k, splits=splits, **OPTS), want, mask)
