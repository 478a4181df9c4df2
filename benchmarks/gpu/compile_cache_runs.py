"""Compile once: the same ``lark-jax score`` twice with one fresh compile-cache directory.

    python benchmarks/gpu/compile_cache_runs.py --shape 15b --layers 28 --dtype bfloat16

The pool is a handful of trajectories (one batch), so a run's scoring time (what the CLI's
summary reports: reading, packing, compiling, scoring) is its time to the first batch; the
wall time adds the process start and loading the weights. The first run compiles and fills
$LARK_JAX_CACHE; the second should read every program back (the goal on a card: ≤ 3 s to
the first batch). One JSON to $LARK_BENCH_RESULTS/compile_cache_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    common.add_student_args(ap)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lo", type=int, default=256)
    ap.add_argument("--hi", type=int, default=1024)
    args = ap.parse_args(argv)

    import jax

    work, student = common.bench_student(args, "lark-cache-")
    pool = common.make_pool(work / f"pool-cache-{args.n}.jsonl", args.n, args.lo, args.hi)
    cache = Path(tempfile.mkdtemp(prefix="compile-cache-", dir=work))
    env = {**os.environ, "LARK_JAX_CACHE": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    res = {"machine": common.machine_info(), "args": vars(args), "runs": []}
    for run in ("first", "second"):
        out = work / f"scores-cache-{run}.json"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lark_jax", "score", "--pool", str(pool),
                            "--student", str(student), "--out", str(out), "--dtype", args.dtype,
                            "-q"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        files = [f for f in cache.rglob("*") if f.is_file()]
        m = re.search(r" in ([0-9.]+)s", p.stdout)
        row = {"run": run, "rc": p.returncode, "wall_s": wall,
               "score_s": float(m.group(1)) if m else None, "cache_files": len(files),
               "cache_bytes": sum(f.stat().st_size for f in files)}
        if p.returncode:
            row["stderr"] = p.stderr[-2000:]
        res["runs"].append(row)
        common.save_results(f"compile_cache_{jax.devices()[0].platform}", res)
        print(row, flush=True)
    a, b = (work / f"scores-cache-{r}.json" for r in ("first", "second"))
    if a.exists() and b.exists():
        scores = [json.loads(f.read_text())["scores"] for f in (a, b)]
        res["same_scores"] = scores[0] == scores[1]
        common.save_results(f"compile_cache_{jax.devices()[0].platform}", res)
        print({"same_scores": res["same_scores"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
