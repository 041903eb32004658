// Shared helpers for the flanmoe_nb compiled core: argument validation with messages that name the
// argument and the offending value. Every op validates its inputs before touching memory.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <sstream>
#include <string>

namespace flanmoe {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s; s << t.sizes(); return s.str();
}

#define FLANMOE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline void check_rank(const at::Tensor& t, int64_t rank, const char* op, const char* name) {
  FLANMOE_CHECK(t.dim() == rank, op, ": ", name, " must be a ", rank, "-D tensor (got shape ",
                shape_str(t), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  FLANMOE_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got shape ", shape_str(t),
                " with strides ", t.strides(), "); call .contiguous() first");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  FLANMOE_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                ref_name, " is on ", ref.device(), "; move them to the same device");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto d = t.scalar_type();
  bool ok = d == at::kFloat || d == at::kBFloat16 || d == at::kDouble ||
            (d == at::kHalf && t.is_cuda());
  FLANMOE_CHECK(ok, op, ": ", name, " must be float32, bfloat16 or float64 (float16 on CUDA only); got ",
                d, " on ", t.device());
}

inline void check_int64(const at::Tensor& t, const char* op, const char* name) {
  FLANMOE_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64 (got ", t.scalar_type(), ")");
}

// Validates group_sizes for a grouped op over `n` rows and `g` groups. On CPU it reads the sizes and
// checks that none is negative and that they sum to at most n (rows past the sum are padding: grouped_mm
// writes zeros there, grouped_mm_wgrad ignores them). On CUDA that check would synchronise the host,
// so it is left to the device kernels (which clamp to the buffer and never read or write out of bounds).
inline void check_group_sizes(const at::Tensor& group_sizes, int64_t n, int64_t g, const char* op) {
  check_rank(group_sizes, 1, op, "group_sizes");
  check_int64(group_sizes, op, "group_sizes");
  FLANMOE_CHECK(group_sizes.size(0) == g, op, ": group_sizes must have one entry per group (", g,
                " groups in b) but has ", group_sizes.size(0), " entries");
  if (group_sizes.is_cpu()) {
    auto gs = group_sizes.contiguous();
    const int64_t* p = gs.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t i = 0; i < g; ++i) {
      FLANMOE_CHECK(p[i] >= 0, op, ": group_sizes must be non-negative (group_sizes[", i, "] = ", p[i], ")");
      total += p[i];
    }
    FLANMOE_CHECK(total <= n, op, ": group_sizes must sum to at most the number of rows of a (sum = ", total,
                  ", rows = ", n, "); rows past the sum are padding");
  }
}

inline void check_device_of(const at::Tensor& t, const char* op, const char* name, bool want_cuda) {
  FLANMOE_CHECK(t.is_cuda() == want_cuda && (want_cuda || t.is_cpu()), op, ": ", name, " must be on ",
                want_cuda ? "a CUDA device" : "the CPU", " for this kernel (got ", t.device(), ")");
}

// Arguments of route_plan (shared by the CPU and CUDA kernels; value checks of expert_idx are the kernels').
inline void check_route_plan_args(const at::Tensor& expert_idx, int64_t num_experts, std::optional<int64_t> capacity,
                                  const std::optional<at::Tensor>& priority, const std::optional<at::Tensor>& valid,
                                  const char* op) {
  check_rank(expert_idx, 2, op, "expert_idx");
  check_int64(expert_idx, op, "expert_idx");
  check_contiguous(expert_idx, op, "expert_idx");
  FLANMOE_CHECK(num_experts >= 1, op, ": num_experts must be >= 1 (got num_experts=", num_experts, ")");
  FLANMOE_CHECK(!capacity.has_value() || *capacity >= 0, op, ": capacity must be >= 0 or None (got capacity=",
                capacity.value_or(0), ")");
  if (priority.has_value()) {
    const auto& p = *priority;
    FLANMOE_CHECK(p.sizes() == expert_idx.sizes(), op, ": priority must have the shape of expert_idx ",
                  shape_str(expert_idx), " (got ", shape_str(p), ")");
    FLANMOE_CHECK(at::isFloatingType(p.scalar_type()), op, ": priority must be a floating tensor (got ",
                  p.scalar_type(), ")");
    check_same_device(p, expert_idx, op, "priority", "expert_idx");
  }
  if (valid.has_value()) {
    const auto& v = *valid;
    FLANMOE_CHECK(v.dim() == 1 && v.size(0) == expert_idx.size(0), op, ": valid must have shape [",
                  expert_idx.size(0), "] (one flag per token; got ", shape_str(v), ")");
    FLANMOE_CHECK(v.scalar_type() == at::kBool, op, ": valid must be bool (got ", v.scalar_type(), ")");
    check_same_device(v, expert_idx, op, "valid", "expert_idx");
    check_contiguous(v, op, "valid");
  }
}

// An index vector into the rows of a tensor with `rows` rows (values are checked by the kernels).
inline void check_index(const at::Tensor& idx, const at::Tensor& ref, const char* op, const char* name) {
  check_rank(idx, 1, op, name);
  check_int64(idx, op, name);
  check_contiguous(idx, op, name);
  check_same_device(idx, ref, op, name, "the data tensor");
}

// Optional per-row weights [n] with the dtype and device of `ref`.
inline void check_weights(const std::optional<at::Tensor>& w, int64_t n, const at::Tensor& ref, const char* op,
                          const char* ref_name) {
  if (!w.has_value()) return;
  check_rank(*w, 1, op, "weights");
  FLANMOE_CHECK(w->size(0) == n, op, ": weights must have one entry per row of token_idx (", n, ") but has ",
                w->size(0));
  FLANMOE_CHECK(w->scalar_type() == ref.scalar_type(), op, ": weights must have the dtype of ", ref_name, " (",
                ref.scalar_type(), "; got ", w->scalar_type(), ")");
  check_same_device(*w, ref, op, "weights", ref_name);
  check_contiguous(*w, op, "weights");
}

// Operands of grouped_mm / grouped_mm_wgrad: `a` [N, K] and the second operand `bn` (b or dy), same dtype,
// device, contiguous. Shared by the CPU and CUDA kernels.
// (`an`: the name of `a` in the op's schema.)
inline void check_gmm_operands(const at::Tensor& a, const at::Tensor& b, const char* op, const char* bn,
                               const char* an = "a") {
  check_rank(a, 2, op, an);
  check_float_dtype(a, op, an);
  FLANMOE_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", bn, " must have the dtype of ", an, " (", an, " is ",
                a.scalar_type(), ", ", bn, " is ", b.scalar_type(), ")");
  check_same_device(b, a, op, bn, an);
  check_contiguous(a, op, an);
  check_contiguous(b, op, bn);
}

// permute(x [T, d], token_idx [S], weights [S]?): shapes, dtypes, devices (index values: CPU kernel only).
inline void check_permute_args(const at::Tensor& x, const at::Tensor& token_idx,
                               const std::optional<at::Tensor>& weights, const char* op) {
  check_rank(x, 2, op, "x");
  check_float_dtype(x, op, "x");
  check_contiguous(x, op, "x");
  check_index(token_idx, x, op, "token_idx");
  check_weights(weights, token_idx.size(0), x, op, "x");
}

// unpermute(y [S, d], token_idx [S], weights [S]?, num_tokens >= 0).
inline void check_unpermute_args(const at::Tensor& y, const at::Tensor& token_idx,
                                 const std::optional<at::Tensor>& weights, int64_t num_tokens, const char* op) {
  check_rank(y, 2, op, "y");
  check_float_dtype(y, op, "y");
  check_contiguous(y, op, "y");
  check_index(token_idx, y, op, "token_idx");
  const int64_t S = token_idx.size(0);
  FLANMOE_CHECK(y.size(0) == S, op, ": y must have one row per entry of token_idx (", S, ") but has shape ",
                shape_str(y));
  FLANMOE_CHECK(num_tokens >= 0, op, ": num_tokens must be >= 0 (got num_tokens=", num_tokens, ")");
  check_weights(weights, S, y, op, "y");
}

// gather_dot(x [T, d], token_idx [S], y [S, d]): shapes, dtypes, devices (index values: CPU kernel only).
inline void check_gather_dot_args(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& y,
                                  const char* op) {
  check_rank(x, 2, op, "x");
  check_rank(y, 2, op, "y");
  check_float_dtype(x, op, "x");
  FLANMOE_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have the dtype of x (x is ", x.scalar_type(),
                ", y is ", y.scalar_type(), ")");
  check_same_device(y, x, op, "y", "x");
  check_contiguous(x, op, "x");
  check_contiguous(y, op, "y");
  check_index(token_idx, x, op, "token_idx");
  const int64_t S = token_idx.size(0), d = x.size(1);
  FLANMOE_CHECK(y.size(0) == S && y.size(1) == d, op, ": y must have shape [", S, ", ", d,
                "] (rows of token_idx, columns of x) but has shape ", shape_str(y));
}

}  // namespace flanmoe
