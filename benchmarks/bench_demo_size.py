"""What a smaller demo costs and what it still measures: the quick preset at another size.

The quick preset is compute-bound on a CPU (its fine-tunes are matmuls, not per-run
overhead), so its wall time follows the student's size, the pool's and the epochs. This
runs the whole quick demo (all its methods, seeds, 500 benchmark problems, the
diagnostics) with the student, pool and epochs given here, from an empty cache (a fresh
temporary cache directory: the student is built and every program compiled), and saves
results.json / results.md under benchmarks/results/demo_size_<tag>/.

    python benchmarks/bench_demo_size.py --hidden 64 --layers 2 --intermediate 176 \\
        --pretrain-steps 1000 --pool 400 --epochs 2 --tag h64l2_pool400_e2

It prints the wall time per stage and, for the issue's criteria, the untouched student's
and 'all''s ACC against the blind-guess floor, and the budget-B methods' ACC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=800, help="pool problems")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tag", required=True, help="results go to results/demo_size_<tag>/")
    args = ap.parse_args()

    from lark_jax.demo import demo_config, run_demo
    from lark_jax.progress import Reporter

    quick = demo_config(quick=True)
    cfg = dataclasses.replace(
        quick, preset=f"quick-resized-{args.tag}", epochs=args.epochs,
        task=dataclasses.replace(quick.task, n_pool=args.pool),
        student=dataclasses.replace(
            quick.student, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate, pretrain_steps=args.pretrain_steps))
    work = Path(tempfile.mkdtemp(prefix="lark-demo-size-"))
    try:  # a fresh cache: the student is built and every program compiled
        res = run_demo(work / "out", config=cfg, cache_dir=work / "cache",
                       reporter=Reporter(quiet=False)).results
        dest = RESULTS / f"demo_size_{args.tag}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md"):
            shutil.copy(work / "out" / name, dest / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {r["method"]: r for r in res["methods"]}
    summary = {
        "seconds": res["seconds"], "stages_s": res["timings_s"],
        "student_params": res["student"]["num_params"],
        "base_acc": res["base"]["acc"], "guess_acc": res["guess"]["acc"],
        "acc": {m: r["acc"]["mean"] for m, r in rows.items()},
        "acc_ci95": {m: r["acc"]["ci95"] for m, r in rows.items()},
        "spearman_ghat_vs_loss": res["diagnostics"]["spearman_ghat_vs_loss"],
    }
    print(json.dumps(summary, indent=1))
    print(f"saved {dest}")


if __name__ == "__main__":
    main()
