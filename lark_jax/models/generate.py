"""Batched, KV-cached, jitted generation with continuous batching.

A fixed number of *slots* decode together. Each slot holds one sequence in its
own row of the KV cache (capacity: the longest prompt's bucket + max_new), at
its own length: keys and values are written at per-row indices, and attention
covers the row's valid slots at or before its position. Decoding runs in jitted
calls of up to ``chunk`` steps. A call returns early, after the step at which
something needs the host: a row ended on the device (eos or its token limit)
while prompts are waiting for a slot, or a row emitted a token that may complete
a host-side ``stop`` (``stop.triggers``, e.g. a token holding ``}`` for a
complete ``\\boxed{...}``; every token for a plain callable). The host then
collects the new tokens, ends the rows that stopped, and prefills waiting prompts
into the freed slots, so a slot is refilled at the step its row ends.

Randomness is per sequence: the draw for token t of the sequence with key r is
made from ``fold_in(fold_in(key(seed), r), t)`` (the inner fold once, at
admission), so a sequence's tokens do not
depend on the batch size, on which slot it lands in, or on what else is in the
batch (``keys`` default to the prompt's index).

Next-token choice: ``lark_jax.models.sampling`` (repetition penalty from a running
per-row presence mask [S, V] updated with each fed token, exact top-p on the top
candidates with an exact full-vocabulary fallback, greedy at temperature 0).

Token ids in, token ids out: text prompts, decoding and text stops are
``evaluation.completions.generate`` (a layer above), which passes its stop rule down as
the ``stop`` callable.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lark_jax.errors import LarkError
from lark_jax.models.decoder import KVCache
from lark_jax.models.sampling import choose
from lark_jax.parallel import data_sharding, replicated
from lark_jax.shapes import pow2_at_least, round_up

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this: a few compiled shapes
CHUNK = 16  # most decoding steps per jitted call (it returns earlier when the host is needed)


def _row_keys(base, keys):
    """key_data of ``fold_in(base, r)`` for each sequence key r [n]: each row's stream."""
    return jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(base, r)))(keys)


def _choose(model, hidden, seen, row_keys, steps, temperature, top_p, penalty, *,
            greedy, use_penalty):
    keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.wrap_key_data(k), t))(
        row_keys, steps)
    return choose(model.logits(hidden), keys, temperature=temperature,
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
    row_keys = _row_keys(base, row_keys)
    tok = _choose(model, last, seen, row_keys, steps, temperature, top_p, penalty,
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
def _decode(graphdef, params, state, live, waiting, triggers, temperature, top_p, penalty,
            eos_ids, pad_id, *, chunk: int, greedy: bool, use_penalty: bool):
    """Up to ``chunk`` steps for every slot. A step emits each live row's pending token,
    ends rows at eos or at their token limit, feeds the others and draws their next token.

    The loop stops after the first step at which a row ended while ``waiting`` (prompts
    wait for a slot), or a live row emitted a token of ``triggers`` [V] (bool: the host
    must check its stop), or when no row is live.

    Returns (state, tokens [S, chunk], emitted [S] (tokens emitted per row; eos
    included), live [S], steps run).
    """
    model = nnx.merge(graphdef, params)
    s_rows = live.shape[0]
    rows = jnp.arange(s_rows)

    def body(carry):
        st, live, out, emitted, i, _ = carry
        tok = st["tok"]
        out = out.at[:, i].set(jnp.where(live, tok, pad_id))
        emitted = emitted + live
        steps = st["steps"] + live
        stop = jnp.isin(tok, eos_ids) | (steps >= st["limit"])
        host = jnp.any(live & (triggers[tok] | (stop & waiting)))
        live = live & ~stop
        cache = st["cache"]
        pos = st["pos"]
        cache = cache._replace(valid=cache.valid.at[rows, pos].max(live, mode="drop"))
        hidden, cache = model.decode(tok[:, None], pos[:, None], cache, pos)
        seen = st["seen"]
        if use_penalty:
            seen = seen.at[rows, tok].max(live)
        nxt = _choose(model, hidden[:, 0], seen, st["row_keys"], steps, temperature,
                      top_p, penalty, greedy=greedy, use_penalty=use_penalty)
        st = dict(st, cache=cache, seen=seen, steps=steps,
                  pos=jnp.where(live, pos + 1, pos), tok=jnp.where(live, nxt, tok))
        return st, live, out, emitted, i + 1, host

    def cond(carry):
        _, live, *_, i, host = carry
        return (i < chunk) & ~host & jnp.any(live)

    out = jnp.full((s_rows, chunk), pad_id, jnp.int32)
    emitted = jnp.zeros((s_rows,), jnp.int32)
    state, live, out, emitted, steps, _ = jax.lax.while_loop(
        cond, body, (state, live, out, emitted, jnp.int32(0), jnp.bool_(False)))
    return state, out, emitted, live, steps


class _Engine:
    """The slot table of one ``generate_ids`` call (host side of continuous batching)."""

    def __init__(self, student, n_slots: int, cap: int, use_penalty: bool):
        self.graphdef, self.params = nnx.split(student.model)
        self.mesh = student.mesh
        cfg = student.config
        dt = student.model.dtype
        put = lambda x: jax.device_put(x, data_sharding(self.mesh, x.ndim))  # noqa: E731
        cache = KVCache.empty(cfg, n_slots, cap, dt)
        kv = data_sharding(self.mesh, 5, axis=1)  # [L, slots, kv heads, cap, head]
        self.state = {
            "cache": KVCache(jax.device_put(cache.k, kv), jax.device_put(cache.v, kv),
                             jax.device_put(cache.valid, data_sharding(self.mesh, 2))),
            "pos": put(np.zeros(n_slots, np.int32)),
            "tok": put(np.zeros(n_slots, np.int32)),
            "steps": put(np.zeros(n_slots, np.int32)),
            "row_keys": put(np.zeros((n_slots, *jax.random.key_data(
                jax.random.key(0)).shape), np.uint32)),
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
      stop: ``stop(tokens) -> n or None``, checked on the host: n ends the sequence keeping
        its first n tokens (e.g. at a complete ``\\boxed{}``). It must be monotone: true of
        a sequence, true of every extension. A plain callable is checked after every step.
        ``stop.triggers(V)`` (optional) names the token ids [V] after which a stop can have
        become true: decoding returns to the host only after one of them (and when a row
        ends). ``stop.scanner()`` (optional) gives a per-sequence object whose
        ``maybe(tokens)`` is a cheap incremental test run before the exact ``stop``.
      on_result: called as ``on_result(i, tokens)`` when prompt i finishes (any order).
      chunk: the most decoding steps per jitted call (fewer when the host is needed).
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

    v = student.config.vocab_size
    # Which emitted tokens send the loop back to the host: a stop's own triggers, or
    # every token for a plain callable; none without a stop.
    trig = np.zeros(v, bool)
    if stop is not None:
        trig = (np.asarray(stop.triggers(v), bool) if hasattr(stop, "triggers")
                else np.ones(v, bool))
        if trig.shape != (v,):
            raise LarkError(f"stop.triggers must give {v} flags, got {trig.shape}")
    trig_dev = jax.device_put(jnp.asarray(trig), rep)
    scanner = getattr(stop, "scanner", None)

    waiting = collections.deque(range(n))
    owner: list[int | None] = [None] * slots
    tokens: dict[int, list[int]] = {}
    scans: dict[int, object] = {}
    live = np.zeros(slots, bool)
    results: list[list[int] | None] = [None] * n
    calls = slot_steps = 0

    def finish(s: int, toks: list[int]) -> None:
        i = owner[s]
        owner[s] = None
        live[s] = False
        results[i] = toks
        tokens.pop(i)
        scans.pop(i, None)
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
                if scanner is not None:
                    scans[i] = scanner()
                live[free[j]] = True
            eng.state = _admit(eng.graphdef, eng.params, eng.state, where, ids, lengths, rkeys,
                               lim, base, *scalars, **statics)
        eng.state, out, emitted, live_dev, ran = _decode(
            eng.graphdef, eng.params, eng.state, jnp.asarray(live), bool(waiting), trig_dev,
            *scalars, eos_arr, pad_id, chunk=chunk, **statics)
        out, emitted, live_dev = np.asarray(out), np.asarray(emitted), np.asarray(live_dev)
        calls += 1
        slot_steps += int(ran) * slots
        for s in range(slots):
            if owner[s] is None or not emitted[s]:
                continue
            i = owner[s]
            new_toks = out[s, :emitted[s]].tolist()
            # An eos ends the sequence and is not part of it.
            cut = next((j for j, t in enumerate(new_toks) if t in eos), None)
            toks = tokens[i]
            toks.extend(new_toks[:cut])
            ended = cut is not None or not live_dev[s] or len(toks) >= limits[i]
            if stop is not None:
                # The exact check (stop(toks): the fewest tokens holding a stop) runs when
                # the row ends, and after a trigger token when the stop's cheap incremental
                # scan (if it has one) says a stop may be complete. Monotone stops make the
                # cut the same whenever it is found.
                check = ended or (any(trig[t] for t in new_toks[:cut]) and (
                    i not in scans or scans[i].maybe(toks)))
                at = stop(toks) if check else None
                if at is not None:
                    finish(s, toks[:at])
                    continue
            if ended:
                finish(s, toks[:limits[i]])
    if stats is not None:
        stats.update(slots=slots, decode_calls=calls, slot_steps=slot_steps,
                     tokens=sum(len(r) for r in results))
    return results

