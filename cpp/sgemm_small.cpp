// AVX-512 register-tiled fp32 GEMMs for small row blocks (see sgemm_small.h for why).
//
// Two tiles do all the work:
//  * row tile (NN and TN): C[MR rows, 32 cols] accumulated over a depth loop; each step loads 32 columns
//    of one row of the right operand and broadcasts MR scalars of the left operand. NN copies the weight
//    64 rows at a time into 32-column panels (one sequential pass over it, into L2; read in place its
//    8 KiB row stride defeats the caches) and A depth-major (K x MR, a few KiB); TN (weight gradient)
//    broadcasts straight from A's rows, where the MR scalars are adjacent, and reads D in place.
//  * column tile (NT, the input gradient x @ W^T): the M (<= 64) rows of A go in V <= 4 vectors of A^T
//    (packed once, K x 16V), and NR rows of B (each contiguous along K) are broadcast one scalar at a time,
//    so the transposed weight is also read in place; the tile is written to C by scatter.
// Only functions marked FLANMOE_AVX512 contain AVX-512 code; this file includes no torch header.
#include "sgemm_small.h"
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#define FLANMOE_AVX512 __attribute__((target("avx512f,fma")))

namespace flanmoe {
namespace {

// ---- row tile: C[i, 0:32) (masked by m0 | m1) (+)= sum_k a[k * as + i] * b[k * ldb + 0:32), i < MR ----
#define RT_DECL(i)                                                                   \
  __m512 c##i##a = _mm512_setzero_ps(), c##i##b = _mm512_setzero_ps();               \
  if constexpr (ACC && MR > i) {                                                     \
    c##i##a = _mm512_maskz_loadu_ps(m0, C + i * ldc);                                \
    c##i##b = _mm512_maskz_loadu_ps(m1, C + i * ldc + 16);                           \
  }
#define RT_STEP(i)                                                                   \
  if constexpr (MR > i) {                                                            \
    const __m512 ai = _mm512_set1_ps(a[i]);                                          \
    c##i##a = _mm512_fmadd_ps(ai, b0, c##i##a);                                      \
    c##i##b = _mm512_fmadd_ps(ai, b1, c##i##b);                                      \
  }
#define RT_STORE(i)                                                                  \
  if constexpr (MR > i) {                                                            \
    _mm512_mask_storeu_ps(C + i * ldc, m0, c##i##a);                                 \
    _mm512_mask_storeu_ps(C + i * ldc + 16, m1, c##i##b);                            \
  }
#define RT_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

template <int MR, bool ACC>
FLANMOE_AVX512 void row_tile(int64_t depth, const float* A, int64_t as, const float* B, int64_t ldb, float* C,
                             int64_t ldc, __mmask16 m0, __mmask16 m1) {
  RT_ALL(RT_DECL)
  for (int64_t k = 0; k < depth; ++k) {
    const float* b = B + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b), b1 = _mm512_maskz_loadu_ps(m1, b + 16);
    const float* a = A + k * as;
    RT_ALL(RT_STEP)
  }
  RT_ALL(RT_STORE)
}

using RowTile = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, __mmask16, __mmask16);
constexpr int kMR = 12;
#define RT_TABLE(ACC) {nullptr, row_tile<1, ACC>, row_tile<2, ACC>, row_tile<3, ACC>, row_tile<4, ACC>,      \
                       row_tile<5, ACC>, row_tile<6, ACC>, row_tile<7, ACC>, row_tile<8, ACC>, row_tile<9, ACC>, \
                       row_tile<10, ACC>, row_tile<11, ACC>, row_tile<12, ACC>}
const RowTile kRowTiles[2][kMR + 1] = {RT_TABLE(false), RT_TABLE(true)};

inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// C[rows, 0:N) (+)= for `rows` (<= kMR) rows, 32 columns at a time; `bstep` is the distance between the
// 32-column blocks of B (32 when B is unpacked, depth * 32 when packed panel by panel).
void row_panel(int rows, bool acc, int64_t depth, const float* A, int64_t as, const float* B, int64_t ldb,
               int64_t bstep, int64_t N, float* C, int64_t ldc) {
  const RowTile tile = kRowTiles[acc][rows];
  for (int64_t j = 0; j < N; j += 32) {
    const int64_t n = std::min<int64_t>(32, N - j);
    tile(depth, A, as, B + (j / 32) * bstep, ldb, C + j, ldc, lane_mask(n), lane_mask(n - 16 > 0 ? n - 16 : 0));
  }
}

// Split `m` rows into the fewest panels of <= kMR rows, as even as possible: 32 -> 11 + 11 + 10.
template <typename F>
void for_each_panel(int64_t m, F f) {
  const int64_t panels = (m + kMR - 1) / kMR;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t lo = m * p / panels, hi = m * (p + 1) / panels;
    f(lo, int(hi - lo));
  }
}

// ---- column tile: C[0:M, n] = sum_k At[k, 0:M) * B[n * ldb + k], n < NR, M <= 16 V ----
#define CT_DECL(n) __m512 c##n##_0 = _mm512_setzero_ps(), c##n##_1 = c##n##_0, c##n##_2 = c##n##_0, c##n##_3 = c##n##_0;
#define CT_STEP(n)                                                                   \
  if constexpr (NR > n) {                                                            \
    const __m512 bn = _mm512_set1_ps(bk[n * ldb]);                                   \
    c##n##_0 = _mm512_fmadd_ps(a0, bn, c##n##_0);                                    \
    if constexpr (V > 1) c##n##_1 = _mm512_fmadd_ps(a1, bn, c##n##_1);               \
    if constexpr (V > 2) c##n##_2 = _mm512_fmadd_ps(a2, bn, c##n##_2);               \
    if constexpr (V > 3) c##n##_3 = _mm512_fmadd_ps(a3, bn, c##n##_3);               \
  }
#define CT_STORE(n)                                                                  \
  if constexpr (NR > n) {                                                            \
    _mm512_mask_i32scatter_ps(C + n, mv[0], rows, c##n##_0, 4);                      \
    if constexpr (V > 1) _mm512_mask_i32scatter_ps(C + n + 16 * ldc, mv[1], rows, c##n##_1, 4); \
    if constexpr (V > 2) _mm512_mask_i32scatter_ps(C + n + 32 * ldc, mv[2], rows, c##n##_2, 4); \
    if constexpr (V > 3) _mm512_mask_i32scatter_ps(C + n + 48 * ldc, mv[3], rows, c##n##_3, 4); \
  }
#define CT_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) \
                  X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)

template <int V, int NR>
FLANMOE_AVX512 void col_tile(int64_t K, const float* At, const float* B, int64_t ldb, float* C, int64_t ldc,
                             const __mmask16* mv) {
  CT_ALL(CT_DECL)
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(int(ldc)));
  for (int64_t k = 0; k < K; ++k) {
    const float* at = At + k * 16 * V;
    const __m512 a0 = _mm512_loadu_ps(at);
    const __m512 a1 = V > 1 ? _mm512_loadu_ps(at + 16) : a0;
    const __m512 a2 = V > 2 ? _mm512_loadu_ps(at + 32) : a0;
    const __m512 a3 = V > 3 ? _mm512_loadu_ps(at + 48) : a0;
    const float* bk = B + k;
    CT_ALL(CT_STEP)
  }
  CT_ALL(CT_STORE)
}

// NR = 24 / V column tiles over N, then one column at a time for the rest.
template <int V>
void col_panels(int64_t M, int64_t N, int64_t K, const float* At, const float* B, int64_t ldb, float* C,
                int64_t ldc) {
  constexpr int NR = 24 / V;
  __mmask16 mv[4];
  for (int v = 0; v < 4; ++v) mv[v] = lane_mask(std::max<int64_t>(M - 16 * v, 0));
  int64_t n = 0;
  for (; n + NR <= N; n += NR) col_tile<V, NR>(K, At, B + n * ldb, ldb, C + n, ldc, mv);
  for (; n < N; ++n) col_tile<V, 1>(K, At, B + n * ldb, ldb, C + n, ldc, mv);
}

bool detect() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

std::atomic<bool>& switched_on() {
  static std::atomic<bool> on([] {
    const char* env = std::getenv("FLANMOE_SMALL_GEMM");
    return !(env && std::strcmp(env, "0") == 0);
  }());
  return on;
}

std::vector<float>& scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf;
}

}  // namespace

bool sgemm_small_supported() {
  static const bool ok = detect();
  return ok;
}

bool sgemm_small_enabled() { return sgemm_small_supported() && switched_on().load(std::memory_order_relaxed); }

void set_small_gemm(bool on) { switched_on().store(on); }

void sgemm_small_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) { for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f); return; }
  // A's panels packed depth-major (panel at row i0: K x rows, at ap + i0 * K); B packed kKC rows at a time
  // into 32-column panels (kKC x 32 each, contiguous) so that the tile reads it sequentially from L2.
  constexpr int64_t kKC = 64;
  const int64_t nb = (N + 31) / 32;
  auto& buf = scratch(size_t(M) * K + size_t(kKC) * nb * 32);
  float* ap = buf.data();
  float* bp = ap + M * K;
  for_each_panel(M, [&](int64_t i0, int rows) {
    float* dst = ap + i0 * K;
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < rows; ++i) dst[k * rows + i] = A[(i0 + i) * lda + k];
  });
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = B + (k0 + k) * ldb;
      for (int64_t jb = 0; jb < nb; ++jb) {
        float* dst = bp + (jb * kc + k) * 32;
        const int64_t n = std::min<int64_t>(32, N - jb * 32);
        std::memcpy(dst, src + jb * 32, size_t(n) * sizeof(float));
        if (n < 32) std::fill(dst + n, dst + 32, 0.f);
      }
    }
    for_each_panel(M, [&](int64_t i0, int rows) {
      row_panel(rows, k0 > 0, kc, ap + i0 * K + k0 * rows, rows, bp, 32, kc * 32, N, C + i0 * ldc, ldc);
    });
  }
}

void sgemm_small_tn(int64_t M, int64_t P, int64_t N, const float* A, int64_t lda, const float* D, int64_t ldd,
                    float* C, int64_t ldc) {
  if (P == 0 || N == 0) return;
  if (M == 0) { for (int64_t p = 0; p < P; ++p) std::fill(C + p * ldc, C + p * ldc + N, 0.f); return; }
  for (int64_t p0 = 0; p0 < P; p0 += kMR) {
    const int rows = int(std::min<int64_t>(kMR, P - p0));
    row_panel(rows, false, M, A + p0, lda, D, ldd, 32, N, C + p0 * ldc, ldc);
  }
}

void sgemm_small_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) { for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f); return; }
  if (M > 64) {                                           // correct for any M; fast up to kSmallRowsNT
    for (int64_t i = 0; i < M; i += 64)
      sgemm_small_nt(std::min<int64_t>(64, M - i), N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
    return;
  }
  const int V = int((M + 15) / 16);
  float* at = scratch(size_t(K) * 16 * V).data();
  for (int64_t k = 0; k < K; ++k) {                       // pack A^T: K x 16V, zero past M
    float* row = at + k * 16 * V;
    for (int64_t i = 0; i < M; ++i) row[i] = A[i * lda + k];
    for (int64_t i = M; i < 16 * V; ++i) row[i] = 0.f;
  }
  switch (V) {
    case 1: col_panels<1>(M, N, K, at, B, ldb, C, ldc); break;
    case 2: col_panels<2>(M, N, K, at, B, ldb, C, ldc); break;
    case 3: col_panels<3>(M, N, K, at, B, ldb, C, ldc); break;
    default: col_panels<4>(M, N, K, at, B, ldb, C, ldc); break;
  }
}

}  // namespace flanmoe
