#!/usr/bin/env bash
# One prepared GPU run (H100/H200 image with jax, flax, optax, orbax, transformers, torch;
# no downloads). From the repository root:
#     OUT=/some/dir bash benchmarks/gpu/run.sh
# All steps share BUDGET=530 s (each at most 150 s), so the whole script fits one
# 600 s device call: give that call timeout_s 580 or so.
# Every result JSON and log goes to $OUT. DRY=1 rehearses the same steps on the CPU with
# a one-layer student and a handful of trajectories (minutes), to catch script errors
# before spending device time.
#
# Measures, in bf16 with a random Qwen2.5-1.5B-shaped student (28 layers, full vocabulary):
#   scoring, lark-jax vs the PyTorch comparator, pools with median ~512 and ~4k tokens,
#     then lark-jax again with the blockwise attention kernel (on a GPU the default,
#     auto, runs the fused Pallas kernel since the first H200 run: results/gpu/h200);
#   generation (eval sampling with the repetition penalty; a length-spread workload with
#     continuous batching) vs transformers generate;
#   SFT tokens/s; MFU of each against the bf16 matmul rate measured in the same process.
#   the fused vocabulary-statistics kernel (learnability.pallas_vocab) against the scorer's
#     current head at 512 tokens: agreement, ms, MFU of the head product (not yet wired
#     into score, so not a whole-scorer MFU);
#   compile once: the same small `lark-jax score` twice with one fresh compile cache, each
#     run's time to the first batch (goal for the second: <= 3 s).
# First a quick check that the fused attention kernel compiles and equals dense attention
# (forward and backward); last, SFT with blockwise attention, in whatever time is left.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
# The device tool returns at most 8 files, so every result and log goes to $R and is
# packed into $OUT/gpu_results.tgz after each step (a step cut off still leaves the rest).
R=$(mktemp -d)
mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu_results.tgz.tmp" -C "$R" . && mv "$OUT/gpu_results.tgz.tmp" "$OUT/gpu_results.tgz"; }
export LARK_BENCH_RESULTS="$R" PYTHONPATH="$PWD:${PYTHONPATH:-}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the card in one process
PY="${PY:-python3}"  # the device image has python3 (its torch venv), not always python
START=$(date +%s)
BUDGET="${BUDGET:-530}"  # seconds for all steps: the device call's limit, less start-up
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; L=1; N512=4; N4K=2; T=900; BUDGET=100000; SMALL=--small
  GEN_N=4; GEN_NEW=16; GEN_SPREAD=8; CACHE_N=2
  TRAIN=(--steps 1 --batch-size 2 --n 4 --lo 128 --hi 256 --micro-batch-tokens 1024)
else
  DEV=cuda; L=28; N512=512; N4K=48; T=150; SMALL=
  GEN_N=64; GEN_NEW=256; GEN_SPREAD=256; CACHE_N=8
  TRAIN=(--steps 4 --batch-size 16 --n 64 --lo 512 --hi 2048 --micro-batch-tokens 8192)
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } \
  > "$R/gpu.txt" 2>&1
"$PY" -c "import jax, flax, transformers, torch; print(jax.__version__, flax.__version__, \
transformers.__version__, torch.__version__, jax.devices())" > "$R/versions.txt" 2>&1
cat "$R/gpu.txt" "$R/versions.txt"; pack
W=$(mktemp -d)

step() {  # step NAME SCRIPT ARGS...: run within min(T, what is left of BUDGET)
  local name=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( left < T ? left : T ))
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, ${left}s left" | tee "$R/$name.log"; return; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$PY" "$@" 2>&1 | grep -v "Loading weights" | tail -n 15 | tee "$R/$name.log"
  pack
}

T=90 step flash_check benchmarks/gpu/check_flash.py $SMALL
T=60 step vocab_kernel benchmarks/gpu/bench_vocab_kernel.py $SMALL
step scoring_median512 benchmarks/bench_scoring.py --shape 15b --layers "$L" --dtype bfloat16 \
  --n "$N512" --lo 256 --hi 1024 --batch-tokens 65536 --row-length 2048 \
  --torch-device "$DEV" --tag _median512 --work "$W" --compare-attention blockwise
T=90 step compile_cache benchmarks/gpu/compile_cache_runs.py --shape 15b --layers "$L" \
  --dtype bfloat16 --n "$CACHE_N" --work "$W"
step scoring_median4k benchmarks/bench_scoring.py --shape 15b --layers "$L" --dtype bfloat16 \
  --n "$N4K" --lo 2048 --hi 8192 --batch-tokens 65536 --row-length 8192 \
  --torch-device "$DEV" --tag _median4k --work "$W" --compare-attention blockwise
step generation benchmarks/bench_generation.py --shape 15b --layers "$L" --dtype bfloat16 \
  --n "$GEN_N" --new "$GEN_NEW" --slots "$GEN_N" --spread-n "$GEN_SPREAD" \
  --modes sample_penalty,spread --torch-device "$DEV" --tag _15b_bf16 --work "$W"
step training benchmarks/bench_training.py --shape 15b --layers "$L" --dtype bfloat16 \
  "${TRAIN[@]}" --tag _15b_bf16 --work "$W"
step training_blockwise benchmarks/bench_training.py --shape 15b --layers "$L" --dtype bfloat16 \
  "${TRAIN[@]}" --tag _15b_bf16_blockwise --work "$W" --attention blockwise
cat "$R/versions.txt"; pack; ls -l "$R" "$OUT"
