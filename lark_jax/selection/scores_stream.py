"""Reading a scores file one problem at a time, never whole.

Two formats, both written by ``lark-jax score``:

* the reference's JSON document, ``{..., "scores": {"<problem_id>": [row, ...], ...}}``
  (one line or indented; NaN/Infinity literals allowed). :class:`JsonMembers` walks it with
  ``json.JSONDecoder.raw_decode`` over a sliding window of the text, so memory holds one
  problem's rows and a window, whatever the file's size;
* parquet, one candidate a row (``score --out scores.parquet``): columns ``problem_id``,
  ``candidate_id``, ``teacher``, ``pool_line``, the statistics, and the JSON header's other
  fields in the file's key-value metadata under ``lark_jax.scores_header``.

:func:`iter_score_problems` yields ``(problem key, rows, entry)`` from either; ``entry``
numbers the places a problem is listed (a JSON key; a parquet row batch), so that a caller
can tell a problem listed twice in JSON from one split across parquet batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lark_jax.errors import LarkError, json_msg

HEADER_KEY = b"lark_jax.scores_header"
CHUNK_CHARS = 1 << 20
_WS = " \t\n\r"


class JsonMembers:
    """The members of a JSON object, read piece by piece from a text file.

    ``value()`` decodes the next JSON value at the cursor; when it may run past the window
    (an error near the window's end, or a value ending exactly there: a number could go
    on) the window grows by a chunk and the decode is retried. Consumed text is dropped,
    keeping only counts for error positions (line and column in the whole file).
    """

    def __init__(self, f, where: str):
        self.f, self.where = f, where
        self.buf, self.pos, self.eof = "", 0, False
        self.dropped = 0  # characters dropped before buf
        self.lines = 0  # newlines in the dropped text
        self.last_nl = -1  # absolute offset of the dropped text's last newline
        self.dec = json.JSONDecoder()

    def _fill(self) -> bool:
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:  # drop what is consumed
            head = self.buf[:self.pos]
            nl = head.rfind("\n")
            if nl >= 0:
                self.lines += head.count("\n")
                self.last_nl = self.dropped + nl
            self.dropped += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.f.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def error(self, msg: str, at: int | None = None) -> LarkError:
        at = self.pos if at is None else at
        nl = self.buf.rfind("\n", 0, at)
        line = self.lines + self.buf.count("\n", 0, at) + 1
        col = at - nl if nl >= 0 else self.dropped + at - self.last_nl
        return LarkError(f"malformed JSON ({msg} at line {line} column {col})",
                         where=self.where)

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            what = " or ".join(repr(x) for x in chars)
            raise self.error(f"Expecting {what}" if c else "Expecting value")
        self.pos += 1
        return c

    def value(self):
        self.peek()
        while True:
            try:
                obj, end = self.dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                near_end = e.pos >= len(self.buf) - 64 or e.msg.startswith("Unterminated")
                if near_end and self._fill():
                    continue
                raise self.error(json_msg(e), e.pos) from None
            if end >= len(self.buf) and self._fill():
                continue  # a number or literal may go on in the next chunk
            self.pos = end
            return obj

    def keys(self) -> Iterator[str]:
        """The keys of the object at the cursor; after each, the cursor is at its value,
        which the caller must consume before asking for the next key."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self.error("Expecting property name enclosed in double quotes")
            key = self.value()
            self.expect(":")
            yield key
            if self.expect(",}") == "}":
                return


def read_json_scores(path: Path, header: dict) -> Iterator[tuple[object, object, int]]:
    """Problems of a scores JSON: ``(key, rows, entry)``; the other top-level fields go
    into ``header`` as they are met (the reference writes "scores" last)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = JsonMembers(f, str(path))
            if doc.peek() != "{":
                if not doc.peek():
                    raise doc.error("Expecting value")
                got = doc.value()
                raise LarkError(f"expected a JSON object, got {type(got).__name__}",
                                where=str(path))
            seen_scores = False
            for key in doc.keys():
                if key != "scores":
                    header[key] = doc.value()
                    continue
                if seen_scores:
                    raise LarkError("field 'scores' given twice", where=str(path))
                seen_scores = True
                if doc.peek() != "{":
                    raise LarkError("'scores' must be an object mapping problem ids to lists",
                                    where=str(path))
                for entry, pid in enumerate(doc.keys()):
                    yield pid, doc.value(), entry
            if doc.peek():
                raise doc.error("Extra data")
    except UnicodeDecodeError as e:
        raise LarkError(f"cannot read scores ({e})", where=str(path)) from None
    except OSError as e:
        raise LarkError(f"cannot read scores ({e})", where=str(path)) from None
    if not seen_scores:
        raise LarkError("missing field 'scores'", where=str(path))


def read_parquet_scores(path: Path, header: dict, batch_rows: int = 65_536
                        ) -> Iterator[tuple[object, object, int]]:
    """Problems of a parquet scores file, one row batch at a time: ``(problem_id, rows,
    batch number)``; a problem may come back in more than one batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LarkError(f"cannot read parquet scores ({e})", where=str(path)) from None
    meta = pf.schema_arrow.metadata or {}
    if HEADER_KEY in meta:
        try:
            header.update(json.loads(meta[HEADER_KEY]))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            raise LarkError("unreadable scores header in the parquet metadata",
                            where=str(path)) from None
    names = pf.schema_arrow.names
    for col in ("problem_id", "candidate_id"):
        if col not in names:
            raise LarkError(f"missing column {col!r} (found: {', '.join(names)})",
                            where=str(path))
    try:
        for entry, batch in enumerate(pf.iter_batches(batch_size=batch_rows)):
            groups: dict = {}
            for row in batch.to_pylist():
                groups.setdefault(row.pop("problem_id"), []).append(row)
            for pid, rows in groups.items():
                if pid is None:
                    raise LarkError("null problem_id", where=f"{path} (batch {entry})")
                yield pid, rows, entry
    except pa.ArrowException as e:
        raise LarkError(f"cannot read parquet scores ({e})", where=str(path)) from None


def iter_score_problems(path, header: dict) -> Iterator[tuple[object, object, int]]:
    """``(problem key, rows, entry)`` of a scores file, JSON or parquet (by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise LarkError("scores file not found", where=str(path))
    if path.suffix.lower() == ".parquet":
        return read_parquet_scores(path, header)
    return read_json_scores(path, header)
