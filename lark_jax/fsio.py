"""Output files: atomic writes, appends that survive a crash, and no writing through links.

Every output lark-jax writes goes through here, so three promises hold everywhere:

* a finished file is complete or absent: it is written to a fresh temporary file in
  the same directory (``mkstemp``: created exclusively, never an existing path),
  flushed to disk and renamed over the target;
* an append-only log (score sidecar, generations, training metrics) is opened with
  ``O_NOFOLLOW``, and a torn last line left by a crash is cut before appending;
* an output path that is a symbolic link is refused rather than followed, so a
  planted link cannot redirect a write into another directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from lark_jax.errors import LarkError


def refuse_link(path: str | Path) -> Path:
    """``path`` as a Path; a LarkError if it is a symbolic link (dangling or not)."""
    path = Path(path)
    if path.is_symlink():
        raise LarkError("refusing to write through a symbolic link", where=str(path))
    return path


def make_dir(path: str | Path) -> Path:
    """Create the output directory ``path`` (and parents); refuse it if it is a link."""
    path = refuse_link(path)
    if path.exists() and not path.is_dir():
        raise LarkError("output directory is an existing file", where=str(path))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


# Read once; also used for directories made with mkdtemp (0700) that become outputs.
UMASK = _read_umask()


@contextlib.contextmanager
def atomic_file(path: str | Path, binary: bool = False):
    """A file object whose contents replace ``path`` only when the block finishes.

    Temp file in the same directory (created exclusively), fsync, rename; on any
    error the temp file is removed and ``path`` is untouched.
    """
    path = refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the usual
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` all at once (see ``atomic_file``)."""
    with atomic_file(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


def atomic_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if path.is_symlink():
            raise LarkError("refusing to write through a symbolic link", where=str(path)) from None
        raise LarkError(f"cannot open for writing: {e.strerror}", where=str(path)) from None


def open_append(path: str | Path):
    """A text file opened for appending (created if absent), never through a link."""
    path = refuse_link(path)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def complete_lines(path: str | Path) -> bytes:
    """The file's bytes up to its last newline; a torn final line is cut off the file.

    A crash mid-append leaves at most one partial line; appends must start on a
    fresh line, so it is removed before the log is reopened for appending.
    """
    path = refuse_link(path)
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        fd = _open_nofollow(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, keep)
        finally:
            os.close(fd)
    return data[:keep]


def write_parquet(f, rows, table_of, batch_rows: int) -> None:
    """Rows to the parquet file object ``f`` in row groups of ``batch_rows``, never all at
    once. ``table_of(batch, schema)`` makes a group's Arrow table: ``schema`` is None for
    the first group, whose schema the file keeps, and the file's schema after. No rows:
    one empty group from ``table_of([], None)``."""
    import pyarrow.parquet as pq

    writer, batch = None, []

    def flush():
        nonlocal writer
        table = table_of(batch, None if writer is None else writer.schema)
        if writer is None:
            writer = pq.ParquetWriter(f, table.schema)
        writer.write_table(table)
        batch.clear()

    try:
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_rows:
                flush()
        if batch or writer is None:
            flush()
    finally:
        if writer is not None:
            writer.close()
