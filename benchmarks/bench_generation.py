"""Generation throughput: lark-jax vs transformers ``generate``, same student and prompts.

    python benchmarks/bench_generation.py [--layers 4] [--n 16] [--new 128] [--skip-torch]
        [--logit-scale 30]

Modes, each timed after a warm-up call (compilation excluded on both sides):

* ``greedy``: temperature 0;
* ``sample``: the eval setting, temperature 0.6, top-p 0.95;
* ``sample_penalty``: the same with repetition penalty 1.1 (the reference's eval);
* ``spread``: the eval setting (with the penalty) on rows that end at very different
  lengths, most early and a few at the limit, as when most samples stop at their
  first boxed answer. The random student never writes one, so each row gets a drawn
  token limit instead; the boxed-answer check still runs on the host between chunks.
  lark-jax runs the workload with continuous batching (freed slots refilled) and as
  static batches of the slot count; transformers runs static batches, each to its
  longest row. Reported: useful tokens/s and slot utilisation (useful tokens /
  slot-steps computed).

``--logit-scale s`` multiplies the student's final norm by s: a random student's logits
are flat (the top-p nucleus is most of the vocabulary, the sampler's full-vocabulary
path), a trained model's are peaked (a few candidates); s = 30 gives the latter.

Writes benchmarks/results/generation_<platform>.json (after every mode).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

SAMPLING = {"greedy": dict(temperature=0.0), "sample": dict(temperature=0.6, top_p=0.95),
            "sample_penalty": dict(temperature=0.6, top_p=0.95, repetition_penalty=1.1),
            "spread": dict(temperature=0.6, top_p=0.95, repetition_penalty=1.1)}


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 40-120 byte tokens (the project's byte tokenizer: ids 3..258)."""
    rng = random.Random(seed)
    return [[1] + [rng.randint(3, 258) for _ in range(rng.randint(40, 120))] for _ in range(n)]


def spread_limits(n: int, new: int, seed: int = 1) -> list[int]:
    """Most rows short (an early boxed answer), about one in seven at the limit."""
    rng = random.Random(seed)
    return [new if rng.random() < 0.15 else max(4, int(new * rng.random() ** 3))
            for _ in range(n)]


def run_jax(student, prompts, limits, mode, slots, static=False):
    import lark_jax
    from lark_jax.evaluation.stops import TextStop

    stop = TextStop(student.tokenizer, boxed=True) if mode == "spread" else None
    t = time.perf_counter()
    groups = ([(i, i + slots) for i in range(0, len(prompts), slots)] if static
              else [(0, len(prompts))])
    tokens = steps = 0
    for a, b in groups:
        s: dict = {}
        out = lark_jax.generate_ids(student, prompts[a:b], limits[a:b], batch_size=slots,
                                    seed=0, stop=stop, stats=s, **SAMPLING[mode])
        tokens += sum(len(o) for o in out)
        steps += s["slot_steps"]
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "slot_steps": steps,
            "utilisation": tokens / steps}


def run_torch(model_dir, prompts, limits, mode, slots, device="cpu", dtype="float32"):
    """transformers generate in static batches of ``slots`` (left padding), each batch to
    its longest row's limit; useful tokens are each row's own limit."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    kw = dict(do_sample=mode != "greedy", pad_token_id=0)
    if mode != "greedy":
        kw.update(temperature=0.6, top_p=0.95, top_k=0)
    if SAMPLING[mode].get("repetition_penalty"):
        kw["repetition_penalty"] = SAMPLING[mode]["repetition_penalty"]
    t = time.perf_counter()
    tokens = steps = 0
    torch.manual_seed(0)
    for a in range(0, len(prompts), slots):
        ps, ls = prompts[a:a + slots], limits[a:a + slots]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(ls), **kw)
        tokens += sum(ls)
        steps += len(ps) * max(ls)
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "slot_steps": steps,
            "utilisation": tokens / steps}


def main(argv=None):
    ap = argparse.ArgumentParser()
    common.add_student_args(ap)
    ap.add_argument("--n", type=int, default=16, help="prompts of the fixed-length modes")
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--slots", type=int, default=16, help="rows decoded together")
    ap.add_argument("--spread-n", type=int, default=64, help="prompts of the spread mode")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--modes", default="greedy,sample,sample_penalty,spread")
    ap.add_argument("--logit-scale", type=float, default=1.0,
                    help="multiply the final norm (peaked logits); lark-jax only")
    args = ap.parse_args(argv)
    if args.logit_scale != 1.0 and not args.skip_torch:
        ap.error("--logit-scale changes lark-jax's student only: add --skip-torch")

    import jax

    import lark_jax

    work, model_dir = common.bench_student(args, "lark-gen-")
    student = lark_jax.load_student(model_dir, dtype=args.dtype)
    if args.logit_scale != 1.0:
        norm = student.model.final_norm
        norm[...] = norm[...] * args.logit_scale
    res = {"machine": common.machine_info(), "args": vars(args), "rows": []}
    platform = jax.devices()[0].platform
    print(f"{'mode':>15} {'impl':>22} {'tok/s':>8} {'util':>6} {'s':>7}")
    for mode in args.modes.split(","):
        n = args.spread_n if mode == "spread" else args.n
        prompts = prompts_of(n)
        limits = spread_limits(n, args.new) if mode == "spread" else [args.new] * n
        runs = [("lark_jax", lambda p=prompts, li=limits, m=mode: run_jax(
            student, p, li, m, args.slots))]
        if mode == "spread":
            runs.append(("lark_jax_static", lambda p=prompts, li=limits, m=mode: run_jax(
                student, p, li, m, args.slots, static=True)))
        if not args.skip_torch:
            runs.append(("transformers", lambda p=prompts, li=limits, m=mode: run_torch(
                model_dir, p, li, m, args.slots, args.torch_device, args.dtype)))
        row = {"mode": mode, "n": n, "new": args.new}
        for name, fn in runs:
            # The same call once untimed: every shape the timed call uses is compiled
            # (transformers: its first-call overheads).
            fn()
            r = fn()
            row[name] = r
            print(f"{mode:>15} {name:>22} {r['tok_s']:8.1f} {r['utilisation']:6.2f} "
                  f"{r['seconds']:7.1f}", flush=True)
        if "transformers" in row:
            row["speedup"] = row["lark_jax"]["tok_s"] / row["transformers"]["tok_s"]
        if "lark_jax_static" in row:
            row["continuous_vs_static"] = (row["lark_jax"]["tok_s"]
                                           / row["lark_jax_static"]["tok_s"])
        res["rows"].append(row)
        path = common.save_results(f"generation_{platform}{args.tag}", res)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
