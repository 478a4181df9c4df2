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
from lark_jax.training.data import read_selection, step_denominator, step_microbatches
from lark_jax.training.loss import weighted_ce_sums
from lark_jax.training.trainer import TrainConfig, Trainer, train


@pytest.fixture()
def selection(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    return write_selection(tmp_path / "train.jsonl", pool, weights=[0.2, 1.0, 2.5])


def _torch_objective(ref, examples, objective):
    """The step loss and its gradient norm, float64 transformers, each record alone.

    Written from the definitions (method.md step 4), not from training.objective.
    """
    import copy

    model = copy.deepcopy(ref).double()
    model.zero_grad()
    mean_ce, tok_ce, n_tok = [], [], []
    for e in examples:
        logits = model(torch.tensor([e.tok.ids.tolist()])).logits[0]
        js = np.arange(max(e.tok.start, 1), e.tok.end)
        y = torch.tensor(e.tok.ids[js], dtype=torch.long)
        ce = torch.nn.functional.cross_entropy(logits[js - 1], y, reduction="none")
        mean_ce.append(ce.mean())
        tok_ce.append(ce.sum())
        n_tok.append(len(js))
    w = [e.weight for e in examples]
    if objective == "reference":  # plain mean over ALL records of the step; weight 0 -> 0
        loss = sum(m * (wi > 0) for m, wi in zip(mean_ce, w, strict=True)) / len(examples)
    elif objective == "record":
        loss = sum(m * wi for m, wi in zip(mean_ce, w, strict=True)) / sum(w)
    else:
        loss = (sum(c * wi for c, wi in zip(tok_ce, w, strict=True))
                / sum(wi * n for wi, n in zip(w, n_tok, strict=True)))
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()
                           if p.grad is not None))
    return loss.item(), gnorm.item()


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
@pytest.mark.parametrize("objective", ["record", "reference", "token"])
def test_objective_equals_float64_transformers(hf_students, tmp_path, objective):
    """Step-1 loss and gradient norm of each objective against float64 transformers:
    packed with accumulation over several micro-batches, unpacked (one record a row),
    8 devices, and LoRA (whose factors start at the base model)."""
    d, ref = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=3)
    sel = write_selection(tmp_path / "train.jsonl", pool, weights=[0.2, 1.0, 2.5, 0.0])
    student = lark_jax.load_student(d, mesh=one_device())
    examples, _ = read_selection(sel, student.tokenizer, 4096, objective)
    assert (0.0 in {e.weight for e in examples}) == (objective == "reference")
    want_loss, want_gnorm = _torch_objective(ref, examples, objective)
    idx = np.arange(len(examples))
    denom = step_denominator(examples, idx, objective)
    cfg = TrainConfig(lr=1e-3, objective=objective)
    # (devices, row length, rows per micro-batch, records per row, LoRA rank). The objective
    # only changes host-side coefficients and D, so the layouts that do not depend on it
    # (unpacked, 8 devices, LoRA) run once, under "record"; every objective gets the
    # packed, accumulated step.
    layouts = [(1, 512, 1, None, 0)]
    if objective == "record":
        layouts += [(1, 512, 4, 1, 0), (8, 512, 8, None, 0), (1, 2048, 1, None, 2)]
    for n, row_len, rows, max_seg, lora in layouts:
        mesh = make_mesh(devices=jax.devices()[:n])
        m = lark_jax.load_student(d, mesh=mesh).model
        tr = Trainer(m, dataclasses.replace(cfg, lora_rank=lora), 10, mesh)
        mbs = list(step_microbatches(examples, idx, row_len, rows, max_seg, row_multiple=n,
                                     objective=objective))
        assert n > 1 or lora or len(mbs) > 1  # gradients accumulate over micro-batches
        loss, gnorm, _ = tr.step(mbs, denom)
        assert loss == pytest.approx(want_loss, rel=1e-5), (n, row_len, max_seg, lora)
        if not lora:  # with LoRA only the factors have gradients
            assert gnorm == pytest.approx(want_gnorm, rel=1e-4), (n, row_len, max_seg)
    # The objectives really differ on this data (weights 0.2/1/2.5/0, unequal lengths).
    others = {o: _torch_objective(ref, read_selection(sel, student.tokenizer, 4096, o)[0], o)[0]
              for o in ("record", "reference", "token") if o != objective}
    assert all(abs(v - want_loss) > 1e-3 for v in others.values())


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_reference_objective_counts_zero_weight_records(hf_students, tmp_path):
    """A zero-weight record keeps its slot: same loss as its positive twins divided by N."""
    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    mesh = one_device()
    student = lark_jax.load_student(d, mesh=mesh)
    out = {}
    for name, weights in (("ones", [1.0]), ("zeros", [1.0, 1.0, 0.0])):
        sel = write_selection(tmp_path / f"{name}.jsonl", pool, weights=weights)
        ex, _ = read_selection(sel, student.tokenizer, 4096, "reference")
        idx = np.arange(len(ex))
        tr = Trainer(lark_jax.load_student(d, mesh=mesh).model,
                     TrainConfig(lr=1e-3, objective="reference"), 10, mesh)
        out[name] = tr.step(step_microbatches(ex, idx, 1024, 4, objective="reference"),
                            step_denominator(ex, idx, "reference"))[0]
        if name == "zeros":  # the weight-0 records are in the step but never packed
            assert len(ex) == 6 and sum(e.weight == 0 for e in ex) == 2
            packed = sum(int((mb["segments"] >= 0).any(1).sum()) for mb in
                         step_microbatches(ex, idx, 64 * 1024, 1, 1, objective="reference"))
            assert packed == 4
    ones_ex, _ = read_selection(tmp_path / "ones.jsonl", student.tokenizer, 4096, "reference")
    # Records 2 and 5 (weight 0) are dropped from the sum but still count in N = 6.
    fn = jax.jit(lambda b: weighted_ce_sums(student.model, chunk_tokens=64, **b))
    per = []
    for e in ones_ex:
        s, _ = fn({k: jnp.asarray(v) for k, v in
                   next(step_microbatches([e], [0], 1024, 1, objective="reference")).items()})
        per.append(float(s))
    assert out["zeros"] == pytest.approx((sum(per) - per[2] - per[5]) / 6, rel=1e-5)
    assert out["ones"] == pytest.approx(sum(per) / 6, rel=1e-5)


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


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
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


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
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


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
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
     ' "meta": {"train_weight": 0}}\n', "train.jsonl: every meta.train_weight is 0"),
    ('{"messages": [{"role": "assistant", "content": "y"}], "meta": {"train_weight": -1}}\n',
     "train.jsonl:1: meta.train_weight must be a finite number >= 0, got -1"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
     '{"messages": [{"role": "assistant", "content": "y"}], "meta": {"train_weight": NaN}}\n',
     "train.jsonl:2: meta.train_weight must be a finite number >= 0, got nan"),
    ('{"messages": [{"role": "assistant", "content": "y"}], "meta": {"train_weight": "1"}}\n',
     "train.jsonl:1: meta.train_weight must be"),
    ('{"messages": oops\n', "train.jsonl:1: malformed JSON"),
])
@pytest.mark.parametrize("objective", ["record", "reference", "token"])
def test_bad_training_data(hf_students, tmp_path, content, match, objective):
    d, _ = hf_students["qwen2_bias_tied"]
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    tok = lark_jax.load_student(d, mesh=one_device()).tokenizer
    with pytest.raises(LarkError, match=match):
        read_selection(p, tok, 512, objective)


def test_bad_objective_and_weights_from_the_cli(hf_students, tmp_path, capsys):
    from lark_jax.cli import main as cli_main

    d, _ = hf_students["qwen2_bias_tied"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)
    good = write_selection(tmp_path / "good.jsonl", pool)
    with pytest.raises(SystemExit) as e:  # argparse: one usage line, exit 2
        cli_main(["train", "--data", str(good), "--student", str(d), "--out",
                  str(tmp_path / "r0"), "--objective", "mean", "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'mean'" in err and "Traceback" not in err
    with pytest.raises(LarkError, match="--objective must be one of"):
        TrainConfig(objective="mean").validate()
    with pytest.raises(LarkError, match="unknown objective"):
        read_selection(good, None, 512, "mean")
    for name, weights, msg in (("neg", [1.0, -0.5], "neg.jsonl:2: meta.train_weight must be"),
                               ("zero", [0.0], "zero.jsonl: every meta.train_weight is 0")):
        sel = write_selection(tmp_path / f"{name}.jsonl", pool, weights=weights)
        rc = cli_main(["train", "--data", str(sel), "--student", str(d), "--out",
                       str(tmp_path / name), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err
        assert not (tmp_path / name).exists()  # nothing written


def test_warmup_and_schedule_follow_hf_trainer():
    """Warm-up = ceil(0.05 x total) (59 at 1,170 steps, where round() gave 58), and the
    learning rate equals transformers' get_cosine_schedule_with_warmup at every step."""
    from transformers.optimization import get_cosine_schedule_with_warmup

    from lark_jax.training.trainer import make_schedule, warmup_steps

    cfg = TrainConfig(lr=1e-5)
    assert warmup_steps(cfg, 1170) == 59 and warmup_steps(cfg, 410) == 21
    assert warmup_steps(cfg, 1) == 1 and warmup_steps(TrainConfig(warmup_ratio=0.0), 50) == 0
    for total, ratio in ((410, 0.05), (1170, 0.05), (7, 0.3), (50, 0.0)):
        cfg = TrainConfig(lr=1e-5, warmup_ratio=ratio)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = get_cosine_schedule_with_warmup(opt, warmup_steps(cfg, total), total).lr_lambdas[0]
        ours = np.asarray(jax.vmap(make_schedule(cfg, total))(jnp.arange(total)))
        np.testing.assert_allclose(ours, [1e-5 * hf(s) for s in range(total)], rtol=2e-5,
                                   atol=1e-12)
        assert ours[0] == 0.0 or ratio == 0.0


def test_max_steps_runs_exactly_n_steps_beyond_one_epoch(hf_students, selection, tmp_path):
    """12 records, batch 4: 3 steps an epoch; --max-steps 7 with --epochs 1 runs 7 steps,
    through three permutations, and every record is seen in each full epoch."""
    from lark_jax.training.data import StepPlan

    plan = StepPlan(12, 4, 1, 7, 0)
    assert plan.total_steps == 7 and StepPlan(12, 4, 5, None, 0).total_steps == 15
    for epoch in range(2):
        seen = np.concatenate([plan.step_indices(3 * epoch + k) for k in range(3)])
        assert sorted(seen) == list(range(12))
    assert not np.array_equal(plan.step_indices(0), plan.step_indices(3))  # reshuffled
    d, _ = hf_students["llama_tied_gqa"]
    s = train(d, selection, tmp_path / "run", TrainConfig(epochs=1, max_steps=7, lr=1e-3,
                                                          batch_size=4), mesh=one_device())
    recs = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert s.steps == 7 and [r["step"] for r in recs] == list(range(1, 8))
    assert [r["epoch"] for r in recs] == [1, 1, 1, 2, 2, 2, 3]
    cfg = json.loads((tmp_path / "run/run_config.json").read_text())
    assert cfg["total_steps"] == 7 and cfg["warmup_steps"] == 1


def test_chat_span_is_assistant_only(hf_students):
    d, _ = hf_students["qwen2_bias_tied"]
    tok = lark_jax.load_student(d, mesh=one_device(), tokenizer=True).tokenizer
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    t = tokenize_record(tok, msgs, 512)
    assert tok.decode(t.ids[t.start:t.end].tolist()) == "world<|im_end|>\n"


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
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
    # The side path the step trains through (x·W + s·(x·A)·B) equals the merged weights'
    # forward pass: the trained (non-zero) factors give the same loss either way.
    batch = next(step_microbatches(examples, idx, 1024, 16))
    s_merged, w_merged = weighted_ce_sums(tr.model(), chunk_tokens=cfg.chunk_tokens,
                                          **tr.place(batch))
    np.testing.assert_allclose(float(s_merged / w_merged), tr.loss_of(batch), rtol=1e-6)
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


def test_system_turn_empty_rebuilds_the_messages(hf_students, tmp_path):
    d, _ = hf_students["qwen2_bias_tied"]
    tok = lark_jax.load_student(d, mesh=one_device(), tokenizer=True).tokenizer
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=2)  # problem 1 has a system turn
    sel = write_selection(tmp_path / "train.jsonl", pool)
    recs = [json.loads(x)["messages"] for x in open(sel)]
    kept, _ = read_selection(sel, tok, 4096)
    empty, _ = read_selection(sel, tok, 4096, system_turn="empty")
    for msgs, a, b in zip(recs, kept, empty, strict=True):
        rebuilt = [{"role": "system", "content": ""}] + [m for m in msgs
                                                         if m["role"] != "system"]
        assert b.tok.ids.tolist() == tokenize_record(tok, rebuilt, 4096).ids.tolist()
        assert a.tok.ids.tolist() == tokenize_record(tok, msgs, 4096).ids.tolist()
        assert a.tok.ids.tolist() != b.tok.ids.tolist()
        # the assistant span itself is unchanged
        assert a.tok.ids[a.tok.start:].tolist() == b.tok.ids[b.tok.start:].tolist()
    with pytest.raises(LarkError, match="--system-turn must be one of"):
        TrainConfig(system_turn="none").validate()


def test_resume_of_a_run_made_before_the_objectives(hf_students, selection, tmp_path):
    """A run_config.json without 'objective' was trained with the token objective: it
    resumes with --objective token, not with another objective; remat may change."""
    d, _ = hf_students["llama_tied_gqa"]
    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=4, save_every=1, max_steps=2,
                      objective="token")
    train(d, selection, tmp_path / "run", cfg, mesh=one_device())
    path = tmp_path / "run" / "run_config.json"
    old = json.loads(path.read_text())
    for key in ("objective", "system_turn"):
        del old["config"][key]
    path.write_text(json.dumps(old))
    with pytest.raises(LarkError, match="--objective: 'token' != 'record'"):
        train(d, selection, tmp_path / "run", dataclasses.replace(cfg, objective="record"),
              mesh=one_device(), resume=True)
    res = train(d, selection, tmp_path / "run", dataclasses.replace(cfg, remat=True),
                mesh=one_device(), resume=True)
    assert res.resumed_from == 2


def test_run_steps_fetches_losses_one_step_late_and_syncs_before_checkpoints():
    """The host dispatches step k+1 before it waits for step k's loss; a checkpoint
    step is waited for before the next dispatch. Same numbers either way."""
    from lark_jax.training.loop import run_steps

    class FakeTrainer:
        def __init__(self, log):
            self.log = log

        def dispatch(self, mbs, denom):
            self.log.append(("dispatch", mbs))
            return jnp.float32(mbs * 1.5), jnp.float32(denom), 10

    items = [(k, k, 2.0 * k) for k in range(4)]
    for lag, sync, want in (
            (True, lambda s: False,
             ["d0", "d1", "f0", "d2", "f1", "d3", "f2", "f3"]),
            (True, lambda s: s == 1,
             ["d0", "d1", "f0", "f1", "d2", "d3", "f2", "f3"]),
            (False, lambda s: False,
             ["d0", "f0", "d1", "f1", "d2", "f2", "d3", "f3"])):
        log, got = [], []

        def done(step, loss, gnorm, tokens, log=log, got=got):
            log.append(("done", step))
            got.append((step, loss, gnorm, tokens))

        run_steps(FakeTrainer(log), iter(items), done, lag=lag, sync_after=sync)
        assert [("d" if e == "dispatch" else "f") + str(k) for e, k in log] == want
        assert got == [(k, 1.5 * k, 2.0 * k, 10) for k in range(4)]


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_runs_trained_together_equal_separate_train_runs(hf_students, tmp_path):
    """vmap over stacked parameters (one compiled step for every run) against ``train`` run
    by run: three runs differing in seed, objective and data, the same per-step losses and
    gradient norms and the same final weights."""
    from flax import nnx

    from lark_jax.training.together import train_together

    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    data = [write_selection(tmp_path / "a.jsonl", pool, weights=[0.2, 1.0, 2.5]),
            write_selection(tmp_path / "b.jsonl", pool, weights=[0.0, 1.0, 3.0]),
            write_selection(tmp_path / "a2.jsonl", pool, weights=[0.2, 1.0, 2.5])]
    base = TrainConfig(lr=1e-3, batch_size=4, max_steps=5, epochs=100, max_length=512,
                       micro_batch_tokens=1024, warmup_ratio=0.2)
    cfgs = [dataclasses.replace(base, seed=0, objective="record"),
            dataclasses.replace(base, seed=1, objective="reference"),
            dataclasses.replace(base, seed=2, objective="token")]
    mesh = one_device()
    student = lark_jax.load_student(d, mesh=mesh)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(student.model))]
    modes = {m: train_together(student, data, cfgs, mode=m) for m in ("vmap", "loop")}
    for r, (path, cfg) in enumerate(zip(data, cfgs, strict=True)):
        s = train(d, path, tmp_path / f"run{r}", cfg, mesh=mesh)
        metrics = [json.loads(x) for x in (tmp_path / f"run{r}" / "metrics.jsonl").open()]
        ref = nnx.state(lark_jax.load_student(s.final_dir, mesh=mesh).model)
        for together in modes.values():
            np.testing.assert_allclose(together.losses[r], [m["loss"] for m in metrics],
                                       rtol=2e-5)
            np.testing.assert_allclose(together.grad_norms[r],
                                       [m["grad_norm"] for m in metrics], rtol=2e-4)
            assert together.tokens[r].tolist() == [m["tokens"] for m in metrics]
            got = nnx.state(together.student(r).model)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
    # The runs really differ (seed, objective, data): not one run copied three times.
    losses = modes["loop"].losses
    assert not np.allclose(losses[0], losses[1]) and not np.allclose(losses[0], losses[2])
    # The student they started from is untouched (the steps donate their own copies).
    for a, b in zip(jax.tree.leaves(nnx.state(student.model)), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_identical_runs_are_trained_once_and_equal_a_separate_run(hf_students, tmp_path):
    """Equal weights make the record and reference objectives compute the same steps (LARK at
    budget 1): such runs are trained once, and the shared result equals the reference run
    trained alone. Another seed, or the record objective on unequal weights, is another
    run."""
    from lark_jax.training.together import train_together

    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    equal = write_selection(tmp_path / "equal.jsonl", pool, weights=[1.0, 1.0, 1.0])
    unequal = write_selection(tmp_path / "unequal.jsonl", pool, weights=[0.2, 1.0, 2.5])
    base = TrainConfig(lr=1e-3, batch_size=4, max_steps=4, epochs=100, max_length=512,
                       micro_batch_tokens=1024)
    rec, ref = (dataclasses.replace(base, objective=o) for o in ("record", "reference"))
    student = lark_jax.load_student(d, mesh=one_device())
    got = train_together(student, [equal, equal, equal, unequal, unequal],
                         [rec, ref, dataclasses.replace(rec, seed=1), rec, ref], mode="loop")
    # The reference objective only drops weight-0 records: on unequal weights it is the
    # equal-weights run again.
    assert got.same_as == [0, 0, 2, 3, 0]
    alone = train_together(student, [equal], [ref], mode="loop")
    assert alone.same_as == [0]
    np.testing.assert_allclose(got.losses[1], alone.losses[0], rtol=1e-6)
    np.testing.assert_array_equal(got.losses[1], got.losses[0])
    assert not np.allclose(got.losses[2], got.losses[0])  # another seed: another order
    assert not np.allclose(got.losses[3], got.losses[4])  # unequal weights: objectives differ


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_training_in_pieces_continues_one_run_and_switches_data(hf_students, tmp_path):
    """``train_together(stop=..., resume=...)``: on the same files, two pieces compute the
    same steps as one call (losses, grad norms, final weights), in both modes, so the
    schedule and the Adam state carry over; a second piece on other data trains the new
    file's records from the first piece's state (not the base student)."""
    from flax import nnx

    from lark_jax.training.together import train_together

    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=5)
    data = [write_selection(tmp_path / "a.jsonl", pool, weights=[0.2, 1.0, 2.5]),
            write_selection(tmp_path / "b.jsonl", pool, weights=[0.0, 1.0, 3.0])]
    base = TrainConfig(lr=1e-3, batch_size=4, max_steps=5, epochs=100, max_length=512,
                       micro_batch_tokens=1024, warmup_ratio=0.2)
    cfgs = [dataclasses.replace(base, seed=0), dataclasses.replace(base, seed=1)]
    student = lark_jax.load_student(d, mesh=one_device())
    leaves = lambda t, r: jax.tree.leaves(nnx.state(t.student(r).model))  # noqa: E731
    for mode in ("loop", "vmap"):
        whole = train_together(student, data, cfgs, mode=mode)
        first = train_together(student, data, cfgs, mode=mode, stop=2)
        assert first.steps == (0, 2) and first.losses.shape == (2, 2)
        rest = train_together(student, data, cfgs, mode=mode, resume=first)
        assert rest.steps == (2, 5)
        np.testing.assert_allclose(np.concatenate([first.losses, rest.losses], 1),
                                   whole.losses, rtol=1e-5)
        np.testing.assert_allclose(np.concatenate([first.grad_norms, rest.grad_norms], 1),
                                   whole.grad_norms, rtol=1e-4)
        for r in range(2):
            for a, b in zip(leaves(rest, r), leaves(whole, r), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
    # Switching data: run 0's second piece on b.jsonl. Its steps are b's records (the
    # tokens trained on are b's at those steps), taken from a's first piece's weights.
    switched = train_together(student, [data[1], data[1]], cfgs, mode="loop", resume=first)
    on_b = train_together(student, [data[1]], [cfgs[0]], mode="loop")
    assert switched.tokens[0].tolist() == on_b.tokens[0, 2:].tolist()
    assert not np.allclose(switched.losses[0], on_b.losses[0, 2:])  # other starting weights
    assert switched.same_as == [0, 1]  # resumed runs are never merged
    with pytest.raises(LarkError, match="stop must be"):
        train_together(student, data, cfgs, mode="loop", stop=2, resume=first)


@pytest.mark.slow  # a long oracle or end-to-end run: the slow tier
def test_train_in_pieces_then_reselect_from_the_command_line(hf_students, tmp_path, capsys):
    """Iterative selection from the CLI: ``train --stop-after`` trains a piece of the run and
    exports that state; ``score`` it, ``select`` again, ``train --resume --switch-data``
    goes on from the checkpoint on the new selection. Pieces on the same file equal the
    uninterrupted run (losses and final weights); after a switch, the steps train the new
    file's records (its own step plan) from the first piece's weights."""
    from lark_jax.cli import main

    d, _ = hf_students["llama_tied_gqa"]
    pool = write_pool(tmp_path / "pool.jsonl", n_problems=4)
    a = write_selection(tmp_path / "a.jsonl", pool, weights=[0.2, 1.0, 2.5])
    cfg = TrainConfig(lr=2e-3, batch_size=4, max_steps=5, epochs=1, seed=1)
    mesh = one_device()
    lines = lambda run: [json.loads(x) for x in  # noqa: E731
                         (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    whole = train(d, a, tmp_path / "whole", cfg, mesh=mesh)
    first = train(d, a, tmp_path / "p", dataclasses.replace(cfg, stop_after=2), mesh=mesh)
    assert first.steps == 2 and len(lines("p")) == 2
    assert (tmp_path / "p" / "final" / "model.safetensors").is_file()  # the step-2 weights
    rest = train(d, a, tmp_path / "p", cfg, mesh=mesh, resume=True)
    assert rest.resumed_from == 2 and rest.steps == 5
    np.testing.assert_allclose([r["loss"] for r in lines("p")],
                               [r["loss"] for r in lines("whole")], rtol=1e-5)
    w = lark_jax.load_student(whole.final_dir, mesh=mesh).model
    p = lark_jax.load_student(rest.final_dir, mesh=mesh).model
    np.testing.assert_allclose(np.asarray(p.layers.q_proj[...]), np.asarray(w.layers.q_proj[...]),
                               atol=1e-6)

    # The command-line chain: piece, score with it, select, switch.
    run = tmp_path / "it"
    common = ["--student", str(d), "--out", str(run), "--lr", "2e-3", "--batch-size", "4",
              "--max-steps", "5", "--seed", "1", "-q"]
    assert main(["train", "--data", str(a), "--stop-after", "2", *common]) == 0
    assert main(["score", "--pool", str(pool), "--student", str(run / "final"), "--out",
                 str(tmp_path / "s1.json"), "-q"]) == 0
    b = tmp_path / "b.jsonl"
    assert main(["select", "--scores", str(tmp_path / "s1.json"), "--pool", str(pool), "--out",
                 str(b), "--policy", "lark", "--budget", "1", "-q"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(b), "--resume", *common]) == 2  # not without the flag
    assert "--switch-data" in capsys.readouterr().err
    assert main(["train", "--data", str(b), "--resume", "--switch-data", *common]) == 0
    cfg_json = json.loads((run / "run_config.json").read_text())
    assert cfg_json["data_history"] == [{"from_step": 0, "data": str(a)},
                                        {"from_step": 2, "data": str(b)}]
    got = lines("it")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in got[:2]],
                               [r["loss"] for r in lines("whole")[:2]], rtol=1e-5)
    on_b = train(d, b, tmp_path / "on_b", cfg, mesh=mesh)  # b from the start
    assert [r["tokens"] for r in got[2:]] == [r["tokens"] for r in lines("on_b")[2:]]
    assert not np.allclose([r["loss"] for r in got[2:]], [r["loss"] for r in lines("on_b")[2:]])
    assert on_b.steps == 5
    # A schedule whose length follows the data (epochs) cannot take other data.
    by_epochs = TrainConfig(lr=2e-3, batch_size=4, epochs=1, seed=1, stop_after=1)
    train(d, a, tmp_path / "e", by_epochs, mesh=mesh)
    big = write_selection(tmp_path / "big.jsonl", write_pool(tmp_path / "pool8.jsonl", 8))
    with pytest.raises(LarkError, match="--max-steps"):
        train(d, big, tmp_path / "e", by_epochs, mesh=mesh, resume=True, switch_data=True)
    with pytest.raises(LarkError, match="needs --resume"):
        train(d, big, tmp_path / "e2", by_epochs, mesh=mesh, switch_data=True)
    with pytest.raises(LarkError, match="past --stop-after"):
        train(d, a, tmp_path / "p", dataclasses.replace(cfg, stop_after=3), mesh=mesh,
              resume=True)
