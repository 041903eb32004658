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
// checks that none is negative and that they sum to n. On CUDA that check would synchronise the host,
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
    FLANMOE_CHECK(total == n, op, ": group_sizes must sum to the number of rows of a (sum = ", total,
                  ", rows = ", n, ")");
  }
}

}  // namespace flanmoe
