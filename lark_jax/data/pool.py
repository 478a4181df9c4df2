"""Trajectory records and the reference's JSONL format (``data.reader`` reads every format).

One record a line::

    {"problem_id": int, "candidate_id": int, "teacher": str,
     "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Every problem is reported as one ``LarkError`` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from lark_jax.errors import LarkError, json_msg

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Record:
    problem_id: int
    candidate_id: int
    teacher: str
    messages: tuple[dict, ...]
    line: int  # 1-based: the line of a JSONL pool, the trajectory's ordinal in other sources
    source_id: str | None = None  # the pool's own problem id when it is not an integer
    where: str = ""  # file:line or file:row N, for messages
    # the pool's verifier verdict where it has a column for one (layouts "correct"): 1.0
    # or 0.0, NaN for an empty cell; None when there is no such column
    correct: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.problem_id, self.candidate_id)


def pack_keys(pids, cids):
    """(problem_id, candidate_id) pairs as 16-byte items whose byte order is the numeric
    order (each int64 big-endian with its sign bit flipped), so that np.sort,
    np.searchsorted and np.isin work on whole pairs."""
    import numpy as np  # here, not at import: the CLI's parser imports this module

    flip = np.int64(-(2 ** 63))
    both = np.stack([np.asarray(pids, np.int64) ^ flip, np.asarray(cids, np.int64) ^ flip], 1)
    return np.ascontiguousarray(both.astype(">i8")).view(np.dtype((np.void, 16))).ravel()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_record(obj, where: str) -> tuple[int, int, str, tuple[dict, ...]]:
    """Check one decoded JSON value; returns its fields or raises LarkError(where=...)."""
    if not isinstance(obj, dict):
        raise LarkError(f"expected a JSON object, got {type(obj).__name__}", where=where)
    for field in ("problem_id", "candidate_id", "messages"):
        if field not in obj:
            raise LarkError(f"missing field {field!r}", where=where)
    pid, cid = obj["problem_id"], obj["candidate_id"]
    for name, val in (("problem_id", pid), ("candidate_id", cid)):
        if not _is_int(val):
            raise LarkError(f"field {name!r} must be an integer, got {val!r}", where=where)
    teacher = obj.get("teacher", "")
    if not isinstance(teacher, str):
        raise LarkError(f"field 'teacher' must be a string, got {teacher!r}", where=where)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LarkError("field 'messages' must be a non-empty list", where=where)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LarkError(f"messages[{i}] must be an object", where=where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LarkError(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                            f"got {role!r}", where=where)
        if not isinstance(content, str):
            raise LarkError(f"messages[{i}].content must be a string", where=where)
        out.append({"role": role, "content": content})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise LarkError("no assistant message", where=where)
    if not any(m["content"].strip() for m in assistant):
        raise LarkError("empty assistant content", where=where)
    return pid, cid, teacher, tuple(out)


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[str, int, object]]:
    """Yield (where, line number, decoded value) of each non-blank line.

    Bytes are read raw so that invalid UTF-8 is reported with its line rather
    than failing the whole read.
    """
    path = Path(path)
    if not path.is_file():
        raise LarkError(f"{what} not found", where=str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LarkError(f"not valid UTF-8 (byte {e.start})", where=where) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise LarkError(f"malformed JSON ({json_msg(e)} at column {e.colno})",
                                where=where) from None
            yield where, lineno, obj
