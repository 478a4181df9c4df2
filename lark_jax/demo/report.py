"""The demo's report: results.json, results.md and the plots, from a finished context."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from lark_jax import fsio
from lark_jax.demo.config import METHOD_SPECS
from lark_jax.demo.stats import guess_floor, mean_ci, paired_difference, resample_counts
from lark_jax.demo.task import TEACHERS


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """What ran the demo: XLA's numerics differ between CPU types and devices, so one run's
    student is one draw (issue #29); results.json says which machine drew it."""
    import flax
    import jax
    import jaxlib

    kinds: dict[str, int] = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "backend": jax.default_backend(),
            "devices": kinds, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__}

# -- report -----------------------------------------------------------------------------------

_TEACHER_COLORS = {"stepwise": "tab:blue", "terse": "tab:orange", "stack": "tab:green",
                   "careless": "tab:red", "rambler": "tab:purple", "answer_only": "tab:brown"}


def plots(ctx, results: dict) -> dict[str, Path]:
    """sft_loss.png (every method, first seed), lark_vs_utility.png (the paper's two
    diagnostics and the proxy against the exact rate) and acc_ci.png (ACC with intervals,
    the untouched student and the blind-guess floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lark_jax.training.trainer import plot_loss

    cfg, out, runs, diag = ctx.cfg, ctx.out, ctx.runs, ctx.diagnostics
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seeds[0]
    loss_png = plots_dir / "sft_loss.png"
    methods = [m for m in cfg.methods if seed in runs[m]]
    # By epoch: under the published rule 'all' runs K times the steps of a budget-B run
    # (all-equal-steps: a fraction of an epoch).
    plot_loss([out / "runs" / f"{m}-s{seed}" / "metrics.jsonl" for m in methods], loss_png,
              labels=methods,
              steps_per_epoch=[cfg.steps_per_epoch(runs[m][seed]["n_records"]) for m in methods])

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    pt = diag["per_teacher"]
    by_acc = all("utility_acc" in v for v in pt.values())
    key = "utility_acc" if by_acc else "utility"
    for t, v in pt.items():
        y = 100 * v[key] if by_acc else v.get(key, math.nan)
        ax.scatter(v["lark_score"], y, color=_TEACHER_COLORS.get(t), s=50)
        ax.annotate(t, (v["lark_score"], y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("LARK score (mean ĝ of the teacher's trajectories)")
    tc = diag["teacher_correlations"]
    if by_acc:
        ax.set_ylabel(f"utility: ACC@{cfg.eval_samples} (%) of the teacher's fine-tune")
        ax.set_title("per teacher, Spearman " + _fmt_ci(tc["lark_score_vs_utility_acc"]))
    else:
        ax.set_ylabel("utility: drop of held-out reference loss")
        ax.set_title(f"per teacher, Spearman {_fmt_r(diag['spearman_teacher_utility'])}")
        ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    traj, corr = diag["per_trajectory"], diag["correlations"]
    panels = ((axes[0, 1], "decrease_all", "measured log(L_before / L_after), 'all' run", False),
              (axes[1, 0], "decrease_first_order",
               f"measured log(L_before / L_after) after {cfg.first_order_steps} steps", False),
              (axes[1, 1], "rate_sum", "exact T·‖∇θ L‖² / L (--estimator gradient)", True))
    for ax, y, label, log in panels:
        c = corr.get(f"rho_vs_{y}")
        if c is None:
            ax.set_title(f"{y}: not measured")
        else:
            _by_teacher(ax, traj["teacher"], traj["rho"], traj[y])
            if log:
                ax.set_yscale("log")
            ax.set_title(f"Spearman {_fmt_ci(c['overall'])}, given T "
                         f"{_fmt_ci(c['partial_given_tokens'])}", fontsize=9)
        ax.set_xlabel("ρ = Brier / L (LARK's predicted rate)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    util_png = plots_dir / "lark_vs_utility.png"
    _save(fig, util_png)

    corr_png = plots_dir / "correlations.png"
    correlation_plot(results, corr_png)

    acc_png = plots_dir / "acc_ci.png"
    acc_plot(results, acc_png)
    return {"sft_loss": loss_png, "lark_vs_utility": util_png, "acc_ci": acc_png,
            "correlations": corr_png}


def correlation_plot(results: dict, path: Path) -> None:
    """Spearman(ρ, each measured quantity) with its interval: overall, given T and within
    each teacher (from results.json alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = results["diagnostics"]["correlations"]
    names = list(corr)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 4.5),
                             sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        c = corr[name]
        rows = [("overall", c["overall"]), ("given T", c["partial_given_tokens"])] + [
            (t, v) for t, v in c["per_teacher"].items()]
        for i, (label, v) in enumerate(rows):
            y = len(rows) - 1 - i
            if v["r"] is None:
                continue
            lo, hi = v["ci95"] or (v["r"], v["r"])
            ax.errorbar(v["r"], y, xerr=[[v["r"] - lo], [hi - v["r"]]], fmt="o", capsize=3,
                        color=_TEACHER_COLORS.get(label, "black"))
        ax.set_yticks(range(len(rows))[::-1], [label for label, _ in rows])
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlim(-1, 1)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("Spearman, 95 % bootstrap interval")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)


def acc_plot(results: dict, path: Path) -> None:
    """Every method's ACC@k with its interval, the untouched student and the guess floor
    (from results.json alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, rows = results["k"], results["methods"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 2.0))
    names = [r["method"] for r in rows]
    means = np.array([100 * r["acc"]["mean"] for r in rows])
    ci = np.array([[100 * x for x in r["acc"]["ci95"]] for r in rows])
    y = np.arange(len(rows))[::-1]
    ax.errorbar(means, y, xerr=[means - ci[:, 0], ci[:, 1] - means], fmt="o", capsize=3)
    base = 100 * results["base"]["acc"]
    ax.axvline(base, color="grey", ls="--", lw=1, label=f"untouched student {base:.1f}%")
    guess = 100 * results["guess"]["acc"]
    ax.axvline(guess, color="tab:red", ls=":", lw=1,
               label=f"blind guess ({k} commonest answers) {guess:.1f}%")
    ax.set_yticks(y, names)
    ax.set_xlabel(f"ACC@{k} (%), mean and 95 % bootstrap interval (problems x seeds)")
    # Below the axes: inside, it hid a method's point.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)


def _by_teacher(ax, teachers, x, y) -> None:
    """One scatter per teacher, in the teacher's colour."""
    teach, x, y = np.array(teachers), np.array(x), np.array(y)
    for t in TEACHERS:
        sel = teach == t
        ax.scatter(x[sel], y[sel], s=6, alpha=0.6, color=_TEACHER_COLORS.get(t), label=t)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with fsio.atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _fmt_r(r) -> str:
    return "n/a" if r is None or not math.isfinite(r) else f"{r:+.2f}"


def _fmt_ci(c: dict) -> str:
    """A correlation_ci result as "+0.12 [+0.05, +0.19]" (n/a when undefined)."""
    if c["r"] is None:
        return "n/a"
    if c["ci95"] is None:
        return f"{c['r']:+.2f} [no interval]"
    return f"{c['r']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


_METRICS = (("acc", "ACC@k", 100.0, True), ("pass@1", "pass@1", 100.0, True),
            ("ref_loss", "ref loss", 1.0, False), ("step_acc", "step acc", 100.0, True))
# How the samples answer (stages.answer_styles): reported beside ACC, never ranked.
_STYLES = ("bare", "worked_pass@1")


def _num(x):
    """A JSON-safe number: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# Paired differences reported (when both methods ran): LARK (either SFT objective) against
# random and against every candidate at equal epochs and at equal steps, and the two
# objectives against each other.
# And LARK against its controls (docs/method.md, "Controls"), and iterative LARK against
# LARK and the random baselines.
PAIRS = (("lark", "random"), ("lark", "all"), ("lark", "all-equal-steps"),
         ("lark-reference", "random"), ("lark-reference", "all"),
         ("lark-reference", "all-equal-steps"), ("lark", "lark-reference"),
         ("lark", "random-matched"), ("lark", "best-teacher"), ("lark", "verified"),
         ("lark-iterative", "lark"), ("lark-iterative", "random"),
         ("lark-iterative", "random-matched"))


def _json_value(v):
    """Numbers JSON-safe (NaN/inf -> None), lists and dicts recursively, strings as is."""
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_json_value(x) for x in v]
    if isinstance(v, str | bool | None):
        return v
    if isinstance(v, np.str_):
        return str(v)
    if isinstance(v, int | np.integer):
        return int(v)
    return _num(v)


def build_results(ctx, t_start: float) -> dict:
    """What results.json holds (see the module docstring of ``pipeline``)."""
    cfg, runs, diag = ctx.cfg, ctx.runs, ctx.diagnostics
    seeds = list(cfg.seeds)
    n_problems = len(ctx.bench.problems)
    # One set of bootstrap draws for every method: intervals and differences comparable.
    counts = resample_counts(len(seeds), n_problems)
    solved = {m: np.stack([ctx.solved[m][s] for s in seeds]) for m in cfg.methods}
    rows = []
    for m in cfg.methods:
        row = {"method": m, "objective": runs[m][seeds[0]]["objective"], "n_seeds": len(seeds),
               "n_records": runs[m][seeds[0]]["n_records"],
               "steps": runs[m][seeds[0]]["steps"],
               "teacher_mix": runs[m][seeds[0]]["teacher_mix"]}
        for key in [spec[0] for spec in _METRICS] + list(_STYLES) + ["final_train_loss"]:
            mean, std = _mean_std([runs[m][s][key] for s in seeds])
            row[key] = {"mean": _num(mean), "std": _num(std),
                        "per_seed": [_num(runs[m][s][key]) for s in seeds]}
        row["acc"]["ci95"] = mean_ci(solved[m], counts)["ci95"]
        # Per seed, the run this one's training equals step for step (evaluation shared).
        row["same_training_as"] = [runs[m][s].get("same_training_as") for s in seeds]
        if "rounds" in runs[m][seeds[0]]:  # iterative selection: each seed's rounds
            row["rounds"] = _json_value({s: runs[m][s]["rounds"] for s in seeds})
        rows.append(row)
    paired = {f"{a} - {b}": paired_difference(solved[a], solved[b], counts)
              for a, b in PAIRS if a in solved and b in solved}
    base = {k: _num(ctx.base_metrics[k])
            for k in ("acc", "pass@1", "ref_loss", "step_acc", *_STYLES)}
    base["acc_ci95"] = mean_ci(ctx.base_solved, resample_counts(1, n_problems))["ci95"]
    guesses, hits = guess_floor([str(p.answer) for p in ctx.task.problems["pool"]],
                                [p.answer for p in ctx.bench.problems], cfg.eval_samples)
    guess = mean_ci(hits[None], resample_counts(1, n_problems))

    def best(key, higher):
        """The best method by mean, or "tie: a, b" ("all tied") when several share it."""
        vals = [(r[key]["mean"], r["method"]) for r in rows if r[key]["mean"] is not None]
        if not vals:
            return None
        top = (max if higher else min)(v for v, _ in vals)
        tied = [m for v, m in vals if v == top]
        if len(tied) == 1:
            return tied[0]
        return "all tied" if len(tied) == len(vals) else "tie: " + ", ".join(tied)

    winners = {key: best(key, higher) for key, _, _, higher in _METRICS}
    per_traj = diag["per_trajectory"]
    built = ctx.built
    keys = ("spearman_ghat_vs_loss", "spearman_rho_vs_loss", "spearman_teacher_utility",
            "spearman_teacher_step_acc", "spearman_teacher_rho_own_rate",
            "spearman_traj_rho_rate", "spearman_traj_ghat_rate",
            "spearman_rho_proxy_vs_gradient")
    return {
        "preset": cfg.preset,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "student": {"path": str(built.path), "num_params": built.num_params,
                    "vocab_size": built.vocab_size, "pretrain_steps": built.pretrain_steps,
                    "pretrain_final_loss": _num(built.final_loss), "cached": built.cached,
                    "seconds": built.seconds},
        "k": cfg.eval_samples,
        "n_bench_problems": n_problems,
        "seeds": seeds,
        "base": base,
        "guess": {"acc": guess["mean"], "acc_ci95": guess["ci95"], "answers": guesses},
        "methods": rows,
        "paired": paired,
        "best": winners,
        "lark_wins": {k: v == "lark" for k, v in winners.items()},
        "diagnostics": {
            "per_teacher": _json_value(diag["per_teacher"]),
            **{k: _num(diag.get(k)) for k in keys},
            "n_trajectories": len(per_traj["rho"]),
            "n_gradient_check": int(np.isfinite(per_traj["rate_mean"]).sum()),
            "correlations": _json_value(diag["correlations"]),
            "teacher_correlations": _json_value(diag["teacher_correlations"]),
        },
        # One entry per pool trajectory, in (problem, candidate) order: every quantity the
        # diagnostics correlate, so that anyone can re-analyse the run (null: not measured).
        "trajectories": _json_value(per_traj),
        "machine": machine_info(),
        "timings_s": {k: round(v, 1) for k, v in ctx.timings.items()},
        # what the demo predicted at its start (demo.estimate), beside what it took
        "estimate_s": {k: round(v, 1) for k, v in ctx.estimate.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _machine(results: dict) -> str:
    m = results.get("machine")
    if not m:
        return "not recorded"
    devices = ", ".join(f"{n} x {k}" for k, n in m["devices"].items())
    return (f"{m['cpu']} ({m['cpu_count']} CPUs), {m['backend']} backend: {devices}; "
            f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, Python {m['python']}")


def _cell(stat: dict, scale: float, digits: int) -> str:
    if stat["mean"] is None:
        return "n/a"
    s = f"{stat['mean'] * scale:.{digits}f}"
    if len(stat["per_seed"]) > 1 and stat["std"] is not None:
        s += f" ± {stat['std'] * scale:.{digits}f}"
    return s


def _length(results: dict) -> str:
    """How long the fine-tunes were: epochs (steps per method) or one step count."""
    cfg = results["config"]
    if cfg["epochs"] is None:
        return f"{cfg['steps']} optimizer steps of {cfg['batch_size']} records"
    by_steps: dict[int, list[str]] = {}
    equal = []  # methods trained for a budget-B selection's steps, not their own epochs
    for r in results["methods"]:
        spec = METHOD_SPECS.get(r["method"])  # None: a results.json of another version
        if spec is not None and spec.budget_steps:
            equal.append(f"{r['method']} {r['steps']}")
        else:
            by_steps.setdefault(r["steps"], []).append(r["method"])
    steps = "; ".join(f"{', '.join(ms)} {n}" for n, ms in sorted(by_steps.items()))
    text = (f"{cfg['epochs']} epochs in batches of {cfg['batch_size']} records, as published"
            f" (steps = ceil(records / {cfg['batch_size']}) x {cfg['epochs']}: {steps})")
    if equal:
        text += (f", except {', '.join(equal)}: every candidate for as many steps as a "
                 f"budget-{cfg['budget']} selection (the same compute)")
    return text


def _twins(row: dict) -> set[str]:
    """The methods whose training this row's seeds share ("all-s0" -> "all")."""
    return {t.rsplit("-s", 1)[0] for t in row.get("same_training_as", []) if t}


def _pts(x) -> str:
    return f"{100 * x:+.1f}"


def headline(results: dict) -> str:
    """One sentence: is LARK's difference from random (and from all, at equal epochs and at
    equal steps, and from the random-matched and best-teacher controls when they ran)
    resolved? And one on how far above blind guessing the best method is."""
    k = results["k"]
    parts = []
    rows = {r["method"]: r for r in results["methods"]}
    shown: set[str] = set()
    for key in ("lark - random", "lark - all", "lark - all-equal-steps",
                "lark - random-matched", "lark - best-teacher"):
        d = results["paired"].get(key)
        other = key.split(" - ")[1]
        # Skipped when it is a method already stated's training (--steps: all-equal-steps).
        if d is None or _twins(rows.get(other, {})) & shown:
            continue
        shown.add(other)
        lo, hi = d["ci95"]
        verdict = ("resolved: LARK better" if lo > 0 else "resolved: LARK worse" if hi < 0
                   else "not resolved (the interval contains 0)")
        parts.append(f"{key}: {_pts(d['mean'])} pts ACC@{k} [{_pts(lo)}, {_pts(hi)}], "
                     f"{verdict}")
    text = "; ".join(parts) + "." if parts else ""
    g = results["guess"]
    if results["methods"]:
        top = max(results["methods"], key=lambda r: r["acc"]["mean"])
        lo = top["acc"]["ci95"][0]
        where = "above" if lo > g["acc"] else "not above"
        text += (f" Blind guessing (the {k} commonest pool answers, no model) scores "
                 f"{100 * g['acc']:.1f} % ACC@{k}; the best method, {top['method']} "
                 f"({100 * top['acc']['mean']:.1f} %), is {where} it (lower CI bound "
                 f"{100 * lo:.1f} %).")
    return text


def render_markdown(results: dict) -> str:
    """The results table and diagnostics as markdown (what ``results.md`` holds)."""
    cfg = results["config"]
    k = results["k"]
    n = results["n_bench_problems"]
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [f"# lark-jax demo results ({results['preset']})", "", "**" + headline(results)
             + "**", ""]
    st = results["student"]
    lines += [
        f"Student: {st['num_params']:,}-parameter {cfg['student']['family']} "
        f"(hidden {cfg['student']['hidden_size']}, {cfg['student']['num_layers']} layers, "
        f"vocabulary {st['vocab_size']}), pre-trained {st['pretrain_steps']} steps. "
        f"Pool: {cfg['task']['n_pool']} problems x 8 candidates from 6 teachers; benchmark: "
        f"{n} held-out problems, {k} samples each. Every method: budget "
        f"{cfg['budget']} per problem (the 'all' policy keeps every candidate), "
        f"{_length(results)}, "
        f"lr {cfg['lr']:g}; seeds {seeds}. "
        "ACC: mean over seeds and problems with a 95 % bootstrap interval (problems and "
        "seeds resampled); other columns: mean ± std over seeds. Bare answers: share of "
        "samples that are only a boxed number (no work shown); worked pass@1: accuracy of "
        "the samples that show work, i.e. solving rather than recalling or guessing an "
        f"answer. guess: every benchmark problem answered with the {k} commonest answers of "
        "the pool's problems (the ACC@k a student reaches without reading the problem).",
        "",
        f"| method | SFT objective | ACC@{k} (%) | 95 % CI | pass@1 (%) | bare answers (%) "
        "| worked pass@1 (%) | ref loss ↓ | step acc (%) | final SFT loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    b = results["base"]
    fmt = lambda x, s, d: "n/a" if x is None else f"{x * s:.{d}f}"  # noqa: E731
    ci = lambda c: f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"  # noqa: E731
    lines.append(f"| base (no fine-tuning) | - | {fmt(b['acc'], 100, 1)} | {ci(b['acc_ci95'])} "
                 f"| {fmt(b['pass@1'], 100, 1)} | {fmt(b['bare'], 100, 1)} | "
                 f"{fmt(b['worked_pass@1'], 100, 1)} | {fmt(b['ref_loss'], 1, 3)} | "
                 f"{fmt(b['step_acc'], 100, 1)} | - |")
    g = results["guess"]
    lines.append(f"| guess {', '.join(g['answers'])} (no model) | - | {fmt(g['acc'], 100, 1)} "
                 f"| {ci(g['acc_ci95'])} | - | - | - | - | - | - |")
    for r in results["methods"]:
        name = f"**{r['method']}**" if r["method"].startswith("lark") else r["method"]
        lines.append(f"| {name} | {r['objective']} | {fmt(r['acc']['mean'], 100, 1)} | "
                     f"{ci(r['acc']['ci95'])} | {_cell(r['pass@1'], 100, 1)} | "
                     f"{_cell(r['bare'], 100, 1)} | {_cell(r['worked_pass@1'], 100, 1)} | "
                     f"{_cell(r['ref_loss'], 1, 3)} | {_cell(r['step_acc'], 100, 1)} | "
                     f"{_cell(r['final_train_loss'], 1, 3)} |")
    for r in results["methods"]:
        twins = _twins(r)
        if twins and all(r["same_training_as"]):
            lines += ["", f"{r['method']}: every seed's fine-tune computes exactly the steps of "
                      f"{', '.join(sorted(twins))} (same records, coefficients and "
                      "normalisers), so it was trained once and evaluated once."]
    lines += ["", "Paired differences (same problems and seeds, same bootstrap draws):", "",
              f"| difference | ACC@{k} (pts) | 95 % CI | resolved |", "|---|---|---|---|"]
    for key, d in results["paired"].items():
        lo, hi = d["ci95"]
        lines.append(f"| {key} | {_pts(d['mean'])} | [{_pts(lo)}, {_pts(hi)}] | "
                     f"{'yes' if d['resolved'] else 'no'} |")
    best = results["best"]
    lines += ["", "Best method per column (by mean): " + ", ".join(
        f"{label} {best[key]}" for key, label, _, _ in _METRICS) + ".", ""]
    lines += ["Teacher mix of each selection (share of train weight, first seed):", "",
              "| method | " + " | ".join(TEACHERS) + " |",
              "|---|" + "---|" * len(TEACHERS)]
    for r in results["methods"]:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{100 * r['teacher_mix'].get(t, 0):.0f}%" for t in TEACHERS) + " |")
    for r in results["methods"]:
        if "rounds" not in r:
            continue
        lines += ["", f"{r['method']}: the pool re-scored by each seed's student and "
                  f"re-selected every {cfg.get('iterative_epochs')} epoch(s); per round "
                  "(steps, share of problems whose chosen trajectories changed, teacher mix; "
                  "first seed; the mix above is the run's, weighted by steps):", ""]
        for i, rd in enumerate(next(iter(r["rounds"].values()))):
            changed = "-" if rd["changed"] is None else f"{100 * rd['changed']:.0f}%"
            mix = ", ".join(f"{t} {100 * v:.0f}%" for t, v in rd["teacher_mix"].items()
                            if v >= 0.005)
            seen = rd.get("per_teacher") or {}
            means = ("; mean L / ĝ seen by its selection: " + ", ".join(
                f"{t} {v['L']:.2f} / {v['g_hat']:.3f}" for t, v in seen.items())) if seen else ""
            lines.append(f"- round {i}: steps {rd['steps'][0]}-{rd['steps'][1]}, changed "
                         f"{changed}; {mix}{means}")
    d = results["diagnostics"]
    n_util = cfg.get("utility_eval_problems")
    lines += ["", "Diagnostics (plots/lark_vs_utility.png, plots/correlations.png):", "",
              f"| teacher | mean ĝ (LARK score) | mean ρ | mean L | utility: ACC@{k} (%) "
              f"of its fine-tune | 95 % CI | utility (ref-loss drop) | "
              "step-acc gain | own held-out rate |", "|---|---|---|---|---|---|---|---|---|"]
    for t, v in d["per_teacher"].items():
        f = lambda x, dg=4: "n/a" if x is None else f"{x:+.{dg}f}"  # noqa: E731
        plain = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        acc, aci = v.get("utility_acc"), v.get("utility_acc_ci95")
        lines.append(f"| {t} | {f(v.get('lark_score'))} | {plain(v.get('rho'))} | "
                     f"{plain(v.get('L'))} | {fmt(acc, 100, 1)} | "
                     f"{ci(aci) if aci else 'n/a'} | {f(v.get('utility'))} | "
                     f"{f(v.get('step_acc_gain'), 3)} | {f(v.get('own_rate'), 3)} |")
    tc = d.get("teacher_correlations", {})
    if tc:
        on = f"the first {n_util}" if n_util else "all"
        lines += ["", f"- Per teacher (6 points; the interval resamples teachers): "
                  f"Spearman(LARK score, ACC@{k} of the teacher's fine-tune, on {on} "
                  f"benchmark problems) {_fmt_ci(tc['lark_score_vs_utility_acc'])}; with the "
                  f"ref-loss drop {_fmt_ci(tc['lark_score_vs_utility_ref_loss'])}."]
    corr = d.get("correlations", {})
    if corr:
        lines += ["", "Spearman(ρ = Brier/L, each measurement) per trajectory, 95 % bootstrap "
                  "interval (trajectories resampled); 'given T': the rank partial correlation "
                  "given the trajectory's length; then within each teacher:", "",
                  "| ρ vs | n | overall | given T | " + " | ".join(TEACHERS) + " |",
                  "|---|---|---|---|" + "---|" * len(TEACHERS)]
        for name, c in corr.items():
            lines.append(f"| {name.removeprefix('rho_vs_')} | {c['overall']['n']} | "
                         f"{_fmt_ci(c['overall'])} | {_fmt_ci(c['partial_given_tokens'])} | "
                         + " | ".join(_fmt_ci(c["per_teacher"][t]) if t in c["per_teacher"]
                                      else "n/a" for t in TEACHERS) + " |")
        lines += ["", "rate_mean = ‖∇θ L‖²/L and rate_sum = T·‖∇θ L‖²/L are the exact rates "
                  "(--estimator gradient, the first "
                  f"{cfg['gradient_check_problems']} pool problems); decrease_first_order "
                  f"and decrease_all = log(L_before / L_after) after {cfg.get('first_order_steps')}"
                  " steps of fine-tuning on every pool trajectory, and after the 'all' run."]
    lines += ["",
              f"- Over {d['n_trajectories']} trajectories: Spearman(ĝ, L) "
              f"{_fmt_r(d['spearman_ghat_vs_loss'])} (near ±1 would mean LARK only ranks by "
              f"loss), Spearman(ρ, L) {_fmt_r(d['spearman_rho_vs_loss'])}.",
              f"- Spearman(LARK score, utility) over teachers: "
              f"{_fmt_r(d['spearman_teacher_utility'])}; with the step-accuracy gain: "
              f"{_fmt_r(d['spearman_teacher_step_acc'])}; mean ρ vs the teacher's own "
              f"held-out loss-decrease rate: {_fmt_r(d['spearman_teacher_rho_own_rate'])}.",
              f"- Spearman(ρ_k, measured rate log(L_before/L_after)) per trajectory after the "
              f"'all' run: {_fmt_r(d['spearman_traj_rho_rate'])}; with ĝ_k: "
              f"{_fmt_r(d['spearman_traj_ghat_rate'])}.",
              f"- Spearman(proxy ρ = Brier/L, exact rate ‖∇θ L‖²/L from --estimator "
              f"gradient) over {d['n_gradient_check']} trajectories: "
              f"{_fmt_r(d['spearman_rho_proxy_vs_gradient'])}.",
              "",
              "Definitions: ACC@k = share of benchmark problems with a correct answer among k "
              f"samples (temperature {cfg['temperature']}, top-p {cfg['top_p']}, repetition "
              f"penalty {cfg['repetition_penalty']}). ref loss = "
              "mean CE per assistant token on the benchmark's reference solutions (it "
              "measures style as well as arithmetic). step acc = share of the reference "
              "solutions' intermediate results predicted exactly, teacher-forced. Utility of "
              "a teacher = ref loss of the untouched student minus ref loss after fine-tuning "
              "on that teacher's pool trajectories only (same epochs or steps, lr and "
              "batch; first seed). Own held-out rate = log of the ratio of the teacher's held-out "
              "trajectory loss before/after that fine-tune.",
              "", f"Machine: {_machine(results)}.",
              "", f"Wall time {results['seconds']:.0f}s "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in results['timings_s'].items())}).", ""]
    return "\n".join(lines)
