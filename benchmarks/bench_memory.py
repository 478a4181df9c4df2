"""Peak memory scoring (or training on) one long trajectory: lark-jax vs PyTorch.

    python benchmarks/bench_memory.py [--layers 4] [--lengths 1024,4096,8192,16384,32768]
                                      [--torch-max 8192]
    python benchmarks/bench_memory.py --mode train --layers 4 --lengths 32768 --tag _train_32k

``--mode train`` runs one optimizer step of ``lark-jax train`` (defaults: record
objective, float32 master weights and AdamW state, remat chosen automatically)
on a selection holding that one trajectory; no comparator.

Each (scorer, length) runs in a fresh subprocess and reports its peak RSS
(ru_maxrss), so numbers include the interpreter, the libraries and the
weights. The comparator is only run up to --torch-max tokens: its full
[T, V] float32 logits alone need T x 151,936 x 4 bytes (19 GB at 32k), which
would take this 24 GB machine down.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
which, model, pool, dtype = sys.argv[1:5]
t = time.perf_counter()
if which == "jax_train":
    import shutil
    from lark_jax.training.trainer import TrainConfig, train
    shutil.rmtree(pool + ".run", ignore_errors=True)
    r = train(model, pool, pool + ".run", TrainConfig(epochs=1, max_steps=1, batch_size=1,
                                                      dtype=dtype))
    tokens = r.tokens
elif which == "jax":
    import lark_jax
    from lark_jax.learnability.runner import ScoreConfig, score_pool
    s = lark_jax.load_student(model, dtype=dtype)
    import pathlib
    pathlib.Path(pool + ".scores.json.partial.jsonl").unlink(missing_ok=True)
    r = score_pool(s, pool, pool + ".scores.json", ScoreConfig(row_length=2048, chunk_tokens=512))
    tokens = r.tokens
else:
    import torch_scorer
    rows, _, _ = torch_scorer.score_pool(model, pool)
    tokens = sum(v["tokens"] for v in rows.values())
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": tokens, "seconds": time.perf_counter() - t}))
"""


def run_child(which, model, pool, dtype, timeout):
    code = CHILD.replace("{bench!r}", repr(str(Path(__file__).parent)))
    try:
        r = subprocess.run([sys.executable, "-c", code, which, str(model), str(pool), dtype],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["killed"])[-1][:200],
                "returncode": r.returncode}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    ap.add_argument("--torch-max", type=int, default=8192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--work", default=None)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--mode", default="score", choices=["score", "train"])
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="lark-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    model = common.make_student(work / f"qwen05b-{args.layers}l", args.layers)
    cfg = json.loads((model / "config.json").read_text())
    res = {"machine": common.machine_info(), "args": vars(args), "rows": []}
    print(f"{'tokens':>7} {'lark-jax MB':>12} {'s':>7} {'torch MB':>10} {'s':>7}")
    for n in [int(x) for x in args.lengths.split(",")]:
        pool = common.make_pool(work / f"pool{n}.jsonl", 1, n - 40, n - 40, log_uniform=False)
        which = "jax_train" if args.mode == "train" else "jax"
        row = {"length": n, "jax": run_child(which, model, pool, args.dtype, args.timeout)}
        if args.mode == "train":
            row["torch"] = {"skipped": "no comparator for training"}
        elif n <= args.torch_max:
            row["torch"] = run_child("torch", model, pool, args.dtype, args.timeout)
        else:
            row["torch"] = {"skipped": f"logits alone need {n * cfg['vocab_size'] * 4 / 2**30:.1f}"
                                       " GiB"}
        res["rows"].append(row)

        def fmt(r):
            if "peak_rss_mb" in r:
                return f"{r['peak_rss_mb']:10,.0f} {r['seconds']:7.1f}"
            return f"{'-':>10} {'-':>7}"
        print(f"{n:7d} {fmt(row['jax']):>20} {fmt(row['torch']):>18}", flush=True)
    path = common.save_results(f"memory_cpu{args.tag}", res)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
