"""Pool layouts: rows of any source (``data.sources``) as trajectories (``pool.Record``).

Two layouts, told apart by their columns with no flag:

- **one trajectory a row**: ``messages`` (``[{role, content}]``) or ShareGPT
  ``conversations`` (``[{from: human|gpt|system, value}]``); the problem is ``problem_id``
  (else ``id``, else ``uuid``; with none of them, the text of the first user turn), the
  candidate ``candidate_id`` (else its order within its problem), the teacher ``teacher``
  (else ``model``, else the dataset's name). The reference's JSONL is this layout.
- **one problem a row**: the problem text (``problem``, else ``question``, else
  ``prompt``) and a list of trajectories (``generations``, else ``responses``, else
  ``completions``); teachers from a parallel ``teachers`` list or a scalar ``teacher`` /
  ``model`` column, else the dataset's name; candidate_id = the index in the list. Each
  trajectory becomes the messages [user: problem, assistant: generation].

``columns`` maps a key above to another column name (``--columns generations=outputs``).
Problem ids that are not integers (uuids, texts) are numbered 0, 1, ... in order of first
appearance; the original id is kept as ``Record.source_id``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from lark_jax.data.pool import Record, validate_record
from lark_jax.errors import LarkError

KEYS = ("messages", "conversations", "problem_id", "candidate_id", "teacher", "problem",
        "generations", "teachers", "correct")
# Column names each key is looked up under, in order (the first present wins).
DEFAULT_NAMES = {
    "messages": ("messages",), "conversations": ("conversations",),
    "problem_id": ("problem_id", "id", "uuid"), "candidate_id": ("candidate_id",),
    "teacher": ("teacher", "model"), "problem": ("problem", "question", "prompt"),
    "generations": ("generations", "responses", "completions"), "teachers": ("teachers",),
    # a verifier's verdict, per row or parallel to the generations: scores carry it as
    # "correct" (1/0), for select --policy verified
    "correct": ("correct", "is_correct", "correctness", "correctness_math_verify"),
}
LAYOUTS = ("auto", "trajectory", "problem")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system"}


def parse_columns(text: str | None) -> dict[str, str]:
    """``KEY=COLUMN,...`` (``--columns``) as a dict; keys are those of the layouts."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or not key or not col:
            raise LarkError(f"--columns takes KEY=COLUMN pairs separated by commas, got {part!r}")
        if key not in KEYS:
            raise LarkError(f"--columns: unknown key {key!r} (keys: {', '.join(KEYS)})")
        out[key] = col
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which layout a source has and which column holds each key (None: absent)."""

    kind: str  # "trajectory" | "problem"
    cols: dict  # key -> column name or None
    name: str  # the dataset's name: the teacher when no column gives one

    def column(self, key: str) -> str | None:
        return self.cols.get(key)


def detect(found: list[str], columns: dict[str, str], layout: str, name: str,
           where: str) -> Layout:
    """The layout of a source whose columns are ``found``; one LarkError naming the columns
    and the flag that settles it when it cannot be told."""
    if layout not in LAYOUTS:
        raise LarkError(f"--layout must be one of {', '.join(LAYOUTS)}")
    present = set(found)
    cols = {}
    for key in KEYS:
        if key in columns:
            if columns[key] not in present:
                raise LarkError(f"--columns {key}={columns[key]}: no such column (columns: "
                                f"{', '.join(found)})", where=where)
            cols[key] = columns[key]
        else:
            cols[key] = next((c for c in DEFAULT_NAMES[key] if c in present), None)
    traj = cols["messages"] or cols["conversations"]
    prob = cols["problem"] and cols["generations"]
    if layout == "auto":
        if traj and prob:
            raise LarkError(f"cannot tell the pool's layout: columns {', '.join(found)} fit "
                            "both one trajectory a row (messages/conversations) and one "
                            "problem a row (problem + generations); pass --layout trajectory "
                            "or --layout problem", where=where)
        if not traj and not prob:
            raise LarkError(f"cannot tell the pool's layout from its columns ({', '.join(found)}"
                            "): expected messages or conversations (one trajectory a row), or "
                            "problem/question/prompt with generations/responses/completions "
                            "(one problem a row); name yours with --columns, e.g. --columns "
                            "problem=COLUMN,generations=COLUMN", where=where)
        layout = "trajectory" if traj else "problem"
    if layout == "trajectory" and not traj:
        raise LarkError(f"no messages or conversations column (columns: {', '.join(found)}); "
                        "name it with --columns messages=COLUMN", where=where)
    if layout == "problem" and not prob:
        need = "problem" if not cols["problem"] else "generations"
        raise LarkError(f"missing column {need!r} for one problem a row (columns: "
                        f"{', '.join(found)}); name it with --columns {need}=COLUMN",
                        where=where)
    return Layout(layout, cols, name)


class Numbering:
    """Integer problem ids: integers stay; anything else is numbered by first appearance."""

    def __init__(self):
        self.ids: dict = {}

    def __call__(self, value, where: str, column: str) -> tuple[int, str | None]:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if not isinstance(value, str) or not value:
            raise LarkError(f"column {column!r} must be an integer or a non-empty string, got "
                            f"{value!r}", where=where)
        return self.ids.setdefault(value, len(self.ids)), value


def _field(row: dict, col: str | None, where: str):
    """The row's value in ``col`` (None when the layout has no such column)."""
    if col is None:
        return None
    if col not in row:
        raise LarkError(f"missing column {col!r}", where=where)
    return row[col]


def trajectory_records(rows, layout: Layout, strict: bool = False
                       ) -> Iterator[tuple[Record, dict]]:
    """One Record per row of the one-trajectory-a-row layout, with its row. ``strict``:
    rows in the reference's JSONL format, validated as the reference's (integer ids)."""
    c = layout.column
    number, candidates = Numbering(), {}
    for ordinal, (where, row) in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise LarkError(f"expected a JSON object, got {type(row).__name__}", where=where)
        if strict:
            # The reference's own layout: its validation and messages, word for word.
            pid, cid, teacher, msgs = validate_record(row, where)
            yield Record(pid, cid, teacher, msgs, ordinal, where=where), row
            continue
        msgs = _messages(row, layout, where)
        if c("problem_id") is not None:
            pid, source = number(_field(row, c("problem_id"), where), where, c("problem_id"))
        else:  # no id column: the first user turn is the problem
            first = next((m["content"] for m in msgs if m["role"] == "user"), "")
            pid, source = number(first, where, "first user turn")
            source = None
        if c("candidate_id") is not None:
            cid = _field(row, c("candidate_id"), where)
            if not isinstance(cid, int) or isinstance(cid, bool):
                raise LarkError(f"column {c('candidate_id')!r} must be an integer, got {cid!r}",
                                where=where)
        else:
            cid = candidates.get(pid, 0)
        candidates[pid] = max(candidates.get(pid, 0), cid + 1)
        teacher = _teacher(row, c("teacher"), layout.name, where)
        yield Record(pid, cid, teacher, msgs, ordinal, source_id=source, where=where), row


def _teacher(row: dict, col: str | None, default: str, where: str) -> str:
    if col is None:
        return default
    t = _field(row, col, where)
    if not isinstance(t, str):
        raise LarkError(f"column {col!r} must be a string, got {t!r}", where=where)
    return t


def _messages(row: dict, layout: Layout, where: str) -> tuple[dict, ...]:
    if layout.column("messages") is not None:
        obj = {"problem_id": 0, "candidate_id": 0,
               "messages": _field(row, layout.column("messages"), where)}
        return validate_record(obj, where)[3]
    conv = _field(row, layout.column("conversations"), where)
    col = layout.column("conversations")
    if not isinstance(conv, list) or not conv:
        raise LarkError(f"column {col!r} must be a non-empty list of turns", where=where)
    msgs = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise LarkError(f"{col}[{i}] must be an object with 'from' and 'value'", where=where)
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise LarkError(f"{col}[{i}].from must be one of human, gpt, system, got "
                            f"{turn['from']!r}", where=where)
        msgs.append({"role": role, "content": turn["value"]})
    return validate_record({"problem_id": 0, "candidate_id": 0, "messages": msgs}, where)[3]


def problem_records(rows, layout: Layout) -> Iterator[tuple[Record, dict, int]]:
    """One Record per generation of each row of the one-problem-a-row layout, with its row
    and the generation's index (for parallel list columns)."""
    c = layout.column
    number = Numbering()
    ordinal = 0
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise LarkError(f"expected an object, got {type(row).__name__}", where=where)
        problem = _field(row, c("problem"), where)
        if not isinstance(problem, str) or not problem.strip():
            raise LarkError(f"column {c('problem')!r} must be a non-empty string", where=where)
        gens = _field(row, c("generations"), where)
        if not isinstance(gens, list):
            raise LarkError(f"column {c('generations')!r} must be a list, got "
                            f"{type(gens).__name__}", where=where)
        teachers = _field(row, c("teachers"), where)
        if teachers is not None:
            check_parallel(row, c("teachers"), len(gens), c("generations"), where)
        if c("problem_id") is not None:
            pid, source = number(_field(row, c("problem_id"), where), where, c("problem_id"))
        else:
            pid, source = index, None
        scalar_teacher = None if teachers is not None else _teacher(row, c("teacher"),
                                                                    layout.name, where)
        for k, gen in enumerate(gens):
            if not isinstance(gen, str):
                raise LarkError(f"{c('generations')}[{k}] must be a string, got "
                                f"{type(gen).__name__}", where=where)
            if not gen.strip():
                raise LarkError(f"{c('generations')}[{k}] is empty", where=where)
            teacher = scalar_teacher
            if teachers is not None:
                teacher = teachers[k]
                if not isinstance(teacher, str):
                    raise LarkError(f"{c('teachers')}[{k}] must be a string", where=where)
            ordinal += 1
            msgs = ({"role": "user", "content": problem}, {"role": "assistant", "content": gen})
            yield Record(pid, k, teacher, msgs, ordinal, source_id=source, where=where), row, k


def check_parallel(row: dict, col: str, n: int, against: str, where: str) -> list:
    """A list column parallel to the generations: the same length, or one error."""
    value = row.get(col)
    if not isinstance(value, list):
        raise LarkError(f"column {col!r} must be a list parallel to {against!r}, got "
                        f"{type(value).__name__}", where=where)
    if len(value) != n:
        raise LarkError(f"list columns of different lengths: {against!r} has {n} items, "
                        f"{col!r} has {len(value)}", where=where)
    return value


__all__ = ["DEFAULT_NAMES", "KEYS", "LAYOUTS", "Layout", "check_parallel", "detect",
           "parse_columns", "problem_records", "trajectory_records"]
