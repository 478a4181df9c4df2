"""``lark-jax eval``: sample a model on a benchmark and score it, or tabulate finished runs.

    lark-jax eval --model MODEL_DIR --benchmark BENCH.json --out EVAL_DIR [--samples 5] ...
    lark-jax eval --aggregate EVAL_DIR [EVAL_DIR ...] [--by-level] [--metric acc|pass@1]
"""

from __future__ import annotations

import argparse

from lark_jax import distributed
from lark_jax.errors import LarkError
from lark_jax.evaluation.bench import DEFAULT_SYSTEM_PROMPT
from lark_jax.progress import Reporter

_DEFAULTS = {"samples": 5, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8192,
             "seed": 0, "batch_size": 32, "repetition_penalty": 1.1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF-style model directory, or a Hub id ORG/NAME[@REV]")
    p.add_argument("--benchmark", help="benchmark: JSON list or JSONL of "
                   "{prompt|problem, answer, level?}")
    p.add_argument("--out", help="eval directory to write (generations.jsonl, answers.jsonl, "
                   "summary.json)")
    p.add_argument("--samples", type=int, default=_DEFAULTS["samples"],
                   help="samples per problem, the k of ACC@k (default 5)")
    p.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"],
                   help="sampling temperature; 0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=_DEFAULTS["top_p"],
                   help="nucleus mass (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=_DEFAULTS["max_new_tokens"],
                   help="generation budget per sample (default 8192, the reference's)")
    p.add_argument("--repetition-penalty", type=float,
                   default=_DEFAULTS["repetition_penalty"],
                   help="HF repetition penalty over prompt + generated ids (default 1.1, the "
                        "reference's; 1 = off)")
    p.add_argument("--no-stop-at-boxed", dest="stop_at_boxed", action="store_false",
                   help="do not end samples at their first complete \\boxed{} (the "
                        "reference does, and cuts the text right after it)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="also end a sample right after this string (repeatable)")
    p.add_argument("--grader", default="math", choices=["math", "reference"],
                   help="headline grader: math-aware equivalence, or the reference's "
                        "exact-string check (summary.json reports both)")
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"])
    p.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"],
                   help="rows (problem x sample) generated together (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--system-prompt", default=None,
                    help=f"system message ('' for none; default: {DEFAULT_SYSTEM_PROMPT!r})")
    sp.add_argument("--system-prompt-file", default=None,
                    help="read the system message from this UTF-8 file")
    p.add_argument("--name", default=None,
                   help="model label in summary.json and tables (default: from --model)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (same settings)")
    distributed.add_arguments(p)
    g = p.add_argument_group("aggregate mode")
    g.add_argument("--aggregate", nargs="+", metavar="EVAL_DIR", default=None,
                   help="print one markdown table over finished eval directories instead")
    g.add_argument("--by-level", action="store_true",
                   help="with --aggregate: a column per difficulty level too")
    g.add_argument("--metric", default="acc", choices=["acc", "pass@1"],
                   help="with --aggregate: the cell value (default acc = ACC@k)")


def _system_prompt(args) -> str:
    if args.system_prompt_file is not None:
        try:
            with open(args.system_prompt_file, encoding="utf-8") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LarkError(f"cannot read the system prompt ({e})",
                            where=args.system_prompt_file) from None
    return DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt


def _run_aggregate(args, rep: Reporter) -> None:
    from lark_jax.evaluation.runner import aggregate

    clash = [f"--{k}" for k in ("model", "benchmark", "out") if getattr(args, k) is not None]
    clash += ["--resume"] if args.resume else []
    if clash:
        raise LarkError(f"--aggregate tabulates finished runs; drop {', '.join(clash)}")
    table, summaries = aggregate(args.aggregate, by_level=args.by_level, metric=args.metric)
    # The table is the command's output (stdout, redirectable); the summary goes to stderr.
    print(table, flush=True)
    models = {s["model"] for s in summaries}
    benches = {s["benchmark"] for s in summaries}
    rep.summary(f"tabulated {len(summaries)} eval run(s): {len(models)} model(s) x "
                f"{len(benches)} benchmark(s)", stderr=True)


def run(args, rep: Reporter) -> None:
    if args.aggregate is not None:
        _run_aggregate(args, rep)
        return
    missing = [f"--{k}" for k in ("model", "benchmark", "out") if getattr(args, k) is None]
    if missing:
        raise LarkError(f"missing {', '.join(missing)} (or use --aggregate EVAL_DIR ...)")
    if args.by_level:
        raise LarkError("--by-level only applies to --aggregate")

    from lark_jax.evaluation.bench import load_benchmark
    from lark_jax.evaluation.runner import EvalConfig, run_eval
    from lark_jax.models import load_student

    cfg = EvalConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, seed=args.seed,
                     batch_size=args.batch_size, system_prompt=_system_prompt(args),
                     repetition_penalty=args.repetition_penalty,
                     stop_at_boxed=args.stop_at_boxed, stop_strings=tuple(args.stop),
                     grader=args.grader)
    cfg.validate()
    bench = load_benchmark(args.benchmark)  # before the model: bad files fail fast
    mesh = None
    if distributed.join(args):
        import jax

        from lark_jax.parallel import make_mesh

        mesh = make_mesh(devices=jax.local_devices())  # each process samples its own share
        if jax.process_index() != 0:
            rep = Reporter(quiet=True)
    rep.info(f"loading {args.model} ({args.dtype})")
    student = load_student(args.model, dtype=args.dtype, mesh=mesh)
    total = len(bench.problems) * cfg.samples
    with rep.bar(total, f"eval {bench.name}", unit="sample") as advance:
        res = run_eval(student, bench, args.out, cfg, resume=args.resume,
                       model_name=args.name, progress=advance)
    s = res.summary
    acc = next(k for k in s if k.startswith("acc@"))
    rep.summary(f"{s['model']} on {bench.name}: {acc} {100 * s[acc]:.1f}%, "
                f"pass@1 {100 * s['pass@1']:.1f}% over {s['n_problems']} problems x "
                f"{cfg.samples} samples ({res.n_generated} generated, {res.n_resumed} resumed) "
                f"in {res.seconds:.1f}s -> {res.out_dir}")
