"""Packing tokenized trajectories into fixed-shape rows with segment ids.

Rows have a fixed length; each holds up to ``max_segments`` trajectories laid
end to end, positions restarting at 0 per trajectory and attention confined
to its segment. Best-fit decreasing keeps padding low; a run compiles one
program per (rows, row length), not one per record.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from lark_jax.data.chat import Tokenized


@dataclasses.dataclass
class PackedBatch:
    ids: np.ndarray  # int32 [B, L]
    positions: np.ndarray  # int32 [B, L]
    segments: np.ndarray  # int32 [B, L]; -1 = padding
    targets: np.ndarray  # int32 [B, L]; next token (0 where unused)
    weights: np.ndarray  # float32 [B, L]; 1 where the prediction is scored
    slots: list[tuple[int, int, int]]  # (row, segment, item index)

    @property
    def n_tokens(self) -> int:
        return int((self.segments >= 0).sum())


def best_fit_rows(lengths: list[int], row_len: int, max_segments: int) -> list[list[int]]:
    """Assign items (all of length <= row_len) to rows, longest first, tightest row first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index) of rows still open
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        space -= n
        if space > 0 and len(rows[r]) < max_segments:
            bisect.insort(free, (space, r))
    return rows


def build_batch(items: list[Tokenized], rows: list[list[int]], n_rows: int,
                row_len: int) -> PackedBatch:
    """Lay out ``rows`` (lists of indices into ``items``) as arrays; pads to n_rows rows."""
    shape = (n_rows, row_len)
    ids = np.zeros(shape, np.int32)
    pos = np.zeros(shape, np.int32)
    seg = np.full(shape, -1, np.int32)
    tgt = np.zeros(shape, np.int32)
    w = np.zeros(shape, np.float32)
    slots = []
    for r, row in enumerate(rows):
        off = 0
        for s, i in enumerate(row):
            t = items[i]
            n = len(t.ids)
            ids[r, off:off + n] = t.ids
            pos[r, off:off + n] = np.arange(n)
            seg[r, off:off + n] = s
            tgt[r, off:off + n - 1] = t.ids[1:]
            lo = max(t.start, 1) - 1
            w[r, off + lo:off + t.end - 1] = 1.0
            slots.append((r, s, i))
            off += n
    return PackedBatch(ids, pos, seg, tgt, w, slots)
