#!/usr/bin/env bash
# One prepared GPU run (H100/H200 image with jax, flax, optax, orbax, transformers, torch;
# no downloads). From the repository root:   OUT=/some/dir bash benchmarks/gpu/run.sh
# Writes every result JSON and log under $OUT.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python - <<'PY' > "$OUT/versions.txt" 2>&1
import jax, flax, transformers, torch
print(jax.__version__, flax.__version__, transformers.__version__, torch.__version__, jax.devices())
PY
W=$(mktemp -d)
# Qwen2.5-1.5B shape (28 layers), bf16, pools with median ~512 and ~4k tokens.
for spec in "512 256 1024 256" "4096 2048 8192 32"; do
  set -- $spec
  timeout 240 python benchmarks/bench_scoring.py --shape 15b --layers 28 --dtype bfloat16 \
    --n "$4" --lo "$2" --hi "$3" --batch-tokens 65536 --row-length 8192 \
    --torch-device cuda --tag "_gpu_median$1" --work "$W" 2>&1 | tail -n 8 | tee "$OUT/scoring_median$1.log"
done
cp benchmarks/results/scoring_gpu_median*.json "$OUT/" 2>/dev/null || true
