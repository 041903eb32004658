// bf16 grouped GEMMs on the CPU's matrix engine: oneDNN's batch-reduce GEMM ukernel, as torch exposes it
// (at::native::cpublas::brgemm), on AMX tiles or AVX512-BF16 (vdpbf16ps), whichever oneDNN picks for this
// CPU (ONEDNN_MAX_CPU_ISA caps it). fp32 accumulation, bf16 in and out. See grouped_mm_bf16_cpu.cpp.
#pragma once
#include <ATen/ATen.h>
#include "sgemm_small.h"
#include <cstdint>
#include <string>
#include <vector>

namespace flanmoe {

// On bf16 bit patterns: x <= 0 (a zero, or negative and not NaN), and relu(x) (NaN kept, as torch's relu).
inline bool bf16_nonpos(uint16_t x) { const uint16_t m = x & 0x7FFF; return m == 0 || ((x & 0x8000) && m <= 0x7F80); }
inline uint16_t bf16_relu_bits(uint16_t x) { return (x & 0x8000) && (x & 0x7FFF) <= 0x7F80 ? uint16_t(0) : x; }

// Whether the ukernel runs here (torch built with oneDNN's ukernel API, a CPU with AVX-512, oneDNN enabled):
// probed once with a small product checked against its exact value.
bool bf16_brgemm_available();
// Whether the own AVX512-BF16 kernels (grouped_mm_bf16_dp.cpp) run here: a CPU with AVX512-BF16 (and F, BW, VL).
bool bf16_dp_available();
// The paths of bf16 grouped products: one ATen matmul per row block, the ukernel, or the own vdpbf16ps kernels.
enum class Bf16Path { blas = 0, brgemm = 1, dp = 2 };
// The path of one product (nn forward, nt input gradient, tn weight gradient; tall: a [f, d] weight), as for fp32
// (sgemm_small.h's GemmProduct and slots).
Bf16Path bf16_gemm_path(GemmProduct p, bool tall);
// What bf16 grouped products use now: "blas", "brgemm" or "avx512bf16" for one product ("nn_wide" ... "tn_tall"), or for
// "all" one name if every product agrees, else "nn_wide=..,nn_tall=..,..."; "" for an unknown product name.
std::string bf16_gemm_active(const std::string& product = "all");
// Choose the path of `product` (a slot name, "nn" / "nt" / "tn" for both orientations, or "all"): "brgemm",
// "avx512bf16", "blas" or "auto" (= blas; the per-shape choice by measurement is made in Python). False when the path
// does not run here or a name is unknown. The start value comes from FLANMOE_BF16_GEMM (a mode for every product).
bool set_bf16_gemm(const std::string& mode, const std::string& product = "all");

// out[rows of g] = op(a[rows of g]) @ b[g] (b[g]^T with trans_b), op = relu with relu_a; then out = 0 wherever
// mask [N, M] <= 0 (NaN passes, as torch's threshold_backward). off = group offsets; out [N, M] preallocated,
// rows past off[G] already handled by the caller.
void gmm_bf16_brgemm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                     at::Tensor& out, bool relu_a = false, const at::Tensor* mask = nullptr);
// out[g] = op(a_g)^T @ dy_g, op = relu with relu_a; out [G, K, M] preallocated.
void wgrad_bf16_brgemm(const at::Tensor& a, const at::Tensor& dy, const std::vector<int64_t>& off, at::Tensor& out,
                       bool relu_a = false);

// The same products on the own AVX512-BF16 kernels (K even for gmm; wgrad pads the depth to pairs).
void gmm_bf16_dp(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                 at::Tensor& out, bool relu_a = false, const at::Tensor* mask = nullptr);
void wgrad_bf16_dp(const at::Tensor& a, const at::Tensor& dy, const std::vector<int64_t>& off, at::Tensor& out,
                   bool relu_a = false);

}  // namespace flanmoe
