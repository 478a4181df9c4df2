"""``lark-jax`` command line: parse, call the library, report.

Each subcommand registers itself in ``COMMANDS`` with an ``add_arguments``
and a ``run(args, reporter)``; errors the user can fix (``LarkError``) print
one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lark_jax import distributed  # no JAX import at module level: the parser stays light
from lark_jax.data.reader import add_pool_arguments, pool_options, pool_size
from lark_jax.errors import LarkError
from lark_jax.hostmem import tune_cpu_malloc
from lark_jax.progress import Reporter

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g.add_argument("-v", "--verbose", action="store_true", help="more progress output")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="neither read nor write JAX's persistent compilation cache "
                        "($LARK_JAX_CACHE/compile, default ~/.cache/lark-jax/compile; "
                        "$JAX_COMPILATION_CACHE_DIR wins)")


# -- generate --------------------------------------------------------------------------


def _add_generate(p):
    p.add_argument("--model", required=True,
                   help="HF-style model directory, or a Hub id ORG/NAME[@REV]")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a user message (repeatable)")
    src.add_argument("--prompts-file", help="text file, one user message per line")
    p.add_argument("--raw", action="store_true",
                   help="use prompts as-is instead of applying the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32, help="decoding slots")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF repetition penalty over prompt + generated ids (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a completion right after this string (repeatable)")
    p.add_argument("--stop-at-boxed", action="store_true",
                   help="end a completion right after its first complete \\boxed{...}")


def _run_generate(args, rep: Reporter) -> None:
    from lark_jax.evaluation.completions import generate
    from lark_jax.models import load_student

    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                messages = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LarkError(f"cannot read prompts ({e})", where=args.prompts_file) from None
    else:
        messages = args.prompt
    if not messages:
        raise LarkError("no prompts (the prompts file has no non-empty line)",
                        where=args.prompts_file)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise LarkError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.repetition_penalty > 0:
        raise LarkError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if any(not x for x in args.stop):
        raise LarkError("--stop strings must be non-empty")
    student = load_student(args.model, dtype=args.dtype)
    if args.raw:
        prompts = messages
    else:
        prompts = [student.tokenizer.apply_chat_template(
            [{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
            for m in messages]
    t0 = time.perf_counter()
    with rep.bar(len(prompts), "generate", unit="prompt") as advance:
        outs = generate(student, prompts, args.max_new_tokens, args.temperature, args.top_p,
                        args.seed, batch_size=args.batch_size, progress=advance,
                        repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                        stop_at_boxed=args.stop_at_boxed)
    for m, o in zip(messages, outs, strict=True):
        print(json.dumps({"prompt": m, "completion": o}, ensure_ascii=False))
    # stdout carries the JSON lines: the summary goes to stderr
    rep.summary(f"generated {len(outs)} completion(s) in {time.perf_counter() - t0:.1f}s",
                stderr=True)


# -- make-tiny -------------------------------------------------------------------------


def _add_make_tiny(p):
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--family", default="qwen2", choices=["llama", "qwen2", "qwen3"])
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _run_make_tiny(args, rep: Reporter) -> None:
    from lark_jax.models.tiny import make_tiny_student

    if args.layers < 1:
        raise LarkError("--layers must be >= 1")
    if args.hidden_size < 8 or args.hidden_size % 8:
        # 4 heads of an even size (rotary embeddings pair dimensions)
        raise LarkError("--hidden-size must be a positive multiple of 8")
    out = make_tiny_student(args.out, args.family, seed=args.seed, overwrite=args.overwrite,
                            hidden_size=args.hidden_size, num_layers=args.layers)
    rep.summary(f"wrote a random tiny {args.family} student to {out}")


# -- score -----------------------------------------------------------------------------


def _add_score(p):
    p.add_argument("--pool", required=True,
                   help="trajectory pool: JSONL, parquet file or directory, a datasets "
                        "save_to_disk directory, or hf://datasets/ORG/NAME[/CONFIG][@REV]")
    p.add_argument("--student", required=True,
                   help="HF-style student directory, or a Hub id ORG/NAME[@REV]")
    p.add_argument("--out", required=True,
                   help="scores to write: the reference's JSON, or parquet (one candidate a "
                        "row, built without holding the rows) when OUT ends in .parquet")
    p.add_argument("--top-k", type=int, default=50, help="K of the top-K Brier (reference: 50)")
    p.add_argument("--brier", default="topk", choices=["topk", "full"],
                   help="Brier used for rho: the reference's top-K renormalised, or exact")
    p.add_argument("--max-length", type=int, default=32768)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="tokens per batch over all devices (rows x row length)")
    p.add_argument("--row-length", type=int, default=2048,
                   help="packed row length (power of two); longer trajectories get own rows")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="positions whose float32 logits are held at once")
    p.add_argument("--model-parallel", type=int, default=1,
                   help="split parameters over this many devices (the mesh's model axis)")
    _add_attention(p)
    p.add_argument("--prefetch", type=int, default=4,
                   help="batches a host thread reads, tokenizes and packs ahead (0: inline)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    distributed.add_arguments(p)
    p.add_argument("--compat", default=None, choices=["reference"],
                   help="the published scorer's conventions: skip assistant spans of <= 1 "
                        "token; with --dtype bfloat16, round logits to bfloat16 before the "
                        "float32 statistics (default: exact float32 logits)")
    add_pool_arguments(p, filters=True)
    p.add_argument("--exclude-benchmark", action="append", default=[], metavar="BENCH",
                   help="drop pool problems that match a problem of this benchmark file "
                        "(normalised text or a shared 13-gram); repeatable")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="drop trajectories longer than this many tokens (chat template "
                        "included), counted in the scores' pool_filters")
    p.add_argument("--vocab-kernel", default="xla", choices=["xla", "pallas"],
                   help="how the head and the statistics run: xla (in chunks of "
                        "--chunk-tokens logits) or pallas (one fused kernel, no logits in "
                        "memory; interpreted, slowly, on a CPU)")
    p.add_argument("--estimator", default="proxy", choices=["proxy", "gradient"],
                   help="proxy = the forward-pass Brier/L of the paper; gradient = the exact "
                        "rate ||grad L||^2/L (one backward pass per trajectory)")


def _run_score(args, rep: Reporter) -> None:
    from lark_jax.learnability.runner import ScoreConfig, score_pool
    from lark_jax.models import load_student
    from lark_jax.parallel import make_mesh, mesh_summary

    cfg = ScoreConfig(top_k=args.top_k, brier=args.brier, max_length=args.max_length,
                      batch_tokens=args.batch_tokens, row_length=args.row_length,
                      chunk_tokens=args.chunk_tokens, estimator=args.estimator,
                      compat=args.compat, max_tokens=args.max_tokens,
                      prefetch=args.prefetch, vocab_kernel=args.vocab_kernel)
    cfg.validate()
    options = _score_pool_options(args)
    devices = None
    if distributed.join(args):
        import jax

        devices = jax.local_devices()  # each host scores its own slice of the pool
        if jax.process_index() != 0:
            rep = Reporter(quiet=True)
    _check_attention(args.attention)
    mesh = make_mesh(model=args.model_parallel, devices=devices)
    rep.info(f"loading {args.student} ({args.dtype}) on {mesh_summary(mesh)}")
    student = load_student(args.student, dtype=args.dtype, mesh=mesh, attn_impl=args.attention)
    total = pool_size(args.pool, options)
    done_tokens = 0

    def progress(n, tokens):
        nonlocal done_tokens
        done_tokens += tokens
        advance(n, tokens=f"{done_tokens:,}")

    with rep.bar(total, "score", unit="traj") as advance:
        s = score_pool(student, args.pool, args.out, cfg, resume=args.resume, progress=progress,
                       pool_options=options)
    rate = s.tokens / s.seconds if s.seconds > 0 else 0.0
    rep.summary(f"scored {s.n_scored} trajectories of {s.n_problems} problems "
                f"({s.n_skipped} skipped, {s.n_resumed} resumed); {s.tokens} tokens in "
                f"{s.seconds:.1f}s ({rate:,.0f} tok/s) -> {s.out}")


def _add_attention(p) -> None:
    p.add_argument("--attention", default="auto",
                   choices=["auto", "dense", "blockwise", "flash"],
                   help="attention kernel: auto (on a GPU flash, else dense for short rows "
                        "and blockwise for long ones), or one of them (flash: JAX's fused "
                        "Pallas kernel, GPU only)")


def _check_attention(impl: str) -> None:
    import jax

    if impl == "flash" and jax.default_backend() != "gpu":
        # Off GPU the Pallas kernel could only run in its (very slow) interpreter.
        raise LarkError(f"--attention flash needs a GPU (this run's backend is "
                        f"{jax.default_backend()}); use auto or blockwise")


def _score_pool_options(args):
    """The pool options of ``score``, benchmarks for decontamination loaded."""
    from lark_jax.data.filters import Decontaminator
    from lark_jax.evaluation.bench import load_benchmark

    exclude = None
    if args.exclude_benchmark:
        exclude = Decontaminator(p.prompt for path in args.exclude_benchmark
                                 for p in load_benchmark(path).problems)
    return pool_options(args, exclude, tuple(args.exclude_benchmark))


# -- train -----------------------------------------------------------------------------


def _add_train(p):
    p.add_argument("--data", required=True,
                   help="selection: JSONL (meta.train_weight honoured) or parquet (its "
                        "train_weight column)")
    p.add_argument("--student", required=True,
                   help="HF-style student directory, or a Hub id ORG/NAME[@REV]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=64, help="records per optimizer step")
    p.add_argument("--max-length", type=int, default=32768,
                   help="truncate records to this many tokens (the reference's 32,768)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="run exactly N optimizer steps, cycling through the data "
                        "(overrides --epochs, as in HF Trainer)")
    p.add_argument("--objective", default="record", choices=["record", "reference", "token"],
                   help="record: sum_r w_r*meanCE_r / sum_r w_r (default); reference: the "
                        "published runs' plain mean of per-record mean CE (weights only "
                        "zero out); token: sum_t w*CE / sum_t w")
    p.add_argument("--system-turn", default="keep", choices=["keep", "empty"],
                   help="empty: replace each record's system messages by one empty system "
                        "turn, as the reference's SFT data does (default: keep them)")
    p.add_argument("--warmup-ratio", type=float, default=0.05,
                   help="warm-up steps = ceil(ratio x total steps), as in HF Trainer")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="tokens per forward/backward pass; gradients accumulate to the batch")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--prefetch", type=int, default=2,
                   help="steps a host thread packs ahead while the device trains (0: inline)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (master weights and optimizer state stay float32)")
    p.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--remat", dest="remat", action="store_const", const=True, default=None,
                   help="recompute decoder blocks in the backward pass (default: automatic, "
                        "on when a micro-batch's activations would exceed 4 GiB)")
    g.add_argument("--no-remat", dest="remat", action="store_const", const=False)
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters and optimizer state over the data axis")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train rank-R LoRA factors of every projection (0 = full fine-tuning);"
                        " merged into the weights at export")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha/R "
                   "(default alpha = 2R)")
    _add_attention(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="train only up to global step STEP of the run's schedule: the "
                        "checkpoint and final/ hold that step's state (iterative selection: "
                        "score with final/, select, then --resume --switch-data)")
    p.add_argument("--switch-data", action="store_true",
                   help="with --resume: go on from the checkpoint on --data, a new selection "
                        "(same schedule: give --max-steps); run_config.json's data_history "
                        "lists each file and the step it took over from")
    distributed.add_arguments(p)


def _run_train(args, rep: Reporter) -> None:
    from lark_jax.training.trainer import TrainConfig, train

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      max_length=args.max_length, max_steps=args.max_steps,
                      objective=args.objective, system_turn=args.system_turn,
                      warmup_ratio=args.warmup_ratio,
                      weight_decay=args.weight_decay,
                      micro_batch_tokens=args.micro_batch_tokens, save_every=args.save_every,
                      keep=args.keep, seed=args.seed, dtype=args.dtype, remat=args.remat,
                      fsdp=args.fsdp, export_dtype=args.export_dtype,
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      attention=args.attention, prefetch=args.prefetch,
                      stop_after=args.stop_after)
    cfg.validate()
    _check_attention(cfg.attention)
    if distributed.join(args):  # one mesh over every process's devices (train's default)
        import jax

        if jax.process_index() != 0:
            rep = Reporter(quiet=True)

    with rep.bar(None, "train", unit="step") as advance:
        def progress(step, total, loss, tok_s):
            advance(1, loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", total=total)

        s = train(args.student, args.data, args.out, cfg, resume=args.resume,
                  switch_data=args.switch_data, progress=progress)
    resumed = f" (resumed from step {s.resumed_from})" if s.resumed_from else ""
    rep.summary(f"trained {s.steps} step{'s' if s.steps != 1 else ''}{resumed}; final loss "
                f"{s.final_loss:.4f}; {s.tokens} tokens in {s.seconds:.1f}s -> {s.final_dir}")


def _lazy(module: str, attr: str):
    """Defer importing a command's module (and JAX) until the command runs."""
    def call(*a):
        import importlib

        return getattr(importlib.import_module(module), attr)(*a)
    return call


COMMANDS = {
    "score": ("score a trajectory pool with a student (LARK learnability)",
              _add_score, _run_score),
    "generate": ("complete prompts with a student (KV-cached, batched)",
                 _add_generate, _run_generate),
    "select": ("select weighted training trajectories (LARK chi-square policy or a baseline)",
               _lazy("lark_jax.selection.command", "add_arguments"),
               _lazy("lark_jax.selection.command", "run")),
    "train": ("fine-tune a student on a selection (weighted SFT)", _add_train, _run_train),
    "eval": ("evaluate a model on a benchmark (ACC@k, pass@k) or tabulate eval runs",
             _lazy("lark_jax.evaluation.command", "add_arguments"),
             _lazy("lark_jax.evaluation.command", "run")),
    "demo": ("run the embedded demo end to end: tiny student, multi-teacher task, "
             "score -> select -> train -> eval, with the paper's diagnostics",
             _lazy("lark_jax.demo.command", "add_arguments"),
             _lazy("lark_jax.demo.command", "run")),
    "make-tiny": ("write a random tiny HF-style student (for tests and trying things out)",
                  _add_make_tiny, _run_make_tiny),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lark-jax",
        description="LARK: learnability-grounded selection of reasoning trajectories (JAX).")
    from lark_jax._version import __version__

    parser.add_argument("--version", action="version", version=f"lark-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tune_cpu_malloc()  # before JAX starts its CPU client (lark_jax.hostmem)
    from lark_jax.compile_cache import compile_cache  # imports JAX: only once a command runs

    rep = Reporter(quiet=args.quiet, verbose=args.verbose)
    try:
        with compile_cache(args.compile_cache):  # before the command compiles anything
            COMMANDS[args.command][2](args, rep)
    except LarkError as e:
        print(f"lark-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lark-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
