// CPU grouped GEMM: one call runs every expert's matrix product over its contiguous row block.
// Each group's product goes to ATen's BLAS (MKL / oneDNN via at::mm_out), never a naive loop.
// Many small groups run in parallel (one single-threaded GEMM per group, OpenMP through
// at::parallel_for); few large groups run one after another, each GEMM using every thread.
#include "flanmoe.h"
#include <ATen/Parallel.h>
#include <vector>

namespace flanmoe {
namespace {

std::vector<int64_t> group_offsets(const at::Tensor& group_sizes) {
  auto gs = group_sizes.to(at::kCPU).contiguous();
  const int64_t* p = gs.data_ptr<int64_t>();
  std::vector<int64_t> off(gs.numel() + 1, 0);
  for (int64_t i = 0; i < gs.numel(); ++i) off[i + 1] = off[i] + p[i];
  return off;
}

// Run body(g) for every non-empty group, in parallel over groups when they are small.
template <typename F>
void for_each_group(const std::vector<int64_t>& off, int64_t work_per_row, F body) {
  const int64_t G = static_cast<int64_t>(off.size()) - 1;
  std::vector<int64_t> nonempty;
  nonempty.reserve(G);
  for (int64_t g = 0; g < G; ++g) if (off[g + 1] > off[g]) nonempty.push_back(g);
  const int64_t n = static_cast<int64_t>(nonempty.size());
  if (n == 0) return;
  const int64_t rows = off[G];
  const int64_t avg_rows = rows / n;
  const bool per_group_parallel = n >= 2 * at::get_num_threads() && avg_rows * work_per_row < (int64_t(1) << 22);
  if (per_group_parallel) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) body(nonempty[i]);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) body(nonempty[i]);
  }
}

}  // namespace

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b) {
  const char* op = "flanmoe::grouped_mm";
  check_rank(a, 2, op, "a");
  check_rank(b, 3, op, "b");
  check_float_dtype(a, op, "a");
  FLANMOE_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have the dtype of a (a is ",
                a.scalar_type(), ", b is ", b.scalar_type(), ")");
  check_same_device(b, a, op, "b", "a");
  check_contiguous(a, op, "a");
  check_contiguous(b, op, "b");
  const int64_t N = a.size(0), K = a.size(1), G = b.size(0);
  const int64_t bK = trans_b ? b.size(2) : b.size(1);
  const int64_t M = trans_b ? b.size(1) : b.size(2);
  FLANMOE_CHECK(bK == K, op, ": inner dimensions differ: a is ", shape_str(a), ", b is ", shape_str(b),
                trans_b ? " (trans_b=True: b must be [G, M, K])" : " (b must be [G, K, M])");
  check_group_sizes(group_sizes, N, G, op);

  auto out = at::empty({N, M}, a.options());
  if (N == 0 || M == 0) return out;
  if (K == 0) return out.zero_();
  const auto off = group_offsets(group_sizes);
  for_each_group(off, K * M, [&](int64_t g) {
    auto bg = trans_b ? b.select(0, g).t() : b.select(0, g);
    auto o = out.narrow(0, off[g], off[g + 1] - off[g]);
    at::mm_out(o, a.narrow(0, off[g], off[g + 1] - off[g]), bg);
  });
  return out;
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& group_sizes) {
  const char* op = "flanmoe::grouped_mm_wgrad";
  check_rank(a, 2, op, "a");
  check_rank(dy, 2, op, "dy");
  check_float_dtype(a, op, "a");
  FLANMOE_CHECK(dy.scalar_type() == a.scalar_type(), op, ": dy must have the dtype of a (a is ",
                a.scalar_type(), ", dy is ", dy.scalar_type(), ")");
  check_same_device(dy, a, op, "dy", "a");
  check_contiguous(a, op, "a");
  check_contiguous(dy, op, "dy");
  FLANMOE_CHECK(dy.size(0) == a.size(0), op, ": a and dy must have the same number of rows (a is ",
                shape_str(a), ", dy is ", shape_str(dy), ")");
  const int64_t N = a.size(0), K = a.size(1), M = dy.size(1);
  check_rank(group_sizes, 1, op, "group_sizes");
  const int64_t G = group_sizes.size(0);
  check_group_sizes(group_sizes, N, G, op);

  // Groups with no rows get a zero gradient.
  auto out = at::zeros({G, K, M}, a.options());
  if (N == 0 || K == 0 || M == 0) return out;
  const auto off = group_offsets(group_sizes);
  for_each_group(off, K * M, [&](int64_t g) {
    const int64_t n = off[g + 1] - off[g];
    auto o = out.select(0, g);
    at::mm_out(o, a.narrow(0, off[g], n).t(), dy.narrow(0, off[g], n));
  });
  return out;
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
}

}  // namespace flanmoe
