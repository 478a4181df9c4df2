"""Scoring throughput: lark-jax vs a PyTorch comparator, same pool, same student, one run.

    python benchmarks/bench_scoring.py [--layers 2] [--n 24] [--lo 256] [--hi 2048]

Prints a table and writes benchmarks/results/scoring_<platform>.json. Throughput is
assistant (scored) tokens per second, with and without start-up (model load +
compilation). MFU is model FLOPs per token (2 x matmul params + attention) times
tokens/s over a float32 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402


def matmul_rate_jax(n=None, dtype="float32", reps=5) -> float:
    """Measured n x n matmul FLOP/s: the ceiling MFU is quoted against (n = 8192 on GPU)."""
    import jax
    import jax.numpy as jnp

    n = n or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg, mean_ctx: float) -> float:
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d + 3 * d * f
    attn = 2 * cfg.num_heads * cfg.head_dim * mean_ctx  # QK^T and PV, causal average
    return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * d) + 2 * cfg.num_layers * attn


def _max_rel_diff(a: Path, b: Path) -> float:
    """Largest relative difference of L or Brier between two scores files (same pool)."""
    sa, sb = (json.loads(p.read_text())["scores"] for p in (a, b))
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-30)
               for pid in sb for x, y in zip(sa[pid], sb[pid], strict=True)
               for k in ("L", "Brier"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    common.add_student_args(ap)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--lo", type=int, default=256)
    ap.add_argument("--hi", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--row-length", type=int, default=2048)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--attention", default="auto",
                    choices=["auto", "dense", "blockwise", "flash"])
    ap.add_argument("--vocab-kernel", default="xla", choices=["xla", "pallas"],
                    help="ScoreConfig.vocab_kernel of lark-jax's runs (pallas: the fused "
                         "head + statistics kernel; interpreted, slowly, on a CPU)")
    ap.add_argument("--compare-attention", default="",
                    help="comma-separated attention kernels to time as well, after the "
                         "comparator (e.g. flash on GPU); results under lark_jax_<impl>")
    ap.add_argument("--prefetch", type=int, default=4, help="ScoreConfig.prefetch")
    ap.add_argument("--compare-serial", action="store_true",
                    help="also time lark-jax with all host work inline (prefetch 0, no batch "
                         "in flight): results under lark_jax_serial")
    args = ap.parse_args(argv)

    import jax

    import lark_jax
    from lark_jax.learnability.runner import ScoreConfig, score_pool

    work, student_dir = common.bench_student(args, "lark-bench-")
    pool = common.make_pool(work / f"pool-{args.n}-{args.lo}-{args.hi}.jsonl", args.n, args.lo,
                            args.hi)

    res = {"machine": common.machine_info(), "args": vars(args)}
    def run_ours(impl: str, tag: str, prefetch: int = args.prefetch):
        cfg = ScoreConfig(batch_tokens=args.batch_tokens, row_length=args.row_length,
                          prefetch=prefetch, vocab_kernel=args.vocab_kernel)
        t0 = time.perf_counter()
        student = lark_jax.load_student(student_dir, dtype=args.dtype, attn_impl=impl)
        s1 = score_pool(student, pool, work / f"scores_{tag}.json", cfg)
        cold = time.perf_counter() - t0
        s2 = score_pool(student, pool, work / f"scores_{tag}2.json", cfg)  # compiled
        return student, s1, {"attention": impl, "prefetch": prefetch, "tokens": s1.tokens,
                             "tok_s_incl_startup": s1.tokens / cold,
                             "tok_s_steady": s1.tokens / s2.seconds, "seconds_cold": cold,
                             "seconds_steady": s2.seconds,
                             "padding_fraction": 1 - s2.tokens / s2.padded_tokens}

    student, s1, ours = run_ours(args.attention, "jax")
    res["lark_jax"] = ours
    mean_ctx = s1.padded_tokens / max(1, s1.n_scored) / 2
    fpt = flops_per_token(student.config, mean_ctx)
    rate = matmul_rate_jax(dtype=args.dtype)
    res["matmul_flops_per_s"] = rate
    res["flops_per_token"] = fpt
    ours["mfu"] = fpt * ours["tok_s_steady"] / rate
    plat = jax.devices()[0].platform
    name = f"scoring_{plat}{args.tag}"
    common.save_results(name, res)  # saved after every phase: a time limit keeps what ran

    if not args.skip_torch:
        sys.path.insert(0, str(Path(__file__).parent))
        import torch_scorer

        rows, t_incl, t_excl = torch_scorer.score_pool(student_dir, pool,
                                                       device=args.torch_device,
                                                       dtype=args.dtype)
        n_tok = sum(r["tokens"] for r in rows.values())
        theirs = {"tokens": n_tok, "tok_s_incl_startup": n_tok / t_incl,
                  "tok_s_steady": n_tok / t_excl}
        theirs["mfu"] = fpt * theirs["tok_s_steady"] / rate
        res["torch"] = theirs
        res["speedup_steady"] = ours["tok_s_steady"] / theirs["tok_s_steady"]
        res["speedup_incl_startup"] = ours["tok_s_incl_startup"] / theirs["tok_s_incl_startup"]
        got = json.loads((work / "scores_jax2.json").read_text())["scores"]
        diffs = []
        for pid, cands in got.items():
            for c in cands:
                r = rows[(int(pid), c["candidate_id"])]
                diffs.append(max(abs(c["L"] - r["L"]) / r["L"],
                                 abs(c["Brier"] - r["Brier"]) / r["Brier"]))
        res["max_rel_diff_vs_torch"] = max(diffs)
        common.save_results(name, res)

    variants = [(f"lark_jax_{impl}", impl, args.prefetch)
                for impl in filter(None, args.compare_attention.split(","))]
    if args.compare_serial:
        variants.append(("lark_jax_serial", args.attention, 0))
    for key, impl, pf in variants:
        tag = key.removeprefix("lark_jax_")
        try:
            _, _, r = run_ours(impl, tag, pf)
            r["mfu"] = fpt * r["tok_s_steady"] / rate
            r["speedup_vs_default"] = r["tok_s_steady"] / ours["tok_s_steady"]
            if "torch" in res:
                r["speedup_vs_torch"] = r["tok_s_steady"] / res["torch"]["tok_s_steady"]
        except Exception as e:  # a kernel that fails to lower is a result too
            r = {"attention": impl, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        res[key] = r
        common.save_results(name, res)
        if "error" not in r:
            try:
                r["max_rel_diff_vs_default"] = _max_rel_diff(work / f"scores_{tag}2.json",
                                                             work / "scores_jax2.json")
            except Exception as e:  # the timings above stand either way
                r["max_rel_diff_vs_default"] = f"{type(e).__name__}: {e}"
            common.save_results(name, res)

    path = common.RESULTS / f"{name}.json"
    print(f"{'scorer':16} {'tok/s steady':>14} {'tok/s incl. start':>18} {'MFU':>7}")
    for key, r in res.items():
        if key.startswith(("lark_jax", "torch")) and isinstance(r, dict):
            if "error" in r:
                print(f"{key:16} failed: {r['error'][:200]}")
                continue
            print(f"{key:16} {r['tok_s_steady']:14,.0f} {r['tok_s_incl_startup']:18,.0f} "
                  f"{r['mfu']:7.1%}")
    if "speedup_steady" in res:
        print(f"speed-up (steady) {res['speedup_steady']:.2f}x, incl. start-up "
              f"{res['speedup_incl_startup']:.2f}x; max rel. diff vs torch "
              f"{res['max_rel_diff_vs_torch']:.1e}")
    print(f"matmul ceiling {rate / 1e9:,.1f} GFLOP/s; {fpt / 1e6:,.0f} MFLOP/token; -> {path}")


if __name__ == "__main__":
    main()
