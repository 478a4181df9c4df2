"""SFT throughput and MFU of `lark_jax.training` on the 0.5B-shaped student (fewer layers).

    python benchmarks/bench_training.py [--layers 2] [--steps 4] [--batch-size 8]

Tokens/s counts every non-padding token of the packed rows; model FLOPs per
token are 3 x the forward FLOPs (forward + backward), over the float32 matmul
rate measured in the same run. Writes benchmarks/results/training_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
from bench_scoring import flops_per_token, matmul_rate_jax  # noqa: E402


def merging_trainer():
    """The LoRA step as it was before the side path (the comparison of ``--compare-lora``):
    W + scale·B·A formed for every projection on every micro-batch. Benchmark-only."""
    from flax import nnx

    from lark_jax.training.loss import weighted_ce_sums
    from lark_jax.training.trainer import Trainer

    class MergingTrainer(Trainer):
        def loss_sums(self, p, batch):
            return weighted_ce_sums(nnx.merge(self.graphdef_c, self.cast(self.full(p))),
                                    chunk_tokens=self.cfg.chunk_tokens, **batch)

    return MergingTrainer


def main(argv=None):
    ap = argparse.ArgumentParser()
    common.add_student_args(ap)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--lo", type=int, default=256)
    ap.add_argument("--hi", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--attention", default="auto",
                    choices=["auto", "dense", "blockwise", "flash"])
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA factors of rank R")
    ap.add_argument("--compare-lora", action="store_true",
                    help="with --lora-rank: also time the old LoRA step, which forms "
                         "W + scale*B*A for every projection on every micro-batch (same run)")
    ap.add_argument("--compare-sync", action="store_true",
                    help="also time the loop as it was: pack each step inline and wait for "
                         "its loss before the next (same steps, same run)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import lark_jax
    from lark_jax.shapes import pow2_length
    from lark_jax.training.data import StepPlan, read_selection, step_microbatches
    from lark_jax.training.trainer import TrainConfig, Trainer

    work, student_dir = common.bench_student(args, "lark-train-bench-")
    pool = common.make_pool(work / "train_pool.jsonl", args.n, args.lo, args.hi, seed=1)
    sel = work / "train.jsonl"
    with open(sel, "w") as f:
        for ln in open(pool):
            f.write(json.dumps({"messages": json.loads(ln)["messages"],
                                "meta": {"train_weight": 1.0}}) + "\n")
    student = lark_jax.load_student(student_dir, "float32", remat=args.remat,
                                    attn_impl=args.attention)
    cfg = TrainConfig(lr=1e-5, batch_size=args.batch_size, dtype=args.dtype, remat=args.remat,
                      attention=args.attention,
                      micro_batch_tokens=args.micro_batch_tokens, lora_rank=args.lora_rank)
    examples, _ = read_selection(sel, student.tokenizer, cfg.max_length)
    plan = StepPlan(len(examples), cfg.batch_size, 100, None, 0)
    row_len = pow2_length(max(len(e.tok.ids) for e in examples), 64, cfg.max_length)
    n_data = student.mesh.shape["data"]
    rows = max(n_data, (cfg.micro_batch_tokens // row_len) // n_data * n_data)
    trainer = Trainer(student.model, cfg, plan.total_steps, student.mesh)
    t0 = time.perf_counter()
    trainer.step(step_microbatches(examples, plan.step_indices(0), row_len, rows,
                                    row_multiple=n_data))  # compile
    first = time.perf_counter() - t0

    from lark_jax.data.prefetch import prefetch
    from lark_jax.training.data import step_denominator
    from lark_jax.training.loop import run_steps

    def packed():
        for k in range(1, args.steps + 1):
            idx = plan.step_indices(k)
            yield k, list(step_microbatches(examples, idx, row_len, rows,
                                            row_multiple=n_data)), \
                step_denominator(examples, idx)

    def steps(asynchronous=True):
        """The train loop's way (host thread packs ahead, losses fetched a step late), or
        the previous one (inline packing, every step waited for)."""
        n = [0]

        def done(step, loss, gnorm, tokens):
            n[0] += tokens

        items = prefetch(packed(), 2) if asynchronous else packed()
        run_steps(trainer, items, done, lag=asynchronous)
        return n[0]

    steps()  # compiles every micro-batch shape these steps use (the last one may shrink)
    t1 = time.perf_counter()
    tokens = steps()  # the same steps again, timed: no compilation inside
    dt = time.perf_counter() - t1
    lora = None
    if args.compare_lora and args.lora_rank:
        side = trainer
        MergingTrainer = merging_trainer()
        trainer = MergingTrainer(student.model, cfg, plan.total_steps, student.mesh)
        steps()  # compile
        t2 = time.perf_counter()
        merge_tokens = steps()
        lora = {"merge_tok_s": merge_tokens / (time.perf_counter() - t2)}
        trainer = side
        t3 = time.perf_counter()
        again = steps()
        lora["side_again_tok_s"] = again / (time.perf_counter() - t3)
    sync = None
    if args.compare_sync:
        t2 = time.perf_counter()
        sync_tokens = steps(asynchronous=False)
        sync = {"tokens": sync_tokens, "tok_s": sync_tokens / (time.perf_counter() - t2)}
        t3 = time.perf_counter()
        again = steps()  # async once more: a drift of the machine shows as a gap
        sync["async_again_tok_s"] = again / (time.perf_counter() - t3)
    rate = matmul_rate_jax(dtype=args.dtype)
    fpt = 3 * flops_per_token(student.config, row_len / 4)
    res = {"machine": common.machine_info(), "args": vars(args), "row_length": row_len,
           "rows_per_microbatch": rows, "first_step_seconds_incl_compile": first,
           "tokens": tokens, "tok_s": tokens / dt, "flops_per_token": fpt,
           "matmul_flops_per_s": rate, "mfu": fpt * tokens / dt / rate,
           "devices": len(jax.devices()), "sync_loop": sync, "lora_merge": lora}
    path = common.save_results(f"training_{jax.devices()[0].platform}{args.tag}", res)
    print(f"SFT: {res['tok_s']:,.0f} tok/s, MFU {res['mfu']:.1%} (first step incl. compile "
          f"{first:.1f}s; {np.round(rate / 1e9, 1)} GFLOP/s ceiling) -> {path}")
    if lora:
        print(f"LoRA rank {args.lora_rank}: side path {res['tok_s']:,.0f} tok/s (again "
              f"{lora['side_again_tok_s']:,.0f}), merged W + BA each micro-batch "
              f"{lora['merge_tok_s']:,.0f} tok/s; side/merge "
              f"{res['tok_s'] / lora['merge_tok_s']:.2f}x")
    if sync:
        print(f"loop as before (inline packing, every step waited for): {sync['tok_s']:,.0f} "
              f"tok/s; async again {sync['async_again_tok_s']:,.0f}; async/sync "
              f"{res['tok_s'] / sync['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
