"""The scoring run: pool → packed batches → sharded kernel → sidecar → scores JSON.

Rows computed so far are appended to ``OUT.partial.jsonl`` (flushed and
fsynced after every batch). ``resume=True`` skips every record already in
the sidecar, so a crash or preemption loses at most the two batches in flight;
the final JSON is written to a temporary file and renamed into place.

The host rarely makes the device wait: a thread reads, tokenizes and packs
``prefetch`` batches ahead (``lark_jax.data.prefetch``), and each batch is
dispatched before the previous one's results are fetched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lark_jax import fsio
from lark_jax.data.chat import Tokenized, tokenize_record
from lark_jax.data.filters import FilterCounts
from lark_jax.data.packing import PackedBatch, best_fit_rows, build_batch
from lark_jax.data.pool import Record
from lark_jax.data.prefetch import prefetch
from lark_jax.data.reader import PoolOptions, iter_pool
from lark_jax.data.sources import HUB_PREFIX
from lark_jax.distributed import barrier, check_same_settings
from lark_jax.errors import LarkError
from lark_jax.learnability.kernel import STATS, score_batch
from lark_jax.learnability.scores import build_scores
from lark_jax.parallel import data_sharding
from lark_jax.runs import check_resume
from lark_jax.shapes import octave_bucket, padded_rows

SIDECAR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    top_k: int = 50
    brier: str = "topk"  # "topk" (the reference) | "full" (exact)
    max_length: int = 32768
    batch_tokens: int = 16384  # tokens per device batch (rows x row_length, summed over devices)
    row_length: int = 2048  # packed row length; longer trajectories get their own rows
    max_segments: int = 32  # trajectories per packed row
    chunk_tokens: int = 1024  # positions whose float32 logits exist at once
    window_tokens: int = 1 << 20  # records tokenized and packed together
    estimator: str = "proxy"  # "proxy" (Brier/L, the paper) | "gradient" (‖∇θ L‖²/L, exact)
    prefetch: int = 4  # packed batches a host thread prepares ahead (0: all work inline)
    # None: exact (float32 logits, skip only empty spans). "reference": the published
    # scorer's conventions: skip spans of <= 1 token; with a bfloat16 student, round the
    # logits to bfloat16 before the float32 statistics (a bf16 forward + .float()).
    compat: str | None = None
    max_tokens: int | None = None  # drop trajectories longer than this (a filter, counted)
    # "xla": the head and statistics in chunks of chunk_tokens (the default); "pallas": the
    # fused Pallas kernel (learnability.pallas_vocab), no [chunk, V] logits in memory
    vocab_kernel: str = "xla"

    def validate(self) -> None:
        if self.brier not in ("topk", "full"):
            raise LarkError(f"--brier must be topk or full, got {self.brier!r}")
        if self.top_k < 1:
            raise LarkError("--top-k must be >= 1")
        if self.max_length < 2:
            raise LarkError("--max-length must be >= 2")
        if self.estimator not in ("proxy", "gradient"):
            raise LarkError(f"--estimator must be proxy or gradient, got {self.estimator!r}")
        if self.row_length < 16 or self.row_length & (self.row_length - 1):
            raise LarkError("--row-length must be a power of two >= 16")
        if self.prefetch < 0:
            raise LarkError("--prefetch must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LarkError("--max-tokens must be >= 1")
        if self.vocab_kernel not in ("xla", "pallas"):
            raise LarkError(f"--vocab-kernel must be xla or pallas, got {self.vocab_kernel!r}")
        if self.compat not in (None, "reference"):
            raise LarkError(f"--compat must be 'reference' (or absent), got {self.compat!r}")

    def skips(self, t: Tokenized) -> bool:
        """Whether a record is skipped: an empty assistant span after truncation, or
        under ``compat="reference"`` a span of at most one token (the reference's rule)."""
        if self.compat == "reference":
            return t.end - t.start <= 1 or t.n_targets == 0
        return t.n_targets == 0


class Sidecar:
    """Append-only JSONL of finished rows; the first line records the run's settings."""

    def __init__(self, path: Path, header: dict, resume: bool, keep_rows: bool = True):
        """``keep_rows=False`` (a parquet output, built from the file at the end): rows are
        counted and their keys kept, not the rows themselves."""
        self.path = path = fsio.refuse_link(path)
        self.keep_rows = keep_rows
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.n_rows = self.n_skipped = 0
        self.keys: set[tuple[int, int]] = set()
        self.created = not path.exists()
        if path.exists() and not resume:
            raise LarkError("a partial run exists here; pass --resume to continue it or delete "
                            "the file", where=str(path))
        if path.exists():
            self._load(header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fsio.atomic_write(path, json.dumps(header) + "\n")
        self._f = fsio.open_append(path)  # closed in close()

    def _load(self, header: dict) -> None:
        good = fsio.complete_lines(self.path).split(b"\n")[:-1]  # cuts a torn last line
        try:
            got = json.loads(good[0]) if good else None
        except json.JSONDecodeError:
            got = None
        if not isinstance(got, dict) or "lark_jax_sidecar" not in got:
            raise LarkError("not a lark-jax partial run (unreadable header); delete it",
                            where=str(self.path))
        # brier only chooses which column becomes rho when the JSON is built
        check_resume(got, header, may_change={"brier"}, where=str(self.path),
                     message="the partial run was made with other settings ({diffs}); delete "
                             "it or rerun with the same options")
        for ln in good[1:]:
            row = json.loads(ln)
            self._keep(row)
            if not self.keep_rows:  # what --resume skips (new rows need no key)
                self.keys.add((row["problem_id"], row["candidate_id"]))

    def _keep(self, row: dict) -> None:
        skipped = bool(row.get("skipped"))
        self.n_skipped += skipped
        self.n_rows += not skipped
        if self.keep_rows:
            (self.skipped if skipped else self.rows).append(row)

    def done_keys(self) -> set[tuple[int, int]]:
        if not self.keep_rows:
            return set(self.keys)
        return {(r["problem_id"], r["candidate_id"]) for r in self.rows + self.skipped}

    def append(self, rows: list[dict]) -> None:
        for r in rows:
            self._keep(r)
            self._f.write(json.dumps(r) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self, remove: bool = False) -> None:
        self._f.close()
        if remove:
            self.path.unlink(missing_ok=True)


@dataclasses.dataclass
class ScoreSummary:
    n_problems: int
    n_scored: int
    n_skipped: int
    n_resumed: int
    tokens: int  # assistant tokens scored in this invocation
    padded_tokens: int  # row slots computed (incl. padding and prompts) in this invocation
    seconds: float
    out: str


def _batches(items: list[Tokenized], cfg: ScoreConfig, n_data: int):
    """Group a window of tokenized items into fixed-shape packed batches."""
    short = [i for i, t in enumerate(items) if len(t.ids) <= cfg.row_length]
    long_ = [i for i, t in enumerate(items) if len(t.ids) > cfg.row_length]
    rows_per_batch = max(n_data, (cfg.batch_tokens // cfg.row_length) // n_data * n_data)
    # The gradient estimator needs one trajectory per row (one gradient per row).
    max_seg = 1 if cfg.estimator == "gradient" else cfg.max_segments
    rows = best_fit_rows([len(items[i].ids) for i in short], cfg.row_length, max_seg)
    rows = [[short[j] for j in row] for row in rows]
    for s in range(0, len(rows), rows_per_batch):
        chunk = rows[s:s + rows_per_batch]
        # A partial batch (the end of a window) shrinks to the next power of two in rows
        # and in row length: a few more compiled shapes instead of computing empty rows.
        fill = max(sum(len(items[i].ids) for i in row) for row in chunk)
        length = min(cfg.row_length, octave_bucket(fill))
        n_rows = padded_rows(len(chunk), n_data, rows_per_batch)
        yield build_batch(items, chunk, n_rows, length)
    by_len: dict[int, list[int]] = {}
    for i in long_:
        by_len.setdefault(octave_bucket(len(items[i].ids)), []).append(i)
    for length, idx in sorted(by_len.items()):
        per = max(n_data, (cfg.batch_tokens // length) // n_data * n_data)
        for s in range(0, len(idx), per):
            part = idx[s:s + per]
            n_rows = padded_rows(len(part), n_data, per)
            yield build_batch(items, [[i] for i in part], n_rows, length)


# -- the stages of score_pool ---------------------------------------------------------
# read/validate -> tokenize/pack -> device loop (one batch in flight) -> sidecar writer
# -> multi-host merge. The first two run in a host thread ahead of the device.


def read_share(pool, proc: int, n_proc: int, done: set, stop: threading.Event,
               options: PoolOptions | None = None, counts: FilterCounts | None = None
               ) -> Iterator[Record]:
    """Stage 1: the validated records of ``pool`` that pass the filters and this process
    scores (index ≡ proc mod n_proc) and are not ``done``; stops early once ``stop`` is
    set. Filter drops go to ``counts``."""
    for index, rec in enumerate(iter_pool(pool, options, counts=counts)):
        if stop.is_set():
            return
        if index % n_proc == proc and rec.key not in done:
            yield rec


def tokenize_and_pack(records: Iterable[Record], tokenizer, pool, cfg: ScoreConfig,
                      n_data: int, counts: FilterCounts | None = None
                      ) -> Iterator[tuple[str, list[Record], PackedBatch | None]]:
    """Stage 2: tokenize records, and pack each window of ``cfg.window_tokens`` tokens.

    Yields ("skip", records, None) for records ``cfg`` skips (no scored span) and
    ("batch", kept records, PackedBatch) whose slots index the kept records. Records over
    ``cfg.max_tokens`` are dropped (counted in ``counts.too_long``). Errors name the
    record's place (``Record.where``; ``pool:line`` for records built without one).
    """
    def window(recs: list[Record], items: list[Tokenized]):
        skipped = [r for r, t in zip(recs, items, strict=True) if cfg.skips(t)]
        if skipped:
            yield "skip", skipped, None
        keep = [(r, t) for r, t in zip(recs, items, strict=True) if not cfg.skips(t)]
        kept, toks = [r for r, _ in keep], [t for _, t in keep]
        for batch in _batches(toks, cfg, n_data):
            yield "batch", kept, batch

    recs: list[Record] = []
    items: list[Tokenized] = []
    n_tokens = 0
    for rec in records:
        t = tokenize_record(tokenizer, rec.messages, cfg.max_length,
                            where=rec.where or f"{pool}:{rec.line}")
        if cfg.max_tokens is not None and len(t.ids) > cfg.max_tokens:
            if counts is not None:
                counts.too_long += 1
            continue
        recs.append(rec)
        items.append(t)
        n_tokens += len(t.ids)
        if n_tokens >= cfg.window_tokens:
            yield from window(recs, items)
            recs, items, n_tokens = [], [], 0
    if recs:
        yield from window(recs, items)


def batch_rows(batch: PackedBatch, recs: list[Record], sums, grads) -> list[dict]:
    """Stage 4's rows: one sidecar row per trajectory of a finished batch."""
    sums = np.asarray(sums, np.float64)
    grads = None if grads is None else np.asarray(grads, np.float64)
    rows = []
    for r, s, i in batch.slots:
        rec = recs[i]
        row = {"problem_id": rec.problem_id, "candidate_id": rec.candidate_id,
               "teacher": rec.teacher, "pool_line": rec.line}
        if rec.source_id is not None:  # the pool's own (non-integer) problem id
            row["source_id"] = rec.source_id
        if rec.correct is not None:  # the pool's verifier verdict (select --policy verified)
            row["correct"] = rec.correct
        row.update({k: float(x) for k, x in zip(STATS, sums[r, s], strict=True)})
        row["tokens"] = int(round(row["tokens"]))
        if grads is not None:
            row["grad_sq"] = float(grads[r])
        rows.append(row)
    return rows


class DeviceLoop:
    """Stage 3: dispatch batches with one in flight.

    ``submit`` dispatches a batch (JAX runs it asynchronously) and only then hands
    the previous one's results to ``on_done``, which waits for them; so the device
    waits on the host only for what the main thread does per batch (dispatch, a new
    shape's compilation, the writer). ``flush`` finishes the batch in flight.
    """

    def __init__(self, run: Callable, on_done: Callable):
        self.run, self.on_done = run, on_done
        self.pending = None

    def submit(self, batch: PackedBatch, recs: list[Record]) -> None:
        result = self.run(batch)
        self.flush()
        self.pending = (batch, recs, *result)

    def flush(self) -> None:
        if self.pending is not None:
            done, self.pending = self.pending, None
            self.on_done(*done)


class SidecarWriter:
    """Stage 4: append each finished batch's rows to the sidecar; count and report."""

    def __init__(self, sidecar: Sidecar, progress: Callable[..., None] | None):
        self.sidecar, self.progress = sidecar, progress
        self.tokens = self.padded = 0

    def skipped(self, recs: list[Record]) -> None:
        self.sidecar.append([{"skipped": True, "problem_id": r.problem_id,
                              "candidate_id": r.candidate_id} for r in recs])

    def finished(self, batch: PackedBatch, recs: list[Record], sums, grads) -> None:
        rows = batch_rows(batch, recs, sums, grads)
        self.sidecar.append(rows)
        n_tok = sum(r["tokens"] for r in rows)
        self.tokens += n_tok
        self.padded += batch.ids.size
        if self.progress is not None:
            self.progress(len(rows), tokens=n_tok)


def score_pool(student, pool: str | Path, out: str | Path, cfg: ScoreConfig = ScoreConfig(),
               *, resume: bool = False, progress: Callable[..., None] | None = None,
               student_name: str | None = None, pool_options: PoolOptions | None = None
               ) -> ScoreSummary:
    """Score every trajectory of ``pool`` with ``student`` and write the scores JSON to ``out``.

    ``pool`` is any source ``data.sources`` reads (JSONL, parquet, a saved dataset, a Hub
    dataset), read with ``pool_options`` (columns, layout, split, filters). With filters,
    the scores JSON gains a "pool_filters" field: the options and each filter's drops.

    ``progress(n_records, tokens=...)`` is called after each batch.

    Multi-host (after ``jax.distributed.initialize``): process i of n scores the
    records whose index in the pool is ≡ i (mod n) on its own devices (load the
    student on ``make_mesh(devices=jax.local_devices())``), keeps its own
    sidecar, and process 0 merges every sidecar into ``out``. ``out`` must be on
    a filesystem all processes share. Rows are independent, so no process
    waits on another until the final merge.
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = fsio.refuse_link(out)
    options = pool_options or PoolOptions()
    counts = FilterCounts()
    if out.is_dir():
        raise LarkError("output path is a directory", where=str(out))
    if student.tokenizer is None:
        raise LarkError("scoring needs the student's tokenizer")
    name = student_name or student.source or student.path or "student"
    header = {"lark_jax_sidecar": SIDECAR_VERSION, "student": str(name), "top_k": cfg.top_k,
              "max_length": cfg.max_length, "pool": _pool_id(pool),
              "estimator": cfg.estimator, "compat": cfg.compat,
              # the forward dtype changes every statistic: a resume must not mix two
              "dtype": str(student.model.dtype)}
    if cfg.vocab_kernel != "xla":  # the kernels agree to float rounding, not bit for bit
        header["vocab_kernel"] = cfg.vocab_kernel
    if options != PoolOptions() or cfg.max_tokens is not None:  # old sidecars stay valid
        header["pool_options"] = {**options.describe(), "max_tokens": cfg.max_tokens}
    n_proc, proc = jax.process_count(), jax.process_index()
    check_same_settings({**header, **dataclasses.asdict(cfg), "resume": resume,
                         "out": str(out)}, "score")
    if n_proc > 1:
        header["process"] = f"{proc}-of-{n_proc}"
        if any(d.process_index != proc for d in np.asarray(student.mesh.devices).flat):
            raise LarkError("multi-host scoring needs the student on this process's devices: "
                            "load_student(..., mesh=make_mesh(devices=jax.local_devices()))")
    as_parquet = out.suffix.lower() == ".parquet"
    sidecar = Sidecar(_sidecar_path(out, proc, n_proc), header, resume, keep_rows=not as_parquet)
    n_resumed = sidecar.n_rows + sidecar.n_skipped
    graphdef, state = nnx.split(student.model)
    mesh = student.mesh
    top_k = min(cfg.top_k, student.config.vocab_size)  # a tiny vocabulary may have fewer than K
    # The reference rounds logits to its forward dtype; exact mode keeps float32 logits.
    round_logits = ("bfloat16" if cfg.compat == "reference"
                    and student.model.dtype == np.dtype("bfloat16") else None)

    def run(batch: PackedBatch):
        # Placed on the devices once, used by the proxy kernel and the gradient estimator.
        arrays = [jax.device_put(x, data_sharding(mesh, 2)) for x in
                  (batch.ids, batch.positions, batch.segments, batch.targets, batch.weights)]
        sums = _run_batch(graphdef, state, arrays, batch, cfg, top_k, mesh, round_logits)
        grads = _run_grad(graphdef, state, arrays, cfg) if cfg.estimator == "gradient" else None
        return sums, grads  # undone: DeviceLoop fetches them after the next dispatch

    stop = threading.Event()  # set on failure: the host thread stops at its next record
    records = read_share(pool, proc, n_proc, sidecar.done_keys(), stop, options, counts)
    work = prefetch(tokenize_and_pack(records, student.tokenizer, pool, cfg,
                                      mesh.shape["data"], counts), cfg.prefetch)
    writer = SidecarWriter(sidecar, progress)
    loop = DeviceLoop(run, writer.finished)
    try:
        for kind, recs, batch in work:
            if kind == "skip":
                writer.skipped(recs)
            else:
                loop.submit(batch, recs)
        loop.flush()
        filters = None
        if header.get("pool_options"):
            filters = {"options": header["pool_options"], "dropped": counts.as_dict()}
        if as_parquet:
            sidecar.close()
            if n_proc > 1:
                barrier("lark_jax_score_rows_done")
            if proc != 0:
                barrier("lark_jax_score_written")
                sidecar.path.unlink(missing_ok=True)
                return ScoreSummary(0, sidecar.n_rows, sidecar.n_skipped, n_resumed,
                                    writer.tokens, writer.padded, time.perf_counter() - t0,
                                    str(out))
            paths = [_sidecar_path(out, p, n_proc) for p in range(n_proc)]
            problems, n_rows, n_skipped = write_scores_parquet(
                out, paths, _scores_header(cfg, name, filters), cfg.brier, cfg.estimator)
            if n_proc > 1:
                barrier("lark_jax_score_written")
                for path in paths[1:]:
                    path.unlink(missing_ok=True)
            sidecar.path.unlink(missing_ok=True)
            return ScoreSummary(problems, n_rows, n_skipped, n_resumed, writer.tokens,
                                writer.padded, time.perf_counter() - t0, str(out))
        rows, skipped = sidecar.rows, sidecar.skipped
        if n_proc > 1:  # stage 5: process 0 merges every process's sidecar
            rows, skipped = _gather_sidecars(out, n_proc)
            if rows is None:  # not process 0: process 0 writes the result
                sidecar.close()
                barrier("lark_jax_score_written")
                sidecar.path.unlink(missing_ok=True)
                return ScoreSummary(0, len(sidecar.rows), len(sidecar.skipped), n_resumed,
                                    writer.tokens, writer.padded, time.perf_counter() - t0,
                                    str(out))
        problems = _write_scores(out, rows, skipped, cfg, name, filters)
        if n_proc > 1:
            barrier("lark_jax_score_written")
    except BaseException as failure:
        try:
            stop.set()
            work.close()  # waits for the host thread, at most one record's work
            if loop.pending is not None and isinstance(failure, Exception):
                # An error elsewhere (a bad pool line, ...): keep the batch already
                # computed, so --resume need not redo it. An interrupt does not wait.
                with contextlib.suppress(Exception):
                    loop.flush()
        finally:
            # A run that failed before finishing any row leaves nothing behind.
            sidecar.close(remove=sidecar.created and not (sidecar.n_rows or sidecar.n_skipped))
        raise
    sidecar.close(remove=True)
    return ScoreSummary(problems, len(rows), len(skipped), n_resumed, writer.tokens,
                        writer.padded, time.perf_counter() - t0, str(out))


def _pool_id(pool) -> str:
    """How the sidecar header names the pool: a local path resolved, a Hub id as given."""
    text = str(pool)
    return text if text.startswith(HUB_PREFIX) else str(Path(text).resolve())


def _write_scores(out: Path, rows: list[dict], skipped: list[dict], cfg: ScoreConfig,
                  name, filters: dict | None = None) -> int:
    """The scores JSON from every row (atomically); returns the number of problems.
    Without filters it is exactly the reference's layout (plus lark-jax's fields)."""
    scores = build_scores(rows, cfg.brier, cfg.estimator)
    problems = {r["problem_id"] for r in rows} | {r["problem_id"] for r in skipped}
    head = _scores_header(cfg, name, None)
    fsio.atomic_json(out, {
        **head, "n_problems": len(problems), "n_scored": len(rows), "n_skipped": len(skipped),
        **({"pool_filters": filters} if filters else {}),
        "scores": scores,
    })
    return len(problems)


def _scores_header(cfg: ScoreConfig, name, filters: dict | None) -> dict:
    return {"method": "lark_ghat", "student_model": str(name), "top_k": cfg.top_k,
            "brier": cfg.brier, "estimator": cfg.estimator, "max_length": cfg.max_length,
            "compat": cfg.compat or "exact", **({"pool_filters": filters} if filters else {})}


def _sidecar_rows(paths: list[Path]) -> Iterator[dict]:
    for path in paths:
        with open(path, "rb") as f:
            next(f, None)  # the settings line
            for ln in f:
                if ln.strip():
                    yield json.loads(ln)


SCORES_PARQUET_BATCH = 65_536
# Where the scores JSON's other fields go in a parquet file's metadata; the reader,
# selection.scores_stream (a unit beside this one, so it cannot import it), names it too.
HEADER_KEY = b"lark_jax.scores_header"


def write_scores_parquet(out: Path, paths: list[Path], header: dict, brier: str,
                         estimator: str) -> tuple[int, int, int]:
    """The scores as parquet, one candidate a row, from the sidecar files, without holding
    their rows: pass 1 keeps (problem, pool line, candidate, L, ρ) as numbers and computes
    every ĝ per problem in the JSON's order (so the values are the JSON's, bit for bit);
    pass 2 streams the rows again into row groups. Rows come in scoring order; the JSON's
    other fields go into the file's metadata (``selection.scores_stream.HEADER_KEY``).
    Returns (problems, rows, skipped)."""
    import pyarrow as pa

    from lark_jax.learnability.scores import g_hat, trajectory_stats

    cols = {k: [] for k in ("pid", "line", "cid", "L", "rho")}
    skipped_pids: list[int] = []
    for row in _sidecar_rows(paths):
        if row.get("skipped"):
            skipped_pids.append(row["problem_id"])
            continue
        st = trajectory_stats(row, brier, estimator)
        for k, v in zip(cols, (row["problem_id"], st.get("pool_line", -1), st["candidate_id"],
                               st["L"], st["rho"]), strict=True):
            cols[k].append(v)
    pid, line, cid = (np.array(cols[k], np.int64) for k in ("pid", "line", "cid"))
    loss, rho = np.array(cols["L"], np.float64), np.array(cols["rho"], np.float64)
    del cols
    n_rows = len(pid)
    order = np.lexsort((cid, line, pid))  # build_scores' order: problem, pool line, candidate
    ghat_sorted = np.empty(n_rows)
    uniq, start = np.unique(pid[order], return_index=True)
    bounds = np.r_[start, n_rows]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        idx = order[a:b]
        ghat_sorted[a:b] = g_hat(loss[idx], rho[idx])
    ghat = np.empty(n_rows)
    ghat[order] = ghat_sorted
    del loss, rho, line, cid, order, ghat_sorted
    n_problems = len(np.union1d(uniq, np.array(skipped_pids, np.int64)))
    meta = {**header, "n_problems": n_problems, "n_scored": n_rows,
            "n_skipped": len(skipped_pids)}

    kinds = {"problem_id": pa.int64(), "candidate_id": pa.int64(), "pool_line": pa.int64(),
             "tokens": pa.int64(), "teacher": pa.string(), "source_id": pa.string()}

    def table_of(batch, schema):
        if schema is None:  # the columns of the first row, typed (later rows may hold nulls)
            names = list(batch[0]) if batch else ["problem_id", "candidate_id", "teacher",
                                                  "pool_line", "g_hat"]
            schema = pa.schema([(k, kinds.get(k, pa.float64())) for k in names],
                               metadata={HEADER_KEY: json.dumps(meta)})
        return pa.Table.from_pylist(batch, schema=schema)

    def rows():
        i = 0
        for row in _sidecar_rows(paths):
            if not row.get("skipped"):
                st = trajectory_stats(row, brier, estimator)
                yield {"problem_id": row["problem_id"], **st, "g_hat": float(ghat[i]),
                       **({} if "source_id" in st else {"source_id": None})}
                i += 1

    with fsio.atomic_file(out, binary=True) as f:
        fsio.write_parquet(f, rows(), table_of, SCORES_PARQUET_BATCH)
    return n_problems, n_rows, len(skipped_pids)


def _sidecar_path(out: Path, proc: int, n_proc: int) -> Path:
    suffix = ".partial.jsonl" if n_proc == 1 else f".partial.p{proc}-of-{n_proc}.jsonl"
    return out.with_name(out.name + suffix)


def _gather_sidecars(out: Path, n_proc: int):
    """After a barrier, process 0 reads every process's rows; others get (None, None)."""
    barrier("lark_jax_score_rows_done")
    if jax.process_index() != 0:
        return None, None
    rows, skipped = [], []
    for p in range(n_proc):
        with open(_sidecar_path(out, p, n_proc), encoding="utf-8") as f:
            for ln in list(f)[1:]:
                if ln.strip():
                    row = json.loads(ln)
                    (skipped if row.get("skipped") else rows).append(row)
    return rows, skipped


def _run_grad(graphdef, state, arrays, cfg: ScoreConfig) -> jax.Array:
    from lark_jax.learnability.gradient import grad_sq_norms

    return grad_sq_norms(graphdef, state, *arrays, chunk_tokens=cfg.chunk_tokens)


def _run_batch(graphdef, state, arrays, batch: PackedBatch, cfg: ScoreConfig, top_k: int,
               mesh, round_logits: str | None = None) -> jax.Array:
    max_seg = max(1, max(s for _, s, _ in batch.slots) + 1) if batch.slots else 1
    # A few static segment counts (powers of two) keep the number of programs small.
    max_seg = 1 << math.ceil(math.log2(max_seg)) if max_seg > 1 else 1
    # Returned undone: the caller fetches it after dispatching the next batch.
    return score_batch(graphdef, state, *arrays, top_k=top_k, max_segments=max_seg,
                       chunk_tokens=cfg.chunk_tokens, mesh=mesh, round_logits=round_logits,
                       vocab_kernel=cfg.vocab_kernel)
