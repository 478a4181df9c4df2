"""GPU check of the fused attention kernel: compiles, equals dense attention, and its speed.

    python benchmarks/gpu/check_flash.py [--small]

For packed rows (three segments and row padding), grouped heads and both dtypes it
compares ``flash_attention`` with ``dense_attention`` — outputs and the gradients
of a random projection of them, i.e. the Triton backward pass too — and times
forward + backward of flash, blockwise and dense. One JSON to
$LARK_BENCH_RESULTS/flash_check_<platform>.json; a case that fails to compile is
recorded with its error and the others still run. ``--small`` is the CPU rehearsal
(Pallas interpreter, tiny shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lark_jax.models.attention import blockwise_attention, dense_attention, flash_attention

    if args.small:
        cases = [(1, 200, 4, 2, 64), (1, 150, 4, 2, 128)]
    else:  # (rows, length, heads, kv heads, head size): 0.5B and 1.5B attention shapes
        cases = [(4, 384, 14, 2, 64), (2, 2048, 12, 2, 128), (1, 4096, 12, 2, 128)]
    res = {"machine": common.machine_info(), "cases": []}
    for b, t, h, kvh, d in cases:
        for dtype in ("bfloat16", "float32"):
            row = {"rows": b, "length": t, "heads": h, "kv_heads": kvh, "head_dim": d,
                   "dtype": dtype}
            try:
                row.update(_case(jax, jnp, np, b, t, h, kvh, d, dtype, flash_attention,
                                 dense_attention, blockwise_attention))
            except Exception as e:  # recorded; the remaining cases still run
                row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
            res["cases"].append(row)
            common.save_results(f"flash_check_{jax.devices()[0].platform}", res)
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()},
                  flush=True)
    return 0


def _case(jax, jnp, np, b, t, h, kvh, d, dtype, flash, dense, blockwise):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), dtype) for n in (h, kvh, kvh))
    seg = np.zeros((b, t), np.int32)
    seg[:, t // 3:] = 1
    seg[:, 2 * t // 3:] = 2
    seg[:, t - t // 10:] = -1  # row padding
    seg = jnp.asarray(seg)
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    ctx = (idx, idx, seg, seg, jnp.ones((b, t), bool))
    cot = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) * (seg >= 0)[..., None, None]

    impls = {"flash": lambda q, k, v: flash(q, k, v, seg),
             "dense": lambda q, k, v: dense(q, k, v, *ctx),
             "blockwise": lambda q, k, v: blockwise(q, k, v, *ctx)}
    fns = {name: jax.jit(jax.value_and_grad(
        lambda q, k, v, f=f: (f(q, k, v).astype(jnp.float32) * cot).sum(), argnums=(0, 1, 2)))
        for name, f in impls.items()}
    outs, row = {}, {}
    for name, fn in fns.items():
        out = jax.block_until_ready(fn(q, k, v))  # compile
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(fn(q, k, v))
        row[f"ms_fwd_bwd_{name}"] = (time.perf_counter() - t0) / reps * 1e3
        outs[name] = out
    (lf, gf), (ld, gd) = outs["flash"], outs["dense"]
    scale = max(float(jnp.abs(x.astype(jnp.float32)).max()) for x in gd)
    row["loss_rel_diff"] = abs(float(lf) - float(ld)) / max(abs(float(ld)), 1e-30)
    row["grad_max_diff_rel"] = max(
        float(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32)).max())
        for a, b_ in zip(gf, gd, strict=True)) / scale
    return row


if __name__ == "__main__":
    raise SystemExit(main())
