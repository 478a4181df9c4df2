"""``lark-jax demo``: the embedded default, end to end (see ``lark_jax.demo.pipeline``)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from lark_jax.errors import LarkError, json_msg
from lark_jax.progress import Reporter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="lark-jax-demo",
                   help="output directory (default: ./lark-jax-demo); a directory from an "
                        "earlier demo run is overwritten")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="the quick preset, which is the default (about 30 min on 2 CPU "
                           "cores; see demo_config for its sizes)")
    size.add_argument("--tiny", action="store_true",
                      help="smallest configuration: checks the plumbing, measures nothing "
                           "(also chosen by the environment variable LARK_JAX_DEMO_TINY=1)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to compare, from lark, lark-reference, "
                        "random, all, all-equal-steps, min-loss, max-loss, rsr, shortest, "
                        "longest, random-matched, best-teacher, verified, lark-iterative "
                        "(default: all of them; --quick: lark, lark-reference, random, all, "
                        "all-equal-steps, max-loss); random-matched, best-teacher and "
                        "verified are the controls of docs/method.md, lark-iterative "
                        "re-scores and re-selects as it trains; 'lark' is required")
    p.add_argument("--iterative-epochs", type=int, default=None,
                   help="lark-iterative: re-score the pool with the student in training and "
                        "re-select every this many epochs (default: 1)")
    p.add_argument("--student-seed", type=int, default=None,
                   help="initialisation and pre-training seed of the demo student (default "
                        "0); another seed is another student, built and cached once")
    p.add_argument("--no-utility", action="store_true",
                   help="skip the per-teacher fine-tunes of the utility diagnostic")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None,
                        help="epochs of every fine-tune, steps = ceil(records / batch) x "
                             "epochs as published (default: the preset's)")
    length.add_argument("--steps", type=int, default=None,
                        help="the same number of optimizer steps for every fine-tune "
                             "instead of epochs")
    p.add_argument("--cache-dir", default=None,
                   help="where the built student is cached (default: $LARK_JAX_CACHE or "
                        "~/.cache/lark-jax)")
    p.add_argument("--rebuild-student", action="store_true",
                   help="build the student again even if a cached one exists")
    p.add_argument("--compare", nargs="+", metavar="[LABEL=]DIR", default=None,
                   help="run nothing: compare finished demo runs (two or more output "
                        "directories, e.g. two students), every statistic they share side "
                        "by side with its spread; writes comparison.md and comparison.json "
                        "into --out")


def _seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LarkError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise LarkError("--seeds is empty")
    return seeds


def _compare(args, rep: Reporter) -> None:
    import json
    from pathlib import Path

    from lark_jax import fsio
    from lark_jax.demo.compare import compare_runs, render_comparison

    if len(args.compare) < 2:
        raise LarkError("--compare needs at least two demo output directories")
    runs: dict[str, dict] = {}
    for item in args.compare:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path)
        label = label or path.name
        if label in runs:
            raise LarkError(f"--compare: the label {label!r} is given twice (name them "
                            "LABEL=DIR)")
        f = path / "results.json"
        if not f.is_file():
            raise LarkError("no results.json: not a finished demo run", where=str(path))
        try:
            runs[label] = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LarkError(f"invalid JSON: {json_msg(e)}", where=f"{f}:{e.lineno}") from None
        except UnicodeDecodeError:
            raise LarkError("not UTF-8 text", where=str(f)) from None
    table = compare_runs(runs)
    if not table:
        raise LarkError("the runs share no statistic to compare")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render_comparison(runs, table)
    fsio.atomic_write(out / "comparison.json", json.dumps(
        {"runs": {k: str(v.get("student", {}).get("path")) for k, v in runs.items()},
         "statistics": table}, indent=1) + "\n")
    fsio.atomic_write(out / "comparison.md", md)
    rep.info(md)
    wider = sum(bool(r["disjoint"]) for r in table.values())
    rep.summary(f"compared {len(runs)} runs on {len(table)} shared statistics; {wider} with "
                f"disjoint intervals -> {out / 'comparison.md'}")


def run(args, rep: Reporter) -> None:
    from lark_jax.demo.pipeline import demo_config, run_demo

    if args.compare is not None:
        _compare(args, rep)
        return
    tiny = args.tiny or os.environ.get("LARK_JAX_DEMO_TINY") == "1"
    overrides = {} if args.steps is None else {"steps": args.steps}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.methods is not None:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.no_utility:
        overrides["utility"] = False
    if args.iterative_epochs is not None:
        overrides["iterative_epochs"] = args.iterative_epochs
    cfg = demo_config(True, tiny=tiny, seeds=_seeds(args.seeds), **overrides)
    if args.student_seed is not None:
        cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student,
                                                                   seed=args.student_seed))
    res = run_demo(args.out, config=cfg, cache_dir=args.cache_dir,
                   rebuild_student=args.rebuild_student, reporter=rep)
    from lark_jax.demo.report import headline

    rep.info("\n" + res.markdown)
    rep.summary(f"demo ({res.results['preset']}, {len(cfg.seeds)} seed(s), "
                f"{res.results['n_bench_problems']} problems): {headline(res.results)} "
                f"{res.seconds:.0f}s -> {res.out_dir / 'results.md'}")
