// CPU grouped GEMM: one call runs every expert's matrix product over its contiguous row block.
// Each group's product goes to the register-tiled fp32 kernels of sgemm_small.cpp (AVX-512 or AVX2, whichever
// is active), bf16 ones to oneDNN's brgemm ukernel (grouped_mm_bf16_cpu.cpp), the own AVX512-BF16 kernels
// (grouped_mm_bf16_dp.cpp) or BLAS, per product as chosen (FLANMOE_BF16_GEMM forces one), and
// the rest to ATen's BLAS (MKL / oneDNN via at::mm_out).
// Work is cut into items (a group's row block, or for weight gradients a group's column block) of at
// most ~1/threads of the total, scheduled longest-first over the intra-op threads (at::parallel_for);
// every GEMM runs single-threaded inside the parallel region, so small experts never pay for a BLAS
// thread barrier, and one huge expert is still shared by all threads.
// relu_grouped_mm (+ its backward) are the same products with the relu folded into them: applied to A as the
// NN / TN kernels (and the bf16 ukernel path) copy it, and as a mask on the NT kernel's output or the ukernel's
// fp32 block (BLAS: a pass around the call instead).
#include "flanmoe.h"
#include "cpu_cache.h"
#include "sgemm_small.h"
#include "work_items.h"
#include "grouped_mm_bf16.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace flanmoe {
namespace {

// relu(a) for the BLAS path, in a block of the host cache (no page faults per call for large items).
at::Tensor relu_copy(const at::Tensor& a) {
  auto r = empty_large(a.sizes(), a.options());
  return at::clamp_min_out(r, a, 0);
}

// o = 0 wherever m <= 0 over n contiguous elements (NaN in m passes, as torch's threshold_backward): one pass,
// no boolean mask tensor.
void zero_where_nonpos(at::Tensor& o, const at::Tensor& m) {
  const int64_t n = o.numel();
  if (o.scalar_type() == at::kBFloat16) {           // on the bit patterns: integer compares, which vectorise
    auto* op = reinterpret_cast<uint16_t*>(o.data_ptr<at::BFloat16>());
    const auto* mp = reinterpret_cast<const uint16_t*>(m.const_data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < n; ++i) op[i] = bf16_nonpos(mp[i]) ? uint16_t(0) : op[i];
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, o.scalar_type(), "zero_where_nonpos", [&] {
    scalar_t* op = o.data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t zero(0);
    for (int64_t i = 0; i < n; ++i) op[i] = mp[i] <= zero ? zero : op[i];
  });
}

}  // namespace

// out = op(a) @ b[g] (b[g]^T with trans_b) per group, op = relu with relu_a; then, with a mask [N, M], out = 0
// wherever mask <= 0 (the input gradient through a relu of `mask`, as torch's threshold_backward: NaN passes).
at::Tensor gmm_cpu(const char* op, const char* an, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& group_sizes, bool trans_b, bool relu_a, const at::Tensor* mask) {
  check_rank(b, 3, op, "b");
  check_gmm_operands(a, b, op, "b", an);
  const int64_t N = a.size(0), K = a.size(1), G = b.size(0);
  const int64_t bK = trans_b ? b.size(2) : b.size(1);
  const int64_t M = trans_b ? b.size(1) : b.size(2);
  FLANMOE_CHECK(bK == K, op, ": inner dimensions differ: ", an, " is ", shape_str(a), ", b is ", shape_str(b),
                trans_b ? " (trans_b=True: b must be [G, M, K])" : " (trans_b=False: b must be [G, K, M])");
  check_same_device(group_sizes, a, op, "group_sizes", an);
  check_group_sizes(group_sizes, N, G, op, an, "b");
  if (mask) {
    check_gmm_operands(*mask, a, op, an, "h");
    FLANMOE_CHECK(mask->size(0) == N && mask->size(1) == M, op, ": h must be [rows of ", an, ", b.shape[1]] = [", N,
                  ", ", M, "] (got ", shape_str(*mask), ")");
  }

  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = make_output(op, std::string("the output [rows of ") + an + ", " + (trans_b ? "b.shape[1]" : "b.shape[2]") + "]",
                         {N, M}, a.scalar_type(), [&] { return empty_large({N, M}, a.options()); });
  if (N == 0 || M == 0) return out;
  if (K == 0) return out.zero_();
  const auto off = group_offsets(group_sizes);
  if (off[G] < N) out.narrow(0, off[G], N - off[G]).zero_();     // padding rows past the groups
  if (a.scalar_type() == at::kBFloat16 && K % 2 == 0) {   // bf16 pairs along the depth: the matrix-engine paths
    const Bf16Path path = bf16_gemm_path(trans_b ? GemmProduct::nt : GemmProduct::nn, b.size(1) > b.size(2));
    if (path == Bf16Path::brgemm) { gmm_bf16_brgemm(a, b, off, trans_b, out, relu_a, mask); return out; }
    if (path == Bf16Path::dp) { gmm_bf16_dp(a, b, off, trans_b, out, relu_a, mask); return out; }
  }
  std::vector<int64_t> rows(G);
  for (int64_t g = 0; g < G; ++g) rows[g] = off[g + 1] - off[g];
  auto items = make_items(rows, std::vector<double>(G, double(K) * M), at::get_num_threads());
  const SmallGemmIsa isa = a.scalar_type() == at::kFloat ? expert_gemm_active(trans_b ? GemmProduct::nt : GemmProduct::nn,
                                                                             b.size(1) > b.size(2))   // a tall weight [f, d]
                                                          : SmallGemmIsa::none;
  run_items(std::move(items), 2.0 * N * K * M, [&](const Item& it) {
    if (it.hi == it.lo) return;
    const int64_t r0 = off[it.g] + it.lo, n = it.hi - it.lo;
    // (relu_a with trans_b, or a mask without it, never comes from the ops below: BLAS with a pass around it)
    if (isa != SmallGemmIsa::none && (trans_b ? !relu_a : !mask)) {
      const float* A = a.const_data_ptr<float>() + r0 * K;
      const float* B = b.const_data_ptr<float>() + it.g * K * M;
      float* C = out.data_ptr<float>() + r0 * M;
      if (trans_b) sgemm_small_nt(isa, n, M, K, A, K, B, K, C, M, mask ? mask->const_data_ptr<float>() + r0 * M : nullptr, M);
      else sgemm_small_nn(isa, n, M, K, A, K, B, M, C, M, relu_a);
      return;
    }
    auto bg = trans_b ? b.select(0, it.g).t() : b.select(0, it.g);
    auto o = out.narrow(0, r0, n);
    auto ag = a.narrow(0, r0, n);
    at::mm_out(o, relu_a ? relu_copy(ag) : ag, bg);
    if (mask) zero_where_nonpos(o, mask->narrow(0, r0, n));
  });
  return out;
}

// out[g] = op(a_g)^T dy_g, op = relu with relu_a.
at::Tensor wgrad_cpu(const char* op, const char* an, const at::Tensor& a, const at::Tensor& dy,
                     const at::Tensor& group_sizes, bool relu_a) {
  check_rank(dy, 2, op, "dy");
  check_gmm_operands(a, dy, op, "dy", an);
  FLANMOE_CHECK(dy.size(0) == a.size(0), op, ": ", an, " and dy must have the same number of rows (", an, " is ",
                shape_str(a), ", dy is ", shape_str(dy), ")");
  const int64_t N = a.size(0), K = a.size(1), M = dy.size(1);
  check_rank(group_sizes, 1, op, "group_sizes");
  check_same_device(group_sizes, a, op, "group_sizes", an);
  const int64_t G = group_sizes.size(0);
  check_group_sizes(group_sizes, N, G, op, an, "group_sizes");

  at::AutoDispatchBelowADInplaceOrView guard;
  const std::string what = std::string("the output [entries of group_sizes, columns of ") + an + ", columns of dy]";
  if (N == 0 || K == 0 || M == 0)
    return make_output(op, what, {G, K, M}, a.scalar_type(), [&] { return at::zeros({G, K, M}, a.options()); });
  auto out = make_output(op, what, {G, K, M}, a.scalar_type(), [&] { return empty_large({G, K, M}, a.options()); });
  const auto off = group_offsets(group_sizes);
  if (a.scalar_type() == at::kBFloat16) {                   // (the depth, a group's rows, is padded to pairs)
    const Bf16Path path = bf16_gemm_path(GemmProduct::tn, K > M);
    if (path == Bf16Path::brgemm) { wgrad_bf16_brgemm(a, dy, off, out, relu_a); return out; }
    if (path == Bf16Path::dp) { wgrad_bf16_dp(a, dy, off, out, relu_a); return out; }
  }
  // Items split the output columns of a group; groups with no rows get a zero gradient.
  std::vector<int64_t> cols(G);
  std::vector<double> work(G);
  for (int64_t g = 0; g < G; ++g) { cols[g] = M; work[g] = double(K) * std::max<int64_t>(off[g + 1] - off[g], 1); }
  auto items = make_items(cols, work, at::get_num_threads());
  const SmallGemmIsa isa = a.scalar_type() == at::kFloat ? expert_gemm_active(GemmProduct::tn, K > M) : SmallGemmIsa::none;
  const bool stream = isa != SmallGemmIsa::none && gemm_stream_pays(G * K * M * int64_t(sizeof(float)));
  run_items(std::move(items), 2.0 * N * K * M, [&](const Item& it) {
    const int64_t n = off[it.g + 1] - off[it.g];
    if (isa != SmallGemmIsa::none && it.hi > it.lo) {  // out[g][:, lo:hi] = a_g^T @ dy_g[:, lo:hi]
      sgemm_small_tn(isa, n, K, it.hi - it.lo, a.const_data_ptr<float>() + off[it.g] * K, K,
                     dy.const_data_ptr<float>() + off[it.g] * M + it.lo, M,
                     out.data_ptr<float>() + it.g * K * M + it.lo, M, relu_a, stream);
      return;
    }
    auto o = out.select(0, it.g).narrow(1, it.lo, it.hi - it.lo);
    if (n == 0) { o.zero_(); return; }
    auto ag = a.narrow(0, off[it.g], n);
    at::mm_out(o, (relu_a ? relu_copy(ag) : ag).t(), dy.narrow(0, off[it.g], n).narrow(1, it.lo, it.hi - it.lo));
  });
  return out;
}

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b) {
  return gmm_cpu("flanmoe::grouped_mm", "a", a, b, group_sizes, trans_b, false, nullptr);
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& group_sizes) {
  return wgrad_cpu("flanmoe::grouped_mm_wgrad", "a", a, dy, group_sizes, false);
}

// relu(h) @ b[g]: the second GEMM of a relu expert FFN, with the relu applied as h is read (no pass of its own).
at::Tensor relu_grouped_mm_cpu(const at::Tensor& h, const at::Tensor& b, const at::Tensor& group_sizes) {
  return gmm_cpu("flanmoe::relu_grouped_mm", "h", h, b, group_sizes, false, true, nullptr);
}

// Its backward: dh = (dy @ b[g]^T), 0 where h <= 0; db = relu(h)^T dy per group; each only if asked for.
std::tuple<at::Tensor, at::Tensor> relu_grouped_mm_backward_cpu(const at::Tensor& dy, const at::Tensor& h,
                                                                const at::Tensor& b, const at::Tensor& group_sizes,
                                                                bool need_dh, bool need_db) {
  const char* op = "flanmoe::relu_grouped_mm_backward";
  at::Tensor dh, db;
  if (need_dh) dh = gmm_cpu(op, "dy", dy, b, group_sizes, true, false, &h);
  if (need_db) db = wgrad_cpu(op, "h", h, dy, group_sizes, true);
  return {dh.defined() ? dh : at::empty({0}, h.options()), db.defined() ? db : at::empty({0}, h.options())};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu);
  m.impl("relu_grouped_mm", &relu_grouped_mm_cpu);
  m.impl("relu_grouped_mm_backward", &relu_grouped_mm_backward_cpu);
}

}  // namespace flanmoe
