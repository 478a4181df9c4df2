"""Final-answer extraction and math-aware answer equivalence.

``extract_answer`` follows the paper's rule (docs/method.md, step 5): drop the
``<think>...</think>`` reasoning, take the first ``\\boxed{...}`` (nested braces
handled), and fall back to the last number of the visible text.

``is_equivalent(pred, gold)`` is true when either

1. the two answers agree after a textual normalisation (``normalize_answer``:
   strip, lowercase, drop ``$``, ``\\text{}``, ``\\left``/``\\right``, LaTeX
   spaces, degrees, percent, trailing units, thousands separators, ...), or
   they denote the same rational number exactly (0.50 == .5 == 1/2 ==
   ``\\frac{1}{2}``); or
2. ``math_verify`` (SymPy-based) parses both and finds them equal.

math_verify's own timeouts rely on ``signal.alarm``, which only works in the
main thread and cannot interrupt long C-level arithmetic anyway (``9^{9^{9}}``
is parsed unevaluated in milliseconds but hangs ``verify`` while CPython
multiplies a 370-million-digit integer). So we disable its timeouts and guard
it ourselves: a length cap, a size estimate of every parsed expression that
refuses astronomically large numbers or high symbolic powers, and a catch-all
for its exceptions. Anything refused is judged by the normalisation alone.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from fractions import Fraction

# -- extraction ------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A number as written in prose: optional sign (not a minus between two terms,
# hence the look-behind), thousands groups, decimals, or a simple a/b fraction.
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w])"
    r"|(?<![\w.])-?\.\d+")


def strip_think(text: str) -> str:
    """Remove reasoning blocks, keeping only what the model shows as its answer.

    Complete ``<think>...</think>`` blocks go; a lone ``</think>`` (chat
    templates that open the block inside the prompt) drops everything before
    it; a lone ``<think>`` (output cut off mid-reasoning) drops everything after.
    """
    text = _THINK_BLOCK.sub(" ", text)
    low = text.lower()
    close = low.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
        low = text.lower()
    opened = low.find("<think>")
    if opened >= 0:
        text = text[:opened]
    return text


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == "{"`` and the index after it.

    Escaped braces (``\\{``, ``\\}``) are content, not structure. ``None`` when
    the group never closes (a truncated generation).
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def box_arguments(text: str):
    """Each ``\\boxed`` / ``\\fbox`` in order as ``(argument, end, braced)``.

    A brace group (nested braces, escaped ones as content) gives its stripped content
    and the index after its closing brace, or ``(None, None, True)`` when it never
    closes; TeX's one-token form (``\\boxed 5``) gives ``(token, None, False)``.
    """
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            yield (None, None, True) if group is None else (group[0].strip(), group[1], True)
        else:
            arg = re.match(r"[^\s$]+", text[i:])
            if arg:
                yield arg.group(0).rstrip(".,;"), None, False


def boxed_answers(text: str) -> list[str]:
    """Every ``\\boxed{...}`` / ``\\fbox{...}`` argument in order (also ``\\boxed 5``)."""
    return [arg for arg, _, _ in box_arguments(text) if arg is not None]


def extract_answer(text: str) -> str:
    """The final answer of a generation; ``""`` when there is none.

    The first non-empty ``\\boxed{...}`` outside ``<think>`` blocks; otherwise
    the last number of that visible text (as written, e.g. ``"-3"``, ``"1,000"``,
    ``"2.5"``, ``"3/4"``).
    """
    visible = strip_think(text)
    for box in boxed_answers(visible):
        if box:
            return box
    numbers = _NUMBER.findall(visible)
    return numbers[-1] if numbers else ""


# -- normalisation ---------------------------------------------------------------------

_TEXT_CMDS = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
# A value (ending in a digit or a closing brace) followed by \text{words} only: units.
_UNIT_TAIL = re.compile(
    rf"^(.*?[\d}}])\s*{_TEXT_CMDS}\{{\s*[A-Za-z][A-Za-z .]*\}}(?:\^\{{?\d\}}?)?$")
_WORD_TAIL = re.compile(rf"^({_NUM}(?:/\d+)?)\s+[a-z]{{2,}}\.?(?:\s+[a-z]+\.?)*(?:\^\d)?$")
_THOUSANDS = re.compile(r"^([-+]?)(\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_FRAC_NUM = re.compile(rf"^([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")


def _unwrap(s: str, cmd: str) -> str:
    """Replace every ``\\cmd{X}`` by ``X`` (braces nested inside X are kept)."""
    pat = re.compile(cmd + r"\s*\{")
    while True:
        m = pat.search(s)
        if not m:
            return s
        group = _braced(s, m.end() - 1)
        if group is None:
            return s
        s = s[:m.start()] + group[0] + s[group[1]:]


def normalize_answer(s: str) -> str:
    """A canonical string for an answer, for the textual part of the equivalence test."""
    s = str(s).strip()
    s = _BOX_CMD.sub("", s) if s.startswith("\\") else s
    if s.startswith("{") and _braced(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1]  # a leftover "{...}" from "\boxed {x}"
    for tok in ("\\displaystyle", "\\left", "\\right", "\\(", "\\)", "\\[", "\\]"):
        s = s.replace(tok, "")
    s = s.replace("\\$", "").replace("$", "")
    # Trailing units first, while a \text{...} still marks them as words.
    m = _UNIT_TAIL.match(s.strip())
    if m:
        s = m.group(1)
    s = _unwrap(s, _TEXT_CMDS)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|\\degree|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", ",")
    for sp in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad"):
        s = s.replace(sp, " " if sp in ("\\ ", "~", "\\quad", "\\qquad") else "")
    s = s.strip().rstrip(".").strip().lower()
    m = _WORD_TAIL.match(s)
    if m:  # "5 cm", "12 dollars": a number followed by words (two letters or more)
        s = m.group(1)
    s = re.sub(r"^[a-z]\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"^\(([a-e])\)$", r"\1", s)  # "(b)" -> "b" (multiple choice)
    # \frac12, \frac1{x}, \frac{x}2, \sqrt2 -> braced forms.
    s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\w)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    m = _THOUSANDS.match(s)
    if m:
        s = m.group(1) + m.group(2).replace(",", "") + (m.group(3) or "")
    return s


def as_number(s: str) -> Fraction | None:
    """The exact rational a normalised answer denotes (integer, decimal, a/b, \\frac), or None."""
    try:
        # At most three exponent digits: Fraction("1e999999999") would build a huge integer.
        if re.fullmatch(rf"{_NUM}(?:e[-+]?\d{{1,3}})?", s):
            return Fraction(s)
        m = re.fullmatch(rf"({_NUM})/({_NUM})", s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = _FRAC_NUM.fullmatch(s)
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


# -- math_verify, guarded --------------------------------------------------------------

# Longer "answers" are runaway generations, not answers; SymPy on them only costs time.
MAX_VERIFY_CHARS = 400
# Largest number (in decimal digits) and symbolic power we let SymPy evaluate or expand.
MAX_DIGITS = 10_000
MAX_SYMBOLIC_POWER = 64


class _DropTimeoutNotice(logging.Filter):
    """math_verify warns once that its timeout is off; we turned it off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def _install_log_filter() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutNotice) for f in logger.filters):
            logger.addFilter(_DropTimeoutNotice())


def _digits(expr) -> float:
    """An upper estimate of log10 |value| of a SymPy expression, inf when too large to evaluate.

    Powers multiply (log b^e = e log b), factorials grow like n log n, sums and
    products stay below the sum of their terms' sizes; symbolic powers above
    ``MAX_SYMBOLIC_POWER`` count as too large because SymPy may expand them.
    """
    import sympy

    if isinstance(expr, sympy.Integer):
        return abs(int(expr)).bit_length() * math.log10(2)
    if isinstance(expr, sympy.Rational):
        return max(_digits(sympy.Integer(expr.p)), _digits(sympy.Integer(expr.q)))
    if isinstance(expr, sympy.Float):
        return math.log10(abs(float(expr)) + 1.0)  # inf (refused) beyond float range
    if isinstance(expr, sympy.Pow):
        exp_size = _digits(expr.exp)
        if exp_size > 6:
            return math.inf
        try:
            e = abs(float(expr.exp.evalf(15))) if expr.exp.is_number else math.inf
        except (TypeError, ValueError):
            e = math.inf
        if not expr.base.is_number:
            return 0.0 if e <= MAX_SYMBOLIC_POWER else math.inf
        return _digits(expr.base) * max(e, 1.0) + 1.0
    if isinstance(expr, sympy.factorial):
        n_size = _digits(expr.args[0])
        if n_size > 5:
            return math.inf
        n = abs(float(expr.args[0].evalf(15))) if expr.args[0].is_number else math.inf
        return n * math.log10(max(n, 2.0)) + 1.0
    total = sum((_digits(a) for a in getattr(expr, "args", ())), 0.0)
    return total + 1.0


def _safe_to_verify(parsed) -> bool:
    import sympy

    try:
        for p in parsed:
            if isinstance(p, sympy.Basic | sympy.MatrixBase) and _digits(p) > MAX_DIGITS:
                return False
    except Exception:  # noqa: BLE001 - an expression we cannot size is one we do not evaluate
        return False
    return True


@functools.lru_cache(maxsize=8192)
def _mv_parse(answer: str) -> tuple:
    """math_verify's parse of one bare answer (wrapped in \\boxed: LaTeX and plain forms parse)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _install_log_filter()
    try:
        return tuple(parse("\\boxed{" + answer + "}",
                           extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                           parsing_timeout=None))
    except Exception:  # noqa: BLE001 - garbage in, "unparseable" out
        return ()


def math_verify_equal(pred: str, gold: str) -> bool:
    """math_verify's verdict, or False when it cannot parse, refuses, raises or would blow up."""
    if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    p, g = _mv_parse(pred), _mv_parse(gold)
    if not p or not g or not (_safe_to_verify(p) and _safe_to_verify(g)):
        return False
    from math_verify import verify

    _install_log_filter()
    try:
        # Gold first: math_verify is asymmetric (assignments and intervals on the gold side).
        return bool(verify(list(g), list(p), timeout_seconds=None))
    except Exception:  # noqa: BLE001
        return False


def is_equivalent(pred: str, gold: str) -> bool:
    """Whether a predicted answer matches the gold one (math-aware; 0.5 == 1/2 == \\frac{1}{2})."""
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a and a == b:
        return True
    na, nb = as_number(a), as_number(b)
    if na is not None and nb is not None and na == nb:
        return True
    return math_verify_equal(pred, gold)


# -- the reference's grader --------------------------------------------------------------

_REF_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reference_extract(text: str) -> str:
    """The reference's extraction: the first ``\\boxed{...}`` of the text (nested braces);
    otherwise the last number after removing a ``<think>...</think>`` block."""
    boxes = boxed_answers(text)
    if boxes:
        return boxes[0]
    numbers = _REF_NUMBER.findall(strip_think(text))
    return numbers[-1] if numbers else ""


def reference_normalize(s: str) -> str:
    """strip, lowercase, drop ``$``, numbers in a canonical form (``2.50`` -> ``2.5``,
    ``3.0`` -> ``3``): our reading of the reference's exact-string normalisation."""
    s = str(s).strip().lower().replace("$", "").strip()
    try:
        x = float(s)
    except ValueError:
        return s
    if not math.isfinite(x):
        return s
    return str(int(x)) if x.is_integer() else repr(x)


def reference_equal(pred: str, gold: str) -> bool:
    """The reference's check: equal strings after :func:`reference_normalize`."""
    a, b = reference_normalize(pred), reference_normalize(gold)
    return bool(a) and a == b
