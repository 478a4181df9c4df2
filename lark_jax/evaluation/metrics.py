"""Sampling metrics: ACC@k, pass@1, the unbiased pass@k estimator, and their tables.

A problem is sampled n times and c of the samples are correct.

* ACC@n (the paper's metric, "ACC@5" for n = 5): the share of problems with at
  least one correct sample, mean over problems of [c > 0].
* pass@1: the expected accuracy of a single sample, mean over problems of c / n.
* pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code"): the probability that k samples drawn without replacement from the n
  contain a correct one,

      pass@k = 1 - C(n - c, k) / C(n, k),

  an unbiased estimate of the k-sample success rate; pass@1 = c / n and
  pass@n = [c > 0] = ACC@n, so the three agree where they overlap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n-c, k) / C(n, k)`` (1 when n - c < k).

    Computed from exact integer binomials, so it holds for any n (no float underflow).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _counts(correct: Sequence[Sequence[bool]]) -> tuple[int, list[int]]:
    """(n, [c per problem]) for a rectangular problems x samples table of booleans."""
    if not correct:
        raise ValueError("no problems")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        raise ValueError("every problem needs the same, non-zero number of samples")
    return n, [sum(bool(x) for x in row) for row in correct]


def acc_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """ACC@n: share of problems with at least one correct sample among their n."""
    _, cs = _counts(correct)
    return sum(c > 0 for c in cs) / len(cs)


def mean_pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of c / n (the expected accuracy of one sample)."""
    n, cs = _counts(correct)
    return sum(cs) / (n * len(cs))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of the unbiased pass@k estimate."""
    n, cs = _counts(correct)
    return sum(pass_at_k(n, c, k) for c in cs) / len(cs)


def report_ks(n: int) -> list[int]:
    """The k reported in ``pass@k``: every k up to 10, beyond that powers of two and n."""
    if n <= 10:
        return list(range(1, n + 1))
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def natural_key(s: str):
    """Sort key that orders "Level 2" before "Level 10"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(s))]


def summarize(correct: Sequence[Sequence[bool]],
              levels: Sequence[str | None] | None = None) -> dict:
    """The metrics of one run: problems x samples booleans -> a JSON-ready dict.

    Keys: ``n_problems``, ``samples`` (n), ``acc@{n}``, ``pass@1``, ``pass@k``
    ({"1": ..., ..., "n": ...}), ``n_correct_samples``, and ``by_level``
    ({level: {"n_problems", "acc@{n}", "pass@1"}}) when any problem has a level.
    """
    n, cs = _counts(correct)
    out = {
        "n_problems": len(cs),
        "samples": n,
        f"acc@{n}": acc_at_k(correct),
        "pass@1": mean_pass_at_1(correct),
        "pass@k": {str(k): mean_pass_at_k(correct, k) for k in report_ks(n)},
        "n_correct_samples": sum(cs),
    }
    if levels is not None and any(lv is not None for lv in levels):
        if len(levels) != len(cs):
            raise ValueError("one level per problem")
        groups: dict[str, list[Sequence[bool]]] = {}
        for row, lv in zip(correct, levels, strict=True):
            groups.setdefault("none" if lv is None else str(lv), []).append(row)
        out["by_level"] = {
            lv: {"n_problems": len(rows), f"acc@{n}": acc_at_k(rows),
                 "pass@1": mean_pass_at_1(rows)}
            for lv, rows in sorted(groups.items(), key=lambda kv: natural_key(kv[0]))}
    return out


def acc_key(summary: dict) -> str:
    """The ``acc@k`` key a summary carries (k = its number of samples)."""
    keys = [k for k in summary if re.fullmatch(r"acc@\d+", k)]
    if len(keys) != 1:
        raise ValueError("a summary needs exactly one acc@k entry")
    return keys[0]


def markdown_table(summaries: Sequence[dict], *, by_level: bool = False,
                   metric: str = "acc") -> str:
    """One markdown table: a row per model, a column per benchmark, cells in percent.

    ``metric`` is "acc" (ACC@k, the paper's table) or "pass@1". Each summary
    must carry "model" and "benchmark". Missing cells show "-"; the "avg"
    column averages a row's benchmarks and is left "-" for incomplete rows.
    With ``by_level``, benchmarks with a per-level breakdown get a column per level.
    """
    if metric not in ("acc", "pass@1"):
        raise ValueError("metric is 'acc' or 'pass@1'")
    cells: dict[tuple[str, str], float] = {}
    ks: dict[str, set[int]] = {}
    models: list[str] = []
    columns: list[str] = []
    for s in summaries:
        model, bench = str(s["model"]), str(s["benchmark"])
        key = acc_key(s) if metric == "acc" else "pass@1"
        ks.setdefault(bench, set()).add(int(s["samples"]))
        entries = [(bench, s[key])]
        if by_level:
            for lv, sub in s.get("by_level", {}).items():
                entries.append((f"{bench} {lv}", sub[key]))
        if model not in models:
            models.append(model)
        for col, value in entries:
            if col not in columns:
                columns.append(col)
            cells[(model, col)] = float(value)
    main_cols = list(ks)
    label = "ACC@" + "/".join(
        str(k) for k in sorted({k for v in ks.values() for k in v})) if metric == "acc" else metric
    header = [f"model ({label}, %)"] + columns + ["avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        row = [m]
        for col in columns:
            v = cells.get((m, col))
            row.append("-" if v is None else f"{100 * v:.1f}")
        mains = [cells.get((m, b)) for b in main_cols]
        avg = None if any(v is None for v in mains) else sum(mains) / len(mains)
        row.append("-" if avg is None else f"{100 * avg:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
