#!/usr/bin/env bash
# The prepared GPU check: a few minutes on one GPU, results under $OUT.
#   1. CUDA tests (pytest -m gpu): every method trains on CUDA and meets the estimate.
#   2. Predicted vs measured on CUDA for every method × three model sizes × three settings,
#      measured by the allocator (peak) and the tracker (by category).
#   3. A 7B of every method on fake CUDA tensors beside the estimate.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.txt"
python bench/estimator_accuracy.py --device cuda --models tiny-llama-20m,llama-60m,llama-130m 2>&1 | tee "$OUT/accuracy_cuda.md"
python bench/dryrun_7b.py --device cuda 2>&1 | tee "$OUT/dryrun_7b_cuda.md"
