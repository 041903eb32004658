// bf16 grouped GEMMs on AVX512-BF16 (vdpbf16ps), own register-tiled kernels: bf16 in and out, fp32 accumulation.
//
// Why: on a CPU without AMX the two other bf16 paths lose most of their time around the multiply, not in it. One
// oneDNN matmul per expert re-lays the expert's weight for every call; the brgemm ukernel wants its B operand packed
// into pairs along the depth (VNNI order) in a pass of its own over every expert's weight per product. Here:
//  * NN (x @ w, the forward): w [K, N] is read strip by strip (kSC rows x 32 columns, the rows of a strip kSD strips
//    ahead prefetched), each strip's row pairs interleaved (vpunpck{l,h}wd) into a 4 KiB block in L1 that every row
//    panel of the chunk multiplies; the chunk's rows of x are packed once as pairs along the depth. The interleave
//    permutes columns within 128-bit lanes: the fp32 block the tiles accumulate into keeps that order, and the final
//    pass (fp32 -> bf16, vcvtne2ps2bf16) puts them back.
//  * NT (dy @ w^T, the input gradients): w [N, K] is read in place along its rows, whose consecutive elements are
//    already pairs along the depth: a column tile broadcasts one pair of each of NR <= 8 rows of w against the chunk's
//    rows of dy, packed once as pairs ([K/2][16 V] 32-bit lanes, 16 x 16 transposes). The tile's columns are
//    transposed back into the output's rows as they are rounded to bf16 (relu's backward mask applied there).
//  * TN (x^T dy, the weight gradients; depth = the expert's rows): both operands are the expert's few rows, packed
//    as pairs of rows (zero-padded to an even count); each [12 x 32] tile takes the whole depth in registers and is
//    written once, as bf16 (non-temporal stores when the gradient outgrows the last-level cache).
// NN and NT prefetch the start of the next expert's weight while they multiply this one (Ahead).
// Rows are taken in units of kMGN (NN) or kMG (NT) per group, or columns per group (TN), spread over the intra-op threads
// longest first (work_items.h), every kernel single-threaded inside. Rounding: vcvtne2ps2bf16 (round to nearest
// even, as torch's), and vdpbf16ps flushes bf16 denormal inputs to zero: results agree with the fp32 reference
// within bf16 tolerance, not bitwise with the other paths.
#include "grouped_mm_bf16.h"
#include "bf16_avx512.h"
#include "scratch.h"
#include "work_items.h"
#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

namespace flanmoe {

#if defined(__x86_64__)

bool bf16_dp_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

namespace {

#define DP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int kMR = 12;            // rows of a row tile (NN, TN): 2 x 12 accumulators of 16 fp32
constexpr int64_t kMG = 64;        // rows of a unit of NT (the column tile holds up to 64 rows: V <= 4 vectors)
constexpr int64_t kMGN = 256;      // rows of a unit of NN: each strip of the weight interleaved once for up to 256 rows
constexpr int64_t kSC = 64;        // NN: depth rows per pass over a strip (32 pairs; 128 or 256 measured no faster)
constexpr int64_t kNC = 256;       // NN: columns per pass (the fp32 block: 32 rows x 256 = 32 KiB, in L1)
// (2-core Zen 5, d 512 / f 2048, both NN products at 32, 128 and 512 rows per expert, three interleaved rounds:
// 64-row units and 1024-column passes summed 72.1-79.9 ms, 256 and 256 68.1-71.7, 128 and 256 69.5-72.1)
constexpr int64_t kSD = 8;         // NN: strips ahead that are prefetched
constexpr int64_t kGN = 96;        // NT: columns per transposed block (a multiple of every NR: 8, 6)
constexpr int64_t kNJ = 128;       // TN: columns per block of the packed dy (its rows of pairs stay in L2)

struct DpScratchA;                 // per-thread buffers (scratch.h), one tag each
struct DpScratchB;
struct DpScratchC;

// thread_scratch, 64-byte aligned: the kernels load and store whole cache lines of it (a vector's data is 16-byte
// aligned, and a 64-byte access across two lines costs two).
template <typename T, typename Tag>
T* scratch64(size_t n) {
  T* p = thread_scratch<T, Tag>(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// The start of the next weight this thread multiplies (kAhead bytes: what its first depth block or tiles read),
// prefetched front to back into L2 in even shares while this one is multiplied; the kernels' own prefetch takes it
// from there. The whole next weight (2 MiB, twice L2) evicted the current one: on a 2-core Zen 5 at 128 experts x 32
// rows (d 512, f 2048) the four NN / NT products summed 52-55 ms with it, 47-51 without, 46.5-49.4 with 256 KiB
// (two interleaved rounds; 512 KiB 47.5-49.4, 1 MiB 48.6-50.9).
constexpr int64_t kAhead = int64_t(256) << 10;
struct Ahead {
  const char* p = nullptr;
  int64_t lines = 0, per = 0, at = 0;
  Ahead(const void* next, int64_t bytes, int64_t calls) : p(static_cast<const char*>(next)) {
    bytes = std::min(bytes, kAhead);
    if (p && calls > 0) { lines = (bytes + 63) / 64; per = (lines + calls - 1) / calls; }
  }
  inline void step() {
    for (int64_t r = 0; r < per && at < lines; ++r, ++at) __builtin_prefetch(p + at * 64, 0, 2);
  }
};

inline int32_t pair_at(const uint16_t* p) { int32_t v; std::memcpy(&v, p, sizeof v); return v; }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }
inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

DP_TARGET inline __m512 dp(__m512 c, __m512i a, __m512i b) { return _mm512_dpbf16_ps(c, (__m512bh)a, (__m512bh)b); }

// Where relu's backward zeroes the gradient: 16 bf16 bit patterns <= 0 (zero, or negative and not NaN).
DP_TARGET inline __mmask16 nonpos16(__m256i x) {
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7FFF));
  const __mmask16 zero = _mm256_cmpeq_epi16_mask(mag, _mm256_setzero_si256());
  const __mmask16 neg = _mm256_test_epi16_mask(x, _mm256_set1_epi16(int16_t(0x8000)));
  return zero | (neg & _mm256_cmple_epu16_mask(mag, _mm256_set1_epi16(0x7F80)));
}

// ---- NN ----
// S[k2][0:64) = B's rows 2k2 and 2k2+1 over a strip of 32 columns, interleaved as pairs (vpunpck{l,h}wd: first the
// pairs of columns 0-3, 8-11, 16-19, 24-27, then of the others), 0 past nc columns: a 4 KiB block in L1 that every
// row panel reads. (The tiles reading B in place instead ran at ~60% of the rate when B's rows are 4 KiB apart, as at
// f = 2048: the strip's rows all fall in one L1 set and evict each other between panels.)
DP_TARGET void nn_strip(int64_t pairs, const uint16_t* B, int64_t ldb, __mmask32 cm, uint16_t* S) {
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const uint16_t* b = B + 2 * k2 * ldb;
    const __m512i r0 = _mm512_maskz_loadu_epi16(cm, b), r1 = _mm512_maskz_loadu_epi16(cm, b + ldb);
    _mm512_store_si512(S + k2 * 64, _mm512_unpacklo_epi16(r0, r1));
    _mm512_store_si512(S + k2 * 64 + 32, _mm512_unpackhi_epi16(r0, r1));
  }
}

// acc[i][0:32) (+)= sum over k2 < pairs of A[i][2k2 .. 2k2+1] . S[k2] (a strip, nn_strip), i < MR: acc's 32 floats
// are in the strip's column order.
template <int MR, bool FIRST>
DP_TARGET void nn_tile(int64_t pairs, const int32_t* A, int64_t lda, const uint16_t* S, float* acc, int64_t ldc) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    if constexpr (FIRST) { lo[i] = _mm512_setzero_ps(); hi[i] = _mm512_setzero_ps(); }
    else { lo[i] = _mm512_loadu_ps(acc + i * ldc); hi[i] = _mm512_loadu_ps(acc + i * ldc + 16); }
  }
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const __m512i bl = _mm512_loadu_si512(S + k2 * 64), bh = _mm512_loadu_si512(S + k2 * 64 + 32);
    const int32_t* a = A + k2 * lda;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(a[i]);
      lo[i] = dp(lo[i], ai, bl);
      hi[i] = dp(hi[i], ai, bh);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) { _mm512_storeu_ps(acc + i * ldc, lo[i]); _mm512_storeu_ps(acc + i * ldc + 16, hi[i]); }
}

using NnTile = void (*)(int64_t, const int32_t*, int64_t, const uint16_t*, float*, int64_t);
template <bool FIRST, size_t... I>
constexpr std::array<NnTile, kMR + 1> nn_tiles(std::index_sequence<I...>) { return {nullptr, &nn_tile<int(I) + 1, FIRST>...}; }
const std::array<NnTile, kMR + 1> kNnTiles[2] = {nn_tiles<false>(std::make_index_sequence<kMR>()),
                                                 nn_tiles<true>(std::make_index_sequence<kMR>())};

// Split m rows into the fewest panels of <= kMR rows, as even as possible: 32 -> 11 + 11 + 10.
template <typename F>
void for_each_panel(int64_t m, F f) {
  const int64_t panels = (m + kMR - 1) / kMR;
  for (int64_t p = 0; p < panels; ++p) f(m * p / panels, int(m * (p + 1) / panels - m * p / panels));
}

// out[i][0:n) = bf16 of one row of the fp32 block, whose 32-float groups are in the unpack order.
DP_TARGET void nn_store_row(const float* acc, int64_t n, uint16_t* out) {
  const __m512i i0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i i1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t j = 0; j < n; j += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + j), hi = _mm512_loadu_ps(acc + j + 16);
    const __m512 c0 = _mm512_permutex2var_ps(lo, i0, hi), c1 = _mm512_permutex2var_ps(lo, i1, hi);
    _mm512_mask_storeu_epi16(out + j, mask32(n - j), (__m512i)_mm512_cvtne2ps_pbh(c1, c0));
  }
}

// C[M, N] = op(A)[M, K] @ B[K, N], M <= kMGN, K even; op = relu with relu_a.
DP_TARGET void nn(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  uint16_t* C, int64_t ldc, bool relu_a, const void* ahead = nullptr, int64_t ahead_bytes = 0) {
  Ahead pf(ahead, ahead_bytes, ((K + kSC - 1) / kSC) * ((N + 31) / 32) * ((M + kMR - 1) / kMR));
  const int V = int((M + 15) / 16);
  // A's rows as pairs along the depth, [K/2][16 V] (read in place, the tiles' 12 rows of A, 4 KiB apart at K = 2048,
  // would share one L1 set with the strip)
  int32_t* at = scratch64<int32_t, DpScratchC>(size_t(K / 2) * 16 * V);
  pack_cols_avx512(A, lda, K / 2, M, reinterpret_cast<uint16_t*>(at), 16 * V, relu_a);
  float* acc = scratch64<float, DpScratchB>(size_t(M) * (kNC + 32));
  alignas(64) uint16_t S[kSC * 32];
  for (int64_t n0 = 0; n0 < N; n0 += kNC) {
    const int64_t nc = std::min(kNC, N - n0), ld = (nc + 31) / 32 * 32;
    for (int64_t k0 = 0; k0 < K; k0 += kSC) {
      const int64_t kc = std::min(kSC, K - k0);
      for (int64_t j = 0; j < nc; j += 32) {
        int64_t pj = j + kSD * 32, pk0 = k0;            // the strip to prefetch: kSD ahead, else the next depth block's
        if (pj >= nc) { pj -= nc; pk0 = k0 + kSC; }
        const int64_t pd = pk0 < K && pj < nc ? std::min(kSC, K - pk0) : 0;
        const int64_t panels = (M + kMR - 1) / kMR, per = (pd + panels - 1) / panels;
        int64_t pr = 0;
        nn_strip(kc / 2, B + k0 * ldb + n0 + j, ldb, mask32(nc - j), S);
        for_each_panel(M, [&](int64_t i0, int rows) {
          kNnTiles[k0 == 0][rows](kc / 2, at + (k0 / 2) * 16 * V + i0, 16 * V, S, acc + i0 * ld + j, ld);
          for (int64_t r = 0; r < per && pr < pd; ++r, ++pr)
            __builtin_prefetch(B + (pk0 + pr) * ldb + n0 + pj, 0, 3);
          pf.step();
        });
      }
    }
    for (int64_t i = 0; i < M; ++i) nn_store_row(acc + i * ld, nc, C + i * ldc + n0);
  }
}

// ---- NT ----
// T[n][0:16V) = sum over k2 < pairs of At[k2][0:16V) . B[n][2k2 .. 2k2+1] for n < NR (At: pairs of A's rows, 32-bit
// lanes; B read in place along its rows). While it runs, the first `pn` rows at P (the next tile's) are prefetched.
template <int V, int NR>
DP_TARGET void nt_tile(int64_t pairs, const int32_t* At, const uint16_t* B, int64_t ldb, float* T, const uint16_t* P,
                       int pn, Ahead* pf) {
  __m512 c[NR][V];
#pragma GCC unroll 24
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[n][v] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
    for (int r = 0; r < pn; ++r) __builtin_prefetch(P + r * ldb + 2 * k0, 0, 3);
    pf->step();
    const int64_t ke = std::min(pairs, k0 + 16);
    for (int64_t k2 = k0; k2 < ke; ++k2) {
      __m512i a[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_si512(At + k2 * 16 * V + 16 * v);
#pragma GCC unroll 24
      for (int n = 0; n < NR; ++n) {
        const __m512i b = _mm512_set1_epi32(pair_at(B + n * ldb + 2 * k2));
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) c[n][v] = dp(c[n][v], a[v], b);
      }
    }
  }
#pragma GCC unroll 24
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(T + n * 16 * V + 16 * v, c[n][v]);
}

// C[0:M, 0:N) = A B^T for M <= 16 V rows whose pairs are packed in At; then 0 where mask <= 0 (if given).
// NR rows of B per tile: at most 8, though 24 / V accumulators would fit. B's rows are read in place, 4 KiB apart at
// K = 2048, so every row of a tile falls in one L1 set (12 ways): 24 rows (V = 1, 16-row chunks) evicted each other,
// and 2-core Zen 5, d 512 / f 2048, 256 experts x 16 rows, dh @ w_in^T took 38.9-42.8 ms with 24 rows against 16.2-16.3
// with 8 (128 experts x 32 rows, V = 2: both NT products 19.7-21.8 ms with 8, 22.0-23.1 with 12).
constexpr int nt_rows(int V) { return std::min(24 / V, 8); }

template <int V>
DP_TARGET void nt_panels(int64_t M, int64_t N, int64_t pairs, const int32_t* At, const uint16_t* B, int64_t ldb,
                         uint16_t* C, int64_t ldc, const uint16_t* mask, int64_t ldm, Ahead* pf) {
  constexpr int NR = nt_rows(V);
  constexpr int64_t ldt = 16 * V;
  alignas(64) float T[kGN * ldt];
  for (int64_t n0 = 0; n0 < N; n0 += kGN) {
    const int64_t gn = std::min(kGN, N - n0);
    int64_t n = 0;
    for (; n + NR <= gn; n += NR) {
      const int64_t next = n0 + n + NR;
      nt_tile<V, NR>(pairs, At, B + (n0 + n) * ldb, ldb, T + n * ldt, B + next * ldb,
                     int(std::max<int64_t>(0, std::min<int64_t>(NR, N - next))), pf);
    }
    for (; n < gn; ++n) nt_tile<V, 1>(pairs, At, B + (n0 + n) * ldb, ldb, T + n * ldt, nullptr, 0, pf);
    // T [gn][16 V] (column n of the output per row) -> C's rows, 16 x 16 at a time, rounded to bf16
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      for (int64_t c0 = 0; c0 < gn; c0 += 16) {
        __m512i r[16];
        for (int c = 0; c < 16; ++c)
          r[c] = c0 + c < gn ? _mm512_castps_si512(_mm512_loadu_ps(T + (c0 + c) * ldt + i0)) : _mm512_setzero_si512();
        transpose16(r);
        const __mmask16 cm = mask16(gn - c0);
        for (int64_t i = 0; i < std::min<int64_t>(16, M - i0); ++i) {
          __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i]));
          __mmask16 keep = cm;
          if (mask) keep &= ~nonpos16(_mm256_maskz_loadu_epi16(cm, mask + (i0 + i) * ldm + n0 + c0));
          _mm256_mask_storeu_epi16(C + (i0 + i) * ldc + n0 + c0, cm, _mm256_maskz_mov_epi16(keep, o));
        }
      }
    }
  }
}

// C[M, N] = A[M, K] @ B[N, K]^T, M <= kMG, K even; then 0 where mask [M, N] <= 0 (relu's backward), if given.
DP_TARGET void nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                  uint16_t* C, int64_t ldc, const uint16_t* mask, int64_t ldm, const void* ahead = nullptr,
                  int64_t ahead_bytes = 0) {
  const int V = int((M + 15) / 16), pairs = int(K / 2);
  Ahead pf(ahead, ahead_bytes, (N / nt_rows(V) + N % nt_rows(V)) * ((pairs + 15) / 16));   // tiles x depth steps
  int32_t* at = scratch64<int32_t, DpScratchC>(size_t(pairs) * 16 * V);
  pack_cols_avx512(A, lda, pairs, M, reinterpret_cast<uint16_t*>(at), 16 * V);
  switch (V) {
    case 1: nt_panels<1>(M, N, pairs, at, B, ldb, C, ldc, mask, ldm, &pf); break;
    case 2: nt_panels<2>(M, N, pairs, at, B, ldb, C, ldc, mask, ldm, &pf); break;
    case 3: nt_panels<3>(M, N, pairs, at, B, ldb, C, ldc, mask, ldm, &pf); break;
    default: nt_panels<4>(M, N, pairs, at, B, ldb, C, ldc, mask, ldm, &pf); break;
  }
}

// ---- TN ----
// C[i][0:32) = sum over k2 < pairs of Aq[k2][i] . Dq[k2][0:32) for i < MR (both packed as pairs of rows, Aq's rows
// lda u16 apart, Dq's ldq), the whole depth in registers, stored once as bf16 (the first n columns).
template <int MR, bool STREAM>
DP_TARGET void tn_tile(int64_t pairs, const uint16_t* Aq, int64_t lda, const uint16_t* Dq, int64_t ldq, uint16_t* C,
                       int64_t ldc, __mmask32 cm) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) { lo[i] = _mm512_setzero_ps(); hi[i] = _mm512_setzero_ps(); }
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const uint16_t* d = Dq + k2 * ldq;
    const __m512i b0 = _mm512_loadu_si512(d), b1 = _mm512_loadu_si512(d + 32);
    const uint16_t* a = Aq + k2 * lda;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(pair_at(a + 2 * i));
      lo[i] = dp(lo[i], ai, b0);
      hi[i] = dp(hi[i], ai, b1);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512i o = (__m512i)_mm512_cvtne2ps_pbh(hi[i], lo[i]);
    if constexpr (STREAM) _mm512_stream_si512(reinterpret_cast<__m512i*>(C + i * ldc), o);
    else _mm512_mask_storeu_epi16(C + i * ldc, cm, o);
  }
}

using TnTile = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, __mmask32);
template <bool STREAM, size_t... I>
constexpr std::array<TnTile, kMR + 1> tn_tiles(std::index_sequence<I...>) { return {nullptr, &tn_tile<int(I) + 1, STREAM>...}; }
const std::array<TnTile, kMR + 1> kTnTiles[2] = {tn_tiles<false>(std::make_index_sequence<kMR>()),
                                                 tn_tiles<true>(std::make_index_sequence<kMR>())};

// C[P, N] = op(A)[R, P]^T D[R, N] (R = the group's rows, the depth; op = relu with relu_a). With `stream`, full tiles
// on 64-byte lines are written with non-temporal stores: a weight gradient larger than the last-level cache (128
// experts: 256 MiB a weight) is otherwise read line by line from memory before it is overwritten.
DP_TARGET void tn(int64_t R, int64_t P, int64_t N, const uint16_t* A, int64_t lda, const uint16_t* D, int64_t ldd,
                  uint16_t* C, int64_t ldc, bool relu_a, bool stream) {
  if (R == 0) {
    for (int64_t p = 0; p < P; ++p) std::memset(C + p * ldc, 0, size_t(N) * sizeof(uint16_t));
    return;
  }
  const int64_t pairs = (R + 1) / 2, Wa = (P + 31) / 32 * 32, Wd = (N + 31) / 32 * 32;
  uint16_t* aq = scratch64<uint16_t, DpScratchA>(size_t(pairs) * Wa * 2);
  uint16_t* dq = scratch64<uint16_t, DpScratchC>(size_t(pairs) * Wd * 2);
  pack_rows_avx512(A, lda, R, pairs, P, aq, Wa, relu_a);
  pack_rows_avx512(D, ldd, R, pairs, N, dq, Wd);
  for (int64_t j0 = 0; j0 < N; j0 += kNJ) {
    const int64_t je = std::min(N, j0 + kNJ);
    for (int64_t p0 = 0; p0 < P; p0 += kMR) {
      const int rows = int(std::min<int64_t>(kMR, P - p0));
      for (int64_t j = j0; j < je; j += 32) {
        const bool nt = stream && j + 32 <= N && reinterpret_cast<uintptr_t>(C + p0 * ldc + j) % 64 == 0 && ldc % 32 == 0;
        kTnTiles[nt][rows](pairs, aq + 2 * p0, Wa * 2, dq + 2 * j, Wd * 2, C + p0 * ldc + j, ldc, mask32(N - j));
      }
    }
  }
  if (stream) _mm_sfence();                                // the streamed lines are visible before we return
}

inline const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }

}  // namespace

void gmm_bf16_dp(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                 at::Tensor& out, bool relu_a, const at::Tensor* mask) {
  const int64_t K = a.size(1), G = b.size(0), M = out.size(1);
  std::vector<int64_t> ext(G);
  std::vector<double> work(G);
  const int64_t U = trans_b ? kMG : kMGN;            // units: chunks of U rows
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = off[g + 1] - off[g];
    ext[g] = (rows + U - 1) / U;
    work[g] = double(std::min(rows, U) + 1) * K * M;
  }
  const uint16_t* A = u16(a);
  const uint16_t* B = u16(b);
  const uint16_t* Mk = mask ? u16(*mask) : nullptr;
  uint16_t* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  run_items_ahead(make_items(ext, work, at::get_num_threads()), 2.0 * off[G] * K * M, [&](const Item& it, const Item* next) {
    const int64_t g0 = off[it.g], rows = off[it.g + 1] - g0;
    // the next group's weight, prefetched during this item's last unit (unless it is this group's)
    const char* ahead = next && next->g != it.g && next->hi > next->lo ? reinterpret_cast<const char*>(B + next->g * K * M) : nullptr;
    for (int64_t u = it.lo; u < it.hi; ++u) {
      const int64_t r = g0 + u * U, m = std::min(U, rows - u * U);
      const char* pf = u + 1 == it.hi ? ahead : nullptr;
      if (trans_b) nt(m, M, K, A + r * K, K, B + it.g * M * K, K, C + r * M, M, Mk ? Mk + r * M : nullptr, M, pf, K * M * 2);
      else nn(m, M, K, A + r * K, K, B + it.g * K * M, M, C + r * M, M, relu_a, pf, K * M * 2);
    }
  });
}

void wgrad_bf16_dp(const at::Tensor& a, const at::Tensor& dy, const std::vector<int64_t>& off, at::Tensor& out,
                   bool relu_a) {
  const int64_t K = a.size(1), M = dy.size(1), G = int64_t(off.size()) - 1;
  // items: a group's columns, in blocks of 32
  const int64_t nblk = (M + 31) / 32;
  std::vector<int64_t> ext(G, nblk);
  std::vector<double> work(G);
  for (int64_t g = 0; g < G; ++g) work[g] = double(std::max<int64_t>(off[g + 1] - off[g], 1) + 8) * K * 32;
  const uint16_t* A = u16(a);
  const uint16_t* D = u16(dy);
  uint16_t* C = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool stream = gemm_stream_pays(G * K * M * int64_t(sizeof(uint16_t)));
  run_items(make_items(ext, work, at::get_num_threads()), 2.0 * off[G] * K * M, [&](const Item& it) {
    if (it.hi == it.lo) return;
    const int64_t r = off[it.g], rows = off[it.g + 1] - r, j0 = it.lo * 32, j1 = std::min(M, it.hi * 32);
    tn(rows, K, j1 - j0, A + r * K, K, D + r * M + j0, M, C + it.g * K * M + j0, M, relu_a, stream);
  });
}

#else   // not x86-64: never available, never called

bool bf16_dp_available() { return false; }
void gmm_bf16_dp(const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&, bool, at::Tensor&, bool,
                 const at::Tensor*) {}
void wgrad_bf16_dp(const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&, at::Tensor&, bool) {}

#endif

}  // namespace flanmoe
