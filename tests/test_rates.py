"""Both exact learnability rates of ``--estimator gradient`` against float64 transformers:
the mean loss's ‖∇θL‖²/L and the summed loss's ‖∇θΣCE‖²/ΣCE (the quantity ρ = Brier/L
stands for), each from its own float64 backward pass."""

import copy
import json

import jax
import pytest
import torch
from conftest import chat_ids, write_pool

import lark_jax
from lark_jax.learnability.runner import ScoreConfig, score_pool
from lark_jax.parallel import make_mesh


def test_rate_mean_and_rate_sum_match_float64_transformers(hf_students, tmp_path):
    d, ref = hf_students["qwen2_bias_tied"]
    ref64 = copy.deepcopy(ref).double()
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    score_pool(s, pool, tmp_path / "g.json", ScoreConfig(top_k=10, estimator="gradient",
                                                         row_length=512, batch_tokens=1024))
    got = json.loads((tmp_path / "g.json").read_text())
    tok = s.tokenizer
    checked = 0
    for line in open(pool, encoding="utf-8"):
        rec = json.loads(line)
        msgs = rec["messages"]
        full, prompt = chat_ids(tok, msgs)
        js = torch.arange(len(prompt), len(full))
        rates = {}
        for name, reduction in (("rate_mean", "mean"), ("rate_sum", "sum")):
            ref64.zero_grad()
            logits = ref64(torch.tensor([full])).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[js - 1], torch.tensor(full)[js],
                                                     reduction=reduction)
            loss.backward()
            g2 = sum(float((p.grad ** 2).sum()) for p in ref64.parameters())
            rates[name] = g2 / float(loss.detach())
        c = next(c for c in got["scores"][str(rec["problem_id"])]
                 if c["candidate_id"] == rec["candidate_id"])
        assert c["tokens"] == len(js)
        # float32 gradients in lark-jax against float64 ones
        assert c["rate_mean"] == pytest.approx(rates["rate_mean"], rel=1e-3)
        assert c["rate_sum"] == pytest.approx(rates["rate_sum"], rel=1e-3)
        assert c["rho"] == c["rate_mean"]
        # The two differ by the length, which is why ρ (≈ rate_sum) and rate_mean rank
        # trajectories of different lengths differently.
        # (to 1e-7: transformers keeps the rotary tables in float32 even in a float64 model)
        assert rates["rate_sum"] == pytest.approx(len(js) * rates["rate_mean"], rel=1e-7)
        checked += 1
    assert checked == 6
