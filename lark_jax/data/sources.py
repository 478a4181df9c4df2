"""Where pools live: JSONL/JSON, parquet files and shard directories, ``datasets``
``save_to_disk`` directories and Hugging Face Hub datasets, read as a stream of rows.

A source is named by one string:

- ``pool.jsonl`` / ``pool.json`` — one JSON object a line (a ``.json`` file may also be
  one JSON array);
- ``pool.parquet``, or a directory of ``*.parquet`` shards (read in sorted order);
- a directory written by ``datasets.Dataset.save_to_disk`` (Arrow stream files listed in
  its ``state.json``), or by ``DatasetDict.save_to_disk`` (one folder a split: ``split``
  picks it);
- ``hf://datasets/ORG/NAME[/CONFIG][@REV]`` — a Hub dataset's parquet or JSONL files,
  resolved by ``huggingface_hub`` through its cache (``HF_HOME``, ``HF_HUB_CACHE``;
  ``HF_HUB_OFFLINE=1`` reads the cache alone). Only data files are fetched; no dataset
  script or remote code is ever run.

Rows are dicts of column values. Every row carries ``where`` (``file:line`` for JSON
lines, ``file:row N`` for Arrow data, N counted from 0 within the file) for error
messages. Nothing holds the whole source: Arrow data is read a record batch at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from lark_jax.data.pool import iter_jsonl
from lark_jax.errors import LarkError, json_msg
from lark_jax.hub import snapshot

HUB_PREFIX = "hf://datasets/"
_HUB = re.compile(r"^hf://datasets/(?P<repo>[^/@\s]+/[^/@\s]+)(?:/(?P<config>[^@\s]+))?"
                  r"(?:@(?P<rev>\S+))?$")
ARROW_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved pool source: its files (in reading order) and how to read them."""

    spec: str  # what the user named
    kind: str  # "jsonl" | "json" | "parquet" | "arrow"
    files: tuple[Path, ...]
    name: str  # the dataset's name (the default teacher of a layout without one)

    def __str__(self) -> str:
        return self.spec


def resolve(spec: str | os.PathLike, split: str = "train") -> Source:
    """The files of the source ``spec`` names; one LarkError if there are none."""
    if isinstance(spec, Source):
        return spec
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX):
        return _resolve_hub(text, split)
    path = Path(text)
    if path.is_dir():
        return _resolve_dir(path, split, text)
    if not path.is_file():
        raise LarkError("pool not found", where=text)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return Source(text, "parquet", (path,), path.stem)
    if suffix == ".arrow":
        return Source(text, "arrow", (path,), path.stem)
    if suffix == ".json" and _starts_with(path, b"["):
        return Source(text, "json", (path,), path.stem)
    return Source(text, "jsonl", (path,), path.stem)


def _starts_with(path: Path, char: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1] == char


def _resolve_dir(path: Path, split: str, text: str) -> Source:
    if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: a folder a split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise LarkError(f"no split {split!r} in this saved DatasetDict (splits: "
                            f"{', '.join(splits) or 'none'}); choose one with --split",
                            where=text)
        return _resolve_dir(path / split, split, text)
    if (path / "state.json").is_file():  # Dataset.save_to_disk
        try:
            names = [d["filename"] for d in json.loads((path / "state.json").read_text())
                     ["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise LarkError("state.json does not list the dataset's data files (_data_files)",
                            where=str(path / "state.json")) from None
        return Source(text, "arrow", tuple(path / n for n in names), path.name)
    shards = tuple(sorted(path.rglob("*.parquet")))
    if shards:
        return Source(text, "parquet", shards, path.name)
    jsonl = tuple(sorted(path.rglob("*.jsonl")))
    if jsonl:
        return Source(text, "jsonl", jsonl, path.name)
    raise LarkError("directory holds no pool: no *.parquet or *.jsonl files, and it is not a "
                    "datasets save_to_disk directory (state.json / dataset_dict.json)",
                    where=text)


def _resolve_hub(text: str, split: str) -> Source:
    m = _HUB.match(text)
    if not m:
        raise LarkError("a Hub dataset is named hf://datasets/ORG/NAME[/CONFIG][@REVISION]",
                        where=text)
    repo, config, rev = m["repo"], m["config"], m["rev"]
    patterns = ["*.parquet", "*.jsonl", "**/*.parquet", "**/*.jsonl"]
    if config:
        patterns = [f"{config}/**/*.parquet", f"{config}/**/*.jsonl", f"{config}/*.parquet",
                    f"{config}/*.jsonl"]
    root = snapshot(repo, repo_type="dataset", revision=rev, patterns=patterns, where=text)
    base = root / config if config else root
    files = sorted(p for p in base.rglob("*") if p.suffix in (".parquet", ".jsonl"))
    files = _split_files(files, base, split) or files
    if not files:
        raise LarkError("this Hub dataset has no parquet or JSONL data files"
                        + (f" under {config}/" if config else ""), where=text)
    kinds = {p.suffix for p in files}
    if len(kinds) > 1:
        raise LarkError("this Hub dataset mixes parquet and JSONL files; name a config "
                        "(hf://datasets/ORG/NAME/CONFIG) that holds one kind", where=text)
    kind = "parquet" if ".parquet" in kinds else "jsonl"
    return Source(text, kind, tuple(files), repo.split("/")[1])


def _split_files(files: list[Path], base: Path, split: str) -> list[Path]:
    """The files of one split, by the Hub's naming: a folder named after the split, or a
    file name starting with it (``train-00000-of-00002.parquet``, ``train.jsonl``)."""
    pick = re.compile(rf"^{re.escape(split)}([-_.]|$)")
    return [p for p in files
            if split in p.relative_to(base).parts[:-1] or pick.match(p.name)]


# -- rows ------------------------------------------------------------------------------


def arrow_columns(source: Source) -> list[str]:
    """The column names of a parquet or Arrow source (its first file's schema)."""
    return list(_schema(source.files[0], source.kind).names)


def _schema(path: Path, kind: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return pq.read_schema(path)
        with pa.memory_map(str(path)) as f:
            return pa.ipc.open_stream(f).schema
    except (OSError, pa.ArrowInvalid) as e:
        raise LarkError(f"cannot read as {kind} ({str(e).splitlines()[0]})",
                        where=str(path)) from None


def check_schemas(source: Source) -> None:
    """Shards of one source must agree on their columns and types (a mixed directory is
    one error naming the two shards and the first column that differs)."""
    if source.kind not in ("parquet", "arrow") or len(source.files) < 2:
        return
    first = _schema(source.files[0], source.kind)
    for path in source.files[1:]:
        other = _schema(path, source.kind)
        if other.equals(first, check_metadata=False):
            continue
        names = set(first.names) | set(other.names)
        diff = sorted(n for n in names if n not in first.names or n not in other.names
                      or first.field(n).type != other.field(n).type)
        col = diff[0] if diff else "(column order)"
        def typ(s, n):
            return str(s.field(n).type) if n in s.names else "absent"
        raise LarkError(f"shards have different schemas: column {col!r} is {typ(first, col)} "
                        f"in {source.files[0].name} but {typ(other, col)} here "
                        f"({len(diff)} column(s) differ)", where=str(path))


def iter_rows(source: Source, *, process: int = 0, n_processes: int = 1
              ) -> Iterator[tuple[str, object]]:
    """(where, row) of every row, in order. With ``n_processes`` > 1 a parquet source is
    split by row group (group g goes to process g mod n), so each process reads only its
    own share; other sources are not split here (the caller deals rows)."""
    if source.kind == "jsonl":
        for path in source.files:
            yield from _jsonl_rows(path)
    elif source.kind == "json":
        yield from _json_array_rows(source.files[0])
    elif source.kind == "parquet":
        for path in source.files:
            yield from _parquet_rows(path, process, n_processes)
    else:
        for path in source.files:
            yield from _arrow_rows(path)


def arrow_lengths(source: Source, list_column: str | None = None) -> Iterator[int]:
    """Rows of each record batch of a parquet/Arrow source, or with ``list_column`` the
    total length of that list column in it (read alone, never the other columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in source.files:
        if source.kind == "parquet" and list_column is None:
            yield pq.ParquetFile(path).metadata.num_rows
            continue
        if source.kind == "parquet":
            batches = pq.ParquetFile(path).iter_batches(columns=[list_column])
        else:
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
        for b in batches:
            if list_column is None:
                yield b.num_rows
            else:
                col = b.column(b.schema.get_field_index(list_column))
                yield int(pc.sum(pc.list_value_length(col)).as_py() or 0)


def split_by_row_group(source: Source) -> bool:
    """Whether ``iter_rows`` gives each process its own share of this source."""
    return source.kind == "parquet"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for where, _lineno, obj in iter_jsonl(path, "pool file"):
        yield where, obj


def _json_array_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = (f"malformed JSON ({json_msg(e)} at line {e.lineno})"
               if isinstance(e, json.JSONDecodeError) else "not valid UTF-8")
        raise LarkError(msg, where=str(path)) from None
    for i, row in enumerate(rows):
        yield f"{path}:[{i}]", row


def _parquet_rows(path: Path, process: int, n_processes: int) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        starts = [0]
        for g in range(f.num_row_groups):
            starts.append(starts[-1] + f.metadata.row_group(g).num_rows)
        for g in range(process, f.num_row_groups, n_processes):
            yield from _batch_rows(path, starts[g], f.iter_batches(
                batch_size=ARROW_BATCH_ROWS, row_groups=[g]))
    except (OSError, pa.ArrowInvalid) as e:
        raise LarkError(f"cannot read as parquet ({str(e).splitlines()[0]})",
                        where=str(path)) from None


def _batch_rows(path: Path, first: int, batches) -> Iterator[tuple[str, object]]:
    """(where, row) of Arrow record batches whose first row is row ``first`` of the file."""
    row = first
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{path}:row {row}", obj
            row += 1


def _arrow_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as mm:
            yield from _batch_rows(path, 0, pa.ipc.open_stream(mm))
    except (OSError, pa.ArrowInvalid) as e:
        raise LarkError(f"cannot read as an Arrow stream ({str(e).splitlines()[0]})",
                        where=str(path)) from None


__all__ = ["HUB_PREFIX", "Source", "arrow_lengths", "arrow_columns", "check_schemas",
           "iter_rows", "resolve", "split_by_row_group"]
