"""The fused vocabulary-statistics kernel on a card: compiles, agrees with the current head
path, and its speed and MFU against the scorer's current head.

    python benchmarks/gpu/bench_vocab_kernel.py [--small]

At the 1.5B shape (T = 512 scored tokens, d = 1,536, V = 151,936, bf16 hidden states and
head), for a few tilings of ``lark_jax.learnability.pallas_vocab.segment_stats`` and for the
current path (``learnability.kernel._head_stats_local``: [chunk, V] float32 logits through
memory): milliseconds per call, TFLOP/s of the head product (2·T·V·d) and MFU against the
bf16 matmul rate measured in the same process, and the largest relative difference of the
per-trajectory sums from the current path. MFU here is the head's, not the whole scorer's
(the kernel is not wired into ``score`` yet). One JSON to
$LARK_BENCH_RESULTS/vocab_kernel_<platform>.json; a tiling that fails to compile is
recorded with its error and the others still run. ``--small`` is the CPU rehearsal (Pallas
interpreter, tiny shapes).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def _time(fn, args, reps):
    out = fn(*args)
    out.block_until_ready()  # compile and warm up
    t = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t) / reps, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_scoring import matmul_rate_jax

    from lark_jax.learnability.kernel import _head_stats_local
    from lark_jax.learnability.pallas_vocab import segment_stats

    platform = jax.devices()[0].platform
    if args.small:
        t, d, v, dtype, reps = 64, 64, 1000, "float32", 1
        tilings = [dict(block_t=16, block_v=128, splits=2)]
    else:
        t, d, v, dtype, reps = args.tokens, 1536, 151936, "bfloat16", args.reps
        tilings = [dict(block_t=bt, block_v=bv, splits=s, block_d=bd)
                   for bt, bv, s, bd in ((32, 128, 16, 128), (64, 128, 16, 128),
                                         (32, 128, 32, 256), (16, 128, 64, 128))]
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((1, t, d)) / np.sqrt(d), dtype)
    head = jnp.asarray(rng.standard_normal((v, d)), dtype)
    targets = jnp.asarray(rng.integers(0, v, (1, t)), jnp.int32)
    weights = jnp.ones((1, t), jnp.float32)
    segments = (jnp.arange(t)[None] * 8 // t).astype(jnp.int32)  # 8 trajectories
    batch = (hidden, targets, weights, segments, head)
    flops = 2.0 * t * v * d
    rate = matmul_rate_jax(dtype=dtype)
    res = {"machine": common.machine_info(), "tokens": t, "hidden": d, "vocab": v,
           "dtype": dtype, "top_k": args.top_k, "matmul_flop_s": rate, "runs": []}

    def record(name, fn, ref=None, **extra):
        row = {"path": name, **extra}
        try:
            sec, out = _time(jax.jit(fn), batch, reps)
            row.update(ms=1e3 * sec, tflop_s=flops / sec / 1e12, mfu=flops / sec / rate)
            if ref is not None:
                a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
                row["max_rel_diff"] = float((np.abs(a - b) / np.maximum(np.abs(b), 1e-6)).max())
        except Exception as e:  # recorded; the remaining tilings still run
            row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
            out = None
        res["runs"].append(row)
        common.save_results(f"vocab_kernel_{platform}", res)
        print({k: (f"{x:.4g}" if isinstance(x, float) else x) for k, x in row.items()},
              flush=True)
        return out

    ref = record("current", functools.partial(_head_stats_local, top_k=args.top_k,
                                              max_segments=8, chunk_tokens=1024))
    for tiling in tilings:
        record("pallas", functools.partial(segment_stats, top_k=args.top_k, max_segments=8,
                                           interpret=platform == "cpu", **tiling),
               ref=ref, **tiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
