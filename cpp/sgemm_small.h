// fp32 GEMMs for the shapes of an MoE expert block: few rows (the tokens of one expert), wide weights.
// Row-major, leading dimensions in elements, C overwritten (not accumulated).
//
// Why not BLAS: per expert a [32, 512] x [512, 2048] product spends about as long packing the 4 MiB weight
// as multiplying it, and MKL runs its AVX2 code on AMD CPUs. These kernels read the weight in
// sequential passes (NN and TN copy it row by row into padded blocks, NT reads it in place along its rows)
// with register tiles, in an AVX-512F and an AVX2+FMA copy picked at run time. NN with few rows (<= 64) and a
// weight of 1 MiB or more reads the weight in place instead, as row streams at the multiply's pace with a prefetch
// a few strips ahead (nn_streamed: the weight's traffic overlaps the multiply; bitwise the same results). `grouped_mm` uses them for
// every fp32 row block while an ISA is active (small_gemm_active() != none) and BLAS for everything else.
// The kernel file includes no torch header: ISA code never leaks into shared inline functions.
// Whether they beat BLAS depends on the machine: expert_ffn measures both per shape class (gemm.py), and
// `flanmoe bench gmm` / the gemm notebook print the rates of every path side by side.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace flanmoe {

enum class SmallGemmIsa { none, avx2, avx512 };

SmallGemmIsa small_gemm_best();                 // the widest ISA this CPU has (none: neither)
SmallGemmIsa small_gemm_active();               // what grouped_mm uses now (none: BLAS only)
// Choose: "off" (= "blas"), "avx2", "avx512" or "auto" (the best). False when the CPU lacks it or the name
// is unknown.
// The start value comes from FLANMOE_SMALL_GEMM (same names; default auto).
bool set_small_gemm(const std::string& mode);
std::string small_gemm_name(SmallGemmIsa isa);   // "avx512", "avx2" or "blas" (none)
// What grouped_mm's fp32 products use: small_gemm_active() unless an expert-GEMM choice overrides it, per
// product (kernels.expert_ffn measures the candidates per shape class and product and sets the fastest of each;
// attention and the loss kernels keep small_gemm_active()). The products: nn (x @ w, the forward), nt (dy @ w^T,
// the input gradients) and tn (x^T dy, the weight gradients), each for a wide weight ([d, f], rows <= columns: an
// FFN's first) and a tall one ([f, d]: its second). They read and write memory differently (nt reads the weight
// in place, nn copies it in blocks, tn writes a whole weight; a tall weight gives short rows), so one machine can
// favour BLAS for one and the own kernels for another.
// set_expert_gemm(mode, product): mode "follow" (no override), "auto", "avx2", "avx512" or "blas"; product
// "nn_wide", "nn_tall", "nt_wide", "nt_tall", "tn_wide", "tn_tall", "nn" / "nt" / "tn" (both orientations) or "all".
// False when the CPU lacks it or a name is unknown.
enum class GemmProduct { nn = 0, nt = 1, tn = 2 };
SmallGemmIsa expert_gemm_active(GemmProduct p, bool tall);
bool set_expert_gemm(const std::string& mode, const std::string& product = "all");
// The slot of one product and orientation ("nn_wide" -> 0, ..., "tn_tall" -> 5); -1 for an unknown name.
int gemm_product_slot(const std::string& name);
// The slots [lo, hi) a product name covers: one slot, "nn" / "nt" / "tn" (both orientations) or "all"; false for an
// unknown name. (fp32's set_expert_gemm and bf16's set_bf16_gemm take the same names.)
bool gemm_product_range(const std::string& product, int* lo, int* hi);
// name(slot) of every slot as one string: the name if all six agree, else "nn_wide=..,nn_tall=..,...".
std::string gemm_slots_summary(const std::function<std::string(int)>& name);
extern const char* const kGemmProductNames[6];
// Whether the NN kernel prefetches the next block of its weight while it multiplies the current one (this also
// keeps the block-copy kernel where nn_streamed would run)
// (start value FLANMOE_GEMM_PREFETCH=1; off by default: `flanmoe bench moe --methods flanmoe,flanmoe_prefetch` compares).
bool gemm_prefetch_active();
void set_gemm_prefetch(bool on);
// Whether the NT kernel prefetches the next tile's rows of its weight while it multiplies (on by default;
// FLANMOE_GEMM_NT_PREFETCH=0 switches it off: an A/B of the same bits).
bool nt_prefetch_active();
void set_nt_prefetch(bool on);
std::vector<std::string> small_gemm_supported();
// Non-temporal stores for the fp32 weight gradients (tn, `stream`): "auto" streams a grouped_mm_wgrad whose output
// is larger than the last-level cache (it would be evicted before the optimizer reads it, and each of its lines
// read from memory before being overwritten), "on" always, "off" never. Start value FLANMOE_GEMM_STREAM (auto).
std::string gemm_stream_mode();
bool set_gemm_stream(const std::string& mode);   // false for an unknown name
bool gemm_stream_pays(int64_t output_bytes);     // what the mode says for an output of this size
int64_t last_level_cache_bytes();                // cpu0's L3 as Linux reports it, else sysconf's L3 (else L2); 32 MiB when none

// C[M, N] = A[M, K] @ B[K, N]   (relu(A) @ B with relu_a)
void sgemm_small_nn(SmallGemmIsa isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool relu_a = false);
// C[M, N] = A[M, K] @ B[N, K]^T   (then zero where mask[M, N] (ldm) is <= 0, if mask is given)
void sgemm_small_nt(SmallGemmIsa isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, const float* mask = nullptr, int64_t ldm = 0);
// C[P, N] = A[M, P]^T @ D[M, N]   (M, the depth, is the expert's rows: the weight-gradient shape; relu(A) with relu_a;
// stream: non-temporal stores of C where the depth takes one pass, for outputs far larger than the caches)
void sgemm_small_tn(SmallGemmIsa isa, int64_t M, int64_t P, int64_t N, const float* A, int64_t lda, const float* D,
                    int64_t ldd, float* C, int64_t ldc, bool relu_a = false, bool stream = false);

}  // namespace flanmoe
