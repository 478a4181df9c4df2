"""Held-out metrics on fixed texts: how well a student predicts given solutions.

``ref_loss`` is the mean cross-entropy per assistant token of the benchmark's reference
solutions; ``step_acc`` the share of their intermediate results that the student predicts
exactly (every token the argmax, teacher-forced). Both use the scorer's own per-token
statistics (``learnability.kernel.token_stats``), so the CE here is the CE of the scores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import numpy as np

from lark_jax.errors import LarkError
from lark_jax.shapes import octave_bucket


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_stats(graphdef, state, ids):
    """Per position t >= 1: CE of token t given tokens < t, and whether it is the argmax
    (rank 1: no logit above it)."""
    from flax import nnx

    from lark_jax.learnability.kernel import token_stats

    z = nnx.merge(graphdef, state)(ids)[:, :-1]
    ce, _, _, rank = token_stats(z, ids[:, 1:], top_k=1)
    return ce, rank == 1.0


@dataclasses.dataclass
class HeldOut:
    """Fixed chat records whose assistant tokens we evaluate, with marked answer spans."""

    ids: list[np.ndarray]
    start: list[int]  # first assistant token
    marks: list[list[list[int]]]  # per record, per marked number: its token indices


def prepare_heldout(tokenizer, records: list[dict], mark=r"= (\d+)") -> HeldOut:
    """Tokenize records as the scorer and trainer do; mark the tokens of every number that
    ``mark`` (group 1) finds in the assistant text."""
    from lark_jax.data.chat import tokenize_record

    ids, starts, marks = [], [], []
    for r in records:
        msgs = r["messages"]
        tok = tokenize_record(tokenizer, msgs, 1 << 20)
        prompt = tokenizer.apply_chat_template([m for m in msgs if m["role"] != "assistant"],
                                               tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != tok.ids.tolist():
            raise LarkError("tokenizer offsets disagree with the chat tokenization")
        offsets = enc["offset_mapping"]
        content = msgs[-1]["content"]
        base = len(prompt)
        rec_marks = []
        for m in re.finditer(mark, content):
            a, b = base + m.start(1), base + m.end(1)
            toks = [j for j, (s, e) in enumerate(offsets) if s < b and e > a and j >= tok.start]
            if toks:
                rec_marks.append(toks)
        ids.append(tok.ids)
        starts.append(tok.start)
        marks.append(rec_marks)
    return HeldOut(ids, starts, marks)


def heldout_metrics(student, held: HeldOut, batch: int = 32) -> dict:
    """``loss``: Σ CE / Σ tokens over the assistant tokens; ``marked_acc``: share of marked
    numbers whose every token is the student's argmax (teacher-forced); ``per_record``: mean
    CE of each record."""
    from flax import nnx

    graphdef, state = nnx.split(student.model)
    pad = student.tokenizer.pad_token_id or 0
    num = den = 0.0
    hit = total = 0
    per_record = [math.nan] * len(held.ids)
    # Records in length order, each batch padded to its longest at 8 lengths per octave:
    # batches of similar lengths (in file order, padding to a power of two computed ~1.8x
    # the tokens). The sums do not depend on the order.
    order = sorted(range(len(held.ids)), key=lambda r: len(held.ids[r]))
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        length = octave_bucket(max(len(held.ids[r]) for r in chunk), 16)
        arr = np.full((batch, length), pad, np.int32)
        for i, r in enumerate(chunk):
            arr[i, :len(held.ids[r])] = held.ids[r]
        ce, ok = jax.device_get(_token_stats(graphdef, state, arr))
        for i, r in enumerate(chunk):
            js = np.arange(max(held.start[r], 1), len(held.ids[r]))  # predicted tokens
            c = ce[i, js - 1].astype(np.float64)
            num += c.sum()
            den += len(js)
            if len(js):
                per_record[r] = float(c.mean())
            for toks in held.marks[r]:
                total += 1
                hit += bool(all(ok[i, j - 1] for j in toks))
    return {"loss": num / den if den else math.nan,
            "marked_acc": hit / total if total else math.nan, "per_record": per_record}
