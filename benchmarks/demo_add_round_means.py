#!/usr/bin/env python
"""Usage: python benchmarks/demo_add_round_means.py RUN_DIR RESULTS_DIR

Copy a finished demo run into benchmarks/results: each lark-iterative round gets the
per-teacher mean ĝ and L of the scores its selection saw (from the run's own
diagnostics/scores_*.json, by stages._teacher_means: added after the run for runs made
before the demo recorded them), results.md re-rendered with the current report."""
import json
import shutil
import sys
from pathlib import Path

from lark_jax.demo.report import render_markdown
from lark_jax.demo.stages import _teacher_means
from lark_jax.selection import load_scores

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
r = json.loads((src / "results.json").read_text())
for row in r["methods"]:
    for seed, rounds in row.get("rounds", {}).items():
        for k, rd in enumerate(rounds):
            if rd.get("per_teacher"):
                continue
            f = (src / "scores.json" if k == 0 else
                 src / "diagnostics" / f"scores_{row['method']}-s{seed}-r{k}.json")
            rd["per_teacher"] = _teacher_means(load_scores(f, need=("g_hat", "L")))
dst.mkdir(parents=True, exist_ok=True)
(dst / "results.json").write_text(json.dumps(r, indent=1, ensure_ascii=False) + "\n")
(dst / "results.md").write_text(render_markdown(r))
for p in (src / "plots").glob("*.png"):
    shutil.copy(p, dst / p.name)
print("ok", dst)
