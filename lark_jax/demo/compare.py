"""One student is one draw: the same statistics from several demo runs, side by side.

A demo run's intervals resample benchmark problems, seeds and trajectories; they do not
resample the *student*, whose pre-training seed (and even the CPU type: XLA's numerics
differ between machines) gives another model. :func:`compare_runs` lines up every
statistic that two or more runs' ``results.json`` share (each method's ACC@k, each paired
difference, the base student, the diagnostics' correlations) and gives, per statistic,

* each run's value and 95 % interval,
* ``spread`` = max − min of the values over the runs,
* ``half_width`` = the mean half-width of the runs' intervals (what one run's interval
  allows), and
* ``disjoint``: whether some two runs' intervals do not overlap, that is, the students
  disagree by more than one run's resampling can explain.

A spread larger than the half-width says that a second student moves the statistic more
than a run's interval admits: a conclusion drawn from one student is then a statement
about that student.
"""

from __future__ import annotations

import math

# Scalar diagnostics reported without an interval (results.json "diagnostics").
SCALARS = ("spearman_ghat_vs_loss", "spearman_rho_vs_loss", "spearman_teacher_utility",
           "spearman_traj_rho_rate", "spearman_traj_ghat_rate",
           "spearman_rho_proxy_vs_gradient")


def _stat(value, ci) -> dict | None:
    if value is None or not math.isfinite(value):
        return None
    return {"value": float(value), "ci95": list(ci) if ci else None}


def statistics(results: dict) -> dict[str, dict]:
    """The comparable statistics of one run: name -> {"value", "ci95" (or None)}."""
    out: dict[str, dict | None] = {}
    base = results.get("base", {})
    out["base acc"] = _stat(base.get("acc"), base.get("acc_ci95"))
    out["student pre-training loss"] = _stat(results.get("student", {})
                                             .get("pretrain_final_loss"), None)
    for row in results.get("methods", []):
        out[f"acc {row['method']}"] = _stat(row["acc"]["mean"], row["acc"].get("ci95"))
    for key, d in results.get("paired", {}).items():
        out[f"paired {key}"] = _stat(d["mean"], d.get("ci95"))
    diag = results.get("diagnostics", {})
    for name, c in diag.get("correlations", {}).items():
        out[f"{name} overall"] = _stat(c["overall"]["r"], c["overall"]["ci95"])
        out[f"{name} given T"] = _stat(c["partial_given_tokens"]["r"],
                                       c["partial_given_tokens"]["ci95"])
    for name, c in diag.get("teacher_correlations", {}).items():
        out[f"teacher {name}"] = _stat(c["r"], c["ci95"])
    for key in SCALARS:
        if key not in out:
            out[key] = _stat(diag.get(key), None)
    return {k: v for k, v in out.items() if v is not None}


def compare_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """Per statistic present in at least two of ``runs`` (label -> results.json), in the
    first run's order: ``{"runs": {label: {"value", "ci95"}}, "spread", "half_width",
    "disjoint"}`` (see the module docstring; ``half_width`` and ``disjoint`` are None when
    fewer than two of the runs have an interval)."""
    stats = {label: statistics(r) for label, r in runs.items()}
    names: list[str] = []
    for s in stats.values():
        names += [n for n in s if n not in names]
    out = {}
    for name in names:
        have = {label: s[name] for label, s in stats.items() if name in s}
        if len(have) < 2:
            continue
        values = [v["value"] for v in have.values()]
        cis = [v["ci95"] for v in have.values() if v["ci95"]]
        half = disjoint = None
        if len(cis) >= 2:
            half = sum((hi - lo) / 2 for lo, hi in cis) / len(cis)
            disjoint = any(a[1] < b[0] or b[1] < a[0]
                           for i, a in enumerate(cis) for b in cis[i + 1:])
        out[name] = {"runs": have, "spread": max(values) - min(values), "half_width": half,
                     "disjoint": disjoint}
    return out


def render_comparison(runs: dict[str, dict], table: dict[str, dict]) -> str:
    """The comparison as a markdown table (values in the units of results.json: ACC and
    differences as fractions shown in points, correlations as r)."""
    labels = list(runs)
    lines = ["| statistic | " + " | ".join(labels) + " | spread | mean CI half-width "
             "| intervals disjoint |", "|---|" + "---|" * (len(labels) + 3)]
    for name, row in table.items():
        pts = name.startswith(("acc ", "paired ", "base acc"))
        scale, digits = (100.0, 1) if pts else (1.0, 2)
        sign = "+" if name.startswith(("paired", "rho_vs", "spearman", "teacher ")) else ""

        def fmt(x, scale=scale, digits=digits, sign=sign):
            return f"{scale * x:{sign}.{digits}f}"

        cells = []
        for label in labels:
            v = row["runs"].get(label)
            if v is None:
                cells.append("-")
                continue
            ci = (f" [{fmt(v['ci95'][0])}, {fmt(v['ci95'][1])}]" if v["ci95"] else "")
            cells.append(fmt(v["value"]) + ci)
        half = "-" if row["half_width"] is None else f"{scale * row['half_width']:.{digits}f}"
        dis = "-" if row["disjoint"] is None else ("**yes**" if row["disjoint"] else "no")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {scale * row['spread']:.{digits}f} | {half} | {dis} |")
    return "\n".join(lines) + "\n"


__all__ = ["compare_runs", "render_comparison", "statistics"]
