#!/usr/bin/env bash
# The CPU performance measurements of issue #18, for a quiet machine (nothing else running: a grid or a
# build beside it distorts every number). About 4 minutes on 2 cores (2-core Xeon, 2026-12-07). Every command prints the machine
# first; keep the output with the machine line when quoting a figure.
set -euo pipefail
cd "$(dirname "$0")/.."
FL=${FLANMOE:-.venv/bin/flanmoe}
rm -f "${FLANMOE_KERNEL_CACHE:-$HOME/.cache/flanmoe_nb/kernel_choice.json}"   # choices measured now, quietly
# 1. the MoE FFN (fp32 and bf16) against dense, the layer's overhead, the roofline (copy bandwidth, GEMM rate)
$FL bench moe --dtype fp32,bf16 --experts 8,32,128 --top-k 1 \
  --methods dense,flanmoe,flanmoe_blas,dense_gmm,moe_layer,router,experts_gemm --no-memory --reps 7
# 2. the NN kernels: streamed (flanmoe) against block copy + prefetch (flanmoe_prefetch), own AVX-512 kernels forced
FLANMOE_PATH_FP32_GEMM=avx512 $FL bench moe --dtype fp32 --experts 32,128 --top-k 1 \
  --methods dense,flanmoe,flanmoe_prefetch --no-memory --reps 7
# 3. bf16 grouped products alone: oneDNN per row block vs the brgemm ukernel
.venv/bin/python bench/bf16_gemm.py
# 4. training tokens/s against HF Switch Transformers
$FL bench train
