"""Reading pools and selecting from them: trajectories/s and peak RSS, per layout.

    python benchmarks/bench_pool_io.py --problems 200000 --k 5        # 1M trajectories
    python benchmarks/bench_pool_io.py --problems 20000 --k 5 --tag _100k

Builds (once, under --work) one synthetic pool in three layouts — the reference JSONL,
one trajectory a row in parquet, one problem a row in parquet (OpenR1-style) — and a
scores JSON for it, then times, each in its own process (so that its peak RSS is its
own): reading every trajectory through ``data.reader.iter_pool``, and ``lark-jax select``
(LARK, budget 1) from each layout. Writes benchmarks/results/pool_io<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

TEACHERS = ("r1", "qwq", "terse", "verbose", "odd")


def trajectory(rng: random.Random, pid: int, k: int) -> str:
    words = rng.randint(60, 160)  # about 850 bytes a trajectory, as in the pool
    return " ".join(f"step{(pid + k + i) % 97}" for i in range(words)) + f" \\boxed{{{pid % 50}}}"


def build(work: Path, n: int, k: int, layouts=("jsonl", "trajectory parquet",
                                                 "problem parquet")) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": work / "pool.jsonl", "trajectory parquet": work / "traj.parquet",
             "problem parquet": work / "problems.parquet", "scores": work / "scores.json"}
    if all(paths[x].exists() for x in (*layouts, "scores")):
        return paths
    rng = random.Random(0)
    batch = 20_000
    traj_writer = prob_writer = None
    with open(paths["jsonl"], "w") as f, open(paths["scores"], "w") as sf:
        sf.write('{"method": "lark_ghat", "student_model": "synthetic", "top_k": 50, '
                 f'"n_problems": {n}, "n_scored": {n * k}, "n_skipped": 0, "scores": {{')
        for start in range(0, n, batch):
            traj = {"problem_id": [], "candidate_id": [], "teacher": [], "messages": []}
            prob = {"problem_id": [], "problem": [], "generations": [], "teachers": []}
            for pid in range(start, min(n, start + batch)):
                q = f"Problem {pid}: what is {pid % 50}?"
                gens = [trajectory(rng, pid, c) for c in range(k)]
                rows = []
                for c, g in enumerate(gens):
                    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": g}]
                    if "jsonl" in layouts:
                        f.write(json.dumps({"problem_id": pid, "candidate_id": c,
                                            "teacher": TEACHERS[c % 5], "messages": msgs})
                                + "\n")
                    for key, v in zip(traj, (pid, c, TEACHERS[c % 5], msgs), strict=True):
                        traj[key].append(v)
                    loss = rng.uniform(0.2, 2.0)
                    rho = rng.uniform(0.05, 0.5)
                    rows.append({"candidate_id": c, "teacher": TEACHERS[c % 5], "L": loss,
                                 "Brier": rho * loss, "rho": rho, "g_hat": rng.gauss(0, 1),
                                 "tokens": len(g) // 4})
                sf.write(("" if pid == 0 else ", ") + json.dumps(str(pid)) + ": "
                         + json.dumps(rows))
                for key, v in zip(prob, (pid, q, gens, [TEACHERS[c % 5] for c in range(k)]),
                                  strict=True):
                    prob[key].append(v)
            t_traj, t_prob = pa.table(traj), pa.table(prob)
            if "trajectory parquet" in layouts:
                traj_writer = traj_writer or pq.ParquetWriter(paths["trajectory parquet"],
                                                              t_traj.schema)
                traj_writer.write_table(t_traj)
            prob_writer = prob_writer or pq.ParquetWriter(paths["problem parquet"],
                                                          t_prob.schema)
            prob_writer.write_table(t_prob)
        sf.write("}}\n")
    if traj_writer is not None:
        traj_writer.close()
    prob_writer.close()
    return paths


READ = """
import resource, sys, time
from lark_jax.data.reader import iter_pool
t = time.perf_counter()
n = sum(1 for _ in iter_pool(sys.argv[1]))
dt = time.perf_counter() - t
print(n, dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


SELECT = """
import resource, sys
from lark_jax.cli import main
rc = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--work", default="/tmp/lark-pool-io")
    ap.add_argument("--tag", default="")
    ap.add_argument("--layouts", default="jsonl,trajectory parquet,problem parquet",
                    help="comma-separated layouts to time (all are built)")
    ap.add_argument("--in-memory", action="store_true",
                    help="also time select --in-memory (the whole-table path) side by side")
    args = ap.parse_args(argv)
    work = Path(args.work) / f"{args.problems}x{args.k}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build(work, args.problems, args.k, args.layouts.split(","))
    print(f"pool of {args.problems * args.k:,} trajectories ready in "
          f"{time.perf_counter() - t0:.0f}s ({paths['jsonl'].stat().st_size / 1e6:.0f} MB JSONL)")
    rows = []
    for layout in args.layouts.split(","):
        out = subprocess.run([sys.executable, "-c", READ, str(paths[layout])],
                             capture_output=True, text=True, check=True).stdout.split()
        n, dt, rss = int(out[0]), float(out[1]), int(out[2])
        row = {"layout": layout, "trajectories": n, "read_s": dt, "read_traj_per_s": n / dt,
               "read_peak_rss_mb": rss / 1024}
        modes = [("select", ())] + ([("select_in_memory", ("--in-memory",))]
                                    if args.in_memory else [])
        for name, extra in modes:
            sel = work / f"sel-{layout.replace(' ', '-')}.jsonl"
            t = time.perf_counter()
            sel_rss = int(subprocess.run(
                [sys.executable, "-c", SELECT, "select", "-q", "--scores", str(paths["scores"]),
                 "--pool", str(paths[layout]), "--out", str(sel), *extra],
                capture_output=True, text=True, check=True).stdout.split()[-1])
            row[f"{name}_s"] = time.perf_counter() - t
            row[f"{name}_peak_rss_mb"] = sel_rss / 1024
        rows.append(row)
        print(f"{layout:20s} read {n:,} in {dt:.1f}s ({n / dt:,.0f}/s, peak {rss / 1024:.0f} MB); "
              + "; ".join(f"{name} {row[name + '_s']:.1f}s (peak "
                          f"{row[name + '_peak_rss_mb']:.0f} MB)" for name, _ in modes))
    res = {"machine": common.machine_info(), "args": vars(args), "rows": rows}
    print("->", common.save_results(f"pool_io{args.tag}", res))


if __name__ == "__main__":
    main()
