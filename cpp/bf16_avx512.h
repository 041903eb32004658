// AVX-512 pieces shared by the bf16 kernels (the brgemm path, the own AVX512-BF16 kernels, the bf16 row moves of
// permute / unpermute): a 16x16 transpose of 32-bit lanes, relu and round-to-bf16 on bit patterns, and the two
// packings into pairs along the depth. x86-64 only; the functions carry their own target.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

#define FLANMOE_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace flanmoe {

// 16x16 transpose of 32-bit lanes held in r[0..15].
FLANMOE_AVX512BW inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + j] now holds, in each 128-bit lane L, row (4L' ...) : finish with two 128-bit lane shuffles
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// relu on bf16 bit patterns (16-bit lanes): 0 where negative and not NaN, as bf16_relu_bits (grouped_mm_bf16.h).
FLANMOE_AVX512BW inline __m512i bf16_relu(__m512i x) {
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7FFF));
  const __mmask32 neg = _mm512_test_epi16_mask(x, _mm512_set1_epi16(int16_t(0x8000)));
  const __mmask32 notnan = _mm512_cmple_epu16_mask(mag, _mm512_set1_epi16(0x7F80));
  return _mm512_maskz_mov_epi16(~(neg & notnan), x);
}
FLANMOE_AVX512BW inline __m256i bf16_relu(__m256i x) {
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7FFF));
  const __mmask16 neg = _mm256_test_epi16_mask(x, _mm256_set1_epi16(int16_t(0x8000)));
  const __mmask16 notnan = _mm256_cmple_epu16_mask(mag, _mm256_set1_epi16(0x7F80));
  return _mm256_maskz_mov_epi16(~(neg & notnan), x);
}

// 16 fp32 lanes rounded to bf16 as c10::BFloat16 does (to nearest even; NaN -> the quiet NaN 0x7FC0 c10 writes): the
// bf16 bits in the low half of each 32-bit lane.
FLANMOE_AVX512BW inline __m512i bf16_round(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i y = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(y, nan, _mm512_set1_epi32(0x7FC0));
}

// dst[k2][n][2] = op(src[2 k2 + {0,1}][n]) for n < nb (0 for nb <= n < W, W a multiple of 16, and for rows at or past
// `rows`), k2 < pairs, src row-major with leading dimension ld; op = relu with relu. Pairs of consecutive rows
// interleaved: the brgemm ukernel's B operand, the AVX512-BF16 weight-gradient tiles' operands.
FLANMOE_AVX512BW inline void pack_rows_avx512(const uint16_t* src, int64_t ld, int64_t rows, int64_t pairs, int64_t nb,
                                              uint16_t* dst, int64_t W, bool relu = false) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    uint16_t* d = dst + k2 * W * 2;
    const int64_t r = 2 * k2;
    const uint16_t* r0 = r < rows ? src + r * ld : nullptr;
    const uint16_t* r1 = r + 1 < rows ? src + (r + 1) * ld : nullptr;
    for (int64_t n = 0; n < W; n += 16) {             // 16 columns: two rows of 16 bf16 -> 16 interleaved pairs
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, nb - n));
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      __m256i a = r0 && left ? _mm256_maskz_loadu_epi16(m, r0 + n) : zero;
      __m256i b = r1 && left ? _mm256_maskz_loadu_epi16(m, r1 + n) : zero;
      if (relu) { a = bf16_relu(a); b = bf16_relu(b); }
      const __m512i v = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(d + 2 * n, v);
    }
  }
}

// The same block of src^T: dst[k2][n][2] = op(src[n][2 k2 + {0,1}]) (src [nb, 2*pairs] rows with leading dim ld; 0
// for nb <= n < W, W a multiple of 16): a transpose of 32-bit pairs, 16 source rows at a time, each read from start to
// end (16 sequential streams for the prefetcher, however wide the packed block). The brgemm ukernel's transposed B,
// the AVX512-BF16 NN / NT tiles' token operand.
FLANMOE_AVX512BW inline void pack_cols_avx512(const uint16_t* src, int64_t ld, int64_t pairs, int64_t nb, uint16_t* dst,
                                              int64_t W, bool relu = false) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  __m512i r[16];
  for (int64_t n0 = 0; n0 < W; n0 += 16) {
    for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
      const int64_t kl = std::min<int64_t>(16, pairs - k0);
      const __mmask16 km = kl >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << kl) - 1);
      for (int i = 0; i < 16; ++i) {                  // row n0 + i of src: pairs k0 .. k0 + 15
        r[i] = n0 + i < nb ? _mm512_maskz_loadu_epi32(km, src + (n0 + i) * ld + 2 * k0) : _mm512_setzero_si512();
        if (relu) r[i] = bf16_relu(r[i]);
      }
      transpose16(r);
      for (int64_t j = 0; j < kl; ++j) _mm512_storeu_si512(d + (k0 + j) * W + n0, r[j]);
    }
  }
}

}  // namespace flanmoe
#endif
