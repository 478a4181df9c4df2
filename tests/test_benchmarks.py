"""The benchmark comparator (benchmarks/torch_scorer.py) computes what lark-jax computes."""

import json
import sys
from pathlib import Path

import jax
import pytest
from conftest import write_pool

import lark_jax
from lark_jax.learnability.runner import ScoreConfig, score_pool
from lark_jax.parallel import make_mesh

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import torch_scorer  # noqa: E402


@pytest.mark.parametrize("case", ["qwen2_bias_tied", "llama3_rope_untied_bias"])
def test_torch_comparator_agrees_with_lark_jax(hf_students, tmp_path, case):
    d, _ = hf_students[case]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    theirs, _, _ = torch_scorer.score_pool(d, pool, top_k=50)
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:2]))
    score_pool(s, pool, tmp_path / "s.json", ScoreConfig(top_k=50, row_length=128))
    ours = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert sum(len(v) for v in ours.values()) == len(theirs) == 12
    for pid, cands in ours.items():
        for c in cands:
            t = theirs[(int(pid), c["candidate_id"])]
            assert c["tokens"] == t["tokens"]
            assert c["L"] == pytest.approx(t["L"], rel=1e-5)
            assert c["Brier"] == pytest.approx(t["Brier"], rel=1e-5)
