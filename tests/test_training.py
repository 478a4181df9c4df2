"""Weighted SFT: loss oracle, packing, learning, resume determinism, devices, export, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    Preempted,
    one_device,
    preempt_at,
    spy_flash,
    write_pool,
    write_selection,
)

import lark_jax
from lark_jax import LarkError
from lark_jax.data.chat import tokenize_record
from lark_jax.parallel import make_mesh
from lark_jax.training.data import read_selection, step_microbatches
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.trainer import TrainConfig, Trainer, train


@pytest.fixture()
def selection(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    return write_selection(tmp_path / "train.jsonl", pool, weights=[0.2, 1.0, 2.5])


def test_weighted_loss_equals_hand_computation_and_packing(hf_students, selection):
    d, ref = hf_students["qwen2_bias_tied"]
    student = lark_jax.load_student(d, mesh=one_device())
    examples, _ = read_selection(selection, student.tokenizer, 4096)
    # Hand computation: each record alone through transformers, float64 CE.
    num = den = 0.0
    for e in examples:
        with torch.no_grad():
            z = ref(torch.tensor([e.tok.ids.tolist()])).logits[0].double().numpy()
        js = np.arange(max(e.tok.start, 1), e.tok.end)
        zz = z[js - 1]
        lse = np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1)) + zz.max(1)
        ce = lse - zz[np.arange(len(js)), e.tok.ids[js]]
        num += e.weight * ce.sum()
        den += e.weight * len(js)
    want = num / den
    fn = jax.jit(lambda b: weighted_ce_sums(student.model, chunk_tokens=64, **b))
    # Packed (several records per row, two layouts) and unpacked (one record per row).
    for row_len, rows, max_seg in ((512, 2, None), (2048, 1, None), (512, 4, 1)):
        s = w = 0.0
        for mb in step_microbatches(examples, np.arange(len(examples)), row_len, rows, max_seg):
            a, b = fn({k: jnp.asarray(v) for k, v in mb.items()})
            s, w = s + float(a), w + float(b)
        assert s / w == pytest.approx(want, rel=1e-5)
    assert den > 0 and len({e.weight for e in examples}) == 3


def test_loss_falls_and_outputs_written(hf_students, selection, tmp_path):
    d, _ = hf_students["llama_tied_gqa"]
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=4, seed=1)
    s = train(d, selection, tmp_path / "run", cfg, mesh=one_device())
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == s.steps == 12
    first, last = np.mean([r["loss"] for r in recs[:3]]), np.mean([r["loss"] for r in recs[-3:]])
    assert last < first - 0.3
    assert recs[0]["lr"] == 0.0 and max(r["lr"] for r in recs) == pytest.approx(3e-3, rel=1e-3)
    for f in ("loss.png", "run_config.json", "final/config.json", "final/model.safetensors"):
        assert (tmp_path / "run" / f).exists()


def test_resume_equals_uninterrupted(hf_students, selection, tmp_path):
    d, _ = hf_students["qwen3_qknorm_headdim"]
    cfg = TrainConfig(epochs=2, lr=2e-3, batch_size=4, save_every=3, seed=3)
    full = train(d, selection, tmp_path / "a", cfg, mesh=one_device())

    with pytest.raises(Preempted):
        train(d, selection, tmp_path / "b", cfg, mesh=one_device(), progress=preempt_at(3))
    with pytest.raises(LarkError, match="pass --resume"):
        train(d, selection, tmp_path / "b", cfg, mesh=one_device())
    res = train(d, selection, tmp_path / "b", cfg, mesh=one_device(), resume=True)
    assert res.resumed_from == 3 and res.steps == full.steps == 6
    la = [json.loads(x)["loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    a = lark_jax.load_student(tmp_path / "a/final", mesh=one_device()).model
    b = lark_jax.load_student(tmp_path / "b/final", mesh=one_device()).model
    np.testing.assert_allclose(np.asarray(b.layers.q_proj[...]), np.asarray(a.layers.q_proj[...]),
                               atol=1e-6)


def test_resume_refuses_other_data_or_settings(hf_students, selection, tmp_path):
    d, _ = hf_students["llama_tied_gqa"]
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=4, save_every=1, max_steps=2)
    train(d, selection, tmp_path / "run", cfg, mesh=one_device())
    other = write_selection(tmp_path / "other.jsonl",
                            write_pool(tmp_path / "pool2.jsonl", n_problems=2))
    before = (tmp_path / "run" / "run_config.json").read_text()
    with pytest.raises(LarkError, match="data: "):
        train(d, other, tmp_path / "run", cfg, mesh=one_device(), resume=True)
    with pytest.raises(LarkError, match="--lr: 0.001 != 0.002"):
        train(d, selection, tmp_path / "run", dataclasses.replace(cfg, lr=2e-3),
              mesh=one_device(), resume=True)
    assert (tmp_path / "run" / "run_config.json").read_text() == before  # nothing rewritten
    # How often to checkpoint does not change what is computed: allowed.
    res = train(d, selection, tmp_path / "run", dataclasses.replace(cfg, save_every=5, keep=2),
                mesh=one_device(), resume=True)
    assert res.resumed_from == 2


def test_export_parity_with_transformers(hf_students, selection, tmp_path):
    import transformers

    d, _ = hf_students["qwen2_bias_tied"]
    train(d, selection, tmp_path / "run", TrainConfig(epochs=1, lr=1e-3, batch_size=6),
          mesh=one_device())
    ours = lark_jax.load_student(tmp_path / "run/final", mesh=one_device())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run/final")
    ids = np.random.RandomState(0).randint(0, 200, (1, 24))
    with torch.no_grad():
        t = theirs(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours.model(jnp.asarray(ids, jnp.int32))) - t).max() <= 1e-4
    orig = lark_jax.load_student(d, mesh=one_device())
    assert np.abs(np.asarray(orig.model(jnp.asarray(ids, jnp.int32))) - t).max() > 1e-3


def test_one_device_equals_eight_with_fsdp(hf_students, selection):
    d, _ = hf_students["llama_tied_gqa"]
    losses = {}
    for n, fsdp in ((1, False), (8, True)):
        mesh = make_mesh(devices=jax.devices()[:n])
        student = lark_jax.load_student(d, mesh=mesh)
        examples, _ = read_selection(selection, student.tokenizer, 4096)
        cfg = TrainConfig(lr=1e-3, fsdp=fsdp)
        tr = Trainer(student.model, cfg, 10, mesh)
        idx = np.arange(len(examples))
        out = [tr.step(step_microbatches(examples, idx[:6], 512, 8, row_multiple=n))
               for _ in range(2)]
        losses[n] = [o[0] for o in out] + [o[1] for o in out]
        if fsdp:
            assert "data" in tuple(tr.params["layers"]["gate_proj"][...].sharding.spec)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def test_flash_attention_training_on_eight_devices_equals_default_on_one(hf_students,
                                                                         selection, monkeypatch):
    """Training through the fused kernel's own backward pass (interpret mode on CPU),
    per device under shard_map: the same losses and gradient norms."""
    d, _ = hf_students["llama_tied_gqa"]
    out = {}
    traced = spy_flash(monkeypatch)
    for n, impl in ((1, "auto"), (8, "flash")):
        mesh = make_mesh(devices=jax.devices()[:n])
        student = lark_jax.load_student(d, mesh=mesh, attn_impl=impl)
        examples, _ = read_selection(selection, student.tokenizer, 4096)
        tr = Trainer(student.model, TrainConfig(lr=1e-3, attention=impl), 10, mesh)
        idx = np.arange(len(examples))
        out[impl] = [tr.step(step_microbatches(examples, idx[:6], 512, 8, row_multiple=n))
                     for _ in range(2)]
    assert traced
    np.testing.assert_allclose(np.asarray(out["flash"], float), np.asarray(out["auto"], float),
                               rtol=1e-5)


def test_flash_attention_is_refused_off_gpu(hf_students, selection, tmp_path, capsys):
    from lark_jax.cli import main as cli_main

    d, _ = hf_students["llama_tied_gqa"]
    rc = cli_main(["train", "--data", str(selection), "--student", str(d), "--out",
                   str(tmp_path / "run"), "--attention", "flash", "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and "--attention flash needs a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=1)
    rc = cli_main(["score", "--pool", str(pool), "--student", str(d), "--out",
                   str(tmp_path / "s.json"), "--attention", "flash", "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and "--attention flash needs a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(LarkError, match="--attention must be one of"):
        TrainConfig(attention="flash2").validate()


@pytest.mark.parametrize("content,match", [
    ("", "no trainable records"),
    ('{"messages": [{"role": "user", "content": "x"}], "meta": {}}\n',
     "train.jsonl:1: no assistant message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],'
     ' "meta": {"train_weight": 0}}\n', "no trainable records"),
    ('{"messages": [{"role": "assistant", "content": "y"}], "meta": {"train_weight": -1}}\n',
     "train.jsonl:1: meta.train_weight must be"),
    ('{"messages": oops\n', "train.jsonl:1: malformed JSON"),
])
def test_bad_training_data(hf_students, tmp_path, content, match):
    d, _ = hf_students["qwen2_bias_tied"]
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    tok = lark_jax.load_student(d, mesh=one_device()).tokenizer
    with pytest.raises(LarkError, match=match):
        read_selection(p, tok, 512)


def test_chat_span_is_assistant_only(hf_students):
    d, _ = hf_students["qwen2_bias_tied"]
    tok = lark_jax.load_student(d, mesh=one_device(), tokenizer=True).tokenizer
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    t = tokenize_record(tok, msgs, 512)
    assert tok.decode(t.ids[t.start:t.end].tolist()) == "world<|im_end|>\n"


def test_lora_trains_factors_only_and_merges_at_export(hf_students, selection, tmp_path):
    import transformers

    d, _ = hf_students["llama_tied_gqa"]
    mesh = one_device()
    cfg = TrainConfig(epochs=3, lr=5e-3, batch_size=4, lora_rank=4, seed=2)
    student = lark_jax.load_student(d, mesh=mesh)
    examples, _ = read_selection(selection, student.tokenizer, 4096)
    tr = Trainer(student.model, cfg, 9, mesh)
    assert set(tr.params) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"}
    idx = np.arange(len(examples))
    before = tr.loss_of(next(step_microbatches(examples, idx, 1024, 16)))
    for _ in range(6):
        tr.step(step_microbatches(examples, idx[:4], 1024, 4))
    after = tr.loss_of(next(step_microbatches(examples, idx, 1024, 16)))
    assert after < before - 0.05
    # Merge parity: W' = W + (alpha/r) B A, computed by hand, is what the trainer exports.
    a, b = (np.asarray(tr.params["q_proj"][k], np.float64) for k in ("a", "b"))
    w0 = np.asarray(student.model.layers.q_proj[...], np.float64)
    want = w0 + (2 * 4 / 4) * np.einsum("lor,lri->loi", b, a)
    merged = tr.model()
    np.testing.assert_allclose(np.asarray(merged.layers.q_proj[...]), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged.embed[...]),
                                  np.asarray(student.model.embed[...]))  # not a target
    assert np.abs(want - w0).max() > 1e-4
    # End to end through the CLI's library call: the exported directory has the merged weights.
    train(d, selection, tmp_path / "run", TrainConfig(epochs=1, lr=5e-3, batch_size=4,
                                                       lora_rank=2), mesh=mesh)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run/final")
    ours = lark_jax.load_student(tmp_path / "run/final", mesh=mesh)
    ids = np.random.RandomState(0).randint(0, 200, (1, 20))
    with torch.no_grad():
        t = theirs(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours.model(jnp.asarray(ids, jnp.int32))) - t).max() <= 1e-4


def test_two_level_logsumexp_is_float64_accurate_with_softmax_gradient():
    from lark_jax.numerics import logsumexp

    rng = np.random.RandomState(3)
    z = (rng.randn(4, 151936) * 3).astype(np.float32)
    z64 = z.astype(np.float64)
    m = z64.max(-1, keepdims=True)
    want = (m + np.log(np.exp(z64 - m).sum(-1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(np.asarray(logsumexp(jnp.asarray(z)), np.float64), want,
                               rtol=0, atol=2e-5)
    g = np.asarray(jax.grad(lambda x: logsumexp(x).sum())(jnp.asarray(z[:, :1001])))
    sm = np.exp(z64[:, :1001] - z64[:, :1001].max(-1, keepdims=True))
    np.testing.assert_allclose(g, sm / sm.sum(-1, keepdims=True), atol=1e-7)
