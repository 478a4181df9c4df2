"""Benchmark files: a JSON list or JSONL of {"prompt" | "problem": str, "answer": str, "level"?}.

Answers may be given as numbers (AIME-style files often store integers); they
are kept as the string JSON shows. Every problem is checked when loaded, and
each complaint names the file and the line (JSONL) or item index (JSON list).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from lark_jax.errors import LarkError, json_msg

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Problem:
    index: int
    prompt: str
    answer: str
    level: str | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    path: str
    sha256: str
    problems: list[Problem]


def _check(obj, where: str, file: str) -> tuple[str, str, str | None]:
    if not isinstance(obj, dict):
        raise LarkError(f"{where}: expected an object, got {type(obj).__name__}", where=file)
    # "problem" wins over "prompt" when a record has both (the reference's rule).
    key = "problem" if "problem" in obj else "prompt" if "prompt" in obj else None
    if key is None:
        raise LarkError(f"{where}: has neither 'problem' nor 'prompt'", where=file)
    prompt = obj[key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise LarkError(f"{where}: '{key}' must be a non-empty string", where=file)
    if "answer" not in obj:
        raise LarkError(f"{where}: missing 'answer'", where=file)
    answer = obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise LarkError(f"{where}: 'answer' must be a string or a number, got "
                        f"{type(answer).__name__}", where=file)
    answer = answer if isinstance(answer, str) else json.dumps(answer)
    if not answer.strip():
        raise LarkError(f"{where}: 'answer' is empty", where=file)
    level = obj.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, str | int)):
        raise LarkError(f"{where}: 'level' must be a string or an integer", where=file)
    return prompt, answer, None if level is None else str(level)


def load_benchmark(path: str | Path) -> Benchmark:
    """Read and validate a benchmark; its name is the file name without extension."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LarkError(f"cannot read benchmark ({e.strerror or e})", where=file) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LarkError("not UTF-8 text", where=file) from None
    if not text.strip():
        raise LarkError("empty benchmark file", where=file)
    items: list[tuple[str, object]] = []
    if text.lstrip().startswith("["):  # one JSON list
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LarkError(f"line {e.lineno} column {e.colno}: malformed JSON ({json_msg(e)})",
                            where=file) from None
        items = [(f"item {i}", obj) for i, obj in enumerate(data)]
    else:
        if len([ln for ln in text.splitlines() if ln.strip()]) > 1:
            try:  # a pretty-printed object is not JSONL: say what is wrong with it
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if whole is not None:
                raise LarkError("expected a JSON list of problems or JSONL (one problem a "
                                f"line), got one multi-line JSON {type(whole).__name__}",
                                where=file)
        # JSONL, one problem a line; blank lines are allowed.
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                items.append((f"line {lineno}", _json_line(line, lineno, file)))
    problems = []
    for i, (where, obj) in enumerate(items):
        prompt, answer, level = _check(obj, where, file)
        problems.append(Problem(i, prompt, answer, level))
    if not problems:
        raise LarkError("the benchmark holds no problems", where=file)
    return Benchmark(name=path.stem, path=file, sha256=hashlib.sha256(raw).hexdigest(),
                     problems=problems)


def _json_line(line: str, lineno: int, file: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise LarkError(f"line {lineno}: malformed JSON ({json_msg(e)} at column {e.colno})",
                        where=file) from None


def chat_prompts(tokenizer, problems: list[Problem],
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """Format each problem with the tokenizer's chat template, ready for the assistant's turn.

    An empty ``system_prompt`` sends the user message alone.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise LarkError("the model's tokenizer has no chat template")
    out = []
    for p in problems:
        messages = [{"role": "user", "content": p.prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors raised by the template itself
            raise LarkError(f"the chat template failed on problem {p.index} ({e})") from None
        out.append(text)
    return out
