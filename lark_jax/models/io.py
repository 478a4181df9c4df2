"""Load Hugging Face style model directories into the NNX decoder, and save them back.

Safetensors only: a directory holding just pickle weights (``*.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) is refused, never unpickled; tokenizers load with
``trust_remote_code=False`` and ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lark_jax import fsio
from lark_jax.errors import LarkError
from lark_jax.hub import snapshot
from lark_jax.models.config import ModelConfig
from lark_jax.models.decoder import Decoder
from lark_jax.models.params import ParamSpec, param_specs
from lark_jax.models.safetensors_io import SafetensorsFile, write_file
from lark_jax.parallel import logical_sharding, make_mesh

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

@dataclasses.dataclass
class Student:
    """A loaded student: the NNX module, its tokenizer, its config and its mesh."""

    model: Decoder
    tokenizer: Any
    config: ModelConfig
    mesh: jax.sharding.Mesh
    path: str | None = None  # the local directory it was read from
    source: str | None = None  # what it was named by (a directory, or a Hub id ORG/NAME[@REV])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LarkError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def _weight_index(model_dir: Path) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the (lazily opened) file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise LarkError("malformed index (expected {'weight_map': {...}})",
                            where=str(index)) from None
        files: dict[str, SafetensorsFile] = {}
        out = {}
        for name, fname in weight_map.items():
            fpath = (model_dir / fname).resolve()
            if fpath.parent != model_dir.resolve():
                raise LarkError(f"shard {fname!r} lies outside the model directory",
                                where=str(index))
            if fname not in files:
                if not fpath.is_file():
                    raise LarkError(f"shard {fname!r} listed in the index is missing",
                                    where=str(index))
                files[fname] = SafetensorsFile(fpath)
            if name not in files[fname].header:
                raise LarkError(f"tensor {name!r} is not in shard {fname!r}", where=str(index))
            out[name] = files[fname]
        return out
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise LarkError(
                f"only pickle weights found ({', '.join(pickles)}); lark-jax loads safetensors "
                "only and never unpickles. Convert them with a trusted tool first.",
                where=str(model_dir))
        raise LarkError("no model.safetensors (or model.safetensors.index.json) found",
                        where=str(model_dir))
    out = {}
    for shard in shards:
        f = SafetensorsFile(shard)
        for name in f.keys():
            out[name] = f
    return out


def _load_param(spec: ParamSpec, cfg: ModelConfig, tensors, dtype, mesh, model_dir) -> jax.Array:
    names = ([spec.hf_name.format(i=i) for i in range(cfg.num_layers)] if spec.stacked
             else [spec.hf_name])
    for name in names:
        if name not in tensors:
            raise LarkError(f"missing tensor {name!r}", where=str(model_dir))
        got = tensors[name].shape(name)
        if got != spec.shape:
            raise LarkError(f"tensor {name!r} has shape {list(got)}, expected "
                            f"{list(spec.shape)} from config.json",
                            where=str(tensors[name].path))
    shape = spec.full_shape(cfg)
    sharding = logical_sharding(mesh, spec.full_axes(), shape, "model")
    np_dtype = np.dtype(dtype)

    def one(name: str, index: tuple) -> np.ndarray:
        # Only the rows this device shard needs are read from disk.
        first = index[0] if index else slice(None)
        arr = tensors[name].read(name, first if isinstance(first, slice) else None)
        arr = arr[(slice(None), *index[1:])] if len(index) > 1 else arr
        return arr.astype(np_dtype, copy=False)

    def read(index) -> np.ndarray:
        # Called once per device shard.
        if not spec.stacked:
            return one(names[0], index)
        layers = range(cfg.num_layers)[index[0]]
        first = one(names[layers[0]], index[1:])
        out = np.empty((len(layers), *first.shape), np_dtype)
        out[0] = first
        for j, i in enumerate(layers[1:], start=1):
            out[j] = one(names[i], index[1:])
        return out

    return jax.make_array_from_callback(shape, sharding, read)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                     "tokenizer.model", "vocab.json")):
        raise LarkError("no tokenizer files (tokenizer.json / tokenizer_config.json)",
                        where=str(model_dir))
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False,
                                            local_files_only=True)
    except (OSError, ValueError) as e:
        raise LarkError(f"cannot load tokenizer: {e}", where=str(model_dir)) from None
    # transformers builds an empty tokenizer (special tokens only) when the vocabulary
    # file is missing; every text would then tokenize to nothing useful.
    if len(tok) - len(tok.get_added_vocab()) < 2:
        raise LarkError("tokenizer has no vocabulary (tokenizer.json or vocab files missing?)",
                        where=str(model_dir))
    return tok


# What a Hub model is fetched as: config, safetensors weights, tokenizer and chat template.
# Never *.bin / *.pt / *.pth / *.ckpt (pickle), never modelling code.
HUB_MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors",
                   "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def resolve_model_dir(model: str | Path) -> Path:
    """A local model directory, or a Hub id ``ORG/NAME[@REV]`` (a path that does not
    exist) resolved through the Hugging Face cache (``lark_jax.hub``: HF_HOME,
    HF_HUB_CACHE, HF_HUB_OFFLINE) to its snapshot, fetching only HUB_MODEL_FILES."""
    path = Path(model)
    if path.is_dir():
        return path
    m = _HUB_ID.match(str(model))
    if m is None or path.exists():
        raise LarkError("model directory not found", where=str(model))
    return snapshot(m["repo"], repo_type="model", revision=m["rev"], patterns=HUB_MODEL_FILES,
                    where=str(model))


def load_student(model_dir: str | Path, dtype="float32", *, mesh=None, tokenizer: bool = True,
                 remat: bool = False, attn_impl: str = "auto") -> Student:
    """Load an HF-style directory (config.json, safetensors, tokenizer) onto a device mesh.

    Parameters are created abstractly (``nnx.eval_shape``) and each tensor is
    read from its memory map straight into its ``NamedSharding``, one device
    shard at a time: the host never holds the model twice.

    Args:
      model_dir: the directory, or a Hub id ``ORG/NAME[@REV]`` (``resolve_model_dir``).
      dtype: "float32" | "bfloat16" | "float16" (parameters and activations).
      mesh: a ("data", "model") mesh; default all devices on "data" (params replicated).
      tokenizer: also load the tokenizer (required by scoring and generation).
      remat: recompute each decoder layer in the backward pass (training memory).
      attn_impl: "auto" | "dense" | "blockwise" | "flash" (``lark_jax.models.attention``;
        "flash" is the fused GPU kernel).
    """
    source = str(Path(model_dir)) if Path(model_dir).is_dir() else str(model_dir)
    model_dir = resolve_model_dir(model_dir)
    dtype = resolve_dtype(dtype)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    tensors = _weight_index(model_dir)
    mesh = mesh if mesh is not None else make_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, remat=remat, attn_impl=attn_impl,
                                              mesh=mesh))
    graphdef, state = nnx.split(abstract)
    pure: dict[str, Any] = {"layers": {}}
    for spec in param_specs(cfg):
        arr = _load_param(spec, cfg, tensors, dtype, mesh, model_dir)
        (pure["layers"] if spec.stacked else pure)[spec.attr] = arr
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    tok = load_tokenizer(model_dir) if tokenizer else None
    return Student(model=model, tokenizer=tok, config=cfg, mesh=mesh, path=str(model_dir),
                   source=source)


def _host_tensors(model: Decoder, dtype=None):
    """Yield (hf_name, numpy array) in a stable order, one layer stack at a time."""
    cfg = model.cfg
    for spec in param_specs(cfg):
        owner = model.layers if spec.stacked else model
        arr = np.asarray(jax.device_get(getattr(owner, spec.attr)[...]))
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
        if spec.stacked:
            for i in range(cfg.num_layers):
                yield spec.hf_name.format(i=i), arr[i]
        else:
            yield spec.hf_name, arr


def save_student(model: Decoder, out_dir: str | Path, tokenizer=None, *, dtype=None,
                 max_shard_bytes: int = 4 * 2**30, overwrite: bool = False,
                 extra_config: dict | None = None) -> Path:
    """Write an HF-style directory that transformers (and ``load_student``) can load.

    Written into a temporary sibling directory and renamed into place, so an
    interrupted save never leaves a half-written model. Shards above
    ``max_shard_bytes`` get a ``model.safetensors.index.json``.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise LarkError("refusing to write through a symbolic link", where=str(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise LarkError("output path is an existing file", where=str(out_dir))
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise LarkError("output directory exists and is not empty", where=str(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # mkdtemp makes 0700; an exported model gets the mode any new directory would.
        os.chmod(tmp, 0o777 & ~fsio.UMASK)
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in _host_tensors(model, dtype):
            if size and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        if len(shards) == 1:
            write_file(tmp / "model.safetensors", shards[0])
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_file(tmp / fname, shard)
                for name, arr in shard.items():
                    weight_map[name] = fname
                    total += arr.nbytes
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            del shards
        hf = model.cfg.to_hf_dict()
        saved = np.dtype(dtype) if dtype is not None else model.dtype
        hf["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            str(saved), "float32")
        hf.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
