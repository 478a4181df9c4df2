"""Batched, KV-cached, jitted sampling from a student.

Prompts are left-padded to a bucketed length P (a multiple of 64, so a run
compiles a few programs, not one per prompt); the cache holds P + max_new
slots. Prefill writes all prompt keys at once, then one token per step under
``lax.while_loop``, which exits early once every row has produced an eos.
Temperature 0 is greedy (argmax); otherwise tokens are drawn from
softmax(z / T) restricted to the smallest top-p nucleus.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lark_jax.errors import LarkError
from lark_jax.models.decoder import KVCache
from lark_jax.parallel import data_sharding, replicated

PROMPT_BUCKET = 64


def _sample(logits, key, temperature, top_p, greedy: bool):
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    order = jnp.argsort(-z, axis=-1)
    z_sorted = jnp.take_along_axis(z, order, axis=-1)
    p_sorted = jax.nn.softmax(z_sorted, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the first always stays).
    keep = (jnp.cumsum(p_sorted, axis=-1) - p_sorted) < top_p
    z_sorted = jnp.where(keep, z_sorted, -jnp.inf)
    choice = jax.random.categorical(key, z_sorted, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy"))
def _generate_jit(graphdef, state, ids, mask, key, temperature, top_p, eos_ids, pad_id, *,
                  max_new: int, greedy: bool):
    model = nnx.merge(graphdef, state)
    b, p_len = ids.shape
    s_len = p_len + max_new
    cache = KVCache.empty(model.cfg, b, s_len, model.dtype)
    valid = jnp.zeros((b, s_len), bool).at[:, :p_len].set(mask)
    cache = cache._replace(valid=valid)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    lengths = mask.sum(axis=1).astype(jnp.int32)
    hidden, cache = model.hidden_states(ids, positions, cache=cache, cache_index=0)
    key, sub = jax.random.split(key)
    token = _sample(model.logits(hidden[:, -1]), sub, temperature, top_p, greedy)
    out = jnp.full((b, max_new), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, out, cache, token, done, key = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | jnp.isin(token, eos_ids)
        slot = p_len + i
        cache = cache._replace(valid=cache.valid.at[:, slot].set(True))
        hidden, cache = model.hidden_states(
            token[:, None], (lengths + i)[:, None], cache=cache, cache_index=slot)
        key, sub = jax.random.split(key)
        token = _sample(model.logits(hidden[:, 0]), sub, temperature, top_p, greedy)
        return i + 1, out, cache, token, done, key

    _, out, *_ = lax.while_loop(cond, body, (jnp.int32(0), out, cache, token, done, key))
    return out


def generate_ids(student, prompt_ids: list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 32, progress=None) -> list[list[int]]:
    """Token-level generation: returns the new tokens of each prompt, up to and excluding eos."""
    if max_new_tokens < 1:
        raise LarkError("max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LarkError("need temperature >= 0 and 0 < top_p <= 1")
    eos = student.eos_token_ids
    if not eos:
        raise LarkError("the model has no eos token (config.json or tokenizer)")
    pad_id = student.tokenizer.pad_token_id if student.tokenizer is not None else None
    pad_id = int(pad_id if pad_id is not None else eos[0])
    graphdef, state = nnx.split(student.model)
    mesh = student.mesh
    n_data = mesh.shape["data"]
    batch_size = max(n_data, (batch_size // n_data) * n_data)
    eos_arr = jnp.asarray(eos, jnp.int32)
    key = jax.random.key(seed)
    results: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        if any(len(p) == 0 for p in chunk):
            raise LarkError("empty prompt")
        p_len = -(-max(len(p) for p in chunk) // PROMPT_BUCKET) * PROMPT_BUCKET
        rows = -(-len(chunk) // n_data) * n_data
        ids = np.full((rows, p_len), pad_id, np.int32)
        mask = np.zeros((rows, p_len), bool)
        for r, p in enumerate(chunk):
            ids[r, p_len - len(p):] = p
            mask[r, p_len - len(p):] = True
        mask[len(chunk):, -1] = True  # filler rows: one valid token keeps them well defined
        ids = jax.device_put(ids, data_sharding(mesh, 2))
        mask = jax.device_put(mask, data_sharding(mesh, 2))
        # One key per chunk, derived from the seed: reproducible whatever the batch split.
        out = _generate_jit(graphdef, state, ids, mask, jax.random.fold_in(key, start),
                            jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                            jax.device_put(eos_arr, replicated(mesh)), pad_id,
                            max_new=max_new_tokens, greedy=temperature == 0)
        out = np.asarray(out)
        for r in range(len(chunk)):
            row = out[r].tolist()
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            results.append(row[:cut])
        if progress is not None:
            progress(len(chunk))
    return results


def generate(student, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, *, batch_size: int = 32,
             progress=None) -> list[str]:
    """Complete already-formatted prompt strings; returns the decoded continuations.

    Temperature 0 is greedy decoding; generation stops at the tokenizer's eos
    (or config.json's eos ids) or after ``max_new_tokens``.
    """
    if isinstance(prompts, str):
        raise LarkError("prompts must be a list of strings, not one string")
    tok = student.tokenizer
    if tok is None:
        raise LarkError("generation needs a tokenizer (load_student(..., tokenizer=True))")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = generate_ids(student, ids, max_new_tokens, temperature, top_p, seed,
                        batch_size=batch_size, progress=progress)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]
