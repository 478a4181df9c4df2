"""Selection I/O: the scores JSON in, the training JSONL and its manifest out.

Scores (docs/method.md, "Reference data formats")::

    {"method": "lark_ghat", ..., "scores": {"<problem_id>": [{"candidate_id", "teacher", "L",
     "Brier", "rho", "g_hat", ...}, ...]}}

Numbers may be NaN / Infinity (Python's JSON) or null, both read as NaN. A
:class:`ScoreTable` holds them as padded ``[N, Kmax]`` arrays: problems in ascending id,
candidates in ascending candidate id. ``order`` is the tie order of the LARK policy, the
candidates' order in the pool file (the reference's: its selection sorts the pool-ordered
rows stably by ĝ): each row's ``pool_line`` where every row has one (lark-jax's scorer
writes it), else the rows' order in the scores file (the reference's scorer lists them in
pool order). ``gather_pool`` checks it against the pool itself.

Output: one JSON line per selected trajectory,
``{"messages": [...], "meta": {"problem_id", "candidate_id", "teacher", "policy", "budget",
"score", "train_weight"}}``, and ``OUT.manifest.json`` beside it; both are written to a
temporary file in the same directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lark_jax import fsio
from lark_jax.data.pool import pack_keys
from lark_jax.data.reader import PoolOptions, iter_pool
from lark_jax.errors import LarkError, json_msg

NUMERIC_FIELDS = ("g_hat", "L", "Brier", "rho", "rsr", "tokens", "mean_rank")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x, field: str, where: str) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise LarkError(f"field {field!r} must be a number, got {x!r}", where=where)
    return float(x)


def parse_problem(key, rows, *, need: Sequence[str] = (), optional: Sequence[str] = (),
                  source: str = "scores") -> tuple[int, list[dict]]:
    """Validate one problem of a scores file: ``(problem_id, rows)``, each row a dict with
    ``candidate_id``, ``teacher``, ``_pos`` (its place in the list), ``_line`` (its
    ``pool_line`` or None) and the numeric fields in ``need`` (required) and ``optional``
    (where present), sorted by candidate id. Raises :class:`LarkError` naming ``source``,
    the problem and the row."""
    try:
        pid = key if _is_int(key) else int(str(key).strip())
    except ValueError:
        raise LarkError(f"problem id {key!r} is not an integer", where=source) from None
    where = f"{source} (problem {pid})"
    if not isinstance(rows, list):
        raise LarkError("expected a list of candidate rows", where=where)
    out = []
    cids: set[int] = set()
    for i, row in enumerate(rows):
        w = f"{where}, row {i}"
        if not isinstance(row, dict):
            raise LarkError("expected a JSON object", where=w)
        cid = row.get("candidate_id")
        if not _is_int(cid):
            raise LarkError("missing or non-integer 'candidate_id'", where=w)
        if cid < 0:
            raise LarkError(f"negative candidate_id {cid}", where=w)
        if cid in cids:
            raise LarkError(f"duplicate candidate_id {cid}", where=w)
        cids.add(cid)
        teacher = row.get("teacher", "")
        if not isinstance(teacher, str):
            raise LarkError(f"field 'teacher' must be a string, got {teacher!r}", where=w)
        line = row.get("pool_line")
        vals = {"candidate_id": cid, "teacher": teacher, "_pos": i,
                "_line": line if _is_int(line) else None}
        for f in need:
            if f not in row:
                raise LarkError(f"missing field {f!r} (needed by this policy)", where=w)
            vals[f] = _number(row[f], f, w)
        for f in optional:
            if f in row and f not in vals:
                vals[f] = _number(row[f], f, w)
        out.append(vals)
    out.sort(key=lambda r: r["candidate_id"])
    return pid, out


@dataclasses.dataclass
class ScoreTable:
    """Per-candidate scores of a pool, padded to ``[N, Kmax]`` (see the module docstring)."""

    problem_ids: np.ndarray  # [N] int64, ascending
    candidate_ids: np.ndarray  # [N, K] int64, ascending per row, -1 on padding
    mask: np.ndarray  # [N, K] bool
    teachers: list[list[str]]  # [N][K_n]
    fields: dict[str, np.ndarray]  # name -> [N, K] float64, NaN on padding
    source: str = "scores"
    n_empty: int = 0  # problems listed with no candidate (left out of the table)
    order: np.ndarray | None = None  # [N, K] int64 tie keys (module docstring); pad = max
    order_source: str = "candidate_id"  # "pool_line" | "scores file order" | ...
    header: dict = dataclasses.field(default_factory=dict)  # the file's other fields

    @property
    def n_problems(self) -> int:
        return len(self.problem_ids)

    @property
    def n_candidates(self) -> int:
        return int(self.mask.sum())

    def keys(self) -> Iterable[tuple[int, int]]:
        """Every scored (problem_id, candidate_id)."""
        for i, pid in enumerate(self.problem_ids.tolist()):
            for cid in self.candidate_ids[i, self.mask[i]].tolist():
                yield pid, cid

    @classmethod
    def from_problems(cls, problems: Mapping, *, need: Sequence[str] = (),
                      optional: Sequence[str] = ("tokens",), source: str = "scores"
                      ) -> ScoreTable:
        """Validate ``{problem_id: [row, ...]}`` (keys int or decimal strings).

        Fields in ``need`` must be present in every row; each field in ``optional`` is kept
        only if every row has it. Raises :class:`LarkError` naming ``source`` and the problem.
        """
        if not isinstance(problems, Mapping):
            raise LarkError("'scores' must be an object mapping problem ids to lists",
                            where=source)
        parsed: list[tuple[int, list[dict]]] = []
        seen_pids: set[int] = set()
        n_empty = 0
        for key, rows in problems.items():
            pid, out = parse_problem(key, rows, need=need, optional=optional, source=source)
            if pid in seen_pids:
                raise LarkError("problem listed twice", where=f"{source} (problem {pid})")
            seen_pids.add(pid)
            if not out:
                n_empty += 1
                continue
            parsed.append((pid, out))
        if not parsed:
            raise LarkError("no scored candidates", where=source)
        parsed.sort(key=lambda x: x[0])
        n, kmax = len(parsed), max(len(rows) for _, rows in parsed)
        cand = np.full((n, kmax), -1, np.int64)
        mask = np.zeros((n, kmax), bool)
        kept = list(need) + [f for f in optional if f not in need and all(
            f in r for _, rows in parsed for r in rows)]
        fields = {f: np.full((n, kmax), np.nan) for f in kept}
        teachers = []
        by_line = all(r["_line"] is not None for _, rows in parsed for r in rows)
        order = np.full((n, kmax), np.iinfo(np.int64).max, np.int64)
        for i, (_, rows) in enumerate(parsed):
            k = len(rows)
            order[i, :k] = [r["_line"] if by_line else i * kmax + r["_pos"] for r in rows]
            cand[i, :k] = [r["candidate_id"] for r in rows]
            mask[i, :k] = True
            for f in kept:
                fields[f][i, :k] = [r[f] for r in rows]
            teachers.append([r["teacher"] for r in rows])
        pids = np.array([pid for pid, _ in parsed], np.int64)
        return cls(pids, cand, mask, teachers, fields, source, n_empty, order,
                   "pool_line" if by_line else "scores file order")


def load_scores(path: str | os.PathLike, *, need: Sequence[str] = (),
                optional: Sequence[str] = ("tokens",)) -> ScoreTable:
    """Read and validate a scores file, JSON or (by suffix) parquet, whole (see
    :meth:`ScoreTable.from_problems`; ``select`` streams it instead where it can)."""
    path = Path(path)
    if not path.is_file():
        raise LarkError("scores file not found", where=str(path))
    if path.suffix.lower() == ".parquet":
        from lark_jax.selection.scores_stream import read_parquet_scores

        header: dict = {}
        problems: dict = {}
        for pid, rows, _ in read_parquet_scores(path, header):
            problems.setdefault(pid, []).extend(rows)
        table = ScoreTable.from_problems(problems, need=need, optional=optional,
                                         source=str(path))
        table.header = header
        return table
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise LarkError(f"malformed JSON ({json_msg(e)} at line {e.lineno} column {e.colno})",
                        where=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LarkError(f"cannot read scores ({e})", where=str(path)) from None
    if not isinstance(obj, dict):
        raise LarkError(f"expected a JSON object, got {type(obj).__name__}", where=str(path))
    if "scores" not in obj:
        raise LarkError("missing field 'scores'", where=str(path))
    table = ScoreTable.from_problems(obj["scores"], need=need, optional=optional,
                                     source=str(path))
    table.header = {k: v for k, v in obj.items() if k != "scores"}
    return table


def pool_order_agrees(table: ScoreTable, positions: np.ndarray) -> bool:
    """Whether ``table.order`` ranks every problem's candidates as ``positions`` does."""
    big = np.iinfo(np.int64).max
    a = np.argsort(np.where(table.mask, table.order, big), axis=-1, kind="stable")
    b = np.argsort(np.where(table.mask, positions, big), axis=-1, kind="stable")
    return bool(np.array_equal(np.where(np.take_along_axis(table.mask, a, -1), a, -1),
                               np.where(np.take_along_axis(table.mask, b, -1), b, -1)))


def gather_pool(pool: str | os.PathLike, table: ScoreTable, wanted: set[tuple[int, int]],
                progress: Callable[[int], None] | None = None, positions: list | None = None,
                options: PoolOptions | None = None, source_ids: dict | None = None
                ) -> tuple[dict[tuple[int, int], tuple[str, tuple[dict, ...]]], int]:
    """Stream the pool once: ``({key: (teacher, messages)} for wanted keys, n_unscored)``.

    The pool is read with ``options`` (columns, layout, split: those it was scored with;
    its filters are not applied again: what they dropped was not scored). With
    ``positions=[]`` the list receives one ``[N, K]`` int64 array: every scored
    candidate's record index in the pool (padding: -1). ``source_ids``, a dict, receives
    the pool's own problem id of each wanted key that has one.

    Every scored candidate must be in the pool; otherwise a :class:`LarkError` names the
    scores file and the first missing (problem, candidate). Pool records that were not scored
    (e.g. skipped by ``score``) are counted, not selected.
    """
    # Keys go into compact int64 buffers, not a set of tuples: a pool can hold millions.
    pool_pids, pool_cids = array("q"), array("q")
    found: dict[tuple[int, int], tuple[str, tuple[dict, ...]]] = {}
    if options is not None:
        options = dataclasses.replace(options, require=(), complete=False, exclude=None)
    for rec in iter_pool(pool, options):
        pool_pids.append(rec.problem_id)
        pool_cids.append(rec.candidate_id)
        if rec.key in wanted:
            found[rec.key] = (rec.teacher, rec.messages)
            if source_ids is not None and rec.source_id is not None:
                source_ids[rec.key] = rec.source_id
        if progress is not None:
            progress(1)
    scored = np.stack([np.repeat(table.problem_ids, table.mask.sum(1)),
                       table.candidate_ids[table.mask]], axis=1)
    in_pool = np.stack([np.frombuffer(pool_pids, np.int64), np.frombuffer(pool_cids, np.int64)],
                       axis=1)
    present = np.isin(pack_keys(scored[:, 0], scored[:, 1]),
                      pack_keys(in_pool[:, 0], in_pool[:, 1]))
    if not present.all():
        missing = scored[~present]  # already in (problem, candidate) order
        pid, cid = missing[0].tolist()
        raise LarkError(f"{len(missing)} scored candidate(s) are not in the pool {pool} "
                        f"(first: problem {pid}, candidate {cid}); were these scores made "
                        f"from another pool?", where=table.source)
    # iter_pool rejects duplicate keys, so every scored key matches exactly one pool record.
    if positions is not None:
        # Sort pool and scored keys together (pool first on equal keys): each scored key
        # sits right after its pool record.
        both = np.concatenate([in_pool, scored])
        tag = np.r_[np.zeros(len(in_pool), np.int64), np.ones(len(scored), np.int64)]
        srt = np.lexsort((tag, both[:, 1], both[:, 0]))
        at = np.nonzero(tag[srt] == 1)[0]
        pos = np.full(table.mask.shape, -1, np.int64)
        flat = np.empty(len(scored), np.int64)
        flat[srt[at] - len(in_pool)] = srt[at - 1]
        pos[table.mask] = flat
        positions.append(pos)
    return found, len(in_pool) - len(scored)


def json_number(x: float) -> float | int | None:
    """A finite float as itself (integers as int), anything else as null (strict JSON)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return int(x) if x.is_integer() and abs(x) < 2 ** 53 else x


def _strict(obj):
    """A copy of ``obj`` with non-finite floats as null, so that it is strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.manifest.json")


# The columns of a parquet selection beside ``messages``: each record's meta fields, with
# their Arrow types (fixed, so that every row group of a large selection agrees).
SELECTION_COLUMNS = {"problem_id": "int64", "candidate_id": "int64", "teacher": "string",
                     "policy": "string", "budget": "int64", "score": "float64",
                     "train_weight": "float64", "source_id": "string"}
PARQUET_BATCH = 50_000  # records per row group


def selection_table(records: Iterable[dict], messages_type=None):
    """The records as an Arrow table: ``messages`` and one column per SELECTION_COLUMNS
    field (null where a record has none)."""
    import pyarrow as pa

    recs = list(records)
    cols = {"messages": pa.array([r["messages"] for r in recs], type=messages_type)}
    for k, t in SELECTION_COLUMNS.items():
        cols[k] = pa.array([r.get("meta", {}).get(k) for r in recs], type=t)
    return pa.table(cols)


def _write_parquet(f, records: Iterable[dict]) -> None:
    """Row groups of PARQUET_BATCH records, streamed (never the whole selection)."""
    fsio.write_parquet(f, records, lambda batch, schema: selection_table(
        batch, None if schema is None else schema.field("messages").type), PARQUET_BATCH)


def write_selection(out: str | os.PathLike, records: Iterable[dict] | None, manifest: dict,
                    lines: Iterable[bytes] | None = None) -> Path:
    """Write the records (JSONL, or parquet when ``out`` ends in .parquet) and then the
    manifest, each atomically; returns the manifest. ``lines``, instead of ``records``:
    the records already as JSON lines (bytes, each ending in a newline)."""
    out, mpath = fsio.refuse_link(out), fsio.refuse_link(manifest_path(out))
    if out.is_dir():
        raise LarkError("output path is a directory", where=str(out))
    if lines is not None:
        records = (json.loads(x) for x in lines) if out.suffix.lower() == ".parquet" else None
    try:
        if out.suffix.lower() == ".parquet":
            with fsio.atomic_file(out, binary=True) as f:
                _write_parquet(f, records)
        elif lines is not None:
            with fsio.atomic_file(out, binary=True) as f:
                f.writelines(lines)
        else:
            with fsio.atomic_file(out) as f:
                f.writelines(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                             for r in records)
        fsio.atomic_write(mpath, json.dumps(_strict(manifest), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        raise LarkError(f"cannot write output ({e})", where=str(out)) from None
    return mpath
