// fp32 GEMMs for the shapes of an MoE expert block: few rows (tokens of one expert, <= kSmallRows),
// wide weights. Row-major, leading dimensions in elements, C overwritten (not accumulated).
//
// Why not BLAS: per expert a [32, 512] x [512, 2048] product spends as long packing the 4 MiB weight
// as multiplying it, and MKL runs its AVX2 code on AMD CPUs. These kernels read the weight once,
// straight from its row-major layout, with AVX-512 register tiles. They exist only where AVX-512F is
// (checked at run time); `sgemm_small_enabled()` says whether to call them, BLAS is used otherwise.
// The kernel file includes no torch header: its AVX-512 code never leaks into shared inline functions.
#pragma once
#include <cstdint>

namespace flanmoe {

// Largest row block each kernel takes (beyond it BLAS is as fast or faster; measured on AMD Zen 5).
constexpr int64_t kSmallRowsNN = 256, kSmallRowsNT = 64, kSmallRowsTN = 96;

bool sgemm_small_supported();          // the CPU has AVX-512F
bool sgemm_small_enabled();            // supported, and not switched off (FLANMOE_SMALL_GEMM=0 or set_small_gemm)
void set_small_gemm(bool on);          // switch the kernels on or off at run time (benchmarks, tests)

// C[M, N] = A[M, K] @ B[K, N]                (M <= kSmallRowsNN)
void sgemm_small_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc);
// C[M, N] = A[M, K] @ B[N, K]^T              (M <= kSmallRowsNT)
void sgemm_small_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc);
// C[P, N] = A[M, P]^T @ D[M, N]              (M, the depth, <= kSmallRowsTN; the weight-gradient shape)
void sgemm_small_tn(int64_t M, int64_t P, int64_t N, const float* A, int64_t lda, const float* D, int64_t ldd,
                    float* C, int64_t ldc);

}  // namespace flanmoe
