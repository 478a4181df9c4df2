"""Minimal, dependency-free safetensors reading (memory-mapped) and writing.

Own reader so that tensors are memory-mapped and sliced per device shard
(never two full host copies), bfloat16 maps onto ml_dtypes without a torch
round trip, and every malformed file gets an error naming file and tensor.
Format: u64-LE header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from lark_jax.errors import LarkError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """Returns ({name: info}, offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LarkError("truncated safetensors file (no header)", where=str(path))
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20 or n > os.path.getsize(path):
                raise LarkError("not a safetensors file (bad header length)", where=str(path))
            header = json.loads(f.read(n).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LarkError("not a safetensors file (bad header)", where=str(path)) from None
    except OSError as e:
        raise LarkError(f"cannot read ({e.strerror})", where=str(path)) from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._start = read_header(self.path)
        self._mm = None

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def _check(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        info = self.header[name]
        dt = DTYPES.get(info.get("dtype"))
        if dt is None:
            raise LarkError(f"tensor {name!r} has unsupported dtype {info.get('dtype')!r}",
                            where=str(self.path))
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if e - b != int(np.prod(shape)) * dt.itemsize or \
                self._start + e > os.path.getsize(self.path):
            raise LarkError(f"tensor {name!r}: byte range does not match its shape",
                            where=str(self.path))
        return dt, shape, self._start + b, self._start + e

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no copy)."""
        dt, shape, b, e = self._check(name)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[b:e].view(dt).reshape(shape)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Read the tensor (or a range of its first axis) into a fresh array.

        Plain reads rather than a memory map: file pages then stay in the page
        cache instead of counting towards the process's resident memory, so
        loading a model peaks at about its size plus one tensor.
        """
        dt, shape, b, _ = self._check(name)
        row_bytes = int(np.prod(shape[1:])) * dt.itemsize if shape else dt.itemsize
        lo, hi = (0, shape[0] if shape else 1) if rows is None else \
            rows.indices(shape[0])[:2]
        out = np.empty((hi - lo, *shape[1:]) if shape else (), dt)
        nbytes = (hi - lo) * row_bytes
        with open(self.path, "rb", buffering=0) as f:
            f.seek(b + lo * row_bytes)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:nbytes])
                if not n:
                    raise LarkError(f"tensor {name!r}: file ends early", where=str(self.path))
                got += n
        return out


def write_file(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write tensors (in the given order) to ``path`` in safetensors format."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
