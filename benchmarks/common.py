"""Shared benchmark helpers: machine info, a random 0.5B-shaped student, synthetic CoT pools."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
from pathlib import Path

# LARK_BENCH_RESULTS redirects results (the GPU script points it at $OUT).
RESULTS = Path(os.environ.get("LARK_BENCH_RESULTS", Path(__file__).parent / "results"))

# Qwen2.5-0.5B's shape (hidden 896, 14 heads / 2 kv heads, MLP 4864, the full 151,936
# vocabulary, tied embeddings); the layer count is a parameter so it runs on a CPU.
QWEN05B = dict(hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64,
               intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
QWEN15B = dict(hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128,
               intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)


# A small student whose device work is light enough to show host-side costs (tokenizing,
# packing) in scoring throughput.
SMALL = dict(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
             intermediate_size=256, vocab_size=512, tie_word_embeddings=True)

SHAPES = {"05b": QWEN05B, "15b": QWEN15B, "small": SMALL}


def add_student_args(ap) -> None:
    """--layers/--shape/--tag/--work, shared by the benchmarks that build a random student."""
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shape", default="05b", choices=sorted(SHAPES),
                    help="Qwen2.5-0.5B or -1.5B layer shapes, or a small host-bound one "
                         "(random weights)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--work", default=None, help="directory for the model and pool (cached)")


def bench_student(args, prefix: str) -> tuple[Path, Path]:
    """(work directory, random student of args.shape with args.layers), both cached."""
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work, make_student(work / f"qwen{args.shape}-{args.layers}l", args.layers,
                              SHAPES[args.shape])


def machine_info() -> dict:
    import jax
    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def save_results(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def make_student(out_dir: Path, layers: int, shape: dict = QWEN05B, dtype="float32",
                 seed: int = 0) -> Path:
    """A random student of the given shape with the project's byte tokenizer (ids < 259)."""
    import jax.numpy as jnp
    from flax import nnx

    from lark_jax.models.decoder import Decoder
    from lark_jax.models.io import save_student
    from lark_jax.models.tiny import byte_tokenizer, tiny_config

    if (out_dir / "config.json").exists():
        return out_dir
    tok = byte_tokenizer()
    cfg = tiny_config("qwen2", num_layers=layers, eos_token_id=tok.eos_token_id,
                      rope_theta=1e6, **shape)
    model = Decoder(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    return save_student(model, out_dir, tok, overwrite=True)


def make_pool(path: Path, n: int, lo: int, hi: int, seed: int = 0, log_uniform=True) -> Path:
    """n trajectories whose assistant text is lo..hi characters (~tokens), log-uniform."""
    import math

    rng = random.Random(seed)
    words = "so we add the two numbers then check carry and verify step result wait".split()
    with open(path, "w") as f:
        for i in range(n):
            u = rng.random()
            length = int(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))) \
                if log_uniform else rng.randint(lo, hi)
            text = []
            while sum(len(w) + 1 for w in text) < length:
                text.append(rng.choice(words) if rng.random() > 0.2 else str(rng.randint(0, 999)))
            msgs = [{"role": "user", "content": f"Problem {i}: compute {i} * 7."},
                    {"role": "assistant", "content": " ".join(text)[:length]}]
            f.write(json.dumps({"problem_id": i // 4, "candidate_id": i % 4, "teacher": "t",
                                "messages": msgs}) + "\n")
    return path
