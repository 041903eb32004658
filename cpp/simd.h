// One SIMD style for the CPU kernels (attention_isa.inc, sgemm_small_isa.inc): GCC vector types one register
// wide, with the ordinary operators for arithmetic, and intrinsics only where an operator cannot say it
// (masked loads and stores, fused multiply-add, lane shuffles). Included at the top of each ISA copy's
// namespace, with
//   ISA_W       floats per vector: 16 (AVX-512F), 8 (AVX2 + FMA) or 4 (the SSE2 baseline; no masks, no FMA)
//   ISA_TARGET  the function attribute that enables the ISA (empty for the baseline copy)
// No include guard: every copy gets its own definitions, in its own namespace. The including file includes
// <immintrin.h> (x86) before its namespaces.

constexpr int W = ISA_W;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int vi __attribute__((vector_size(4 * W)));
#define ISA_INLINE ISA_TARGET __attribute__((always_inline)) inline

ISA_INLINE vf vzero() { return vf{}; }
ISA_INLINE vf vloadu(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
ISA_INLINE void vstoreu(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

#if ISA_W == 16
ISA_INLINE vf vset1(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }   // (0 + x would cost an add)
using mask_t = __mmask16;
ISA_INLINE mask_t make_mask(int64_t n) { return n >= 16 ? mask_t(0xFFFF) : n <= 0 ? mask_t(0) : mask_t((1u << n) - 1); }
ISA_INLINE vf vload(const float* p, mask_t m) { return _mm512_maskz_loadu_ps(m, p); }
ISA_INLINE void vstore(float* p, mask_t m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
ISA_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// A non-temporal store of one vector (p 64-byte aligned): the line goes to memory without being read first.
ISA_INLINE void vstream(float* p, vf v) { _mm512_stream_ps(p, v); }
#elif ISA_W == 8
ISA_INLINE vf vset1(float x) { return vf{x, x, x, x, x, x, x, x}; }
using mask_t = __m256i;
ISA_INLINE mask_t make_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
}
ISA_INLINE vf vload(const float* p, mask_t m) { return _mm256_maskload_ps(p, m); }
ISA_INLINE void vstore(float* p, mask_t m, vf v) { _mm256_maskstore_ps(p, m, v); }
ISA_INLINE vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
ISA_INLINE void vstream(float* p, vf v) { _mm256_stream_ps(p, v); }   // (p 32-byte aligned)
#else
ISA_INLINE vf vset1(float x) { return vf{x, x, x, x}; }
#endif

// Horizontal sum / max: a tree of half-width shuffles (log2 W steps) instead of W - 1 lane extracts.
#if ISA_W == 16
#define ISA_FOLD(v, OP)                                                                                    \
  v = OP(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));           \
  v = OP(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));           \
  v = OP(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));           \
  v = OP(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#elif ISA_W == 8
#define ISA_FOLD(v, OP)                                                                                    \
  v = OP(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));                                        \
  v = OP(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));                                        \
  v = OP(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
#else
#define ISA_FOLD(v, OP)                                                                                    \
  v = OP(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));                                                    \
  v = OP(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
#endif
ISA_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
ISA_INLINE vf vadd(vf a, vf b) { return a + b; }
ISA_INLINE float hsum(vf v) {
  ISA_FOLD(v, vadd)
  return v[0];
}
ISA_INLINE float hmax(vf v) {
  ISA_FOLD(v, vmax)
  return v[0];
}
#undef ISA_FOLD
