// CPU flanmoe::router_linear / flanmoe::router_linear_backward: an MoE router's projection
// `logits = x W^T (+ b)`, x [T, d] (rows any stride apart, contiguous along d), W [E, d], and its backward with
// dx = g W and dW = g^T x produced in one pass over the tokens (router_kernels.h says why); dx can be added
// in place to a gradient x already has (dx_acc: the experts' share, so the sum costs no pass of its own). float32 runs the
// vectorised kernels; float64 (gradcheck) plain loops of the same sums. The weight gradient is summed over fixed
// token blocks (their number set by T alone) in a fixed order: its bits do not depend on the thread count.
#include "flanmoe.h"
#include "router_kernels.h"
#include "cpu_cache.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <tuple>
#include <vector>

namespace flanmoe {
namespace {

void check_router_args(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_rank(x, 2, op, "x");
  check_rank(w, 2, op, "weight");
  FLANMOE_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": x must be float32 or float64 (got ", x.scalar_type(), ")");
  FLANMOE_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (x is ", x.scalar_type(),
                ", weight is ", w.scalar_type(), ")");
  check_device_of(x, op, "x", false);
  check_same_device(w, x, op, "weight", "x");
  FLANMOE_CHECK(w.size(1) == x.size(1), op, ": weight must be [num_experts, ", x.size(1),
                "] (the columns of x), got shape ", shape_str(w));
  FLANMOE_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x must have a contiguous last dimension (got shape ",
                shape_str(x), " with strides ", x.strides(), ")");
  check_contiguous(w, op, "weight");
}

int64_t ldx_of(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.size(1); }

// Plain loops (float64): the same products, one token at a time.
template <typename T>
void fwd_loops(const T* x, int64_t ldx, const T* w, const T* b, T* out, int64_t t0, int64_t t1, int64_t d, int64_t E) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t e = 0; e < E; ++e) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += x[t * ldx + k] * w[e * d + k];
      out[t * E + e] = b ? s + b[e] : s;
    }
}

template <typename T>
void bwd_loops(const T* g, const T* x, int64_t ldx, const T* w, T* dx, bool acc, T* dw, int64_t t0, int64_t t1,
               int64_t d, int64_t E) {
  if (dw) std::fill(dw, dw + E * d, T(0));
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t k = 0; dx && k < d; ++k) {
      T s = acc ? dx[t * d + k] : T(0);
      for (int64_t e = 0; e < E; ++e) s += g[t * E + e] * w[e * d + k];
      dx[t * d + k] = s;
    }
    for (int64_t e = 0; dw && e < E; ++e)
      for (int64_t k = 0; k < d; ++k) dw[e * d + k] += g[t * E + e] * x[t * ldx + k];
  }
}

void fwd_any(const float* x, int64_t ldx, const float* w, const float* b, float* out, int64_t t0, int64_t t1,
             int64_t d, int64_t E) {
  router_fwd_f32(small_gemm_active(), x, ldx, w, b, out, t0, t1, d, E);
}
void fwd_any(const double* x, int64_t ldx, const double* w, const double* b, double* out, int64_t t0, int64_t t1,
             int64_t d, int64_t E) {
  fwd_loops(x, ldx, w, b, out, t0, t1, d, E);
}
void bwd_any(const float* g, const float* x, int64_t ldx, const float* w, float* dx, bool acc, float* dw, int64_t t0,
             int64_t t1, int64_t d, int64_t E) {
  router_bwd_f32(small_gemm_active(), g, x, ldx, w, dx, acc, dw, t0, t1, d, E);
}
void bwd_any(const double* g, const double* x, int64_t ldx, const double* w, double* dx, bool acc, double* dw,
             int64_t t0, int64_t t1, int64_t d, int64_t E) {
  bwd_loops(g, x, ldx, w, dx, acc, dw, t0, t1, d, E);
}

// Token blocks of the backward: at most 16, of a multiple of 8 tokens, at least 128 (fewer partial weight
// gradients to sum than threads would give on a large machine, and the same blocks on every machine).
int64_t bwd_block_rows(int64_t T) { return std::max<int64_t>(128, ((T + 15) / 16 + 7) / 8 * 8); }

}  // namespace

at::Tensor router_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "flanmoe::router_linear";
  check_router_args(x, weight, op);
  const int64_t T = x.size(0), d = x.size(1), E = weight.size(0);
  if (bias.has_value()) {
    FLANMOE_CHECK(bias->dim() == 1 && bias->size(0) == E, op, ": bias must be [num_experts] = [", E,
                  "] (the rows of weight; got shape ", shape_str(*bias), ")");
    FLANMOE_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (x is ",
                  x.scalar_type(), ", bias is ", bias->scalar_type(), ")");
    check_same_device(*bias, x, op, "bias", "x");
  }
  auto out = make_output(op, "the output [rows of x, rows of weight]", {T, E}, x.scalar_type(),
                         [&] { return at::empty({T, E}, x.options()); });
  if (T == 0 || E == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flanmoe_router_linear", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int64_t ldx = ldx_of(x);
    at::parallel_for(0, T, std::max<int64_t>(16, 65536 / std::max<int64_t>(d * E, 1)), [&](int64_t t0, int64_t t1) {
      fwd_any(xp, ldx, wp, bp, op_, t0, t1, d, E);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& dx_acc,
    bool need_dx, bool need_dweight, bool need_dbias) {
  const char* op = "flanmoe::router_linear_backward";
  check_router_args(x, weight, op);
  const int64_t T = x.size(0), d = x.size(1), E = weight.size(0);
  check_rank(grad, 2, op, "grad");
  FLANMOE_CHECK(grad.size(0) == T && grad.size(1) == E, op, ": grad must be [rows of x, rows of weight] = [", T, ", ",
                E, "] (got shape ", shape_str(grad), ")");
  FLANMOE_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have the dtype of x (x is ", x.scalar_type(),
                ", grad is ", grad.scalar_type(), ")");
  check_same_device(grad, x, op, "grad", "x");
  const bool acc = dx_acc.has_value() && need_dx;
  if (acc) {
    FLANMOE_CHECK(dx_acc->sizes() == x.sizes() && dx_acc->is_contiguous(), op,
                  ": dx_acc must be a contiguous tensor of the shape of x ", shape_str(x), " (got shape ",
                  shape_str(*dx_acc), ", contiguous ", dx_acc->is_contiguous(), ")");
    FLANMOE_CHECK(dx_acc->scalar_type() == x.scalar_type(), op, ": dx_acc must have the dtype of x (x is ",
                  x.scalar_type(), ", dx_acc is ", dx_acc->scalar_type(), ")");
    check_same_device(*dx_acc, x, op, "dx_acc", "x");
  }
  const at::Tensor g = grad.contiguous();
  auto none = [&] { return at::empty({0}, x.options()); };  // a gradient not asked for, or added into dx_acc
  at::Tensor dx = none(), dw = none(), db = need_dbias ? g.sum(0) : none();   // (three tensors: outputs never alias)
  if (need_dx && !acc) dx = make_output(op, "dx [rows of x, columns of x]", {T, d}, x.scalar_type(),
                                        [&] { return empty_large({T, d}, x.options()); });
  if (need_dweight) dw = at::empty({E, d}, x.options());
  if (!need_dx && !need_dweight) return {dx, dw, db};
  if (T == 0 || d == 0 || E == 0) {
    if (need_dx && !acc) dx.zero_();
    if (need_dweight) dw.zero_();
    return {dx, dw, db};
  }
  const int64_t rows = bwd_block_rows(T), nblk = (T + rows - 1) / rows;
  at::Tensor part;
  if (need_dweight && nblk > 1) part = at::empty({nblk, E, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flanmoe_router_linear_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* dxp = acc ? dx_acc->data_ptr<scalar_t>() : need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* pp = !need_dweight ? nullptr : nblk > 1 ? part.data_ptr<scalar_t>() : dw.data_ptr<scalar_t>();
    const int64_t ldx = ldx_of(x);
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk)
        bwd_any(gp, xp, ldx, wp, dxp, acc, pp ? pp + blk * E * d : nullptr, blk * rows, std::min(T, (blk + 1) * rows),
                d, E);
    });
    if (!need_dweight || nblk == 1) return;
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    const int64_t n = E * d;
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {     // the partials summed in block order
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t s = pp[i];
        for (int64_t blk = 1; blk < nblk; ++blk) s += pp[blk * n + i];
        dwp[i] = s;
      }
    });
  });
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("router_linear", &router_linear_cpu);
  m.impl("router_linear_backward", &router_linear_backward_cpu);
}

}  // namespace flanmoe
