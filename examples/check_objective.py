"""Check `lark-jax train --objective ...` against an independent float64 computation.

    python examples/check_objective.py [--objective reference] [--student DIR]

Builds a random tiny student (unless --student is given), writes a selection of
examples/pool.jsonl with weights 0.5, 1, 2 and 0 in turn, runs the CLI for one
optimizer step over every record, and recomputes that step's loss with
transformers in float64 from the definitions in docs/method.md, step 4 (each record
alone, no packing). Needs the dev extra (torch). Prints both numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torch_loss(student: Path, records: list[dict], objective: str) -> float:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(student)
    model = transformers.AutoModelForCausalLM.from_pretrained(student).double().eval()
    means, sums, counts, weights = [], [], [], []
    for r in records:
        msgs = r["messages"]
        full = tok(tok.apply_chat_template(msgs, tokenize=False),
                   add_special_tokens=False)["input_ids"]
        prompt = tok(tok.apply_chat_template([m for m in msgs if m["role"] != "assistant"],
                                             tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        ce = torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1],
                                               torch.tensor(full[len(prompt):]),
                                               reduction="none")
        means.append(float(ce.mean()))
        sums.append(float(ce.sum()))
        counts.append(len(ce))
        weights.append(r["meta"]["train_weight"])
    if objective == "reference":  # plain mean over every record; weight 0 contributes 0
        return sum(m for m, w in zip(means, weights, strict=True) if w > 0) / len(records)
    if objective == "record":
        return sum(m * w for m, w in zip(means, weights, strict=True)) / sum(weights)
    return (sum(s * w for s, w in zip(sums, weights, strict=True))
            / sum(c * w for c, w in zip(counts, weights, strict=True)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objective", default="reference", choices=["record", "reference", "token"])
    ap.add_argument("--student", default=None, help="HF-style student (default: a random one)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lark-check-"))
    student = Path(args.student) if args.student else work / "student"
    cli = [sys.executable, "-m", "lark_jax"]
    if not args.student:
        subprocess.run([*cli, "make-tiny", "--out", str(student), "-q"], check=True)
    pool = [json.loads(x) for x in (ROOT / "examples/pool.jsonl").read_text().splitlines()]
    weights = [0.5, 1.0, 2.0, 0.0]
    records = [{"messages": r["messages"],
                "meta": {"problem_id": r["problem_id"],
                         "train_weight": weights[i % len(weights)]}}
               for i, r in enumerate(pool)]
    sel = work / "train.jsonl"
    sel.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Zero-weight records are dropped by the record and token objectives.
    kept = [r for r in records if args.objective == "reference" or r["meta"]["train_weight"] > 0]
    subprocess.run([*cli, "train", "--data", str(sel), "--student", str(student), "--out",
                    str(work / "run"), "--objective", args.objective, "--batch-size",
                    str(len(kept)), "--max-steps", "1", "-q"], check=True)
    step1 = json.loads((work / "run/metrics.jsonl").read_text().splitlines()[0])["loss"]
    want = torch_loss(student, kept, args.objective)
    print(f"--objective {args.objective}: lark-jax step-1 loss {step1:.7f}, "
          f"transformers float64 {want:.7f}, relative difference {abs(step1 - want) / want:.1e}")
    return 0 if abs(step1 - want) <= 1e-5 * want else 1


if __name__ == "__main__":
    sys.exit(main())
