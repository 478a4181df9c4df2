"""A plain PyTorch + transformers scorer doing what the published scorer does.

One record at a time: full-sequence logits cast to float32, exact CE, top-50
renormalised Brier, on the assistant span of docs/method.md. Dev-only comparator
for the benchmarks (and checked against lark-jax in tests/test_benchmarks.py).
"""

from __future__ import annotations

import json
import time

import torch


def score_record(model, tok, messages, top_k=50, max_length=32768):
    full = tok(tok.apply_chat_template(messages, tokenize=False),
               add_special_tokens=False)["input_ids"][:max_length]
    prompt = tok(tok.apply_chat_template([m for m in messages if m["role"] != "assistant"],
                                         tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    start, end = max(min(len(prompt), len(full)), 1), len(full)
    if end <= start:
        return None
    ids = torch.tensor([full], device=model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0].float()  # [T, V] float32, the whole sequence
    z = logits[start - 1:end - 1]
    y = ids[0, start:end]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    logp = torch.log_softmax(z, dim=-1)
    ce = -logp.gather(1, y[:, None])[:, 0]
    top_v, top_i = torch.topk(z, top_k, dim=-1)
    p = torch.softmax(top_v, dim=-1)
    p_true = (p * (top_i == y[:, None])).sum(-1)
    brier = 1 - 2 * p_true + (p * p).sum(-1)
    return {"tokens": int(end - start), "L": float(ce.mean()), "Brier": float(brier.mean())}


def score_pool(model_dir, pool_path, top_k=50, max_length=32768, threads=None, device="cpu",
               dtype="float32"):
    """Returns ({(pid, cid): stats}, seconds incl. model load, seconds excl. load)."""
    import transformers

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    t1 = time.perf_counter()
    out = {}
    for line in open(pool_path, encoding="utf-8"):
        rec = json.loads(line)
        r = score_record(model, tok, rec["messages"], top_k, max_length)
        if r is not None:
            out[(rec["problem_id"], rec["candidate_id"])] = r
    t2 = time.perf_counter()
    return out, t2 - t0, t2 - t1
