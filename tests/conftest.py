"""Test setup: 8 simulated CPU devices (set before JAX initialises) and tiny students."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from lark_jax.hostmem import tune_cpu_malloc  # noqa: E402

tune_cpu_malloc()  # as the CLI does, before the CPU client starts

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_in_tmp(tmp_path_factory):
    """The CLI's compile cache (lark_jax.compile_cache) goes to this session's tmp dir, in
    this process and in the ones the tests start: a test run never writes to ~/.cache."""
    os.environ["LARK_JAX_CACHE"] = str(tmp_path_factory.mktemp("lark-jax-cache"))
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)


# Tiny configurations covering every family feature the decoder implements.
FAMILY_CASES = {
    "llama_tied_gqa": dict(model_type="llama", tie_word_embeddings=True,
                           num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope_untied_bias": dict(
        model_type="llama", tie_word_embeddings=False, num_attention_heads=4,
        num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "qwen2_bias_tied": dict(model_type="qwen2", tie_word_embeddings=True,
                            num_attention_heads=4, num_key_value_heads=2),
    "qwen3_qknorm_headdim": dict(model_type="qwen3", tie_word_embeddings=False,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


def build_hf_student(out_dir, case: str, seed: int = 0):
    """A random transformers (PyTorch) model of the case, saved with our tokenizer."""
    import torch
    import transformers

    from lark_jax.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    kw = dict(FAMILY_CASES[case])
    model_type = kw.pop("model_type")
    cfg_cls = transformers.CONFIG_MAPPING[model_type]
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, initializer_range=0.15, rms_norm_eps=1e-6,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=None, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model, tok


@pytest.fixture(scope="session")
def hf_students(tmp_path_factory):
    """{case: (dir, torch model)} for every FAMILY_CASES entry, built once per session."""
    out = {}
    for case in FAMILY_CASES:
        d = tmp_path_factory.mktemp(case)
        model, _ = build_hf_student(d, case)
        out[case] = (d, model)
    return out


def write_pool(path, n_problems: int = 6, seed: int = 0, teachers=("terse", "verbose", "odd")):
    """A small multi-teacher arithmetic pool in the reference JSONL format."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for pid in range(n_problems):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            for cid, t in enumerate(teachers):
                if t == "terse":
                    ans = f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"
                elif t == "verbose":
                    ans = (f"Take {a}, then add {b}. " * rng.randint(1, 8)
                           + f"The answer is \\boxed{{{a + b}}}")
                else:
                    ans = f"<<{a}|{b}>> => {a + b}"
                msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": ans}]
                if pid % 2:
                    msgs.insert(0, {"role": "system", "content": "Think step by step."})
                f.write(json.dumps({"problem_id": pid, "candidate_id": cid, "teacher": t,
                                    "messages": msgs}) + "\n")
    return path


def chat_ids(tok, msgs):
    """(ids of the whole chat, ids of its prompt up to the last assistant turn), through
    the tokenizer's own chat template: the oracle's view of the assistant span."""
    full = tok(tok.apply_chat_template(msgs, tokenize=False),
               add_special_tokens=False)["input_ids"]
    prompt = tok(tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    return full, prompt


def one_device():
    """A 1-device mesh (the session has 8 simulated CPU devices)."""
    from lark_jax.parallel import make_mesh

    return make_mesh(devices=jax.devices()[:1])


def write_selection(path, pool_path, weights=None):
    """A training JSONL from a pool: record i gets weights[i % len(weights)] (default 1)."""
    import json

    recs = [json.loads(x) for x in open(pool_path, encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(recs):
            w = weights[i % len(weights)] if weights else 1.0
            f.write(json.dumps({"messages": r["messages"],
                                "meta": {"problem_id": r["problem_id"], "train_weight": w}})
                    + "\n")
    return path


class Preempted(Exception):
    """Stands in for a preemption in interruption tests."""


def preempt_at(step: int):
    """A train() progress callback that raises Preempted after ``step``."""
    def progress(done, total, loss, tok_s):
        if done == step:
            raise Preempted
    return progress


def spy_flash(monkeypatch) -> list:
    """Count traces of the fused attention kernel (a test that means to use it must)."""
    from lark_jax.models import attention

    calls = []
    real = attention.flash_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attention", spy)
    return calls
