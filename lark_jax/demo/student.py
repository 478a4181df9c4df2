"""The demo's tiny student: built by a recipe, pre-trained briefly, cached on disk.

Recipe (:class:`StudentRecipe`):

1. A byte-level BPE tokenizer whose merges are learnt on the pre-training corpus (the task's
   language), numbers isolated from what surrounds them (so every number is spelt the same
   way wherever it appears), with the project's ChatML chat template.
2. A randomly initialised Llama-architecture decoder (3.1M parameters at the default size,
   0.8M in quick mode), saved as an HF-style directory with ``save_student``.
3. Brief pre-training with the project's own ``train()`` on a selection file of weight 1:
   ``task.pretrain_corpus`` of problems in neither the pool nor the benchmark, that is
   retellings of problems (reading, no computing) and isolated arithmetic facts, never a
   worked solution. The student knows the task's language and its single operations but
   has never solved a problem: what it learns from each teacher in fine-tuning differs
   (how much of what it knows a teacher reuses), which is what LARK measures.

The result is an ordinary HF-style directory, ``<cache>/demo-student-<hash>``, where
``<cache>`` is ``$LARK_JAX_CACHE`` or ``~/.cache/lark-jax`` and ``<hash>`` is a hash of the
recipe (and of the corpus it is trained on); it loads through ``load_student`` exactly like a
real checkpoint. The build is deterministic by seed on a given platform and is done once:
later runs find the directory and load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lark_jax.errors import LarkError
from lark_jax.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_config

STUDENT_VERSION = "demo-student-v2"
RECIPE_FILE = "demo_recipe.json"


@dataclasses.dataclass(frozen=True)
class StudentRecipe:
    """Architecture and pre-training of the demo student (every field enters the cache key)."""

    family: str = "llama"  # see validate() for why not qwen2/qwen3
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    vocab_size: int = 512  # BPE vocabulary incl. 256 bytes and the special tokens
    pretrain_steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 512
    micro_batch_tokens: int = 2048  # 8 packed rows of 256 tokens per forward/backward
    seed: int = 0

    def validate(self) -> None:
        if self.family != "llama":
            # transformers (v5) loads a model_type qwen2/qwen3 directory's tokenizer as
            # Qwen2Tokenizer, which replaces tokenizer.json's pre-tokenizer with Qwen2's own:
            # the demo tokenizer's digit rule would silently change between build and load.
            raise LarkError(f"the demo student is a Llama-family model, got {self.family!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise LarkError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if min(self.num_layers, self.pretrain_steps, self.batch_size) < 1:
            raise LarkError("num_layers, pretrain_steps and batch_size must be >= 1")
        if self.vocab_size < 300:
            raise LarkError("vocab_size must be >= 300 (256 bytes, specials and some merges)")
        if not self.lr > 0:
            raise LarkError("the pre-training lr must be > 0")


def cache_root() -> Path:
    """``$LARK_JAX_CACHE`` if set, else ``~/.cache/lark-jax``."""
    env = os.environ.get("LARK_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lark-jax"


def recipe_key(recipe: StudentRecipe, corpus_recipe: dict) -> dict:
    """Everything the student depends on, as one JSON-ready dict."""
    return {"version": STUDENT_VERSION, "student": dataclasses.asdict(recipe),
            "corpus": corpus_recipe}


def recipe_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def demo_tokenizer(corpus: list[str], vocab_size: int = 512):
    """Byte-level BPE (merges learnt on ``corpus``) with numbers isolated, ChatML template.

    Same construction as ``models.tiny.byte_tokenizer`` except that every run of digits is
    its own pre-token (a preceding space or brace is not merged into it) before the
    byte-level step, so that a number is spelt the same way wherever it appears: "13" in
    "8 + 5 = 13." and in "\\boxed{13}" are the same token(s), and copying an intermediate
    result into the answer is a copy. The task's numbers (1..20) each become one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE)


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


@dataclasses.dataclass
class BuiltStudent:
    path: Path
    cached: bool  # True when an earlier build was found
    seconds: float
    num_params: int
    vocab_size: int
    pretrain_steps: int
    final_loss: float | None  # last pre-training loss (from the build's metrics)


def _describe(path: Path, cached: bool, seconds: float) -> BuiltStudent:
    meta = json.loads((path / RECIPE_FILE).read_text(encoding="utf-8"))
    return BuiltStudent(path, cached, seconds, meta["num_params"], meta["vocab_size"],
                        meta["student"]["pretrain_steps"], meta.get("final_loss"))


def student_path(recipe: StudentRecipe, corpus_recipe: dict, cache_dir=None) -> Path:
    """Where the student of this recipe and corpus is cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / f"demo-student-{recipe_hash(recipe_key(recipe, corpus_recipe))}"


def is_built(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() and (path / "config.json").is_file()


def build_student(recipe: StudentRecipe, pretrain_records: list[dict], corpus_recipe: dict, *,
                  cache_dir: str | os.PathLike | None = None, mesh=None, rebuild: bool = False,
                  progress: Callable[..., None] | None = None,
                  info: Callable[[str], None] | None = None) -> BuiltStudent:
    """The cached student directory for ``recipe``, building it first if needed.

    ``pretrain_records`` are chat records ``{"messages": [...]}`` (the corpus; their texts
    also train the tokenizer) and ``corpus_recipe`` what generated them (part of the cache
    key). ``progress(step, total, loss=..., tok_s=...)`` follows the pre-training steps.
    """
    from flax import nnx

    from lark_jax.models.decoder import Decoder
    from lark_jax.models.io import save_student
    from lark_jax.models.params import count_params
    from lark_jax.training.trainer import TrainConfig, train

    recipe.validate()
    if not pretrain_records:
        raise LarkError("the pre-training corpus is empty")
    t0 = time.perf_counter()
    key = recipe_key(recipe, corpus_recipe)
    target = student_path(recipe, corpus_recipe, cache_dir)
    root = target.parent
    if not rebuild and is_built(target):
        return _describe(target, True, time.perf_counter() - t0)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LarkError(f"cannot create the cache directory ({e}); set LARK_JAX_CACHE",
                        where=str(root)) from None
    if info is not None:
        info(f"building the demo student (first run; cached afterwards) in {target}")
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=root))
    try:
        texts = [m["content"] for r in pretrain_records for m in r["messages"]
                 if m["role"] != "system"]
        tok = demo_tokenizer(texts, recipe.vocab_size)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        cfg = tiny_config(recipe.family, vocab_size=len(tok), hidden_size=recipe.hidden_size,
                          num_layers=recipe.num_layers, num_heads=recipe.num_heads,
                          num_kv_heads=recipe.num_kv_heads,
                          intermediate_size=recipe.intermediate_size, eos_token_id=eos,
                          pad_token_id=tok.pad_token_id, max_position_embeddings=2048)
        model = Decoder(cfg, rngs=nnx.Rngs(recipe.seed))
        save_student(model, work / "init", tok)
        data = work / "pretrain.jsonl"
        _write_jsonl(data, ({"messages": r["messages"], "meta": {"train_weight": 1.0}}
                            for r in pretrain_records))
        tcfg = TrainConfig(epochs=10**6, max_steps=recipe.pretrain_steps, lr=recipe.lr,
                           batch_size=recipe.batch_size, max_length=recipe.max_length,
                           warmup_ratio=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
                           micro_batch_tokens=recipe.micro_batch_tokens, seed=recipe.seed,
                           keep=1)
        summary = train(work / "init", data, work / "run", tcfg, mesh=mesh, progress=progress)
        final = work / "run" / "final"
        for name in ("metrics.jsonl", "loss.png"):
            shutil.copy(work / "run" / name, final / f"pretrain_{name}")
        meta = {**key, "num_params": count_params(cfg), "vocab_size": len(tok),
                "final_loss": summary.final_loss, "build_seconds": time.perf_counter() - t0,
                "n_corpus_records": len(pretrain_records)}
        (final / RECIPE_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if target.exists():  # a concurrent build finished first, or --rebuild
            if not rebuild:
                return _describe(target, True, time.perf_counter() - t0)
            shutil.rmtree(target)
        os.replace(final, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _describe(target, False, time.perf_counter() - t0)
