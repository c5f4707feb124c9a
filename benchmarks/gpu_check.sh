#!/usr/bin/env bash
# The GPU checks of one lent device, in one call from the repository root, everything written to $OUT:
#   bash benchmarks/gpu_check.sh            (WHEELS=dir: pip-installs the wheels there first, no index)
# 1. tests/test_cuda.py (CUDA vs CPU references, grouped experts, the MoE layer and the trainer's quiet steps
#    with sync checks on error, activation checkpointing), tests/test_indexer_triton.py, tests/test_mhc_triton.py and
#    tests/test_window_triton.py (the compiled Triton indexer, bf16 included, mHC and window attention kernels);
# 2. benchmarks/grouped_experts.py in bf16 (grouped_mm vs the per-expert loop) and benchmarks/mhc_triton.py
#    (mHC's Triton kernels vs the torch ops, one sublayer site in bf16);
# 3. benchmarks/gpu_step.py on configs/v4_1b.yaml (tokens/s, peak memory, MFU), without and with selective
#    activation checkpointing;
# 4. benchmarks/gpu_attention.py (CSA and HCA layers vs dense SDPA, torch and Triton backends, 8k-128k).
#    Each part has its own time limit (about 12 minutes in all), and a failing part does not stop the next.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    pip install --no-index --find-links "$WHEELS" deepspeed wandb datasets omegaconf > "$OUT/pip.txt" 2>&1
fi
# The package is the repository root itself, imported as `moesaic`.
mkdir -p /tmp/moesaic_pkg && ln -sfn "$PWD" /tmp/moesaic_pkg/moesaic
export PYTHONPATH=/tmp/moesaic_pkg
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" > "$OUT/versions.txt" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_indexer_triton.py \
    tests/test_mhc_triton.py tests/test_window_triton.py > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >> "$OUT/summary.txt"
timeout 60 python benchmarks/grouped_experts.py --dtype bfloat16 --reps 20 > "$OUT/grouped_experts.txt" 2>&1
echo "grouped_experts exit $?" >> "$OUT/summary.txt"
timeout 60 python benchmarks/mhc_triton.py > "$OUT/mhc_triton.txt" 2>&1
echo "mhc_triton exit $?" >> "$OUT/summary.txt"
for ac in none selective; do
    timeout 120 python benchmarks/gpu_step.py --json "$OUT/gpu_step_$ac.json" \
        "train.activation_checkpointing=$ac" > "$OUT/gpu_step_$ac.txt" 2>&1
    echo "gpu_step $ac exit $?" >> "$OUT/summary.txt"
done
timeout 180 python benchmarks/gpu_attention.py --json "$OUT/gpu_attention.json" > "$OUT/gpu_attention.txt" 2>&1
echo "gpu_attention exit $?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
