#!/usr/bin/env bash
# Every GPU check the open issues ask for, as one command for a lent device machine
# (a session gets ~15 minutes of device time; this plans ~9 of them), from the repo root:
#
#     bash benchmarks/gpu_checks.sh            # results under $OUT (default runs/gpu_checks)
#
# 1. the CUDA lanes of the kernel tests (every fused kernel against its reference on the GPU,
#    same codes for q8/q4) and the CUDA memory tests (issues 11, 15, 17)
# 2. optimizer step time at LLaMA 60M-1B shapes against torch AdamW (foreach and fused) and galore-torch, with
#    and without gradient_as_bucket_view (issue 11)
# 3. the fused kernels against the unfused chain they replace (benchmarks/kernels.py)
# 4. with the time left, convergence runs on the GPU, several at once, into their own ledger
#    (benchmarks/results/convergence-cuda), packed as one file (issue 12)
# Each stage has its own time limit and runs whatever the one before it did; nothing here
# needs the network. Logs and tables land in $OUT (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
begin=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - begin) )); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

timeout 180 $PY -m pytest -q -p no:randomly -p no:cacheprovider -rfE \
    tests/kernels/test_kernels_cuda.py tests/kernels/test_kernels_diffgrad.py tests/memory/test_cuda.py \
    2>&1 | tail -40 | tee "$OUT/cuda_tests.txt"

timeout 240 $PY benchmarks/step_time.py --device cuda --sizes 60m,130m,350m,1b --repeats 5 \
    --out "$OUT/step_time_cuda.md" 2>&1 | tail -30 > "$OUT/step_time_cuda.log"

timeout 60 $PY benchmarks/kernels.py 2>&1 | tail -30 > "$OUT/kernels_cuda.txt"

budget=$(left 540)
if [ "$budget" -gt 60 ]; then
    timeout "$budget" $PY benchmarks/convergence.py --device cuda --jobs 12 --timing-rounds 0 \
        2>&1 | tail -60 > "$OUT/convergence_cuda.log"
fi
tar -czf "$OUT/convergence_cuda_ledger.tgz" -C benchmarks/results convergence-cuda 2>/dev/null
echo "gpu_checks: $(( $(date +%s) - begin )) s" | tee -a "$OUT/env.txt"
