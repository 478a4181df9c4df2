"""Training steps on XLA:CPU with glibc's default allocator vs ``lark_jax.hostmem``'s settings.

Each setting runs in its own process (glibc's arenas are chosen when JAX's threads start),
the two alternating, on the same steps: the demo's quick student shape (hidden 128, 4
layers, vocabulary 512; random weights) on packed rows of 320 tokens, 5 rows a step, the
demo's fine-tune step (weighted CE, AdamW). Per process: ms per step, kernel (sys) ms per
step and minor page faults per step, after a warm-up pass.

    python benchmarks/bench_cpu_malloc.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine_info, save_results  # noqa: E402


def child(mode: str, steps: int) -> dict:
    from lark_jax.hostmem import tune_cpu_malloc

    applied = tune_cpu_malloc(force=True) if mode == "tuned" else False
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from lark_jax.models.decoder import Decoder
    from lark_jax.models.tiny import tiny_config
    from lark_jax.training.loss import weighted_ce_sums
    from lark_jax.training.trainer import TrainConfig, make_optimizer

    model = Decoder(tiny_config("llama", 512, hidden_size=128, num_layers=4, num_heads=4,
                                num_kv_heads=2, intermediate_size=352), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(TrainConfig(max_steps=steps, lr=1e-3, batch_size=8), steps)
    rng = np.random.default_rng(0)
    rows, length = 5, 320

    def batch():  # 2-3 records per row, the last ~20 % padding
        seg = np.full((rows, length), -1, np.int32)
        pos = np.zeros((rows, length), np.int32)
        for r in range(rows):
            cuts = np.sort(rng.choice(np.arange(60, 260), 2, replace=False))
            bounds = [0, *cuts.tolist(), int(length * 0.8)]
            for s, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
                seg[r, a:b], pos[r, a:b] = s, np.arange(b - a)
        ids = rng.integers(0, 512, (rows, length), dtype=np.int32)
        return {"ids": ids, "positions": pos, "segments": seg,
                "targets": np.roll(ids, -1, 1), "weights": (seg >= 0).astype(np.float32)}

    batches = [batch() for _ in range(steps)]

    def one(p, o, b):
        def loss(q):
            return weighted_ce_sums(nnx.merge(graphdef, q), **b)

        (s, _), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, s

    fn = jax.jit(one, donate_argnums=(0, 1))
    p, o = jax.tree.map(jnp.copy, params), tx.init(params)
    for b in batches:  # compile and warm up
        p, o, s = fn(p, o, b)
    s.block_until_ready()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in batches:
        p, o, s = fn(p, o, b)
    s.block_until_ready()
    r1, dt = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"mode": mode, "applied": applied, "ms_per_step": 1000 * dt / steps,
            "sys_ms_per_step": 1000 * (r1.ru_stime - r0.ru_stime) / steps,
            "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs = []
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    for _ in range(args.rounds):
        for mode in ("default", "tuned"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps",
                                  str(args.steps)], env=env, check=True, capture_output=True,
                                 text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"{mode:8s} {r['ms_per_step']:7.1f} ms/step  sys {r['sys_ms_per_step']:6.1f} "
                  f"ms/step  {r['faults_per_step']:8.0f} faults/step", flush=True)
    med = {m: sorted(r["ms_per_step"] for r in runs if r["mode"] == m) for m in
           ("default", "tuned")}
    med = {m: v[len(v) // 2] for m, v in med.items()}
    print(f"median ms/step: default {med['default']:.1f}, tuned {med['tuned']:.1f}: "
          f"{med['default'] / med['tuned']:.2f}x")
    path = save_results("cpu_malloc", {"machine": machine_info(), "runs": runs,
                                       "median_ms_per_step": med})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
