"""``select`` over pools of millions: scores and pool read in passes, neither held whole.

Every per-problem policy (LARK's per-problem mode and the local baselines) decides each
problem from its own candidates alone, so the work splits by problem:

1. **Scores pass.** The scores file is read one problem at a time
   (:mod:`.scores_stream`), each problem validated as the in-memory reader does
   (:func:`.io.parse_problem`), and its rows appended, as fixed-width binary records, to
   one of up to ``MAX_PARTS`` partition files chosen by a hash of the problem id.
2. **Select per partition.** Each partition becomes a small :class:`ScoreTable` and goes
   through the same :func:`selection.select` as the in-memory path; what is chosen is kept
   as flat arrays (problem, candidate, weight, score: ~60 bytes per *selected* trajectory).
3. **Pool pass.** The pool is streamed once: each record's key and index go to the pool's
   partition files, and a chosen record's output line goes to a spill file (its offset is
   kept).
4. **Checks per partition**, as the in-memory path makes them: every scored candidate is in
   the pool, no key is there twice, and the scores' tie order (``pool_line`` or the order
   of the scores file) ranks each problem's candidates as the pool file does. A partition
   where it does not is selected again with the pool's own order (then a second pool pass
   fetches any record newly chosen), like the in-memory path's re-read.
5. **Write** the chosen lines in (problem, candidate) order from the spill.

Memory: one partition (about 1/64 of the scores' rows, as numbers), read-ahead windows, and
the chosen arrays; it does not grow with the pool's text or its unselected rows. Disk: the
partition files (~60 bytes a scored row, ~24 a pool record) and the spill (the selection's
text), in a temporary folder beside the output, removed at the end.

The output is the in-memory path's, byte for byte (tests compare them). The global mode
and policies that compare problems (``selection.baselines`` ``GLOBAL_POLICIES``) need the
whole table and keep the in-memory path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lark_jax.data.pool import pack_keys
from lark_jax.data.reader import PoolOptions, iter_pool
from lark_jax.errors import LarkError
from lark_jax.selection.baselines import _splitmix64
from lark_jax.selection.io import ScoreTable, json_number, parse_problem
from lark_jax.selection.scores_stream import iter_score_problems

MAX_PARTS = 64
PART_BYTES = 24 << 20  # about this much scores text per partition
BATCH = 8192
_BIG = np.iinfo(np.int64).max


def _buckets(pids: np.ndarray, parts: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (_splitmix64(pids.astype(np.int64).astype(np.uint64))
                % np.uint64(parts)).astype(np.int64)


class Partitions:
    """``parts`` append-only files of one record dtype, rows routed by problem id."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, parts: int):
        self.paths = [root / f"{name}.{p}" for p in range(parts)]
        self.dtype, self.parts = dtype, parts
        self.files = [open(p, "wb") for p in self.paths]  # noqa: SIM115 (closed in close)

    def add(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        b = _buckets(rows["pid"], self.parts)
        order = np.argsort(b, kind="stable")
        rows, b = rows[order], b[order]
        edges = np.searchsorted(b, np.arange(self.parts + 1))
        for p in np.flatnonzero(np.diff(edges)):
            self.files[p].write(rows[edges[p]:edges[p + 1]].tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def read(self, p: int) -> np.ndarray:
        return np.fromfile(self.paths[p], dtype=self.dtype)


@dataclasses.dataclass
class ScoresSpill:
    """What the scores pass learnt, beside its partition files."""

    parts: Partitions
    fields: list[str]  # numeric fields stored (need + optional ones seen)
    complete: set[str]  # fields every row has
    by_line: bool  # every row has pool_line
    teachers: list[str]  # teacher code -> name
    n_empty: int
    n_rows: int
    header: dict
    json: bool  # a JSON document (a problem listed twice is an error)


_MISSING = object()


def _fast_rows(key, rows, fields: list[str], need: set[str]):
    """``parse_problem`` for the common case, without its per-row dicts (a third of the
    scores pass): ``(pid, [(cid, teacher, position, pool_line, values)])``, a value
    ``_MISSING`` where an optional field is absent. None for anything else (a string id
    that is not plain digits, a bad row, a non-number): the caller then runs
    ``parse_problem``, which accepts it or raises the error naming the row."""
    if type(key) is int:
        pid = key
    elif type(key) is str and key.isdigit() and key.isascii():
        pid = int(key)
    else:
        return None
    if type(rows) is not list:
        return None
    out, seen = [], set()
    for i, r in enumerate(rows):
        if type(r) is not dict:
            return None
        cid = r.get("candidate_id")
        if type(cid) is not int or cid < 0 or cid in seen:
            return None
        seen.add(cid)
        teacher = r.get("teacher", "")
        line = r.get("pool_line")
        if type(teacher) is not str:
            return None
        vals = []
        for f in fields:
            if f not in r:
                if f in need:
                    return None
                vals.append(_MISSING)
                continue
            v = r[f]
            if type(v) is float:
                vals.append(v)
            elif type(v) is int:
                vals.append(float(v))
            elif v is None:
                vals.append(math.nan)
            else:
                return None
        out.append((cid, teacher, i, line if type(line) is int else None, vals))
    return pid, out


def spill_scores(path, root: Path, need: Sequence[str], optional: Sequence[str],
                 progress: Callable[[int], None] | None = None) -> ScoresSpill:
    """Pass 1: validate every problem of the scores file and spill its rows by problem."""
    fields = list(dict.fromkeys([*need, *optional]))
    dtype = np.dtype([("pid", "i8"), ("cid", "i8"), ("pos", "i8"), ("line", "i8"),
                      ("entry", "i8"), ("teacher", "i4")] + [(f, "f8") for f in fields])
    header: dict = {}
    problems = iter_score_problems(path, header)  # checks that the file is there
    # Few partitions for a small file (each one costs a select call), up to MAX_PARTS.
    n_parts = int(min(MAX_PARTS, max(1, -(-Path(path).stat().st_size // PART_BYTES))))
    parts = Partitions(root, "scores", dtype, n_parts)
    codes: dict[str, int] = {}
    missing = dict.fromkeys(fields, 0)
    need_set = set(need)
    by_line, n_empty, n_rows, pos = True, 0, 0, 0
    buf: list[tuple] = []
    source = str(path)
    try:
        for key, rows, entry in problems:
            fast = _fast_rows(key, rows, fields, need_set)
            if fast is None:  # anything unusual: the full check (and its error message)
                pid, parsed = parse_problem(key, rows, need=need, optional=optional,
                                            source=source)
                fast = pid, [(r["candidate_id"], r["teacher"], r["_pos"], r["_line"],
                              [r.get(f, _MISSING) for f in fields]) for r in parsed]
            pid, parsed = fast
            if not parsed:
                n_empty += 1
                continue
            for cid, teacher, i, line, vals in parsed:
                by_line &= line is not None
                for j, v in enumerate(vals):
                    if v is _MISSING:
                        missing[fields[j]] += 1
                        vals[j] = np.nan
                t = codes.setdefault(teacher, len(codes))
                buf.append((pid, cid, pos + i, -1 if line is None else line, entry, t, *vals))
            pos += len(rows)
            n_rows += len(parsed)
            if len(buf) >= BATCH:
                parts.add(np.array(buf, dtype))
                if progress is not None:
                    progress(len(buf))
                buf = []
        parts.add(np.array(buf, dtype))
        if progress is not None and buf:
            progress(len(buf))
    finally:
        parts.close()
    if not n_rows:
        raise LarkError("no scored candidates", where=source)
    return ScoresSpill(parts, fields, {f for f in fields if not missing[f]}, by_line,
                       list(codes), n_empty, n_rows, header,
                       Path(path).suffix.lower() != ".parquet")


def _grouped(rows: np.ndarray, source: str, json_doc: bool) -> np.ndarray:
    """The rows sorted by (problem, candidate), checked for a problem listed twice."""
    rows = rows[np.lexsort((rows["cid"], rows["pid"]))]
    same = rows["pid"][1:] == rows["pid"][:-1]
    if json_doc:
        bad = same & (rows["entry"][1:] != rows["entry"][:-1])
        if bad.any():
            pid = int(rows["pid"][1:][bad].min())
            raise LarkError("problem listed twice", where=f"{source} (problem {pid})")
    dup = same & (rows["cid"][1:] == rows["cid"][:-1])
    if dup.any():
        i = int(np.flatnonzero(dup)[0]) + 1
        raise LarkError(f"duplicate candidate_id {int(rows['cid'][i])}",
                        where=f"{source} (problem {int(rows['pid'][i])})")
    return rows


def table_of(rows: np.ndarray, spill: ScoresSpill, source: str, order=None) -> ScoreTable:
    """A partition's rows (sorted by problem, candidate) as a padded ScoreTable.
    ``order``: the tie keys per row (default: pool_line where every row has one, else the
    position in the scores file)."""
    pids, start, counts = np.unique(rows["pid"], return_index=True, return_counts=True)
    # Rows padded to a power of two (problems with no candidate, which no policy selects):
    # the partitions then share a few compiled shapes instead of one each.
    n, kmax = 1 << max(6, (len(pids) - 1).bit_length()), int(counts.max())
    pids = np.r_[pids, np.full(n - len(pids), -1, np.int64)]
    g = np.repeat(np.arange(len(counts)), counts)
    col = np.arange(len(rows)) - start[g]
    cand = np.full((n, kmax), -1, np.int64)
    cand[g, col] = rows["cid"]
    mask = np.zeros((n, kmax), bool)
    mask[g, col] = True
    fields = {}
    for f in spill.fields:
        if f in spill.complete:
            a = np.full((n, kmax), np.nan)
            a[g, col] = rows[f]
            fields[f] = a
    keys = np.full((n, kmax), _BIG, np.int64)
    if order is None:
        order = rows["line"] if spill.by_line else rows["pos"]
    keys[g, col] = order
    names = np.array(spill.teachers, dtype=object)[rows["teacher"]].tolist()
    teachers = [names[s:s + c] for s, c in zip(start.tolist(), counts.tolist(), strict=True)]
    teachers += [[] for _ in range(n - len(teachers))]
    return ScoreTable(pids, cand, mask, teachers, fields, source, 0, keys,
                      "pool_line" if spill.by_line else "scores file order")


# what is kept of each chosen trajectory until it is written: 36 bytes
CHOSEN = np.dtype([("pid", "i8"), ("cid", "i8"), ("weight", "f8"), ("score", "f8"),
                   ("part", "i4")])


def _chosen(table: ScoreTable, sel, part: int) -> tuple[np.ndarray, float]:
    """The chosen entries of a partition's selection, and the sum of their tokens."""
    rows, cols = np.nonzero(sel.chosen)
    out = np.empty(len(rows), CHOSEN)
    out["pid"] = table.problem_ids[rows]
    out["cid"] = table.candidate_ids[rows, cols]
    out["weight"] = sel.weights[rows, cols] * sel.train_scale
    out["score"] = sel.score[rows, cols]
    out["part"] = part
    tokens = table.fields.get("tokens")
    return out, float(np.nansum(tokens[rows, cols])) if tokens is not None else 0.0


STATUS_ORDER = ("ok", "fewer_than_budget_plus_one", "tie", "all_nan", "empty")


def merge_info(infos: list[dict]) -> dict:
    """One ``Selection.info`` from the partitions', keys in the order one table's info has:
    status counts and solver counts add, maxima take the max, the iteration mean is
    weighted by the rows solved."""
    if not infos:
        return {}
    out = dict(infos[0])
    if "status" in out:
        total: dict = {}
        for info in infos:
            for k, v in info["status"].items():
                total[k] = total.get(k, 0) + v
        out["status"] = {k: total[k] for k in STATUS_ORDER if k in total}
    if "solver" in out:
        solved = [i["solver"] for i in infos if i["solver"].get("rows_solved")]
        if not solved:
            out["solver"] = {"rows_solved": 0}
        else:
            n = sum(s["rows_solved"] for s in solved)
            out["solver"] = {
                "rows_solved": n,
                "iterations_max": max(s["iterations_max"] for s in solved),
                # iteration counts are integers: each mean times its rows is its sum
                "iterations_mean": sum(round(s["iterations_mean"] * s["rows_solved"])
                                       for s in solved) / n,
                "kkt_max": max(s["kkt_max"] for s in solved),
                "duality_gap_max": max(s["duality_gap_max"] for s in solved),
                "unconverged": sum(s["unconverged"] for s in solved)}
    return out


@dataclasses.dataclass
class StreamResult:
    """What ``select_streaming`` wrote and counted, for the manifest and the summary."""

    n_problems: int
    n_empty: int
    n_candidates: int
    n_records: int
    n_problems_selected: int
    selected_tokens: int | None
    train_weight_sum: float
    unscored: int
    info: dict
    tie_order: str
    header: dict
    policy: str
    solver: str | None
    train_scale: float


def select_streaming(scores, pool, out, manifest: Callable[[StreamResult], dict], *,
                     policy: str, budget: int, select_kwargs: dict, need: Sequence[str],
                     optional: Sequence[str], options: PoolOptions | None,
                     progress: Callable[[str], Callable[[int], None]] | None = None
                     ) -> StreamResult:
    """Select from ``scores`` and ``pool`` into ``out`` (JSONL or parquet) with bounded
    memory (module docstring); ``manifest(result)`` builds the manifest written beside it.
    ``progress(stage)`` returns a callback advanced by rows/records done."""
    parent = Path(out).parent
    made = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    try:
        return _select_streaming(scores, pool, out, manifest, parent, policy=policy,
                                 budget=budget, select_kwargs=select_kwargs, need=need,
                                 optional=optional, options=options, progress=progress)
    except BaseException:
        for d in made:  # folders made for the output go too: nothing is left behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _select_streaming(scores, pool, out, manifest, parent: Path, *, policy, budget,
                      select_kwargs, need, optional, options, progress) -> StreamResult:
    from lark_jax.selection import select
    from lark_jax.selection.io import write_selection

    source = str(scores)
    opts = dataclasses.replace(options or PoolOptions(), require=(), complete=False,
                               exclude=None)
    bar = progress or (lambda stage: None)
    # beside the output, not in /tmp: the spill is the selection's text, and /tmp may be RAM
    with tempfile.TemporaryDirectory(prefix=".lark-select-", dir=parent) as tmp:
        root = Path(tmp)
        spill = spill_scores(scores, root, need, optional, bar("read scores"))

        def choose(p: int, rows: np.ndarray, order=None):
            table = table_of(rows, spill, source, order)
            try:
                sel = select(table, policy, budget, **select_kwargs)
            except ValueError as e:  # a policy's check of the scores (verified's values)
                raise LarkError(str(e), where=source) from None
            n_real = len(np.unique(rows["pid"]))
            status = sel.info.get("status")
            if status is not None:  # the padding rows are not problems of the file
                status["empty"] = status.get("empty", 0) - (table.n_problems - n_real)
                if not status["empty"]:
                    del status["empty"]
            c, n_tokens = _chosen(table, sel, p)
            tokens[p] = n_tokens
            return n_real, sel, c

        chosen, infos, tokens, n_problems, meta = [], {}, {}, 0, None
        for p in range(spill.parts.parts):
            rows = spill.parts.read(p)
            if not len(rows):
                continue
            rows = _grouped(rows, source, spill.json)
            n_real, sel, c = choose(p, rows)
            n_problems += n_real
            chosen.append(c)
            infos[p] = sel.info
            meta = meta or (sel.policy, sel.solver, sel.train_scale)
        chosen = np.concatenate(chosen)
        chosen = chosen[np.lexsort((chosen["cid"], chosen["pid"]))]

        # Pass 3: the pool once. Chosen records' lines go to the spill file.
        pool_parts = Partitions(root, "pool", np.dtype([("pid", "i8"), ("cid", "i8"),
                                                         ("idx", "i8")]), spill.parts.parts)
        lines = _Lines(root / "spill.jsonl", meta[0], budget)
        try:
            try:
                n_pool = _pool_pass(pool, opts, chosen, lines, pool_parts, bar("read pool"))
            finally:
                pool_parts.close()

            # Pass 4: checks per partition; re-select where the pool's order decides ties.
            n_found, first_missing, n_missing, reread = 0, None, 0, []
            def joined(p: int):
                """Partition p's scored rows, sorted, and the pool's sorted keys and indices."""
                srows = spill.parts.read(p)
                srows = srows[np.lexsort((srows["cid"], srows["pid"]))]
                prows = pool_parts.read(p)
                prows = prows[np.argsort(pack_keys(prows["pid"], prows["cid"]), kind="stable")]
                return srows, pack_keys(prows["pid"], prows["cid"]), prows["idx"]

            for p in range(spill.parts.parts):
                if not spill.parts.paths[p].stat().st_size:
                    continue
                srows, pk, pidx = joined(p)
                if len(pk) > 1 and (pk[1:] == pk[:-1]).any():
                    # iter_pool's own duplicate check names the file and line
                    for _ in iter_pool(pool, opts):
                        pass
                    raise LarkError("duplicate (problem_id, candidate_id) in the pool",
                                    where=str(pool))
                sk = pack_keys(srows["pid"], srows["cid"])
                j = np.minimum(np.searchsorted(pk, sk), max(len(pk) - 1, 0))
                present = (pk[j] == sk) if len(pk) else np.zeros(len(sk), bool)
                if not present.all():
                    n_missing += int((~present).sum())
                    m = srows[~present][0]
                    key = (int(m["pid"]), int(m["cid"]))
                    first_missing = key if first_missing is None else min(first_missing, key)
                    continue
                n_found += len(srows)
                if policy != "lark":
                    continue
                order = srows["line"] if spill.by_line else srows["pos"]
                a = np.lexsort((srows["cid"], order, srows["pid"]))
                b = np.lexsort((srows["cid"], pidx[j], srows["pid"]))
                if not np.array_equal(a, b):
                    reread.append(p)  # only its number: a partition is read again when needed
            if first_missing is not None:
                pid, cid = first_missing
                raise LarkError(f"{n_missing} scored candidate(s) are not in the pool {pool} "
                                f"(first: problem {pid}, candidate {cid}); were these scores made "
                                f"from another pool?", where=source)
            tie_order = "pool_line" if spill.by_line else "scores file order"
            if reread:
                tie_order = "pool file (re-read)"
                kept = chosen[~np.isin(chosen["part"], reread)]
                new = []
                for p in reread:
                    srows, pk, pidx = joined(p)
                    position = pidx[np.searchsorted(pk, pack_keys(srows["pid"], srows["cid"]))]
                    _, sel, c = choose(p, srows, position)
                    new.append(c)
                    infos[p] = sel.info
                chosen = np.concatenate([kept, *new])
                chosen = chosen[np.lexsort((chosen["cid"], chosen["pid"]))]
                lines.rekey(chosen)
                if not lines.complete():
                    _pool_pass(pool, opts, chosen, lines, None, bar("read pool again"))

            result = StreamResult(
                n_problems=n_problems, n_empty=spill.n_empty, n_candidates=spill.n_rows,
                n_records=len(chosen),
                n_problems_selected=len(np.unique(chosen["pid"])),
                selected_tokens=(int(sum(tokens.values())) if "tokens" in spill.complete
                                 else None),
                train_weight_sum=float(chosen["weight"].sum()), unscored=n_pool - n_found,
                info=merge_info([infos[p] for p in sorted(infos)]), tie_order=tie_order,
                header=spill.header,
                policy=meta[0], solver=meta[1], train_scale=meta[2])
            write_selection(out, None, manifest(result), lines=lines.ordered())
            return result
        finally:
            lines.f.close()  # on an error too (the spill is removed)


class _Lines:
    """The spill of chosen records' output lines; ``off[j]``/``size[j]``: where the line of
    the j-th chosen key (in (problem, candidate) order) is (-1: not yet read)."""

    def __init__(self, path: Path, policy: str, budget: int):
        self.path, self.policy, self.budget = path, policy, budget
        self.f = open(path, "ab")  # noqa: SIM115 (closed in ordered)
        self.keys = None

    def rekey(self, chosen: np.ndarray) -> None:
        """A new chosen set: lines already spilled for keys still chosen are kept."""
        keys = pack_keys(chosen["pid"], chosen["cid"])
        off, size = np.full(len(keys), -1, np.int64), np.zeros(len(keys), np.int64)
        if self.keys is not None and len(self.keys) and len(keys):
            j = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = self.keys[j] == keys
            off[hit], size[hit] = self.off[j[hit]], self.size[j[hit]]
        self.chosen, self.keys, self.off, self.size = chosen, keys, off, size

    def complete(self) -> bool:
        return bool((self.off >= 0).all())

    def add(self, rec, j: int) -> None:
        c = self.chosen[j]
        meta = {"problem_id": rec.problem_id, "candidate_id": rec.candidate_id,
                "teacher": rec.teacher, "policy": self.policy, "budget": self.budget,
                "score": json_number(c["score"]), "train_weight": float(c["weight"])}
        if rec.source_id is not None:
            meta["source_id"] = rec.source_id
        data = (json.dumps({"messages": list(rec.messages), "meta": meta},
                           ensure_ascii=False, allow_nan=False) + "\n").encode()
        self.off[j], self.size[j] = self.f.tell(), len(data)
        self.f.write(data)

    def ordered(self):
        """The chosen keys' lines (bytes) in (problem, candidate) order. Read with pread, not
        a memory map: mapped pages would count in the process's RSS, the page cache does
        not."""
        self.f.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a in range(0, len(self.off), 1 << 16):  # not one Python int per line at once
                for off, n in zip(self.off[a:a + (1 << 16)].tolist(),
                                  self.size[a:a + (1 << 16)].tolist(), strict=True):
                    yield os.pread(fd, n, off)
        finally:
            os.close(fd)


def _pool_pass(pool, opts: PoolOptions, chosen: np.ndarray, lines: _Lines,
               parts: Partitions | None, progress) -> int:
    """Stream the pool: keys to ``parts`` (when given), chosen records' lines to
    ``lines`` (only those it lacks); returns the number of records."""
    if lines.keys is None:
        lines.rekey(chosen)
    keys = lines.keys
    pdt = np.dtype([("pid", "i8"), ("cid", "i8"), ("idx", "i8")])
    n = 0
    batch: list = []

    def flush():
        nonlocal n
        pids = np.fromiter((r.problem_id for r in batch), np.int64, len(batch))
        cids = np.fromiter((r.candidate_id for r in batch), np.int64, len(batch))
        if parts is not None:
            rows = np.empty(len(batch), pdt)
            rows["pid"], rows["cid"], rows["idx"] = pids, cids, np.arange(n, n + len(batch))
            parts.add(rows)
        if len(keys):
            k = pack_keys(pids, cids)
            j = np.minimum(np.searchsorted(keys, k), len(keys) - 1)
            for i in np.flatnonzero(keys[j] == k).tolist():
                if lines.off[j[i]] < 0:
                    lines.add(batch[i], int(j[i]))
        n += len(batch)
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for rec in iter_pool(pool, opts, check_duplicates=False):
        batch.append(rec)
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    return n


__all__ = ["MAX_PARTS", "Partitions", "StreamResult", "merge_info", "select_streaming",
           "spill_scores", "table_of"]
