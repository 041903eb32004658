#!/usr/bin/env bash
# One device check on a lent CUDA machine (see /work/.library/device/README.md in the workplace), sized to
# fit a 10-minute call: build flanmoe_nb._C against the torch there (CUDA kernels for that GPU), run every
# GPU test, then the GPU benchmarks. Everything it prints also lands in $OUT/ (device_check.log, JSON rows).
#   run(command="bash bench/device_check.sh", timeout_s=600)
# Needs nothing beyond that machine's image (torch, nvcc, ninja, pytest, hypothesis, transformers).
set -uo pipefail
OUT=${OUT:-/tmp/flanmoe_device_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
t0=$(date +%s)
step() { echo; echo "=== $* (t+$(( $(date +%s) - t0 ))s)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'sm', torch.cuda.get_device_capability(0))" || exit 1

step "build (CUDA kernels for this GPU only)"
cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
$PY -c "import flanmoe_nb.kernels as K; print(K.extension_info())" || exit 1

step "GPU tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py -x --timeout=120 2>&1 | tail -25

step "grouped GEMM vs cuBLAS and torch._grouped_mm"
timeout 120 $PY -c "import sys; from flanmoe_nb.cli import main; sys.exit(main(sys.argv[1:]))" bench gmm --device cuda --dtype bf16,fp16,fp32 --experts 8,32,64,128 \
  --json "$OUT/gmm_cuda.json" 2>&1 | tail -20
timeout 120 $PY -c "import sys; from flanmoe_nb.cli import main; sys.exit(main(sys.argv[1:]))" bench gmm --device cuda --dtype bf16 --tokens 32768 --d-model 1024 --d-ff 4096 \
  --experts 8,64 --json "$OUT/gmm_cuda_large.json" 2>&1 | tail -6

step "done"
