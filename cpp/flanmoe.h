// Shared helpers for the flanmoe_nb compiled core: argument validation with messages that name the
// argument and the offending value. Every op validates its inputs before touching memory: values that are
// summed (group sizes) are checked against what is left before each addition (never a wrapped int64 sum),
// indices against their range before they offset a pointer, and a size that comes from an argument (num_tokens,
// num_experts, an output shape from the operands' dims) is checked to fit int64 before anything is allocated
// for it; an allocation that still fails names the argument (`make_output`, `allocating`).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <algorithm>
#include <cstdint>
#include <new>
#include <sstream>
#include <stdexcept>
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

// Runs `make`, an allocation whose size comes from the arguments (an output, a contiguous copy of an input, a
// working array), and turns an allocator failure into an error that names `what` (the argument it comes from)
// instead of the allocator's bare message. CUDA out-of-memory stays a torch.OutOfMemoryError.
template <typename F>
auto allocating(const char* op, const std::string& what, F&& make) -> decltype(make()) {
  std::string why;
  bool oom = false;
  try {
    return make();
  } catch (const c10::OutOfMemoryError& e) {
    why = e.what_without_backtrace();
    oom = true;
  } catch (const c10::Error& e) {
    why = e.what_without_backtrace();
  } catch (const std::bad_alloc&) {
    why = "out of host memory (std::bad_alloc)";
  } catch (const std::length_error& e) {
    why = e.what();
  }
  std::ostringstream msg;
  msg << op << ": cannot allocate " << what << ": " << why;
  if (oom) C10_THROW_ERROR(OutOfMemoryError, msg.str());
  C10_THROW_ERROR(Error, msg.str());
}

// A tensor of `sizes` elements of `itemsize` bytes must be addressable: the running product of the sizes (as
// ATen computes it, so an overflow counts even before a 0) and the byte count fit in int64. `what` names it.
inline void check_size_fits(at::IntArrayRef sizes, int64_t itemsize, const char* op, const std::string& what) {
  uint64_t prod = 1, bytes = 0;
  bool over = false;
  for (auto s : sizes) {
    FLANMOE_CHECK(s >= 0, op, ": ", what, " would have a negative size (shape ", sizes, ")");
    over |= __builtin_mul_overflow(prod, static_cast<uint64_t>(s), &prod);
  }
  over |= __builtin_mul_overflow(prod, static_cast<uint64_t>(itemsize), &bytes);
  FLANMOE_CHECK(!over && bytes <= static_cast<uint64_t>(INT64_MAX), op, ": ", what, " would have shape ", sizes,
                ": more bytes than int64 can count");
}

// An output (or working copy) of `sizes` whose size comes from the arguments: checked to fit (check_size_fits),
// then made by `make` under `allocating`. `what` says which arguments give its shape, e.g.
// "the output [num_tokens, columns of y]".
template <typename F>
at::Tensor make_output(const char* op, const std::string& what, at::IntArrayRef sizes, at::ScalarType dtype,
                       F&& make) {
  check_size_fits(sizes, static_cast<int64_t>(c10::elementSize(dtype)), op, what);
  std::ostringstream desc;
  desc << what << " = " << sizes;
  return allocating(op, desc.str(), std::forward<F>(make));
}

// t.contiguous(), where t may be a huge stride-0 expansion: a failed copy names the argument.
inline at::Tensor contiguous_arg(const at::Tensor& t, const char* op, const char* name) {
  if (t.is_contiguous()) return t;
  return make_output(op, std::string("a contiguous copy of ") + name, t.sizes(), t.scalar_type(),
                     [&] { return t.contiguous(); });
}

// Validates group_sizes for a grouped op over the `n` rows of `an` and the `g` groups of `bn`. On CPU it reads
// the sizes and checks that none is negative and that they sum to at most n (rows past the sum are padding:
// grouped_mm writes zeros there, grouped_mm_wgrad ignores them); each size is compared with the rows still left
// before it is added, so no int64 sum can wrap (e.g. four sizes of 2**62 "summing" to 0). On CUDA that check
// would synchronise the host, so it is left to the device kernels (which clamp to the buffer, in the same
// overflow-free way, and never read or write out of bounds).
inline void check_group_sizes(const at::Tensor& group_sizes, int64_t n, int64_t g, const char* op,
                              const char* an = "a", const char* bn = "b") {
  check_rank(group_sizes, 1, op, "group_sizes");
  check_int64(group_sizes, op, "group_sizes");
  FLANMOE_CHECK(group_sizes.size(0) == g, op, ": group_sizes must have one entry per group (", g, " groups in ", bn,
                ") but has ", group_sizes.size(0), " entries");
  FLANMOE_CHECK(group_sizes.is_cpu() || group_sizes.is_cuda(), op, ": group_sizes must be on the CPU or a CUDA device (got ",
                group_sizes.device(), ")");
  if (group_sizes.is_cpu()) {
    auto gs = contiguous_arg(group_sizes, op, "group_sizes");
    const int64_t* p = gs.const_data_ptr<int64_t>();
    int64_t left = n;
    for (int64_t i = 0; i < g; ++i) {
      FLANMOE_CHECK(p[i] >= 0, op, ": group_sizes must be non-negative (group_sizes[", i, "] = ", p[i], ")");
      if (p[i] > left) {
        if (i == 0)
          FLANMOE_CHECK(false, op, ": group_sizes[0] = ", p[0], " exceeds the ", n, " rows of ", an,
                        " (group_sizes must sum to at most the rows of ", an, "; rows past the sum are padding)");
        FLANMOE_CHECK(false, op, ": group_sizes[", i, "] = ", p[i], " exceeds the ", left, " rows of ", an,
                      " left after groups 0..", i - 1, " (", an, " has ", n, " rows; group_sizes must sum to at most ",
                      "that, rows past the sum are padding)");
      }
      left -= p[i];
    }
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
  // The kernels bucket assignments into num_experts + 1 buckets (the last: invalid tokens) and the CUDA one sorts by
  // the key bucket * T*k + rank: (num_experts + 2) and (num_experts + 1) * T*k must fit int64.
  {
    const int64_t A = expert_idx.size(0) * expert_idx.size(1);   // (expert_idx exists: no overflow)
    int64_t e2 = 0, span = 0;
    FLANMOE_CHECK(!__builtin_add_overflow(num_experts, int64_t(2), &e2) &&
                      !__builtin_mul_overflow(num_experts + 1, std::max<int64_t>(A, 1), &span),
                  op, ": num_experts=", num_experts, " is too large: (num_experts + 1) * ", A,
                  " assignments (the sort keys) overflow int64");
  }
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
    FLANMOE_CHECK(v.dim() == 1 && v.size(0) == expert_idx.size(0), op, ": valid must have shape [rows of expert_idx] = [",
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

// The router's projection and the tokens it passes on, joined for the backward (autograd.cpp):
// (router_linear(x, weight, bias), x as a view). The experts read the view; the router's backward then receives the
// gradient of both outputs and adds its own share of x's gradient into the experts' in place, instead of autograd
// summing two [T, d] gradients in a pass of their own.
std::tuple<at::Tensor, at::Tensor> router_join(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias);

}  // namespace flanmoe
