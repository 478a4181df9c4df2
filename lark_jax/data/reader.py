"""The one pool reader: any source (``data.sources``), any layout (``data.layouts``),
the filters (``data.filters``), as a stream of validated ``Record``s.

Every command that reads a pool (``score --pool``, ``select --pool``) goes through
:func:`iter_pool`; its options are the CLI's ``--columns``, ``--layout``, ``--split``,
``--require``, ``--complete`` and ``--exclude-benchmark``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

from lark_jax.data.filters import (
    FINISH_COLUMNS,
    Decontaminator,
    FilterCounts,
    flag,
    has_closed_boxed,
)
from lark_jax.data.layouts import (
    LAYOUTS,
    Layout,
    check_parallel,
    detect,
    parse_columns,
    problem_records,
    trajectory_records,
)
from lark_jax.data.pool import Record, pack_keys
from lark_jax.data.sources import (
    Source,
    arrow_columns,
    arrow_lengths,
    check_schemas,
    iter_rows,
    resolve,
)
from lark_jax.errors import LarkError

REFERENCE_KEYS = ("problem_id", "candidate_id", "messages")


@dataclasses.dataclass(frozen=True)
class PoolOptions:
    """How to read a pool: column names, layout, split, and the filters."""

    columns: dict = dataclasses.field(default_factory=dict)  # key -> column (--columns)
    layout: str = "auto"  # "auto" | "trajectory" | "problem"
    split: str = "train"  # of a saved DatasetDict or a Hub dataset
    require: tuple[str, ...] = ()  # boolean columns that must hold (--require)
    complete: bool = False  # only finished trajectories (--complete)
    exclude: Decontaminator | None = None  # benchmark problems to drop (--exclude-benchmark)
    exclude_names: tuple[str, ...] = ()  # the benchmark files, for reports

    def describe(self) -> dict:
        """The options as they go into a scores header or a manifest."""
        return {"columns": dict(self.columns), "layout": self.layout, "split": self.split,
                "require": list(self.require), "complete": self.complete,
                "exclude_benchmark": list(self.exclude_names)}

    @property
    def filters(self) -> bool:
        return bool(self.require or self.complete or self.exclude)


def open_pool(source, options: PoolOptions) -> tuple[Source, Layout, Iterator, bool]:
    """Resolve ``source`` and tell its layout: (source, layout, rows, strict). ``strict``:
    a JSON-lines pool in the reference's own format, validated exactly as the reference's."""
    src = resolve(source, options.split)
    check_schemas(src)
    rows = iter_rows(src)
    first = next(rows, None)
    if first is None:
        raise LarkError("pool is empty (no records)", where=src.files[0] if len(
            src.files) == 1 else src.spec)
    rows = itertools.chain([first], rows)
    found = arrow_columns(src) if src.kind in ("parquet", "arrow") else (
        list(first[1]) if isinstance(first[1], dict) else list(REFERENCE_KEYS))
    strict = (src.kind in ("jsonl", "json") and not options.columns
              and options.layout != "problem"
              and (not isinstance(first[1], dict) or all(k in first[1] for k in REFERENCE_KEYS)))
    if strict:
        found = list(dict.fromkeys([*REFERENCE_KEYS, *found]))
    return src, detect(found, options.columns, options.layout, src.name, src.spec), rows, strict


class SeenKeys:
    """Duplicate (problem_id, candidate_id) detection at 16 bytes a key, for pools of millions.

    Keys of the last ``flush_at`` records live in a dict (key -> where, for the message);
    a repeat among them is found at once. Then they are checked against, and merged into,
    one sorted array of 16-byte items (the two int64s, big-endian with the sign bit flipped:
    byte order is numeric order), all at once with NumPy; so a repeat of an older key is
    reported up to ``flush_at`` records late (and by :meth:`finish` at the end). A Python
    set of tuples would take ~150 bytes a key: 1.5 GB at 10M trajectories.
    """

    def __init__(self, flush_at: int = 1 << 16):
        self.recent: dict[tuple[int, int], str] = {}
        self.sorted = None
        self.flush_at = flush_at

    def add(self, key: tuple[int, int], where: str) -> None:
        if key in self.recent:
            raise LarkError(f"duplicate (problem_id, candidate_id) = {key}", where=where)
        self.recent[key] = where
        if len(self.recent) >= self.flush_at:
            self.finish()

    def finish(self) -> None:
        """Check the recent keys against the older ones and merge them in."""
        import numpy as np

        if not self.recent:
            return
        a = np.array(list(self.recent), np.int64).reshape(-1, 2)
        new = pack_keys(a[:, 0], a[:, 1])
        if self.sorted is None or not len(self.sorted):
            self.sorted = np.sort(new)
        else:
            at = np.searchsorted(self.sorted, new)
            i = np.minimum(at, len(self.sorted) - 1)
            hit = np.flatnonzero(self.sorted[i] == new)
            if len(hit):
                key = list(self.recent)[int(hit[0])]
                raise LarkError(f"duplicate (problem_id, candidate_id) = {key}",
                                where=self.recent[key])
            # one linear merge (np.insert), not a re-sort of everything seen
            order = np.argsort(new)
            self.sorted = np.insert(self.sorted, at[order], new[order])
        self.recent = {}


def iter_pool(source, options: PoolOptions | None = None, *, check_duplicates: bool = True,
              counts: FilterCounts | None = None) -> Iterator[Record]:
    """Yield the pool's trajectories that pass the filters (their drops go to ``counts``);
    anything malformed is one LarkError naming the file and line or row."""
    options = options or PoolOptions()
    counts = counts if counts is not None else FilterCounts()
    src, layout, rows, strict = open_pool(source, options)
    if layout.kind == "trajectory":
        items = ((rec, row, None) for rec, row in trajectory_records(rows, layout, strict))
    else:
        items = problem_records(rows, layout)
    seen = SeenKeys()
    contaminated: dict[int, bool] = {}
    verdict = layout.column("correct")
    for rec, row, k in items:
        if check_duplicates:
            seen.add(rec.key, rec.where)
        if options.filters and not _keep(rec, row, k, layout, options, counts, contaminated):
            continue
        if verdict is not None:
            value = _value(rec, row, verdict, k, layout) if verdict in row else None
            if value is not None and not isinstance(value, bool):
                raise LarkError(f"column {verdict!r} must be true/false, got {value!r}",
                                where=rec.where)
            rec = dataclasses.replace(rec, correct=math.nan if value is None else float(value))
        yield rec
    if check_duplicates:
        seen.finish()


def _keep(rec: Record, row: dict, k: int | None, layout: Layout, options: PoolOptions,
          counts: FilterCounts, contaminated: dict[int, bool]) -> bool:
    """Whether the trajectory passes every filter (``k``: its index in a problem row's
    generations, whose parallel lists hold its values); counts the first filter that drops
    it."""
    for col in options.require:
        if col not in row:
            raise LarkError(f"missing column {col!r} (--require)", where=rec.where)
        if not flag(_value(rec, row, col, k, layout), rec.where, col):
            counts.required[col] = counts.required.get(col, 0) + 1
            return False
    if options.complete and not _complete(rec, row, k, layout):
        counts.incomplete += 1
        return False
    if options.exclude is not None:
        hit = contaminated.get(rec.problem_id)
        if hit is None:
            text = next((m["content"] for m in rec.messages if m["role"] == "user"), "")
            hit = contaminated[rec.problem_id] = options.exclude.matches(text)
            counts.contaminated_problems += hit
        if hit:
            counts.contaminated_trajectories += 1
            return False
    return True


def _value(rec: Record, row: dict, col: str, k: int | None, layout: Layout):
    """The trajectory's value in ``col``: the row's, or for generation ``k`` of a problem
    row, item k of a list parallel to the generations (checked to be parallel)."""
    value = row[col]
    if k is not None and isinstance(value, list):
        gens = layout.column("generations")
        value = check_parallel(row, col, len(row[gens]), gens, rec.where)[k]
    return value


def _complete(rec: Record, row: dict, k: int | None, layout: Layout) -> bool:
    """Finish reason "stop" where the pool records one, else a closed \\boxed{} at the end."""
    for col in FINISH_COLUMNS:
        if col in row and row[col] is not None:
            return _value(rec, row, col, k, layout) == "stop"
    last = next((m["content"] for m in reversed(rec.messages) if m["role"] == "assistant"), "")
    return has_closed_boxed(last)


def add_pool_arguments(p, *, filters: bool) -> None:
    """The pool-reading flags of a command (``filters``: also --require and --complete;
    --exclude-benchmark and --max-tokens belong to ``score``, which knows benchmarks and
    tokens)."""
    p.add_argument("--columns", default=None, metavar="KEY=COLUMN,...",
                   help="pool column names other than the defaults: keys messages, "
                        "conversations, problem_id, candidate_id, teacher, problem, "
                        "generations, teachers")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="one trajectory a row, or one problem a row with a list of "
                        "generations (auto: told from the columns)")
    p.add_argument("--split", default="train",
                   help="split of a saved DatasetDict or a Hub dataset (default train)")
    if filters:
        p.add_argument("--require", action="append", default=[], metavar="COLUMN",
                       help="keep only trajectories whose boolean COLUMN is true (a per-row "
                            "value or a list parallel to the generations); repeatable")
        p.add_argument("--complete", action="store_true",
                       help="keep only finished trajectories: finish reason 'stop' where the "
                            "pool has one, else a closed \\boxed{} in the answer")


def pool_options(args, exclude: Decontaminator | None = None,
                 exclude_names: tuple[str, ...] = ()) -> PoolOptions:
    """PoolOptions from the flags of :func:`add_pool_arguments`."""
    return PoolOptions(columns=parse_columns(args.columns), layout=args.layout,
                       split=args.split, require=tuple(getattr(args, "require", ())),
                       complete=getattr(args, "complete", False), exclude=exclude,
                       exclude_names=exclude_names)


def pool_size(source, options: PoolOptions | None = None) -> int | None:
    """Trajectories in the pool before filters, for a progress bar; None where counting
    would mean parsing every row (one problem a row in JSON lines) or the pool is bad
    (the reader then reports it)."""
    options = options or PoolOptions()
    try:
        src, layout, rows, _ = open_pool(source, options)
    except LarkError:
        return None
    gens = layout.column("generations") if layout.kind == "problem" else None
    if src.kind in ("jsonl", "json"):
        if gens:
            return None
        if src.kind == "json":
            return sum(1 for _ in iter_rows(src))
        return sum(1 for path in src.files for ln in open(path, "rb") if ln.strip())
    return sum(arrow_lengths(src, gens))


def read_pool(source, options: PoolOptions | None = None) -> list[Record]:
    return list(iter_pool(source, options))


__all__ = ["PoolOptions", "add_pool_arguments", "iter_pool", "open_pool", "pool_options",
           "pool_size", "read_pool"]
