"""Decoder parity with transformers (PyTorch CPU float32 oracle), loading, saving, generation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import FAMILY_CASES

import lark_jax
from lark_jax.models.attention import blockwise_attention, dense_attention, flash_attention
from lark_jax.models.decoder import KVCache
from lark_jax.parallel import make_mesh

CASES = list(FAMILY_CASES)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_logit_parity_with_transformers(hf_students, case):
    d, ref = hf_students[case]
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    ids = np.random.RandomState(1).randint(0, student.config.vocab_size, (2, 40))
    ours = np.asarray(student.model(jnp.asarray(ids, jnp.int32)))
    theirs = torch_logits(ref, ids)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4
    # The check has teeth: logits are far from constant.
    assert theirs.std() > 0.1


@pytest.mark.parametrize("impl,case,rows", [
    ("blockwise", "llama3_rope_untied_bias", 1), ("blockwise", "qwen3_qknorm_headdim", 1),
    ("flash", "llama_tied_gqa", 2), ("flash", "qwen3_qknorm_headdim", 2)])
def test_attention_paths_match_transformers(hf_students, impl, case, rows):
    d, ref = hf_students[case]
    student = lark_jax.load_student(d, attn_impl=impl,
                                    mesh=make_mesh(devices=jax.devices()[:1]))
    ids = np.random.RandomState(2).randint(0, student.config.vocab_size, (rows, 70))
    ours = np.asarray(student.model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - torch_logits(ref, ids)).max() <= 1e-4


def _np_attention(q, k, v, mask):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_attention_kernels_match_float64_oracle():
    rng = np.random.RandomState(0)
    b, t, h, kvh, d = 2, 37, 4, 2, 8
    q, k, v = (rng.randn(b, t, n, d).astype(np.float32) for n in (h, kvh, kvh))
    seg = np.sort(rng.randint(0, 3, (b, t)), axis=1)  # packed rows: 3 segments
    idx = np.broadcast_to(np.arange(t), (b, t))
    valid = np.ones((b, t), bool)
    mask = (idx[:, None, :] <= idx[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
    want = _np_attention(q, k, v, mask)
    args = [jnp.asarray(x) for x in (q, k, v, idx, idx, seg, seg, valid)]
    dense = np.asarray(dense_attention(*args))
    block = np.asarray(blockwise_attention(*args, q_block=8, kv_block=16))
    assert np.abs(dense - want).max() < 1e-5
    assert np.abs(block - want).max() < 1e-5


def test_bf16_attention_in_the_kv_cache_layout_on_cpu():
    """The KV cache's layout ([B, Hkv, S, D]) in bfloat16: XLA:CPU lacks the bf16 dot it
    would use (decoding a bf16 student on CPU failed); the result is the float64 oracle's
    on the bf16-rounded inputs, to bf16's precision."""
    rng = np.random.RandomState(1)
    b, t, h, kvh, d = 2, 5, 4, 2, 16
    q, k, v = (rng.randn(b, t, n, d).astype(np.float32) for n in (h, kvh, kvh))
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k, v))
    idx = np.broadcast_to(np.arange(t), (b, t))
    seg = np.zeros((b, t), np.int32)
    valid = np.ones((b, t), bool)
    want = _np_attention(q, k, v, idx[:, None, :] <= idx[:, :, None])
    got = dense_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q,)),
                          jnp.asarray(k, jnp.bfloat16).transpose(0, 2, 1, 3),
                          jnp.asarray(v, jnp.bfloat16).transpose(0, 2, 1, 3),
                          *(jnp.asarray(x) for x in (idx, idx, seg, seg, valid)),
                          kv_heads_first=True)
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - want).max() < 3e-2


def test_blockwise_attention_gradients_equal_dense():
    """Training backpropagates through the checkpointed tiles: same gradients as dense."""
    rng = np.random.RandomState(1)
    b, t, h, kvh, d = 2, 40, 4, 2, 8
    q, k, v = (jnp.asarray(rng.randn(b, t, n, d).astype(np.float32)) for n in (h, kvh, kvh))
    seg = jnp.asarray(np.sort(rng.randint(0, 2, (b, t)), axis=1))
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    ctx = (idx, idx, seg, seg, jnp.ones((b, t), bool))
    cot = jnp.asarray(rng.randn(b, t, h, d).astype(np.float32))

    def loss(fn, q, k, v):
        return (fn(q, k, v, *ctx) * cot).sum()

    want = jax.grad(lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(lambda *x: blockwise_attention(*x, q_block=8, kv_block=16),
                                   *a), argnums=(0, 1, 2))(q, k, v)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), atol=1e-5)


def _packed_case(rng, b, t, h, kvh, d):
    q, k, v = (rng.randn(b, t, n, d).astype(np.float32) for n in (h, kvh, kvh))
    seg = np.sort(rng.randint(0, 3, (b, t)), axis=1)
    seg[1, t - 5:] = -1  # row padding, as the packer writes it
    idx = np.broadcast_to(np.arange(t), (b, t))
    mask = (idx[:, None, :] <= idx[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
    return q, k, v, seg, mask


@pytest.mark.parametrize("t,d,dtype,tol", [(37, 24, "float32", 1e-5),
                                           (150, 128, "float32", 1e-5),
                                           (150, 64, "bfloat16", 3e-2)])
def test_flash_attention_matches_float64_oracle(t, d, dtype, tol):
    """The fused Pallas kernel (interpret mode on CPU): grouped heads, a head size that
    is not a power of two, lengths that are not a multiple of its block, packing; the
    float32 / head size 128 case takes the smaller 64-blocks."""
    rng = np.random.RandomState(5)
    q, k, v, seg, mask = _packed_case(rng, 2, t, 4, 2, d)
    q, k, v = (x.astype(dtype).astype(np.float32) for x in (q, k, v))  # the oracle's inputs
    want = _np_attention(q, k, v, mask)
    got = flash_attention(*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(seg))
    assert got.dtype == jnp.dtype(dtype)
    got = np.asarray(got, np.float32)
    real = seg >= 0
    assert got.shape == want.shape
    assert np.abs(got - want)[real].max() < tol


def test_flash_attention_gradients_equal_dense():
    rng = np.random.RandomState(6)
    q, k, v, seg, _ = _packed_case(rng, 2, 40, 4, 2, 8)
    q, k, v, seg = (jnp.asarray(x) for x in (q, k, v, seg))
    idx = jnp.broadcast_to(jnp.arange(40), (2, 40))
    # Padding queries are dropped by every caller; their cotangent is zero.
    cot = jnp.asarray(rng.randn(*q.shape).astype(np.float32)) * (seg >= 0)[..., None, None]
    want = jax.grad(lambda q, k, v: (dense_attention(q, k, v, idx, idx, seg, seg,
                                                     jnp.ones_like(seg, bool)) * cot).sum(),
                    argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda q, k, v: (flash_attention(q, k, v, seg) * cot).sum(),
                   argnums=(0, 1, 2))(q, k, v)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), atol=1e-5)


def test_unknown_attention_impl_is_refused(hf_students):
    d, _ = hf_students["llama_tied_gqa"]
    with pytest.raises(ValueError, match="attn_impl"):
        lark_jax.load_student(d, attn_impl="flash2", mesh=make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("case", ["qwen2_bias_tied", "qwen3_qknorm_headdim"])
def test_kv_cache_decoding_matches_full_forward(hf_students, case):
    d, _ = hf_students[case]
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    m = student.model
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 200, (2, 12)), jnp.int32)
    full = np.asarray(m(ids))
    cache = KVCache.empty(m.cfg, 2, 16, m.dtype)
    cache = cache._replace(valid=cache.valid.at[:, :8].set(True))
    pos0 = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    h, cache = m.decode(ids[:, :8], pos0, cache, 0)
    steps = [np.asarray(m.logits(h))]
    for i in range(8, 12):
        cache = cache._replace(valid=cache.valid.at[:, i].set(True))
        pos = jnp.full((2, 1), i, jnp.int32)
        h, cache = m.decode(ids[:, i:i + 1], pos, cache, i)
        steps.append(np.asarray(m.logits(h)))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-4


def test_packed_segments_equal_separate_rows(hf_students):
    d, _ = hf_students["llama_tied_gqa"]
    m = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1])).model
    rng = np.random.RandomState(4)
    a, b = rng.randint(0, 200, 9), rng.randint(0, 200, 6)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(9), np.arange(6)])[None], jnp.int32)
    seg = jnp.asarray(np.array([0] * 9 + [1] * 6)[None], jnp.int32)
    out = np.asarray(m(packed, pos, seg))[0]
    sep_a = np.asarray(m(jnp.asarray(a[None], jnp.int32)))[0]
    sep_b = np.asarray(m(jnp.asarray(b[None], jnp.int32)))[0]
    assert np.abs(out[:9] - sep_a).max() < 1e-4
    assert np.abs(out[9:] - sep_b).max() < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_matches_transformers(hf_students, case):
    d, ref = hf_students[case]
    student = lark_jax.load_student(d)  # all 8 devices: batch split over "data"
    tok = student.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                       add_generation_prompt=True)
               for c in ["2+2?", "a much longer question about numbers", "x"]]
    ours = lark_jax.generate_ids(student, [tok(p, add_special_tokens=False)["input_ids"]
                                           for p in prompts], max_new_tokens=12)
    for p, got in zip(prompts, ours, strict=True):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = ref.generate(ids, max_new_tokens=12, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        want = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id)]
        assert got == want
    assert len({tuple(o) for o in ours}) > 1  # prompts lead to different continuations


def test_sampling_is_seeded(hf_students):
    d, _ = hf_students["qwen2_bias_tied"]
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    prompts = ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"] * 3
    a = lark_jax.generate(student, prompts, 16, temperature=0.9, top_p=0.95, seed=7)
    b = lark_jax.generate(student, prompts, 16, temperature=0.9, top_p=0.95, seed=7)
    c = lark_jax.generate(student, prompts, 16, temperature=0.9, top_p=0.95, seed=8)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # rows draw different samples


@pytest.mark.parametrize("case", ["llama3_rope_untied_bias", "qwen3_qknorm_headdim"])
def test_save_then_transformers_load(hf_students, case, tmp_path):
    import transformers

    d, ref = hf_students[case]
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    out = lark_jax.save_student(student.model, tmp_path / "saved", student.tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = np.random.RandomState(5).randint(0, 200, (1, 20))
    assert np.abs(torch_logits(reloaded, ids) - torch_logits(ref, ids)).max() <= 1e-5
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == \
        student.tokenizer.apply_chat_template(msgs, tokenize=False)


def test_sharded_index_roundtrip_and_model_axis(hf_students, tmp_path):
    d, ref = hf_students["qwen2_bias_tied"]
    student = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1]))
    out = lark_jax.save_student(student.model, tmp_path / "sharded", student.tokenizer,
                                max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    # Load the sharded checkpoint with parameters split over a 2x4 ("data","model") mesh.
    mesh = make_mesh(model=4)
    sharded = lark_jax.load_student(out, mesh=mesh)
    spec = sharded.model.layers.q_proj[...].sharding.spec
    assert "model" in tuple(spec)
    ids = np.random.RandomState(6).randint(0, 200, (8, 16))
    ours = np.asarray(jax.jit(lambda x: sharded.model(x))(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - torch_logits(ref, ids)).max() <= 1e-4


def test_bfloat16_load_is_close(hf_students):
    d, ref = hf_students["llama_tied_gqa"]
    student = lark_jax.load_student(d, dtype="bfloat16", mesh=make_mesh(devices=jax.devices()[:1]))
    assert student.model.embed[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(7).randint(0, 200, (1, 16))
    ours = np.asarray(student.model(jnp.asarray(ids, jnp.int32)).astype(jnp.float32))
    theirs = torch_logits(ref, ids)
    assert np.isfinite(ours).all()
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(theirs).max()


def test_sequence_chunked_mlp_matches(hf_students, monkeypatch):
    import lark_jax.models.decoder as dec

    d, ref = hf_students["qwen3_qknorm_headdim"]
    m = lark_jax.load_student(d, mesh=make_mesh(devices=jax.devices()[:1])).model
    monkeypatch.setattr(dec, "MLP_CHUNK_TOKENS", 16)
    assert dec._mlp_chunk(2, 64) == 8
    ids = np.random.RandomState(8).randint(0, 200, (2, 64))
    ours = np.asarray(m(jnp.asarray(ids, jnp.int32)))
    assert np.abs(ours - torch_logits(ref, ids)).max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_parameter_table_counts_and_shards_every_weight(hf_students, case):
    """count_params comes from the one table and equals transformers' count (o/mlp biases,
    q/k norms and tied heads included); every weight has one logical axis per dimension."""
    from lark_jax.models.params import count_params, param_shardings, param_specs
    from lark_jax.parallel import SHARDING_RULES

    d, ref = hf_students[case]
    student = lark_jax.load_student(d, mesh=make_mesh(model=2))
    cfg = student.config
    assert count_params(cfg) == sum(p.numel() for p in ref.parameters())
    known = {"layers"} | {a for rules in SHARDING_RULES.values() for a in rules}
    for spec in param_specs(cfg):
        assert len(spec.axes) == len(spec.shape) and set(spec.axes) <= known, spec
    # Loading, FSDP and model-parallel placement all read the table: column-parallel q,
    # row-parallel o, vocab-parallel embedding, and the FSDP split of gate over "data".
    m = student.model
    assert tuple(m.layers.q_proj[...].sharding.spec) == (None, "model", None)
    assert tuple(m.layers.o_proj[...].sharding.spec) == (None, None, "model")
    # (a vocabulary the model axis does not divide stays whole)
    want = ("model", None) if cfg.vocab_size % 2 == 0 else ()
    assert tuple(m.embed[...].sharding.spec) == want
    from flax import nnx

    fsdp = param_shardings(nnx.split(m)[1], cfg, make_mesh(), "fsdp")
    assert tuple(fsdp["layers"]["gate_proj"].spec) == (None, "data", None)


def test_auto_attention_is_flash_for_uncached_rows_on_gpu_only():
    from lark_jax.models.attention import choose_impl

    assert choose_impl("auto", cached=False, platform="gpu") == "flash"
    assert choose_impl("auto", cached=True, platform="gpu") == "auto"
    assert choose_impl("flash", cached=True, platform="gpu") == "auto"
    assert choose_impl("auto", cached=False, platform="cpu") == "auto"
    assert choose_impl("blockwise", cached=False, platform="gpu") == "blockwise"
    assert choose_impl("dense", cached=True, platform="tpu") == "dense"
