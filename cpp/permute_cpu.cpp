// CPU permute / unpermute / gather_dot: the row movement around the grouped GEMMs.
//   permute:    out[s] = x[token_idx[s]] (* weights[s])                       gather, parallel over rows
//   unpermute:  out[t] = sum_{s: token_idx[s] = t} weights[s] * y[s]          scatter-add, made race-free
//               and deterministic by a counting sort of rows by token (CSR), then parallel over tokens
//   gather_dot: out[s] = <x[token_idx[s]], y[s]>                              the gradient of the weights
//   unpermute_backward: both gradients of unpermute from one read of each gathered gradient row:
//               dy[s] = weights[s] * grad[token_idx[s]],  dweights[s] = <grad[token_idx[s]], y[s]>
// Accumulation is in float for bf16/fp16 and in the input type otherwise.
#include "flanmoe.h"
#include "cpu_cache.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#include "bf16_avx512.h"

namespace flanmoe {
namespace {

void check_index_values(const at::Tensor& idx, int64_t rows, const char* op, const char* name, const char* what) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i)
    FLANMOE_CHECK(p[i] >= 0 && p[i] < rows, op, ": ", name, " must be in [0, ", what, "=", rows, ") (got ", name,
                  "[", i, "] = ", p[i], ")");
}

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// <a, c> over d elements in 16 interleaved partial sums (one vector's worth per lane group: the compiler vectorises
// it, where a single running sum is a chain of dependent adds), then summed in a fixed order: the same bits on
// every machine.
template <typename scalar_t, typename opmath_t>
opmath_t dot_row(const scalar_t* a, const scalar_t* c, int64_t d) {
  constexpr int L = 16;
  opmath_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= d; i += L)
    for (int j = 0; j < L; ++j) part[j] += static_cast<opmath_t>(a[i + j]) * static_cast<opmath_t>(c[i + j]);
  for (int j = 0; i < d; ++i, ++j) part[j] += static_cast<opmath_t>(a[i]) * static_cast<opmath_t>(c[i]);
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) part[j] += part[j + w];
  return part[0];
}

// ---- bf16 rows with AVX-512: the loops above convert one element at a time through c10::BFloat16 (scalar code:
// ~0.5 ms for a [4096, 512] unpermute on a 2-core Zen 5, where the rows move at the memory rate in ~0.1). The same
// operations per element in the same order (a product, then a sum: no fused multiply-add), and the same rounding
// to bf16 as c10 (to nearest even, NaN -> 0x7FC0): bitwise the scalar results.
#if defined(__x86_64__)
#define PERM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), optimize("fp-contract=off")))

bool bf16_rows_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}

PERM_AVX512 inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

PERM_AVX512 inline void store16(at::BFloat16* p, __m512 v, __mmask16 m) {
  _mm512_mask_cvtepi32_storeu_epi16(p, m, bf16_round(v));
}

inline __mmask16 tail16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dst[i] = bf16(float(src[i]) * w)
PERM_AVX512 void scale_row_bf16(const at::BFloat16* src, float w, at::BFloat16* dst, int64_t d) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail16(d - i);
    store16(dst + i, _mm512_mul_ps(load16(src + i, m), wv), m);
  }
}

// dst[i] = bf16(sum over r in [r0, r1) of w_r * float(y[rows[r]][i])), summed from 0 in row order
PERM_AVX512 void unpermute_row_bf16(const at::BFloat16* yp, const int64_t* rows, int64_t r0, int64_t r1,
                                    const at::BFloat16* wp, at::BFloat16* dst, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail16(d - i);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = rows[r];
      const __m512 w = _mm512_set1_ps(wp ? static_cast<float>(wp[s]) : 1.f);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(w, load16(yp + s * d + i, m)));
    }
    store16(dst + i, acc, m);
  }
}

// dot_row<bf16, float> (lane j of the 16 partial sums takes elements i + j, the tail continues from lane 0, then
// the same pairwise reduction)
PERM_AVX512 float dot_row_bf16(const at::BFloat16* a, const at::BFloat16* c, int64_t d) {
  __m512 part = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) part = _mm512_add_ps(part, _mm512_mul_ps(load16(a + i, 0xFFFF), load16(c + i, 0xFFFF)));
  alignas(64) float p[16];
  _mm512_store_ps(p, part);
  for (int j = 0; i < d; ++i, ++j) p[j] += static_cast<float>(a[i]) * static_cast<float>(c[i]);
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  return p[0];
}
#else
bool bf16_rows_avx512() { return false; }
void scale_row_bf16(const at::BFloat16*, float, at::BFloat16*, int64_t) {}
void unpermute_row_bf16(const at::BFloat16*, const int64_t*, int64_t, int64_t, const at::BFloat16*, at::BFloat16*, int64_t) {}
float dot_row_bf16(const at::BFloat16*, const at::BFloat16*, int64_t) { return 0.f; }
#endif

// The vector paths where they apply (bf16 on a CPU with AVX-512 F, BW and VL): true when they ran.
template <typename T> bool scale_row_vec(const T*, float, T*, int64_t) { return false; }
template <> bool scale_row_vec(const at::BFloat16* src, float w, at::BFloat16* dst, int64_t d) {
  if (!bf16_rows_avx512()) return false;
  scale_row_bf16(src, w, dst, d);
  return true;
}
template <typename T> bool unpermute_rows_vec(const T*, const int64_t*, const int64_t*, const T*, T*, int64_t, int64_t,
                                              int64_t) { return false; }
template <> bool unpermute_rows_vec(const at::BFloat16* yp, const int64_t* start, const int64_t* rows, const at::BFloat16* wp,
                                    at::BFloat16* out, int64_t d, int64_t num_tokens, int64_t grain) {
  if (!bf16_rows_avx512()) return false;
  at::parallel_for(0, num_tokens, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) unpermute_row_bf16(yp, rows, start[t], start[t + 1], wp, out + t * d, d);
  });
  return true;
}
template <typename T> bool dot_row_vec(const T*, const T*, int64_t, T*) { return false; }
template <> bool dot_row_vec(const at::BFloat16* a, const at::BFloat16* c, int64_t d, at::BFloat16* out) {
  if (!bf16_rows_avx512()) return false;
  *out = static_cast<at::BFloat16>(dot_row_bf16(a, c, d));
  return true;
}

}  // namespace

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& token_idx, const std::optional<at::Tensor>& weights) {
  const char* op = "flanmoe::permute";
  check_permute_args(x, token_idx, weights, op);
  const int64_t S = token_idx.size(0), T = x.size(0), d = x.size(1);
  check_index_values(token_idx, T, op, "token_idx", "rows of x");
  auto out = make_output(op, "the output [entries of token_idx, columns of x]", {S, d}, x.scalar_type(),
                         [&] { return empty_large({S, d}, x.options()); });
  if (S == 0 || d == 0) return out;
  const int64_t* idx = token_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "flanmoe_permute", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const scalar_t* wp = weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, S, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        const scalar_t* src = xp + idx[s] * d;
        scalar_t* dst = op_ + s * d;
        if (!wp) { std::memcpy(dst, src, sizeof(scalar_t) * d); continue; }
        const opmath_t w = static_cast<opmath_t>(wp[s]);
        if (scale_row_vec(src, w, dst, d)) continue;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[i]) * w);
      }
    });
  });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& token_idx, const std::optional<at::Tensor>& weights,
                         int64_t num_tokens) {
  const char* op = "flanmoe::unpermute";
  check_unpermute_args(y, token_idx, weights, num_tokens, op);
  const int64_t S = token_idx.size(0), d = y.size(1);
  check_index_values(token_idx, num_tokens, op, "token_idx", "num_tokens");
  auto out = make_output(op, "the output [num_tokens, columns of y]", {num_tokens, d}, y.scalar_type(),
                         [&] { return empty_large({num_tokens, d}, y.options()); });
  if (num_tokens == 0 || d == 0) return out;
  const int64_t* idx = token_idx.data_ptr<int64_t>();
  // Rows of each token, in ascending row order (deterministic summation order). (num_tokens * d elements were
  // allocated above, so num_tokens + 1 cannot overflow; the arrays are 2x its size and named if they fail.)
  std::vector<int64_t> start, rows, fill;
  allocating(op, "the [num_tokens + 1] row offsets of unpermute (num_tokens=" + std::to_string(num_tokens) + ")", [&] {
    start.assign(num_tokens + 1, 0);
    fill.resize(num_tokens);
    rows.resize(S);
    return 0;
  });
  for (int64_t s = 0; s < S; ++s) ++start[idx[s] + 1];
  for (int64_t t = 0; t < num_tokens; ++t) start[t + 1] += start[t];
  std::copy(start.begin(), start.end() - 1, fill.begin());
  for (int64_t s = 0; s < S; ++s) rows[fill[idx[s]]++] = s;
  fill = std::vector<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "flanmoe_unpermute", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const scalar_t* wp = weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      // Accumulating in the output row itself: the same sums in the same order as through a zeroed buffer (0 + a
      // is a), one pass over each row instead of three (a top-1 token is one scaled copy).
      at::parallel_for(0, num_tokens, row_grain(d), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          scalar_t* dst = op_ + t * d;
          const int64_t r0 = start[t], r1 = start[t + 1];
          if (r0 == r1) { std::memset(dst, 0, sizeof(scalar_t) * d); continue; }
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t s = rows[r];
            const scalar_t* src = yp + s * d;
            const scalar_t w = wp ? wp[s] : scalar_t(1);
            if (r == r0) for (int64_t i = 0; i < d; ++i) dst[i] = scalar_t(0) + w * src[i];
            else for (int64_t i = 0; i < d; ++i) dst[i] += w * src[i];
          }
        }
      });
      return;
    }
    if (unpermute_rows_vec(yp, start.data(), rows.data(), wp, op_, d, num_tokens, row_grain(d))) return;
    at::parallel_for(0, num_tokens, row_grain(d), [&](int64_t b, int64_t e) {
      std::vector<opmath_t> acc(d);
      for (int64_t t = b; t < e; ++t) {
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t r = start[t]; r < start[t + 1]; ++r) {
          const int64_t s = rows[r];
          const scalar_t* src = yp + s * d;
          const opmath_t w = wp ? static_cast<opmath_t>(wp[s]) : opmath_t(1);
          for (int64_t i = 0; i < d; ++i) acc[i] += w * static_cast<opmath_t>(src[i]);
        }
        scalar_t* dst = op_ + t * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return out;
}

at::Tensor gather_dot_cpu(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& y) {
  const char* op = "flanmoe::gather_dot";
  check_gather_dot_args(x, token_idx, y, op);
  const int64_t S = token_idx.size(0), T = x.size(0), d = x.size(1);
  check_index_values(token_idx, T, op, "token_idx", "rows of x");
  auto out = at::empty({S}, x.options());
  if (S == 0) return out;
  const int64_t* idx = token_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "flanmoe_gather_dot", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        if (dot_row_vec(xp + idx[s] * d, yp + s * d, d, op_ + s)) continue;
        op_[s] = static_cast<scalar_t>(dot_row<scalar_t, opmath_t>(xp + idx[s] * d, yp + s * d, d));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad, const at::Tensor& token_idx,
                                                          const std::optional<at::Tensor>& weights, const at::Tensor& y,
                                                          bool need_dy, bool need_dweights) {
  const char* op = "flanmoe::unpermute_backward";
  check_rank(grad, 2, op, "grad");
  check_rank(y, 2, op, "y");
  check_float_dtype(grad, op, "grad");
  FLANMOE_CHECK(y.scalar_type() == grad.scalar_type(), op, ": y must have the dtype of grad (grad is ",
                grad.scalar_type(), ", y is ", y.scalar_type(), ")");
  check_same_device(y, grad, op, "y", "grad");
  check_contiguous(grad, op, "grad");
  check_contiguous(y, op, "y");
  check_index(token_idx, grad, op, "token_idx");
  const int64_t S = token_idx.size(0), T = grad.size(0), d = grad.size(1);
  FLANMOE_CHECK(y.size(0) == S && y.size(1) == d, op, ": y must have shape [", S, ", ", d,
                "] (rows of token_idx, columns of grad) but has shape ", shape_str(y));
  check_index_values(token_idx, T, op, "token_idx", "rows of grad");
  if (weights.has_value()) check_weights(weights, S, y, op, "y");
  FLANMOE_CHECK(!need_dweights || weights.has_value(), op, ": need_dweights needs weights (got weights=None)");
  at::Tensor dy = need_dy ? make_output(op, "dy [entries of token_idx, columns of grad]", {S, d}, y.scalar_type(),
                                        [&] { return empty_large({S, d}, y.options()); })
                          : at::empty({0}, y.options());
  at::Tensor dw = need_dweights ? at::empty({S}, y.options()) : at::empty({0}, y.options());
  if (S == 0 || (!need_dy && !need_dweights)) return {dy, dw};
  const int64_t* idx = token_idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "flanmoe_unpermute_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr;
    scalar_t* dyp = need_dy ? dy.data_ptr<scalar_t>() : nullptr;
    scalar_t* dwp = need_dweights ? dw.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, S, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        const scalar_t* row = gp + idx[s] * d;
        if (dwp && !dot_row_vec(row, yp + s * d, d, dwp + s))
          dwp[s] = static_cast<scalar_t>(dot_row<scalar_t, opmath_t>(row, yp + s * d, d));
        if (!dyp) continue;
        scalar_t* dst = dyp + s * d;
        if (!wp) { std::memcpy(dst, row, sizeof(scalar_t) * d); continue; }
        const opmath_t w = static_cast<opmath_t>(wp[s]);
        if (scale_row_vec(row, w, dst, d)) continue;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(row[i]) * w);
      }
    });
  });
  return {dy, dw};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("gather_dot", &gather_dot_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace flanmoe
