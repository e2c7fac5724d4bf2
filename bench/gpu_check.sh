#!/usr/bin/env bash
# The prepared GPU check: a few minutes on one GPU, results under $OUT.
#   1. A 7B (llama-7b preset, random weights) trained for real with every method at 1×512 and
#      4×1024, 3 steps each: the load's and the steps' allocated and reserved peaks beside the
#      estimate (bench/gpu_7b.py, a markdown table; ~4 minutes on an H200, bounded by --budget).
#   2. CUDA tests (pytest -m gpu): every method trains on CUDA and meets the estimate.
#   3. Predicted vs measured on CUDA for every method × three model sizes × three settings,
#      measured by the allocator (peak) and the tracker (by category).
#   4. A 7B of every method on fake CUDA tensors beside the estimate.
# The same 7B check runs on the CPU with a tiny preset: python bench/gpu_7b.py --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } > "$OUT/device.txt" 2>&1
python bench/gpu_7b.py --device cuda --budget "${GPU_7B_BUDGET:-330}" --out "$OUT/gpu_7b.json" 2>&1 | tee "$OUT/gpu_7b.md"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.txt"
python bench/estimator_accuracy.py --device cuda --models tiny-llama-20m,llama-60m,llama-130m 2>&1 | tee "$OUT/accuracy_cuda.md"
python bench/dryrun_7b.py --device cuda 2>&1 | tee "$OUT/dryrun_7b_cuda.md"
