"""Scoring: kernel vs float64 NumPy, end to end vs transformers logits, devices, resume."""

import dataclasses
import itertools
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import chat_ids, spy_flash, write_pool
from hypothesis import given, settings
from hypothesis import strategies as st

import lark_jax
from lark_jax import LarkError
from lark_jax.data.chat import tokenize_record
from lark_jax.data.prefetch import prefetch
from lark_jax.data.reader import iter_pool
from lark_jax.learnability.kernel import blocked_top_k, token_stats
from lark_jax.learnability.runner import ScoreConfig, score_pool
from lark_jax.learnability.scores import g_hat
from lark_jax.parallel import make_mesh


def np_token_stats(z, y, k):
    """Float64 oracle, written independently of the kernel (sorting, explicit loops)."""
    z = np.asarray(z, np.float64)
    out = []
    for zi, yi in zip(z, y, strict=True):
        m = zi.max()
        p = np.exp(zi - m) / np.exp(zi - m).sum()
        ce = -np.log(p[yi])
        onehot = np.zeros_like(p)
        onehot[yi] = 1
        brier_full = ((onehot - p) ** 2).sum()
        top = np.argsort(-zi, kind="stable")[:k]
        pk = np.exp(zi[top] - zi[top].max())
        pk /= pk.sum()
        p_true = pk[list(top).index(yi)] if yi in top else 0.0
        brier_topk = 1 - 2 * p_true + (pk**2).sum()
        rank = min(1 + int((zi > zi[yi]).sum()), 100)
        out.append((ce, brier_topk, brier_full, rank))
    return np.array(out)


def test_token_stats_match_float64_oracle():
    rng = np.random.RandomState(0)
    v, n, k = 300, 64, 50
    z = (rng.randn(n, v) * 3).astype(np.float32)
    y = rng.randint(0, v, n)
    y[:8] = np.argsort(-z[:8], axis=1)[:, 0]  # some targets at rank 1
    y[8:16] = np.argsort(-z[8:16], axis=1)[:, 49]  # some at the edge of the top K
    got = np.stack([np.asarray(a) for a in token_stats(jnp.asarray(z), jnp.asarray(y), k)], -1)
    want = np_token_stats(z, y, k)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert (want[:, 3] == 100).any() and (want[:, 3] == 1).any()  # rank clip exercised
    assert (got[16:, 1] > 0.99).any()  # target outside the top K: p_true = 0


def test_token_stats_on_a_large_vocabulary_use_the_blocked_top_k():
    """V = 20,001 (not a multiple of the block): the two-stage top-K path, same oracle."""
    rng = np.random.RandomState(1)
    v, n, k = 20001, 12, 50
    z = (rng.randn(n, v) * 2).astype(np.float32)
    z[0, :300] += 9.0  # the top K crowded into a few blocks
    z[1, -1] = 50.0  # the last, padded block holds the maximum
    y = rng.randint(0, v, n)
    y[:4] = np.argsort(-z[:4], axis=1)[:, 10]
    y[4] = np.argsort(-z[4])[49]
    got = np.stack([np.asarray(a) for a in token_stats(jnp.asarray(z), jnp.asarray(y), k)], -1)
    np.testing.assert_allclose(got, np_token_stats(z, y, k), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("v", [151936, 100003])  # Qwen's vocabulary; a prime (padded blocks)
def test_token_stats_keep_float64_accuracy_on_a_real_vocabulary(v):
    """A float32 running sum over 1.5e5 terms drifts ~5e-4; the blocked sums must not."""
    rng = np.random.RandomState(2)
    z = (rng.randn(8, v) * 3).astype(np.float32)
    y = rng.randint(0, v, 8)
    got = np.stack([np.asarray(a, np.float64) for a in
                    token_stats(jnp.asarray(z), jnp.asarray(y), 50)], -1)
    want = np_token_stats(z, y, 50)
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=0, atol=1e-5)  # CE in nats
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v,k,block", [(1000, 5, 16), (999, 7, 8), (4096, 3, 64)])
def test_blocked_top_k_equals_lax_top_k(v, k, block):
    rng = np.random.RandomState(v)
    z = rng.randn(6, v).astype(np.float32)
    z[1] = np.round(z[1])  # many exact ties
    z[4] = 0.0
    z[4, [3, block + 5, 3 * block + 1]] = 1.0  # ties across blocks at the k-th place
    z[2, : v // 2] = -np.inf
    z[3, 5 * block: 6 * block] += 100.0  # all of the top k in one block
    vals, idx = blocked_top_k(jnp.asarray(z), k, block)
    want_v, want_i = jax.lax.top_k(jnp.asarray(z), k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_v))
    np.testing.assert_array_equal(np.take_along_axis(z, np.asarray(idx), 1), np.asarray(vals))
    assert all(len(set(r)) == k for r in np.asarray(idx).tolist())  # k distinct tokens
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i))  # ties: lower index


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8),
       st.lists(st.floats(0.0, 3.0), min_size=8, max_size=8))
def test_g_hat_is_the_gradient_of_mixture_learnability(losses, rhos):
    """ĝ_k = ∂R/∂q_k at uniform q, R(q) = Σ q² Brier / Σ q L  (finite-difference oracle)."""
    L = np.array(losses)
    rho = np.array(rhos[:len(L)])
    g = g_hat(L, rho)
    if L.sum() <= 1e-12:
        assert np.isnan(g).all()
        return
    B = rho * L

    def R(q):
        return (q * q * B).sum() / (q * L).sum()

    q0 = np.full(len(L), 1 / len(L))
    for k in range(len(L)):
        h = 1e-6
        e = np.zeros(len(L))
        e[k] = h
        fd = (R(q0 + e) - R(q0 - e)) / (2 * h)
        assert abs(fd - g[k]) <= 1e-5 * max(1, abs(fd))


def oracle_scores(model, tok, pool_path, k, max_length):
    """Reference computation: one record at a time, full logits from transformers."""
    rows = {}
    for line in Path(pool_path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        msgs = rec["messages"]
        full = tok(tok.apply_chat_template(msgs, tokenize=False),
                   add_special_tokens=False)["input_ids"][:max_length]
        prompt = tok(tok.apply_chat_template([m for m in msgs if m["role"] != "assistant"],
                                             tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        start, end = min(len(prompt), len(full)), len(full)
        if end - max(start, 1) <= 0:
            continue
        with torch.no_grad():
            z = model(torch.tensor([full])).logits[0].numpy()
        js = np.arange(max(start, 1), end)
        st_ = np_token_stats(z[js - 1], np.array(full)[js], k)
        rows[(rec["problem_id"], rec["candidate_id"])] = st_
    return rows


@pytest.mark.parametrize("case", ["qwen2_bias_tied", "llama3_rope_untied_bias"])
def test_scores_match_transformers_oracle(hf_students, case, tmp_path):
    d, ref = hf_students[case]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    # Short rows so that verbose trajectories take the long-row path too.
    cfg = ScoreConfig(top_k=20, row_length=128, batch_tokens=512, chunk_tokens=64)
    summary = score_pool(student, pool, tmp_path / "scores.json", cfg)
    got = json.loads((tmp_path / "scores.json").read_text())
    want = oracle_scores(ref, student.tokenizer, pool, 20, cfg.max_length)
    assert summary.n_scored == len(want) == 15 and got["n_skipped"] == 0
    assert max(len(x) for x in want.values()) > 128  # long path exercised
    for pid, cands in got["scores"].items():
        Ls, rhos = [], []
        for c in cands:
            w = want[(int(pid), c["candidate_id"])]
            L, Bk, Bf, rank = w[:, 0].mean(), w[:, 1].mean(), w[:, 2].mean(), w[:, 3].sum()
            assert c["tokens"] == len(w)
            np.testing.assert_allclose(
                [c["L"], c["Brier"], c["brier_full"], c["rsr"]],
                [L, Bk, Bf, rank / w[:, 0].sum()], rtol=1e-4)
            Ls.append(L)
            rhos.append(Bk / L)
        np.testing.assert_allclose([c["g_hat"] for c in cands], g_hat(Ls, rhos), rtol=1e-3,
                                   atol=1e-7)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_one_device_equals_eight(hf_students, tmp_path):
    d, _ = hf_students["qwen3_qknorm_headdim"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=6)
    cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=1024, chunk_tokens=128)
    out = {}
    for n in (1, 8):
        s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:n]))
        score_pool(s, pool, tmp_path / f"s{n}.json", cfg)
        out[n] = json.loads((tmp_path / f"s{n}.json").read_text())["scores"]
    assert out[1].keys() == out[8].keys()
    for pid in out[1]:
        for a, b in zip(out[1][pid], out[8][pid], strict=True):
            assert a["candidate_id"] == b["candidate_id"] and a["tokens"] == b["tokens"]
            np.testing.assert_allclose([a["L"], a["Brier"], a["g_hat"]],
                                       [b["L"], b["Brier"], b["g_hat"]], rtol=1e-5)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_flash_attention_scores_equal_default_on_one_and_eight_devices(hf_students, tmp_path,
                                                                       monkeypatch):
    """The fused kernel runs per device under shard_map: rows over "data", heads over
    "model" (a 4 x 2 mesh); the scores equal the default path's on one device."""
    d, _ = hf_students["qwen3_qknorm_headdim"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=3)
    cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=1024, chunk_tokens=128)
    runs = {"auto-1": (1, 1, "auto"), "flash-1": (1, 1, "flash"), "flash-8": (8, 2, "flash")}
    out = {}
    traced = spy_flash(monkeypatch)
    for name, (n, model, impl) in runs.items():
        s = lark_jax.load_student(d, attn_impl=impl,
                                  mesh=make_mesh(model=model, devices=jax.devices()[:n]))
        score_pool(s, pool, tmp_path / f"{name}.json", cfg)
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]
    assert traced  # the fused kernel really ran (not a silent fall-back)
    want = out["auto-1"]
    for name in ("flash-1", "flash-8"):
        assert out[name].keys() == want.keys()
        for pid in want:
            for a, b in zip(want[pid], out[name][pid], strict=True):
                assert a["candidate_id"] == b["candidate_id"] and a["tokens"] == b["tokens"]
                np.testing.assert_allclose([a["L"], a["Brier"], a["g_hat"]],
                                           [b["L"], b["Brier"], b["g_hat"]], rtol=1e-5)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_pallas_vocab_kernel_scores_as_the_transformers_oracle(hf_students, tmp_path, n_dev):
    """score --vocab-kernel pallas (the fused kernel, interpreted on CPU) against the float64
    transformers oracle, on one device and on eight (rows over "data")."""
    d, ref = hf_students["llama3_rope_untied_bias"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:n_dev]))
    cfg = ScoreConfig(top_k=20, row_length=128, batch_tokens=1024, vocab_kernel="pallas")
    score_pool(student, pool, tmp_path / "scores.json", cfg)
    got = json.loads((tmp_path / "scores.json").read_text())
    want = oracle_scores(ref, student.tokenizer, pool, 20, cfg.max_length)
    assert got["n_scored"] == len(want) == 6
    for pid, cands in got["scores"].items():
        for c in cands:
            w = want[(int(pid), c["candidate_id"])]
            assert c["tokens"] == len(w)
            np.testing.assert_allclose(
                [c["L"], c["Brier"], c["brier_full"], c["rsr"]],
                [w[:, 0].mean(), w[:, 1].mean(), w[:, 2].mean(), w[:, 3].sum() / w[:, 0].sum()],
                rtol=1e-4)


def test_prefetch_keeps_order_and_reraises_where_the_error_happened():
    def gen():
        yield from range(5)
        raise LarkError("bad record", where="pool.jsonl:6")

    for size in (0, 1, 3):
        got = []
        with pytest.raises(LarkError, match="pool.jsonl:6"):
            for x in prefetch(gen(), size):
                got.append(x)
        assert got == [0, 1, 2, 3, 4]
    assert list(prefetch(iter(range(100)), 2)) == list(range(100))


def test_prefetch_thread_stops_when_the_consumer_stops():
    produced = []

    def gen():
        for i in range(10_000):
            produced.append(i)
            yield i

    before = {t.ident for t in threading.enumerate()}
    it = prefetch(gen(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    (thread,) = [t for t in threading.enumerate() if t.ident not in before]
    it.close()
    assert not thread.is_alive()  # close() stopped and joined it
    assert len(produced) < 10  # it ran only a few items ahead


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_prefetched_scoring_equals_inline_scoring(hf_students, tmp_path):
    """The host thread and the batch in flight change when work happens, not what is
    computed: several windows, skipped records and batches give identical files."""
    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=8)
    with open(pool, "a") as f:  # truncation leaves this one no assistant tokens: skipped
        f.write(json.dumps({"problem_id": 99, "candidate_id": 0, "messages": [
            {"role": "user", "content": "q" * 3000},
            {"role": "assistant", "content": "a"}]}) + "\n")
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:2]))
    out = {}
    for n in (0, 1, 4):
        cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=256, window_tokens=300,
                          max_length=2048, prefetch=n)
        summary = score_pool(s, pool, tmp_path / f"p{n}.json", cfg)
        assert summary.n_scored == 24 and summary.n_skipped == 1
        out[n] = (tmp_path / f"p{n}.json").read_text()
    assert out[0] == out[1] == out[4]


@pytest.mark.parametrize("prefetch_size", [0, 4])
def test_bad_line_mid_pool_keeps_every_batch_already_computed(hf_students, tmp_path,
                                                              prefetch_size):
    """The error names the line, and each window scored before it (including the batch
    still in flight) is in the sidecar for --resume."""
    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=8)
    with open(pool, "a") as f:
        f.write('{"problem_id": oops\n')
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=256, window_tokens=300,
                      prefetch=prefetch_size)
    with pytest.raises(LarkError, match="pool.jsonl:25"):
        score_pool(s, pool, tmp_path / "s.json", cfg)
    # Records of complete windows: the window closes once it holds >= 300 tokens.
    lengths = [len(tokenize_record(s.tokenizer, r.messages, cfg.max_length).ids)
               for r in itertools.islice(iter_pool(pool), 24)]
    complete = window = 0
    for i, n in enumerate(lengths, 1):
        window += n
        if window >= cfg.window_tokens:
            complete, window = i, 0
    side = [json.loads(x) for x in (tmp_path / "s.json.partial.jsonl").read_text().splitlines()]
    rows = [r for r in side if "problem_id" in r]
    assert 0 < complete < 24 and len(rows) == complete
    assert len({(r["problem_id"], r["candidate_id"]) for r in rows}) == complete


def test_resume_with_other_settings_names_the_difference(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=256, window_tokens=300)

    def crash(n, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_pool(s, pool, tmp_path / "s.json", cfg, progress=crash)
    side = tmp_path / "s.json.partial.jsonl"
    kept = side.read_text()
    with pytest.raises(LarkError, match=r"other settings \(top_k: 10 != 20\)"):
        score_pool(s, pool, tmp_path / "s.json", dataclasses.replace(cfg, top_k=20),
                   resume=True)
    assert side.read_text() == kept  # untouched


def test_resume_after_interruption_loses_and_duplicates_nothing(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=8)
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    cfg = ScoreConfig(top_k=10, row_length=128, batch_tokens=256, window_tokens=300)
    score_pool(s, pool, tmp_path / "full.json", cfg)
    calls = []

    def crash(n, tokens):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a preemption mid-run

    with pytest.raises(KeyboardInterrupt):
        score_pool(s, pool, tmp_path / "part.json", cfg, progress=crash)
    side = tmp_path / "part.json.partial.jsonl"
    assert side.exists() and not (tmp_path / "part.json").exists()
    with open(side, "a") as f:
        f.write('{"problem_id": 7, "cand')  # a torn line from the crash
    with pytest.raises(LarkError, match="pass --resume"):
        score_pool(s, pool, tmp_path / "part.json", cfg)
    summary = score_pool(s, pool, tmp_path / "part.json", cfg, resume=True)
    assert summary.n_resumed > 0 and not side.exists()
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "part.json").read_text())
    assert a["n_scored"] == b["n_scored"] == 24
    for pid in a["scores"]:
        assert [c["candidate_id"] for c in a["scores"][pid]] == \
            [c["candidate_id"] for c in b["scores"][pid]]
        np.testing.assert_allclose([c["g_hat"] for c in a["scores"][pid]],
                                   [c["g_hat"] for c in b["scores"][pid]], rtol=1e-5)


def test_truncation_skips_empty_spans(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    pool = tmp_path / "pool.jsonl"
    recs = [{"problem_id": 0, "candidate_id": i, "teacher": "t",
             "messages": [{"role": "user", "content": "q" * n},
                          {"role": "assistant", "content": "answer"}]} for i, n in
            enumerate([5, 80])]
    pool.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    summary = score_pool(s, pool, tmp_path / "s.json", ScoreConfig(max_length=40))
    got = json.loads((tmp_path / "s.json").read_text())
    assert (summary.n_scored, summary.n_skipped) == (1, 1)
    assert got["n_skipped"] == 1 and [c["candidate_id"] for c in got["scores"]["0"]] == [0]
    assert got["scores"]["0"][0]["g_hat"] == pytest.approx(1.0 * got["scores"]["0"][0]["rho"])


def test_blockwise_memory_path_on_long_trajectory(hf_students, tmp_path):
    """A trajectory far beyond the row length goes through the blockwise attention path."""
    d, ref = hf_students["llama_tied_gqa"]
    pool = tmp_path / "pool.jsonl"
    rec = {"problem_id": 3, "candidate_id": 0, "teacher": "long",
           "messages": [{"role": "user", "content": "count"},
                        {"role": "assistant", "content": " ".join(map(str, range(600)))}]}
    pool.write_text(json.dumps(rec) + "\n")
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]),
                              attn_impl="blockwise")
    score_pool(s, pool, tmp_path / "s.json", ScoreConfig(top_k=5, row_length=256,
                                                          chunk_tokens=256))
    got = json.loads((tmp_path / "s.json").read_text())["scores"]["3"][0]
    want = oracle_scores(ref, s.tokenizer, pool, 5, 32768)[(3, 0)]
    assert got["tokens"] == len(want) > 2000
    np.testing.assert_allclose([got["L"], got["Brier"]], [want[:, 0].mean(), want[:, 1].mean()],
                               rtol=1e-4)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_gradient_estimator_matches_torch_autograd(hf_students, tmp_path):
    d, ref = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    score_pool(s, pool, tmp_path / "g.json", ScoreConfig(top_k=10, estimator="gradient",
                                                         row_length=512, batch_tokens=1024))
    got = json.loads((tmp_path / "g.json").read_text())
    assert got["estimator"] == "gradient"
    tok = s.tokenizer
    for line in open(pool, encoding="utf-8"):
        rec = json.loads(line)
        msgs = rec["messages"]
        full, prompt = chat_ids(tok, msgs)
        ref.zero_grad()
        logits = ref(torch.tensor([full])).logits[0]
        js = torch.arange(len(prompt), len(full))
        loss = torch.nn.functional.cross_entropy(logits[js - 1], torch.tensor(full)[js])
        loss.backward()
        g2 = sum(float((p.grad.double() ** 2).sum()) for p in ref.parameters())
        c = next(c for c in got["scores"][str(rec["problem_id"])]
                 if c["candidate_id"] == rec["candidate_id"])
        assert c["grad_sq"] == pytest.approx(g2, rel=1e-3)
        assert c["rho"] == pytest.approx(g2 / float(loss.detach()), rel=1e-3)
        assert c["rho_proxy"] == pytest.approx(c["Brier"] / c["L"], rel=1e-6)


def test_compat_reference_skips_spans_of_one_token(hf_students, tmp_path):
    """Truncated to one assistant token: scored by default, skipped by the reference."""
    from lark_jax.data.chat import render

    d, _ = hf_students["qwen2_bias_tied"]
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    base = len(render(s.tokenizer, [{"role": "user", "content": ""}],
                      add_generation_prompt=True))
    m = base + 60  # max_length; the byte tokenizer adds one token per character
    recs = [{"problem_id": 0, "candidate_id": i, "teacher": "t",
             "messages": [{"role": "user", "content": "q" * n},
                          {"role": "assistant", "content": "the answer"}]}
            for i, n in enumerate([59, 60, 10])]  # spans after truncation: 1, 0, 10+
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in recs))
    spans = [(t := tokenize_record(s.tokenizer, r["messages"], m)).end - t.start
             for r in recs]
    assert spans[:2] == [1, 0] and spans[2] > 1
    out = {}
    for compat in (None, "reference"):
        p = tmp_path / f"s_{compat}.json"
        summary = score_pool(s, pool, p, ScoreConfig(max_length=m, compat=compat))
        out[compat] = json.loads(p.read_text())
        out[compat]["summary"] = (summary.n_scored, summary.n_skipped)
    assert out[None]["summary"] == (2, 1) and out["reference"]["summary"] == (1, 2)
    assert [c["candidate_id"] for c in out[None]["scores"]["0"]] == [0, 2]
    assert [c["candidate_id"] for c in out["reference"]["scores"]["0"]] == [2]
    assert out[None]["compat"] == "exact" and out["reference"]["compat"] == "reference"
    # float32 student: only the skip rule differs, the statistics are the same numbers
    assert out["reference"]["scores"]["0"][0]["L"] == pytest.approx(
        out[None]["scores"]["0"][1]["L"], rel=1e-5)  # other packing: float rounding only


def test_compat_reference_rounds_logits_to_bfloat16():
    """Kernel: logits rounded to bf16 before the float32 statistics, vs float64 NumPy on
    bf16-rounded logits. Inputs are dyadic so the matmul is exact in float32 and float64."""
    import ml_dtypes

    from lark_jax.learnability.kernel import _head_stats_local

    rng = np.random.RandomState(5)
    b, t, d, v, k = 1, 16, 8, 300, 20
    hidden = rng.randint(-8, 9, (b, t, d)) / 8.0
    w_head = rng.randint(-64, 65, (v, d)) / 64.0
    targets = rng.randint(0, v, (b, t))
    weights = np.ones((b, t), np.float32)
    segments = np.zeros((b, t), np.int32)
    z = np.einsum("btd,vd->btv", hidden, w_head)[0]  # exact
    z_bf16 = z.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    assert np.abs(z_bf16 - z).max() > 1e-3  # the rounding is visible
    args = [jnp.asarray(x, dt) for x, dt in ((hidden, jnp.float32), (targets, jnp.int32),
                                            (weights, jnp.float32), (segments, jnp.int32),
                                            (w_head, jnp.float32))]
    for rounding, zz in ((None, z), ("bfloat16", z_bf16)):
        got = np.asarray(_head_stats_local(*args, top_k=k, max_segments=1, chunk_tokens=16,
                                           round_logits=rounding))[0, 0]
        want = np_token_stats(zz, targets[0], k).sum(0)
        np.testing.assert_allclose(got[:4], want, rtol=1e-5)
    other = np_token_stats(z, targets[0], k).sum(0)
    assert abs(other[0] - np_token_stats(z_bf16, targets[0], k).sum(0)[0]) > 1e-4


def test_compat_reference_with_a_bfloat16_student_changes_only_rounding(hf_students, tmp_path):
    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    s = lark_jax.load_student(d, dtype="bfloat16", mesh=make_mesh(devices=jax.devices()[:1]))
    got = {}
    for compat in (None, "reference"):
        score_pool(s, pool, tmp_path / f"{compat}.json", ScoreConfig(compat=compat))
        got[compat] = json.loads((tmp_path / f"{compat}.json").read_text())["scores"]
    a = np.array([c["L"] for cs in got[None].values() for c in cs])
    b = np.array([c["L"] for cs in got["reference"].values() for c in cs])
    assert a.shape == b.shape and not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, rtol=2e-2)  # bf16 logit rounding, no more
    with pytest.raises(LarkError, match="--compat must be"):
        ScoreConfig(compat="paper").validate()


def test_scores_list_candidates_in_pool_order_with_their_line(hf_students, tmp_path):
    """select breaks ĝ ties by pool position: the scores carry it (pool_line) and list each
    problem's candidates in pool order, as the reference's scorer does."""
    d, _ = hf_students["qwen2_bias_tied"]
    src = write_pool(tmp_path / "src.jsonl", n_problems=2)
    lines = open(src).read().splitlines()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(lines[::-1]) + "\n")  # candidates 2, 1, 0 per problem
    s = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    score_pool(s, pool, tmp_path / "s.json", ScoreConfig(top_k=10))
    got = json.loads((tmp_path / "s.json").read_text())["scores"]
    for pid, cands in got.items():
        assert [c["candidate_id"] for c in cands] == [2, 1, 0]
        for c in cands:
            rec = json.loads(lines[::-1][c["pool_line"] - 1])
            assert (rec["problem_id"], rec["candidate_id"]) == (int(pid), c["candidate_id"])


# -- the stages of score_pool, one at a time ----------------------------------------------


def test_stage_read_share_partitions_the_pool(tmp_path):
    from lark_jax.learnability.runner import read_share

    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    every = [r.key for r in iter_pool(pool)]
    never = threading.Event()
    shares = [[r.key for r in read_share(pool, q, 3, set(), never)] for q in range(3)]
    assert sorted(itertools.chain(*shares)) == sorted(every)
    assert shares[1] == every[1::3]
    done = set(every[:4])
    assert [r.key for r in read_share(pool, 0, 1, done, never)] == every[4:]
    stopped = threading.Event()
    stopped.set()
    assert list(read_share(pool, 0, 1, set(), stopped)) == []


def test_stage_tokenize_and_pack_places_every_record_once(tmp_path):
    from lark_jax.learnability.runner import tokenize_and_pack
    from lark_jax.models.tiny import byte_tokenizer

    pool = write_pool(tmp_path / "pool.jsonl", n_problems=8)
    recs = list(iter_pool(pool))
    # Tiny windows and rows: several windows, several batches, long rows of their own.
    cfg = ScoreConfig(window_tokens=600, row_length=128, batch_tokens=512, max_length=400)
    seen = []
    for kind, kept, batch in tokenize_and_pack(recs, byte_tokenizer(), pool, cfg, n_data=2):
        if kind == "skip":
            seen += [r.key for r in kept]
            continue
        assert batch.ids.shape[0] % 2 == 0  # whole rows for each data-parallel device
        seen += [kept[i].key for _, _, i in batch.slots]
    assert sorted(seen) == sorted(r.key for r in recs)


def test_stage_device_loop_keeps_one_batch_in_flight():
    from lark_jax.learnability.runner import DeviceLoop

    events = []
    loop = DeviceLoop(run=lambda b: events.append(("dispatch", b)) or (b, None),
                      on_done=lambda b, recs, sums, grads: events.append(("done", b)))
    for b in range(3):
        loop.submit(b, [])
    loop.flush()
    loop.flush()  # nothing left in flight: a no-op
    assert events == [("dispatch", 0), ("dispatch", 1), ("done", 0), ("dispatch", 2),
                      ("done", 1), ("done", 2)]


def test_stage_batch_rows_and_writer(tmp_path):
    from lark_jax.data.packing import PackedBatch
    from lark_jax.data.pool import Record
    from lark_jax.learnability.kernel import STATS
    from lark_jax.learnability.runner import Sidecar, SidecarWriter

    recs = [Record(7, c, "t", (), line=10 + c) for c in range(2)]
    z = np.zeros((2, 8), np.int32)
    batch = PackedBatch(z, z, z, z, z.astype(np.float32), [(0, 0, 1), (1, 0, 0)])
    sums = np.zeros((2, 1, len(STATS)))
    sums[..., STATS.index("tokens")] = [[5.0], [3.0]]
    calls = []
    sidecar = Sidecar(tmp_path / "s.jsonl", {"h": 1}, resume=False)
    writer = SidecarWriter(sidecar, lambda n, tokens: calls.append((n, tokens)))
    writer.finished(batch, recs, sums, np.array([2.0, 4.0]))
    sidecar.close()
    assert [(r["candidate_id"], r["pool_line"], r["tokens"], r["grad_sq"])
            for r in sidecar.rows] == [(1, 11, 5, 2.0), (0, 10, 3, 4.0)]
    assert calls == [(2, 8)] and (writer.tokens, writer.padded) == (8, 16)
