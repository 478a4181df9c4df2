"""Selection JSONL → tokenized, weighted examples → deterministic packed steps.

Each step takes the next ``batch_size`` records of the epoch's seeded
permutation (the reference's global batch counts trajectories; with
``max_steps`` the permutation is redrawn each epoch and the run cycles through
the data until exactly ``max_steps`` steps are done, as HF Trainer does), packs them
into rows of ``max_length`` tokens with segment ids (positions restart, no
attention across records), and splits the rows into fixed-shape micro-batches
for gradient accumulation. Step k of a run is a pure function of (seed, k),
which is what makes resuming exact.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from lark_jax.data.chat import Tokenized, tokenize_record
from lark_jax.data.packing import best_fit_rows, build_batch
from lark_jax.data.pool import ROLES, iter_jsonl
from lark_jax.errors import LarkError
from lark_jax.shapes import padded_rows
from lark_jax.training.objective import OBJECTIVES, step_normaliser, token_coefficient


@dataclasses.dataclass(frozen=True)
class Example:
    tok: Tokenized
    weight: float
    line: int


SYSTEM_TURNS = ("keep", "empty")


def selection_rows(path: str | Path):
    """(where, line or row number, {"messages", "meta": {"train_weight"}}) of a selection:
    JSONL, or parquet (``select --out X.parquet``: a ``messages`` column and the meta
    fields as columns)."""
    if Path(path).suffix.lower() != ".parquet":
        yield from iter_jsonl(path, "training data")
        return
    from lark_jax.data.sources import iter_rows, resolve

    if not Path(path).is_file():
        raise LarkError("training data not found", where=str(path))
    for i, (where, row) in enumerate(iter_rows(resolve(path)), start=1):
        w = row.get("train_weight")
        yield where, i, {"messages": row.get("messages"),
                         "meta": {} if w is None else {"train_weight": w}}


def read_selection(path: str | Path, tokenizer, max_length: int,
                   objective: str = "record", system_turn: str = "keep"
                   ) -> tuple[list[Example], int]:
    """Validate and tokenize a selection file (JSONL or parquet, ``selection_rows``);
    returns (examples, n_skipped_empty_span).

    Records with train_weight 0 contribute nothing to any objective; they are
    dropped, except under ``objective="reference"``, where they keep their slot
    in the steps and in each step's record count (the published runs do that).
    ``system_turn="empty"`` replaces each record's system messages by one empty
    system turn (the reference's SFT data rebuilds its messages so; with Qwen's
    template an absent system turn would insert the default system prompt instead).
    """
    if objective not in OBJECTIVES:
        raise LarkError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    if system_turn not in SYSTEM_TURNS:
        raise LarkError(f"unknown system turn rule {system_turn!r} (choose from "
                        f"{', '.join(SYSTEM_TURNS)})")
    examples, skipped, n_positive, n_zero = [], 0, 0, 0
    for where, lineno, obj in selection_rows(path):
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise LarkError("missing or empty 'messages' list", where=where)
        for i, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)):
                raise LarkError(f"messages[{i}] must be {{role: system|user|assistant, "
                                "content: str}", where=where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise LarkError("no assistant message to train on", where=where)
        meta = obj.get("meta") or {}
        w = meta.get("train_weight", 1.0) if isinstance(meta, dict) else 1.0
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) \
                or w < 0:
            raise LarkError(f"meta.train_weight must be a finite number >= 0, got {w!r}",
                            where=where)
        if system_turn == "empty":
            msgs = [{"role": "system", "content": ""}] + [m for m in msgs
                                                          if m["role"] != "system"]
        tok = tokenize_record(tokenizer, msgs, max_length, where=where)
        if tok.n_targets == 0:
            skipped += 1
            continue
        n_positive += w > 0
        n_zero += w == 0
        if w > 0 or objective == "reference":
            examples.append(Example(tok, float(w), lineno))
    if not n_positive:
        if n_zero:
            raise LarkError(f"every meta.train_weight is 0 ({n_zero} record(s)): nothing to "
                            "train on", where=str(path))
        raise LarkError("no trainable records (empty file, or all assistant spans truncated "
                        "away)", where=str(path))
    return examples, skipped


@dataclasses.dataclass(frozen=True)
class StepPlan:
    n_examples: int
    batch_size: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        """``max_steps`` when given (overrides ``epochs``), else steps_per_epoch × epochs."""
        return self.max_steps if self.max_steps else self.steps_per_epoch * self.epochs

    def step_indices(self, step: int) -> np.ndarray:
        """Example indices of global step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
        return perm[k * self.batch_size:(k + 1) * self.batch_size]


def step_denominator(examples: list[Example], idx, objective: str = "record") -> float:
    """The normaliser D of the step made of ``examples[idx]`` (training.objective)."""
    return step_normaliser([examples[i].weight for i in idx],
                           [examples[i].tok.n_targets for i in idx], objective)


def split_by_tokens(lengths: list[int], n: int) -> list[list[int]]:
    """Positions of ``lengths`` dealt to ``n`` processes, longest first to the least loaded.

    Deterministic (ties go to the lower position and process), so every process
    computes every process's share without talking to the others.
    """
    shares: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        q = min(range(n), key=lambda q: (load[q], q))
        shares[q].append(j)
        load[q] += lengths[j]
    return [sorted(s) for s in shares]


def step_microbatches(examples: list[Example], idx: np.ndarray, row_len: int, rows: int,
                      max_segments: int | None = None, row_multiple: int | None = None,
                      objective: str = "record", process: int = 0, n_processes: int = 1,
                      exact_rows: bool = False):
    """Pack one step's examples; yields dicts of [rows', row_len] arrays.

    ``weights`` holds the objective's per-token coefficient c_t (training.objective);
    records whose coefficient is 0 are not packed at all.

    Micro-batches have ``rows`` rows. With ``row_multiple`` (the data-parallel
    width) the last one shrinks to the next power of two times ``row_multiple``
    at or above the rows it holds, capped at ``rows``: a small step then computes
    a few padding rows, not a whole micro-batch of them, at the cost of at most
    log2(rows) extra compiled shapes. With ``exact_rows`` every micro-batch has
    just the rows it fills (at most ``rows``; for callers that compile once per
    row count anyway, or pad themselves). ``max_segments=1`` gives one record per
    row (no packing).

    With ``n_processes`` > 1, ``rows`` and ``row_multiple`` are global: the step's
    records are dealt to the processes by tokens (:func:`split_by_tokens`), each
    packs its own share into rows / n_processes rows per micro-batch, and this
    call yields process ``process``'s part. Every process yields the same number
    of micro-batches with the same shapes (a process that runs out of records
    contributes padding rows), because each computes every share's packing from
    the token counts alone; the global batch is the processes' parts stacked.
    """
    coef = [token_coefficient(examples[i].weight, examples[i].tok.n_targets, objective)
             for i in idx]
    idx = [i for i, c in zip(idx, coef, strict=True) if c > 0]
    coef = [c for c in coef if c > 0]
    toks = [examples[i].tok for i in idx]
    lengths = [len(t.ids) for t in toks]
    if rows % n_processes or (row_multiple and row_multiple % n_processes):
        raise LarkError(f"{rows} rows per micro-batch do not split over {n_processes} processes")
    shares = split_by_tokens(lengths, n_processes) if n_processes > 1 else [list(range(len(toks)))]
    packed = [[[share[j] for j in row] for row in best_fit_rows(
        [lengths[j] for j in share], row_len, max_segments=max_segments or row_len)]
        for share in shares]
    rows_p = rows // n_processes
    multiple = row_multiple // n_processes if row_multiple else None
    n_micro = max(-(-len(p) // rows_p) for p in packed)
    for s in range(0, n_micro * rows_p, rows_p):
        chunk = packed[process][s:s + rows_p]
        n_rows = rows_p
        filled = max(len(p[s:s + rows_p]) for p in packed)
        if exact_rows:
            n_rows = max(filled, 1)
        elif multiple:
            n_rows = padded_rows(filled, multiple, rows_p)
        b = build_batch(toks, chunk, n_rows, row_len)
        w = b.weights.copy()
        for r, seg, i in b.slots:  # broadcast the record's coefficient over its scored tokens
            w[r][b.segments[r] == seg] *= coef[i]
        yield {"ids": b.ids, "positions": b.positions, "segments": b.segments,
               "targets": b.targets, "weights": w}
