#!/usr/bin/env bash
# The GPU checks of one device, from the repository root, every result written to $OUT as it comes:
#   bash benchmarks/gpu_check.sh [PART ...]     (default: all four parts, in this order)
#   tests      tests/test_cuda.py (CUDA vs CPU references, grouped experts, the MoE layer, the trainer's quiet
#              steps with sync checks on error, activation checkpointing) and the compiled Triton kernels
#              (tests/test_indexer_triton.py with bf16, test_mhc_triton.py, test_window_triton.py); limit 240 s
#   attention  benchmarks/gpu_attention.py: CSA and HCA layers vs dense SDPA, Triton backend 8k-128k, torch
#              backend to 32k; stops starting cases after 200 s (limit 240 s)
#   step       benchmarks/gpu_step.py on configs/v4_1b.yaml (tokens/s, peak memory, MFU) on the Triton
#              backend without and with selective activation checkpointing; limit 120 s each
#   micro      benchmarks/grouped_experts.py in bf16 (grouped_mm vs the per-expert loop), benchmarks/mhc_triton.py
#              (mHC's kernels vs the torch ops) and gpu_step on the torch backend; limit 60 + 60 + 120 s
# A failing part does not stop the next. All four take up to ~14 minutes: where one command may run 10 at most,
# run `tests attention` and then `step micro`.
# WHEELS=dir: first installs the wheels there (no index, no dependency resolution) into /tmp/site, for a machine
# without network; `python benchmarks/gpu_wheels.py --dest dir` downloads them on one with network.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PARTS=${*:-tests attention step micro}
if [ -n "${WHEELS:-}" ]; then
    pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl >> "$OUT/summary.txt" 2>&1
    echo "wheels exit $?" >> "$OUT/summary.txt"
fi
# The package is the repository root itself, imported as `moesaic`.
mkdir -p /tmp/moesaic_pkg && ln -sfn "$PWD" /tmp/moesaic_pkg/moesaic
export PYTHONPATH=/tmp/moesaic_pkg${WHEELS:+:/tmp/site} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/summary.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/summary.txt" 2>&1

gpu_step() {  # name, time limit, config overrides
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python benchmarks/gpu_step.py "$@" > "$OUT/gpu_step_$name.txt" 2>&1  # its result: a JSON line
    echo "gpu_step $name exit $?" >> "$OUT/summary.txt"
}

for part in $PARTS; do
    case $part in
    tests)
        timeout 240 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_indexer_triton.py \
            tests/test_mhc_triton.py tests/test_window_triton.py > "$OUT/tests.txt" 2>&1
        echo "tests exit $?" >> "$OUT/summary.txt" ;;
    attention)
        timeout 240 python benchmarks/gpu_attention.py --budget 200 --json "$OUT/gpu_attention.json" \
            > "$OUT/gpu_attention.txt" 2>&1
        echo "gpu_attention exit $?" >> "$OUT/summary.txt" ;;
    step)
        gpu_step triton 120 model.attention.backend=triton
        gpu_step triton_selective 120 model.attention.backend=triton train.activation_checkpointing=selective ;;
    micro)
        { timeout 60 python benchmarks/grouped_experts.py --dtype bfloat16 --reps 20
          echo "grouped_experts exit $?" >> "$OUT/summary.txt"
          timeout 60 python benchmarks/mhc_triton.py
          echo "mhc_triton exit $?" >> "$OUT/summary.txt"; } > "$OUT/micro.txt" 2>&1
        gpu_step torch 120 model.attention.backend=torch ;;
    *)
        echo "gpu_check: unknown part '$part' (tests, attention, step, micro)" >> "$OUT/summary.txt" ;;
    esac
done
cat "$OUT/summary.txt"
