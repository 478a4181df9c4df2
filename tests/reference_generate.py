"""The decoding engine as it was before the per-step rewrite (commit 0d7af30), frozen.

A test oracle only: ``tests/test_decode_equivalence.py`` checks that the library's
engine gives these exact token ids (greedy, seeded sampling, penalty, stops). It is
the old ``models.generate`` and ``models.sampling`` verbatim, merged into one file:
16-step chunks, stops checked between chunks, the full-vocabulary draw.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lark_jax.errors import LarkError
from lark_jax.models.decoder import KVCache
from lark_jax.numerics import vocab_blocks
from lark_jax.parallel import data_sharding, replicated
from lark_jax.shapes import pow2_at_least, round_up

PROMPT_BUCKET = 64
CHUNK = 16


def apply_repetition_penalty(z, seen, penalty):
    """z [B, V] float; seen [B, V] bool (ids in prompt + generated); penalty > 0."""
    return jnp.where(seen, jnp.where(z > 0, z / penalty, z * penalty), z)


def _row_sum(x):
    """Σ over the last axis of non-negative terms in two levels (float32 stays accurate
    over 1.5e5 terms)."""
    return vocab_blocks(x, 0.0).sum(-1).sum(-1)


def _sortable(z):
    """float32 -> uint32 whose unsigned order is the float order (-0.0 and +0.0 equal)."""
    z = z.astype(jnp.float32)
    z = jnp.where(z == 0, jnp.float32(0), z)  # -0.0 == 0.0: one key for both zeros
    bits = lax.bitcast_convert_type(z, jnp.uint32)
    sign = bits >> 31
    return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


PREFILTER_K = 256


def top_p_keep(z, top_p):
    """The kept set of top-p over scaled logits z [B, V] (module docstring), bool [B, V].

    ``top_p`` is a scalar in (0, 1]; at 1 every token with non-zero probability stays.
    Fast path: when the ``PREFILTER_K`` most likely tokens of every row hold at least
    ``top_p`` of its mass, the nucleus lies among them, and ``lax.top_k`` (descending,
    ties by lower id: the stable sort's order) gives it directly. Otherwise (flat rows)
    the bisection below, also exact.
    """
    z = z.astype(jnp.float32)
    z = jnp.where(z == 0, jnp.float32(0), z)  # -0.0 and +0.0 are one value
    m = z.max(-1, keepdims=True)
    e = jnp.exp(z - m)
    total = _row_sum(e)[:, None]
    p = e / total
    k = min(PREFILTER_K, z.shape[-1])
    top_z, top_i = lax.top_k(z, k)
    top_p_mass = jnp.exp(top_z - m) / total
    before = jnp.cumsum(top_p_mass, -1) - top_p_mass
    fits = before[:, -1] + top_p_mass[:, -1] >= top_p  # [B]: the nucleus is in the top k
    rows = jnp.arange(z.shape[0])[:, None]
    from_top = jnp.zeros(z.shape, bool).at[rows, top_i].set(before < top_p)
    # Each row's path depends on that row alone (batch composition never changes a
    # sample); the bisection runs only when some row needs it, and never at top_p = 1.
    branch = jnp.where(top_p >= 1.0, 0, jnp.where(jnp.all(fits), 1, 2))
    return lax.switch(branch, [
        lambda: p > 0,
        lambda: from_top,
        lambda: jnp.where(fits[:, None], from_top, _bisect_keep(z, p, top_p)),
    ])


def _bisect_keep(z, p, top_p):
    """Exact kept set by bisection on the order-preserving keys (module docstring)."""
    key = _sortable(z)
    lo = key.min(-1)
    hi = key.max(-1)  # S(hi) = 0 < top_p

    def mass_above(k):
        return _row_sum(jnp.where(key > k[:, None], p, 0.0))

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p  # the answer is <= mid
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    lo, _ = lax.fori_loop(0, 32, step, (lo, hi))
    tau = lo[:, None]
    s_tau = mass_above(lo)[:, None]
    tied = key == tau
    p_tau = jnp.max(jnp.where(tied, p, 0.0), -1, keepdims=True)
    rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1
    return (key > tau) | (tied & (s_tau + rank.astype(jnp.float32) * p_tau < top_p))


def draw(z, keep, u):
    """Token ids [B]: inverse-CDF draw from softmax(z) restricted to ``keep``; u [B] in [0, 1)."""
    z = jnp.where(keep, z.astype(jnp.float32), -jnp.inf)
    e = jnp.exp(z - z.max(-1, keepdims=True))
    blk = vocab_blocks(e, 0.0)  # [B, nb, bs], two-level cumulative sums
    inner = jnp.cumsum(blk, -1)
    offsets = jnp.cumsum(inner[..., -1], -1) - inner[..., -1]
    cdf = (inner + offsets[..., None]).reshape(e.shape[0], -1)[:, :e.shape[1]]
    target = u * cdf[:, -1]
    # The first index whose CDF exceeds the target has non-zero mass, so it is kept.
    idx = jnp.argmax(cdf > target[:, None], axis=-1)
    return idx.astype(jnp.int32)


def choose(logits, keys, *, temperature, top_p, greedy: bool, penalty=None, seen=None):
    """Next tokens [B] from logits [B, V]; ``keys`` [B] are per-row PRNG keys.

    ``penalty``/``seen`` apply the repetition penalty first when given.
    """
    z = logits.astype(jnp.float32)
    if penalty is not None:
        z = apply_repetition_penalty(z, seen, penalty)
    if greedy:
        return jnp.argmax(z, axis=-1).astype(jnp.int32)
    z = z / temperature
    keep = top_p_keep(z, top_p)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return draw(z, keep, u)


def _keys(base, row_keys, steps):
    """Per-row PRNG keys for token ``steps[b]`` of sequence ``row_keys[b]``."""
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base, r), t))(
        row_keys, steps)


def _choose(model, hidden, seen, base, row_keys, steps, temperature, top_p, penalty, *,
            greedy, use_penalty):
    return choose(model.logits(hidden), _keys(base, row_keys, steps), temperature=temperature,
                  top_p=top_p, greedy=greedy, penalty=penalty if use_penalty else None,
                  seen=seen)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "use_penalty"),
                   donate_argnames=("state",))
def _admit(graphdef, params, state, slots, ids, lengths, row_keys, limits, base, temperature,
           top_p, penalty, *, greedy: bool, use_penalty: bool):
    """Prefill ``ids`` [n, P] (right-padded, ``lengths`` real tokens) into ``slots`` [n].

    Slot entries >= the number of slots are padding and are dropped. Returns the new
    state; each admitted row has its first token drawn and is live.
    """
    model = nnx.merge(graphdef, params)
    n, p_len = ids.shape
    cap = state["cache"].k.shape[3]
    valid = jnp.arange(cap)[None] < lengths[:, None]
    small = KVCache.empty(model.cfg, n, cap, model.dtype)._replace(valid=valid)
    positions = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (n, p_len))
    hidden, small = model.decode(ids, positions, small, 0)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    v = model.cfg.vocab_size
    seen = jnp.zeros((n, v), bool)
    if use_penalty:
        real = jnp.arange(p_len)[None] < lengths[:, None]
        seen = seen.at[jnp.arange(n)[:, None], ids].max(real)
    steps = jnp.zeros((n,), jnp.int32)
    tok = _choose(model, last, seen, base, row_keys, steps, temperature, top_p, penalty,
                  greedy=greedy, use_penalty=use_penalty)
    new = dict(state)
    new["cache"] = state["cache"].put_rows(slots, small)
    new["pos"] = state["pos"].at[slots].set(lengths, mode="drop")
    new["tok"] = state["tok"].at[slots].set(tok, mode="drop")
    new["steps"] = state["steps"].at[slots].set(0, mode="drop")
    new["row_keys"] = state["row_keys"].at[slots].set(row_keys, mode="drop")
    new["limit"] = state["limit"].at[slots].set(limits, mode="drop")
    new["live"] = state["live"].at[slots].set(True, mode="drop")
    if use_penalty:
        new["seen"] = state["seen"].at[slots].set(seen, mode="drop")
    return new


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "greedy", "use_penalty"),
                   donate_argnames=("state",))
def _decode(graphdef, params, state, live, base, temperature, top_p, penalty, eos_ids,
            pad_id, *, chunk: int, greedy: bool, use_penalty: bool):
    """``chunk`` steps for every slot. Emits each live row's pending token, ends rows at
    eos or at their token limit, feeds the others and draws their next token.

    Returns (state, tokens [S, chunk], emitted [S] (tokens emitted per row; eos
    included), live [S]).
    """
    model = nnx.merge(graphdef, params)
    s_rows = live.shape[0]
    rows = jnp.arange(s_rows)

    def body(i, carry):
        st, live, out, emitted = carry
        tok = st["tok"]
        out = out.at[:, i].set(jnp.where(live, tok, pad_id))
        emitted = emitted + live
        steps = st["steps"] + live
        stop = jnp.isin(tok, eos_ids) | (steps >= st["limit"])
        live = live & ~stop
        cache = st["cache"]
        pos = st["pos"]
        cache = cache._replace(valid=cache.valid.at[rows, pos].max(live, mode="drop"))
        hidden, cache = model.decode(tok[:, None], pos[:, None], cache, pos)
        seen = st["seen"]
        if use_penalty:
            seen = seen.at[rows, tok].max(live)
        nxt = _choose(model, hidden[:, 0], seen, base, st["row_keys"], steps, temperature,
                      top_p, penalty, greedy=greedy, use_penalty=use_penalty)
        st = dict(st, cache=cache, seen=seen, steps=steps,
                  pos=jnp.where(live, pos + 1, pos), tok=jnp.where(live, nxt, tok))
        return st, live, out, emitted

    out = jnp.full((s_rows, chunk), pad_id, jnp.int32)
    emitted = jnp.zeros((s_rows,), jnp.int32)
    state, live, out, emitted = jax.lax.fori_loop(0, chunk, body,
                                                  (state, live, out, emitted))
    return state, out, emitted, live


class _Engine:
    """The slot table of one ``generate_ids`` call (host side of continuous batching)."""

    def __init__(self, student, n_slots: int, cap: int, use_penalty: bool):
        self.graphdef, self.params = nnx.split(student.model)
        self.mesh = student.mesh
        cfg = student.config
        dt = student.model.dtype
        shard = data_sharding(self.mesh, 1)
        put = lambda x: jax.device_put(x, shard)  # noqa: E731
        cache = KVCache.empty(cfg, n_slots, cap, dt)
        kv = data_sharding(self.mesh, 5, axis=1)  # [L, slots, kv heads, cap, head]
        self.state = {
            "cache": KVCache(jax.device_put(cache.k, kv), jax.device_put(cache.v, kv),
                             jax.device_put(cache.valid, data_sharding(self.mesh, 2))),
            "pos": put(np.zeros(n_slots, np.int32)),
            "tok": put(np.zeros(n_slots, np.int32)),
            "steps": put(np.zeros(n_slots, np.int32)),
            "row_keys": put(np.zeros(n_slots, np.uint32)),
            "limit": put(np.zeros(n_slots, np.int32)),
            "live": put(np.zeros(n_slots, bool)),
            "seen": put(np.zeros((n_slots, cfg.vocab_size if use_penalty else 1), bool)),
        }


def generate_ids(student, prompt_ids: list[list[int]], max_new_tokens: int | Sequence[int] = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 32, progress=None, *, repetition_penalty: float = 1.0,
                 keys: Sequence[int] | None = None,
                 stop: Callable[[list[int]], int | None] | None = None,
                 on_result: Callable[[int, list[int]], None] | None = None,
                 chunk: int = CHUNK, stats: dict | None = None) -> list[list[int]]:
    """New tokens of each prompt, up to and excluding eos (or up to a ``stop`` cut).

    Args:
      max_new_tokens: a limit for every prompt, or one per prompt.
      batch_size: decoding slots (rounded to the data-parallel width).
      repetition_penalty: HF semantics over prompt + generated ids (1.0: off).
      keys: one non-negative integer per prompt naming its random stream (default: its
        index); equal keys and prompts give equal samples whatever the batching.
      stop: ``stop(tokens) -> n or None``, checked on the host after each chunk: n ends the
        sequence keeping its first n tokens (e.g. at a complete ``\\boxed{}``). It must be
        monotone: true of a sequence, true of every extension.
      on_result: called as ``on_result(i, tokens)`` when prompt i finishes (any order).
      chunk: decoding steps per jitted call between host stop checks.
      stats: if given, filled with ``slots``, ``decode_calls``, ``slot_steps`` (slots x
        steps computed) and ``tokens`` (tokens kept): their ratio is the slot utilisation.
    """
    n = len(prompt_ids)
    limits = ([int(max_new_tokens)] * n if isinstance(max_new_tokens, int | np.integer)
              else [int(x) for x in max_new_tokens])
    if len(limits) != n or any(x < 1 for x in limits):
        raise LarkError("max_new_tokens must be >= 1 (one number, or one per prompt)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LarkError("need temperature >= 0 and 0 < top_p <= 1")
    if not repetition_penalty > 0:
        raise LarkError(f"repetition penalty must be > 0, got {repetition_penalty}")
    if chunk < 1:
        raise LarkError("chunk must be >= 1")
    eos = student.eos_token_ids
    if not eos:
        raise LarkError("the model has no eos token (config.json or tokenizer)")
    if any(len(p) == 0 for p in prompt_ids):
        raise LarkError("empty prompt")
    keys = list(range(n)) if keys is None else [int(k) for k in keys]
    if len(keys) != n or any(not 0 <= k < 2 ** 32 for k in keys):
        raise LarkError("keys must be one integer in [0, 2^32) per prompt")
    if not n:
        return []
    pad_id = student.tokenizer.pad_token_id if student.tokenizer is not None else None
    pad_id = int(pad_id if pad_id is not None else eos[0])
    mesh = student.mesh
    n_data = mesh.shape["data"]
    slots = max(n_data, (min(batch_size, -(-n // n_data) * n_data) // n_data) * n_data)
    cap = round_up(max(len(p) for p in prompt_ids), PROMPT_BUCKET) + max(limits)
    use_penalty = repetition_penalty != 1.0
    greedy = temperature == 0
    eng = _Engine(student, slots, cap, use_penalty)
    rep = replicated(mesh)
    scalars = [jax.device_put(jnp.asarray(x, dt), rep) for x, dt in (
        (max(temperature, 1e-6), jnp.float32), (top_p, jnp.float32),
        (repetition_penalty, jnp.float32))]
    eos_arr = jax.device_put(jnp.asarray(eos, jnp.int32), rep)
    base = jax.random.key(seed)
    statics = dict(greedy=greedy, use_penalty=use_penalty)

    waiting = collections.deque(range(n))
    owner: list[int | None] = [None] * slots
    tokens: dict[int, list[int]] = {}
    live = np.zeros(slots, bool)
    results: list[list[int] | None] = [None] * n
    calls = 0

    def finish(s: int, toks: list[int]) -> None:
        i = owner[s]
        owner[s] = None
        live[s] = False
        results[i] = toks
        if on_result is not None:
            on_result(i, toks)
        if progress is not None:
            progress(1)

    while waiting or live.any():
        free = [s for s in range(slots) if owner[s] is None]
        if free and waiting:
            take = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
            m = pow2_at_least(len(take))  # power-of-two admissions: few shapes
            p_len = round_up(max(len(prompt_ids[i]) for i in take), PROMPT_BUCKET)
            ids = np.full((m, p_len), pad_id, np.int32)
            lengths = np.ones(m, np.int32)
            where = np.full(m, slots, np.int32)  # out of range: dropped
            rkeys = np.zeros(m, np.uint32)
            lim = np.ones(m, np.int32)
            for j, i in enumerate(take):
                ids[j, :len(prompt_ids[i])] = prompt_ids[i]
                lengths[j] = len(prompt_ids[i])
                where[j] = free[j]
                rkeys[j] = keys[i]
                lim[j] = limits[i]
                owner[free[j]] = i
                tokens[i] = []
                live[free[j]] = True
            eng.state = _admit(eng.graphdef, eng.params, eng.state, where, ids, lengths, rkeys,
                               lim, base, *scalars, **statics)
        eng.state, out, emitted, live_dev = _decode(
            eng.graphdef, eng.params, eng.state, jnp.asarray(live), base, *scalars, eos_arr,
            pad_id, chunk=chunk, **statics)
        out, emitted, live_dev = np.asarray(out), np.asarray(emitted), np.asarray(live_dev)
        calls += 1
        for s in range(slots):
            if owner[s] is None:
                continue
            i = owner[s]
            new_toks = out[s, :emitted[s]].tolist()
            # An eos ends the sequence and is not part of it.
            cut = next((j for j, t in enumerate(new_toks) if t in eos), None)
            toks = tokens[i]
            toks.extend(new_toks[:cut])
            if stop is not None:
                at = stop(toks)
                if at is not None:
                    finish(s, toks[:at])
                    continue
            if cut is not None or not live_dev[s] or len(toks) >= limits[i]:
                finish(s, toks[:limits[i]])
    if stats is not None:
        stats.update(slots=slots, decode_calls=calls, slot_steps=calls * chunk * slots,
                     tokens=sum(len(r) for r in results))
    return results

