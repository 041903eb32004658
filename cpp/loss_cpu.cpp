// CPU flanmoe::cross_entropy / flanmoe::cross_entropy_backward: the mean token cross-entropy of logits [N, V]
// against target [N] (rows whose target is ignore_index count for nothing), as F.cross_entropy(reduction="mean").
// The forward keeps each row's logsumexp; the backward writes (softmax - onehot) * g / count in one pass per row,
// instead of log_softmax + nll_loss and their two backward kernels (and a zero-filled [N, V] gradient).
// float32 runs the vectorised rows of attention_kernels.cpp; float64 plain loops.
#include "flanmoe.h"
#include "attention_kernels.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace flanmoe {
namespace {

void check_ce_args(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, const char* op) {
  check_rank(logits, 2, op, "logits");
  FLANMOE_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
                ": logits must be float32 or float64 (got ", logits.scalar_type(), ")");
  check_device_of(logits, op, "logits", false);
  check_contiguous(logits, op, "logits");
  check_rank(target, 1, op, "target");
  check_int64(target, op, "target");
  check_contiguous(target, op, "target");
  check_same_device(target, logits, op, "target", "logits");
  FLANMOE_CHECK(target.size(0) == logits.size(0), op, ": target must have one entry per row of logits (logits is ",
                shape_str(logits), ", target is ", shape_str(target), ")");
  const int64_t V = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.size(0); ++i)
    FLANMOE_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < V), op, ": target must be in [0, ", V, ") (", V,
                  " = the columns of logits) or ignore_index=", ignore_index, " (got target[", i, "] = ", t[i], ")");
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

template <typename T>
T lse_loops(const T* x, int64_t V) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, x[j]);
  for (int64_t j = 0; j < V; ++j) if (std::isnan(x[j])) return x[j];
  T s = 0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(x[j] - mx);
  return mx + std::log(s);
}

// float: the vectorised rows; double: the loops
float lse_row(SmallGemmIsa isa, const float* x, int64_t V) { return row_logsumexp_f32(isa, x, V); }
double lse_row(SmallGemmIsa, const double* x, int64_t V) { return lse_loops(x, V); }
void grad_row(SmallGemmIsa isa, const float* x, int64_t V, float lse, int64_t t, float g, float* d) {
  row_ce_grad_f32(isa, x, V, lse, t, g, d);
}
void grad_row(SmallGemmIsa, const double* x, int64_t V, double lse, int64_t t, double g, double* d) {
  for (int64_t j = 0; j < V; ++j) d[j] = std::exp(x[j] - lse) * g;
  d[t] -= g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index) {
  const char* op = "flanmoe::cross_entropy";
  check_ce_args(logits, target, ignore_index, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto lse = at::empty({N}, logits.options());
  std::vector<double> row_loss(N, 0.0);
  const int64_t* t = target.data_ptr<int64_t>();
  const SmallGemmIsa isa = small_gemm_active();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "flanmoe_cross_entropy", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xi = x + i * V;
        l[i] = lse_row(isa, xi, V);
        if (t[i] != ignore_index) row_loss[i] = double(l[i]) - double(xi[t[i]]);
      }
    });
  });
  int64_t count = 0;
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i)
    if (t[i] != ignore_index) { ++count; total += row_loss[i]; }
  auto loss = at::full({}, count ? total / double(count) : std::numeric_limits<double>::quiet_NaN(), logits.options());
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& lse, int64_t ignore_index) {
  const char* op = "flanmoe::cross_entropy_backward";
  check_ce_args(logits, target, ignore_index, op);
  FLANMOE_CHECK(grad.numel() == 1, op, ": grad must be the scalar gradient of the loss (got ", shape_str(grad), ")");
  FLANMOE_CHECK(lse.dim() == 1 && lse.size(0) == logits.size(0) && lse.scalar_type() == logits.scalar_type(), op,
                ": lse must be the per-row logsumexp from cross_entropy: shape [rows of logits] = [", logits.size(0),
                "], the dtype of logits (", logits.scalar_type(), "); got ", shape_str(lse), " ", lse.scalar_type());
  check_same_device(lse, logits, op, "lse", "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* t = target.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < N; ++i) count += t[i] != ignore_index;
  auto dx = at::empty_like(logits);
  const SmallGemmIsa isa = small_gemm_active();
  const auto l = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "flanmoe_cross_entropy_backward", [&] {
    const scalar_t g = count ? scalar_t(grad.item<double>() / double(count)) : scalar_t(0);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const scalar_t* lp = l.data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* di = d + i * V;
        if (t[i] == ignore_index) { std::fill(di, di + V, scalar_t(0)); continue; }
        const scalar_t* xi = x + i * V;
        grad_row(isa, xi, V, lp[i], t[i], g, di);
      }
    });
  });
  return dx;
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace flanmoe
