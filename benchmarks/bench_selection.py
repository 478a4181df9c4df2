"""Selection speed: the vectorised closed form and χ² solvers against a per-problem loop.

    .venv/bin/python benchmarks/bench_selection.py [--problems 1000000] [--candidates 8]

Times, on N problems × K candidates of random energies: the JAX closed form (float64, the
CLI's precision, and float32), the exact sorted-threshold solver and mirror descent (both at
each problem's implied τ_B, so their answer is the closed form's), and the plain per-problem
NumPy loop (``reference_closed_form``). The loop runs on a subsample and its time is
extrapolated linearly to N (it is O(1) per problem); the output says so. JAX timings exclude
compilation (one warm-up call on the same shapes); "on device" rows start from arrays already
on the (CPU) device and wait for the result there, the "NumPy in -> NumPy out" row also pays
both copies. The table reports the best of ``--repeats`` runs (the JSON has the median too).
Writes benchmarks/results/selection_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lark_jax.selection.closed_form import (  # noqa: E402
    STATUS_OK,
    STATUS_SHORT,
    closed_form,
    reference_closed_form,
)
from lark_jax.selection.mirror_descent import mirror_descent, solve_exact  # noqa: E402


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out = fn()  # warm-up: compiles for these shapes
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=1_000_000)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--budget", type=int, default=2)
    ap.add_argument("--loop-sample", type=int, default=20_000,
                    help="problems the Python loop really runs (then extrapolated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--entropy-iters", type=int, default=100,
                    help="steps for the plain exponentiated-gradient row (0 to skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "selection_cpu.json"))
    args = ap.parse_args(argv)

    n, k, b = args.problems, args.candidates, args.budget
    rng = np.random.default_rng(args.seed)
    e64 = rng.normal(scale=0.1, size=(n, k))
    rows: list[dict] = []

    def add(name, times, n_timed, note=""):
        best = min(times)
        rows.append({"name": name, "seconds": best, "median_seconds": statistics.median(times),
                     "problems_per_second": n_timed / best, "note": note})

    def on_device(x):
        return jax.block_until_ready(jax.device_put(x))

    def host(result):
        return jax.tree.map(np.asarray, result)

    with jax.enable_x64(True):
        ed = on_device(e64)
        t, _ = timed(lambda: jax.block_until_ready(closed_form(ed, b)), args.repeats)
        add("closed form, float64, on device", t, n, "input already on the device")
        t, cf = timed(lambda: host(closed_form(e64, b)), args.repeats)
        add("closed form, float64, NumPy in -> NumPy out", t, n,
            "includes the host->device copy and copying every output back")
        w_ref = cf.weights
        ok = (cf.status == STATUS_OK) | (cf.status == STATUS_SHORT)
        tau = np.where(ok, cf.tau, 1.0)
        tau_d = on_device(tau)

        t, _ = timed(lambda: jax.block_until_ready(solve_exact(ed, tau_d)), args.repeats)
        ex = host(solve_exact(ed, tau_d))
        add("exact sorted-threshold solver at tau_B, float64, on device", t, n,
            f"max |dq| vs closed form {np.abs(ex.weights - w_ref)[ok].max():.1e}")

        t, _ = timed(lambda: jax.block_until_ready(mirror_descent(ed, tau_d)), args.repeats)
        md = host(mirror_descent(ed, tau_d))
        add("mirror descent (hybrid) at tau_B, float64, on device", t, n,
            f"iterations max {md.iterations.max()} mean {md.iterations.mean():.1f}; "
            f"max KKT {md.kkt.max():.1e}; max gap {md.gap.max():.1e}; "
            f"unconverged {int((~md.converged).sum())}; "
            f"max |dq| vs closed form {np.abs(md.weights - w_ref)[ok].max():.1e}")

        if args.entropy_iters:
            t, eg = timed(lambda: host(mirror_descent(
                ed, tau_d, geometry="entropy", max_iters=args.entropy_iters, tol=1e-6)), 1)
            add(f"mirror descent (plain entropic/EG, {args.entropy_iters} steps), float64", t, n,
                f"converged to KKT 1e-6: {eg.converged.mean():.1%}; max |dq| vs closed form "
                f"{np.abs(eg.weights - w_ref)[ok].max():.1e} (the 1/t tail at tau_B)")

    e32 = on_device(e64.astype(np.float32))
    t, _ = timed(lambda: jax.block_until_ready(closed_form(e32, b)), args.repeats)
    cf32 = host(closed_form(e32, b))
    add("closed form, float32, on device", t, n,
        f"max |dq| vs float64 {np.abs(cf32.weights - w_ref).max():.1e}")
    tau32 = on_device(tau.astype(np.float32))
    t, _ = timed(lambda: jax.block_until_ready(mirror_descent(e32, tau32)), args.repeats)
    md32 = host(mirror_descent(e32, tau32))
    add("mirror descent (hybrid) at tau_B, float32, on device", t, n,
        f"iterations max {md32.iterations.max()}; max |dq| vs float64 closed form "
        f"{np.abs(md32.weights - w_ref)[ok].max():.1e}")

    m = min(args.loop_sample, n)
    loop_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loop_w = np.stack([reference_closed_form(e64[i], b)[0] for i in range(m)])
        loop_times.append(time.perf_counter() - t0)
    assert np.abs(loop_w - w_ref[:m]).max() < 1e-12  # same answer, or the timing is moot
    loop_s = min(loop_times)
    rows.append({"name": "per-problem Python/NumPy loop (reference_closed_form)",
                 "seconds": loop_s * n / m, "median_seconds": statistics.median(loop_times) * n / m,
                 "problems_per_second": m / loop_s,
                 "note": f"measured on {m} problems (best {loop_s:.2f}s of {args.repeats}), "
                         f"extrapolated linearly to {n}"})

    loop_total = rows[-1]["seconds"]
    for r in rows:
        r["speedup_vs_loop"] = loop_total / r["seconds"]

    print(f"selection benchmark: {n:,} problems x {k} candidates, budget {b}, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cpus), best of {args.repeats}")
    print(f"{'':62s} {'seconds':>9s} {'problems/s':>12s} {'vs loop':>9s}")
    for r in rows:
        print(f"{r['name']:62s} {r['seconds']:9.3f} {r['problems_per_second']:12,.0f} "
              f"{r['speedup_vs_loop']:8.0f}x")
        if r["note"]:
            print(f"    {r['note']}")

    result = {
        "benchmark": "selection",
        "command": "python benchmarks/bench_selection.py " + " ".join(argv or sys.argv[1:]),
        "timing": "best of repeats after one warm-up (compile) call; median also given",
        "problems": n, "candidates": k, "budget": b, "repeats": args.repeats,
        "loop_sample": m, "loop_extrapolated": m < n,
        "rows": rows,
        "load_average_at_end": os.getloadavg(),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "numpy": np.__version__,
            "devices": [str(d) for d in jax.devices()],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
