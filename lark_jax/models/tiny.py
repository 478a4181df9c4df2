"""Tiny students made by the project itself (tests, README examples, the demo).

Nothing can be downloaded at run time, so the project builds its own small
HF-style directories: a byte-level tokenizer with a ChatML chat template and a
randomly initialised decoder of any supported family. They go through exactly
the same loading path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from lark_jax.models.config import ModelConfig

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer(merges_corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer (any UTF-8 text) with the ChatML template.

    Without a corpus it has only the 256 byte tokens plus the special tokens;
    with one it learns BPE merges up to ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size if merges_corpus else 0, initial_alphabet=alphabet,
        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(merges_corpus or [""], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE)


def tiny_config(family: str = "qwen2", vocab_size: int = 259, *, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 128, tie_word_embeddings: bool = True,
                eos_token_id: int | None = None, **overrides) -> ModelConfig:
    head_dim = overrides.pop("head_dim", hidden_size // num_heads)
    base = dict(
        model_type=family, vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, tie_word_embeddings=tie_word_embeddings,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        eos_token_ids=(eos_token_id,) if eos_token_id is not None else (),
        rope_theta=10000.0 if family == "llama" else 1000000.0,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_tiny_student(out_dir: str | Path, family: str = "qwen2", *, seed: int = 0,
                      dtype="float32", overwrite: bool = False, **config_overrides) -> Path:
    """Write a random tiny student of ``family`` to ``out_dir`` (HF layout)."""
    from lark_jax.models.decoder import Decoder
    from lark_jax.models.io import resolve_dtype, save_student

    tok = byte_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = tiny_config(family, vocab_size=len(tok), eos_token_id=eos,
                      pad_token_id=tok.pad_token_id, **config_overrides)
    model = Decoder(cfg, dtype=resolve_dtype(dtype), rngs=nnx.Rngs(seed))
    # Random biases and norm weights too, so parity tests exercise every tensor.
    for name in ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "input_norm", "post_norm"):
        if hasattr(model.layers, name):
            p = getattr(model.layers, name)
            key = nnx.Rngs(seed + 1).params()
            import jax

            base = 1.0 if "norm" in name else 0.0
            p[...] = (base + 0.1 * jax.random.normal(key, p.shape)).astype(p.dtype)
    model.final_norm[...] = jnp.ones_like(model.final_norm[...]) * 1.1
    return save_student(model, out_dir, tok, overwrite=overwrite)
