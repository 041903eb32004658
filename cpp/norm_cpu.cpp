// CPU flanmoe::rms_norm / flanmoe::rms_norm_backward: T5's layer norm over the last dimension,
//   y = x * r * weight,  r = 1 / sqrt(mean(x^2) + eps)   (per row; r is returned for the backward)
//   dx = r * (g*w - xh * mean(g*w * xh)),  dweight = sum over rows of g * xh,  xh = x * r
// in the input precision (float32 / float64), one pass over each row. The weight gradient is summed per
// block of 256 rows, then over the blocks in order: the same bits for any thread count. Row sums are
// vectorised (`omp simd` reductions), so they differ from a sequential sum in the last bits.
#include "flanmoe.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>
#include <vector>

namespace flanmoe {
namespace {

constexpr int64_t kRowBlock = 256;

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  FLANMOE_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (got a 0-D tensor)");
  FLANMOE_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": x must be float32 or float64 (got ", x.scalar_type(), ")");
  check_device_of(x, op, "x", false);
  check_contiguous(x, op, "x");
  check_rank(weight, 1, op, "weight");
  FLANMOE_CHECK(weight.size(0) == x.size(-1), op, ": weight must have one entry per feature of x (x is ", shape_str(x),
                ", weight is ", shape_str(weight), ")");
  FLANMOE_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (x is ", x.scalar_type(),
                ", weight is ", weight.scalar_type(), ")");
  check_same_device(weight, x, op, "weight", "x");
  check_contiguous(weight, op, "weight");
}

// One row each way. The float copies are compiled for AVX-512F, AVX2+FMA and the baseline ISA and picked at
// load time (GCC function multi-versioning); they call nothing but inlined arithmetic.
template <typename T>
inline T fwd_row(const T* xr, const T* w, T eps, int64_t d, T* yr) {
  T ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
  const T inv = T(1) / std::sqrt(ss / T(d) + eps);
  for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * inv) * w[i];
  return inv;
}

template <typename T>
inline void bwd_row(const T* gr, const T* xr, const T* w, T inv, int64_t d, T* dxr, T* pw) {
  if (dxr) {
    T m = 0;
#pragma omp simd reduction(+ : m)
    for (int64_t i = 0; i < d; ++i) m += (gr[i] * w[i]) * (xr[i] * inv);
    m /= T(d);
    for (int64_t i = 0; i < d; ++i) dxr[i] = (gr[i] * w[i] - (xr[i] * inv) * m) * inv;
  }
  if (pw)
    for (int64_t i = 0; i < d; ++i) pw[i] += gr[i] * (xr[i] * inv);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLANMOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FLANMOE_CLONES
#endif

FLANMOE_CLONES float fwd_row_f32(const float* xr, const float* w, float eps, int64_t d, float* yr) {
  return fwd_row<float>(xr, w, eps, d, yr);
}
FLANMOE_CLONES void bwd_row_f32(const float* gr, const float* xr, const float* w, float inv, int64_t d, float* dxr,
                                float* pw) {
  bwd_row<float>(gr, xr, w, inv, d, dxr, pw);
}
inline double fwd_row_any(const double* xr, const double* w, double eps, int64_t d, double* yr) {
  return fwd_row<double>(xr, w, eps, d, yr);
}
inline float fwd_row_any(const float* xr, const float* w, float eps, int64_t d, float* yr) {
  return fwd_row_f32(xr, w, eps, d, yr);
}
inline void bwd_row_any(const double* gr, const double* xr, const double* w, double inv, int64_t d, double* dxr,
                        double* pw) {
  bwd_row<double>(gr, xr, w, inv, d, dxr, pw);
}
inline void bwd_row_any(const float* gr, const float* xr, const float* w, float inv, int64_t d, float* dxr, float* pw) {
  bwd_row_f32(gr, xr, w, inv, d, dxr, pw);
}

template <typename T>
void fwd(const T* x, const T* w, T eps, int64_t rows, int64_t d, T* y, T* rstd) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rstd[r] = fwd_row_any(x + r * d, w, eps, d, y + r * d);
  });
}

template <typename T>
void bwd(const T* g, const T* x, const T* w, const T* rstd, int64_t rows, int64_t d, T* dx, T* dw, bool need_dx) {
  const int64_t nblk = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<T> part(dw ? nblk * d : 0, T(0));
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      T* pw = dw ? part.data() + blk * d : nullptr;
      for (int64_t r = blk * kRowBlock; r < std::min(rows, (blk + 1) * kRowBlock); ++r)
        bwd_row_any(g + r * d, x + r * d, w, rstd[r], d, need_dx ? dx + r * d : nullptr, pw);
    }
  });
  if (!dw) return;
  for (int64_t i = 0; i < d; ++i) dw[i] = T(0);
  for (int64_t blk = 0; blk < nblk; ++blk)
    for (int64_t i = 0; i < d; ++i) dw[i] += part[blk * d + i];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "flanmoe::rms_norm";
  check_norm_args(x, weight, op);
  FLANMOE_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0 (got eps=", eps, ")");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  auto y = at::empty_like(x);
  auto rstd = make_output(op, "rstd [x.shape[:-1]]", x.sizes().slice(0, x.dim() - 1), x.scalar_type(),
                          [&] { return at::empty(x.sizes().slice(0, x.dim() - 1), x.options()); });
  if (x.numel() == 0) return {y, rstd.fill_(std::nan(""))};   // (d = 0: the mean of nothing, as in torch)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flanmoe_rms_norm", [&] {
    fwd<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), scalar_t(eps), rows, d, y.data_ptr<scalar_t>(),
                  rstd.data_ptr<scalar_t>());
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         bool need_dx, bool need_dweight) {
  const char* op = "flanmoe::rms_norm_backward";
  check_norm_args(x, weight, op);
  FLANMOE_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), op,
                ": dy must have the shape and dtype of x (x is ", shape_str(x), ", dy is ", shape_str(dy), " ",
                dy.scalar_type(), ")");
  FLANMOE_CHECK(rstd.sizes() == x.sizes().slice(0, x.dim() - 1) && rstd.scalar_type() == x.scalar_type(), op,
                ": rstd must be the per-row statistic from rms_norm, shape x.shape[:-1] = ", x.sizes().slice(0, x.dim() - 1),
                " (got ", shape_str(rstd), " ", rstd.scalar_type(), ")");
  check_same_device(dy, x, op, "dy", "x");
  check_same_device(rstd, x, op, "rstd", "x");
  const auto g = contiguous_arg(dy, op, "dy"), r = contiguous_arg(rstd, op, "rstd");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  auto dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  auto dw = need_dweight ? at::empty_like(weight) : at::empty({0}, x.options());
  if (rows == 0) { if (need_dweight) dw.zero_(); return {dx, dw}; }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flanmoe_rms_norm_backward", [&] {
    bwd<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                  rows, d, need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                  need_dweight ? dw.data_ptr<scalar_t>() : nullptr, need_dx);
  });
  return {dx, dw};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace flanmoe
