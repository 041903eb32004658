// CUDA kernels of the flanmoe ops (fp32 / bf16 / fp16, and fp64 for gradcheck).
// No host synchronisation anywhere: group sizes, offsets and counts stay on the device. Values that
// the CPU kernels reject (expert or token indices out of range, group sizes that sum to more than the
// rows) cannot be checked here without a sync; the kernels clamp instead and never read or write out
// of bounds: an out-of-range expert index is treated like an invalid token (never kept), an
// out-of-range token index reads zeros / is skipped, group offsets are clamped to the buffer.
#include "flanmoe.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

namespace flanmoe {
namespace {

constexpr int kThreads = 256;
inline int64_t blocks_for(int64_t n, int64_t per = kThreads) { return std::max<int64_t>(1, (n + per - 1) / per); }

// ------------------------------------------------------------------ group offsets (device)
// off[0] = 0, off[g+1] = min(off[g] + max(gs[g], 0), n): clamped prefix sums, one thread (G is small).
__global__ void offsets_kernel(const int64_t* gs, int64_t G, int64_t n, int64_t* off) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t acc = 0;
  off[0] = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t v = gs[g] > 0 ? gs[g] : 0;
    acc = acc + v < n ? acc + v : n;
    off[g + 1] = acc;
  }
}

at::Tensor device_offsets(const at::Tensor& group_sizes, int64_t n) {
  auto gs = group_sizes.contiguous();
  auto off = at::empty({gs.numel() + 1}, gs.options());
  offsets_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(gs.data_ptr<int64_t>(), gs.numel(), n,
                                                                 off.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return off;
}

// ------------------------------------------------------------------ tiled GEMM on one group
// C[i, j] = sum_k A(i, k) * B(k, j) for a BM x BN tile, A and B given by (row stride, column stride).
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;   // 256 threads, 4x4 outputs each

template <typename scalar_t>
__device__ void gemm_tile(const scalar_t* A, int64_t a_rs, int64_t a_cs, const scalar_t* B, int64_t b_rs,
                          int64_t b_cs, scalar_t* C, int64_t c_rs, int64_t m, int64_t n, int64_t kdim,
                          int64_t i0, int64_t j0) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t As[BK][BM];
  __shared__ acc_t Bs[BK][BN];
  const int tid = threadIdx.x;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);
  acc_t acc[TM][TN];
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TN; ++b) acc[a][b] = acc_t(0);
  for (int64_t k0 = 0; k0 < kdim; k0 += BK) {
    for (int e = tid; e < BK * BM; e += blockDim.x) {
      const int kk = e / BM, ii = e % BM;
      const int64_t i = i0 + ii, k = k0 + kk;
      As[kk][ii] = (i < m && k < kdim) ? static_cast<acc_t>(A[i * a_rs + k * a_cs]) : acc_t(0);
    }
    for (int e = tid; e < BK * BN; e += blockDim.x) {
      const int kk = e / BN, jj = e % BN;
      const int64_t j = j0 + jj, k = k0 + kk;
      Bs[kk][jj] = (j < n && k < kdim) ? static_cast<acc_t>(B[k * b_rs + j * b_cs]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[TM], bv[TN];
#pragma unroll
      for (int a = 0; a < TM; ++a) av[a] = As[kk][ty * TM + a];
#pragma unroll
      for (int b = 0; b < TN; ++b) bv[b] = Bs[kk][tx * TN + b];
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < TM; ++a) {
    const int64_t i = i0 + ty * TM + a;
    if (i >= m) continue;
#pragma unroll
    for (int b = 0; b < TN; ++b) {
      const int64_t j = j0 + tx * TN + b;
      if (j < n) C[i * c_rs + j] = static_cast<scalar_t>(acc[a][b]);
    }
  }
}

// Row tiles of all groups: blockIdx.x enumerates (group, row tile) pairs found on the device by a
// scan over the groups; blocks past the last tile exit. Rows past off[G] are left untouched (zeroed).
template <typename scalar_t>
__global__ void grouped_mm_kernel(const scalar_t* a, const scalar_t* b, const int64_t* off, int64_t G,
                                  int64_t K, int64_t M, bool trans_b, scalar_t* out) {
  int64_t tile = blockIdx.x, g = 0;
  for (; g < G; ++g) {
    const int64_t tiles = (off[g + 1] - off[g] + BM - 1) / BM;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (g >= G) return;
  const int64_t r0 = off[g], rows = off[g + 1] - off[g];
  const scalar_t* bg = b + g * K * M;
  // b[g] is [K, M] (B(k, j) = bg[k*M + j]) or, with trans_b, [M, K] (B(k, j) = bg[j*K + k]).
  gemm_tile<scalar_t>(a + r0 * K, K, 1, bg, trans_b ? 1 : M, trans_b ? K : 1, out + r0 * M, M, rows, M, K,
                      tile * BM, static_cast<int64_t>(blockIdx.y) * BN);
}

// out[g] = a[rows of g]^T @ dy[rows of g]: grid (G, K tiles, M tiles), inner loop over the group's rows.
template <typename scalar_t>
__global__ void grouped_wgrad_kernel(const scalar_t* a, const scalar_t* dy, const int64_t* off, int64_t K,
                                     int64_t M, scalar_t* out) {
  const int64_t g = blockIdx.x;
  const int64_t r0 = off[g], rows = off[g + 1] - off[g];
  // A(i, k) = a[(r0 + k) * K + i], B(k, j) = dy[(r0 + k) * M + j]; empty groups give zeros.
  gemm_tile<scalar_t>(a + r0 * K, 1, K, dy + r0 * M, M, 1, out + g * K * M, M, K, M, rows,
                      static_cast<int64_t>(blockIdx.y) * BM, static_cast<int64_t>(blockIdx.z) * BN);
}

}  // namespace

at::Tensor grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b) {
  const char* op = "flanmoe::grouped_mm";
  check_rank(b, 3, op, "b");
  check_gmm_operands(a, b, op, "b");
  check_same_device(group_sizes, a, op, "group_sizes", "a");
  const int64_t N = a.size(0), K = a.size(1), G = b.size(0);
  const int64_t bK = trans_b ? b.size(2) : b.size(1), M = trans_b ? b.size(1) : b.size(2);
  FLANMOE_CHECK(bK == K, op, ": inner dimensions differ: a is ", shape_str(a), ", b is ", shape_str(b));
  check_group_sizes(group_sizes, N, G, op);   // shape/dtype only on CUDA (no sync)
  c10::cuda::CUDAGuard guard(a.device());
  auto out = at::zeros({N, M}, a.options());
  if (N == 0 || M == 0 || K == 0 || G == 0) return out;
  auto off = device_offsets(group_sizes, N);
  const dim3 grid(static_cast<unsigned>((N + BM - 1) / BM + G), static_cast<unsigned>((M + BN - 1) / BN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "flanmoe_grouped_mm_cuda", [&] {
    grouped_mm_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), G, K, M, trans_b,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& group_sizes) {
  const char* op = "flanmoe::grouped_mm_wgrad";
  check_rank(dy, 2, op, "dy");
  check_gmm_operands(a, dy, op, "dy");
  check_same_device(group_sizes, a, op, "group_sizes", "a");
  FLANMOE_CHECK(dy.size(0) == a.size(0), op, ": a and dy must have the same number of rows (a is ", shape_str(a),
                ", dy is ", shape_str(dy), ")");
  check_rank(group_sizes, 1, op, "group_sizes");
  const int64_t N = a.size(0), K = a.size(1), M = dy.size(1), G = group_sizes.size(0);
  check_group_sizes(group_sizes, N, G, op);
  c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({G, K, M}, a.options());
  if (G == 0 || K == 0 || M == 0) return out;
  if (N == 0) return out.zero_();
  auto off = device_offsets(group_sizes, N);
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>((K + BM - 1) / BM),
                  static_cast<unsigned>((M + BN - 1) / BN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "flanmoe_grouped_wgrad_cuda", [&] {
    grouped_wgrad_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), K, M, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------ route_plan
namespace {

__global__ void count_kernel(const int64_t* ei, const bool* valid, int64_t A, int64_t k, int64_t E, int64_t* count) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (a >= A) return;
  const int64_t e = ei[a];
  const bool ok = e >= 0 && e < E && (valid == nullptr || valid[a / k]);
  atomicAdd(reinterpret_cast<unsigned long long*>(count + (ok ? e : E)), 1ULL);
}

// Sort key of an assignment: bucket (expert, or E for invalid) major, then its rank in the priority order.
__global__ void key_kernel(const int64_t* ei, const bool* valid, const int64_t* rank, int64_t A, int64_t k,
                           int64_t E, int64_t* key) {
  const int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (a >= A) return;
  const int64_t e = ei[a];
  const bool ok = e >= 0 && e < E && (valid == nullptr || valid[a / k]);
  key[a] = (ok ? e : E) * A + rank[a];
}

__global__ void finish_counts_kernel(const int64_t* count, int64_t E, int64_t cap, int64_t* gs, int64_t* req,
                                     int64_t* start, int64_t* kept_start, int64_t* drop_start) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t s = 0, ks = 0, kept_total = 0;
  for (int64_t e = 0; e < E; ++e) kept_total += count[e] < cap ? count[e] : cap;
  int64_t ds = kept_total;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t c = count[e], kept = e < E ? (c < cap ? c : cap) : 0;
    start[e] = s; kept_start[e] = ks; drop_start[e] = ds;
    if (e < E) { gs[e] = kept; req[e] = c; }
    s += c; ks += kept; ds += c - kept;
  }
}

__global__ void place_kernel(const int64_t* order, const int64_t* ei, const bool* valid, int64_t A, int64_t k,
                             int64_t E, int64_t cap, const int64_t* start, const int64_t* kept_start,
                             const int64_t* drop_start, int64_t* slot, bool* keep, int64_t* tok, int64_t* asg) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= A) return;
  const int64_t a = order[i], e0 = ei[a];
  const bool ok = e0 >= 0 && e0 < E && (valid == nullptr || valid[a / k]);
  const int64_t e = ok ? e0 : E, s = i - start[e];
  const bool kept = ok && s < cap;
  slot[a] = ok ? s : -1;
  keep[a] = kept;
  const int64_t row = kept ? kept_start[e] + s : drop_start[e] + (ok ? s - cap : s);
  tok[row] = a / k;
  asg[row] = a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_cuda(
    const at::Tensor& expert_idx, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& priority, const std::optional<at::Tensor>& valid) {
  const char* op = "flanmoe::route_plan";
  check_route_plan_args(expert_idx, num_experts, capacity, priority, valid, op);
  c10::cuda::CUDAGuard guard(expert_idx.device());
  const int64_t T = expert_idx.size(0), k = expert_idx.size(1), A = T * k, E = num_experts;
  const auto lopt = expert_idx.options();
  auto gs = at::zeros({E}, lopt), req = at::zeros({E}, lopt);
  auto tok = at::empty({A}, lopt), asg = at::empty({A}, lopt);
  auto keep = at::empty({T, k}, lopt.dtype(at::kBool)), slot = at::empty({T, k}, lopt);
  if (A == 0) return {gs, req, tok, asg, keep, slot};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool* vp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  // Rank of each assignment in the priority order: default (choice j, then token t); with priority,
  // a stable sort by descending priority of the default order (NaN last, like the reference).
  auto default_order = at::arange(A, lopt).view({T, k}).t().reshape({A});
  at::Tensor rank = at::empty({A}, lopt);
  if (priority.has_value()) {
    auto p = priority->reshape({A}).to(at::kDouble).index_select(0, default_order).neg();
    auto by_prio = std::get<1>(at::sort(p, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    rank.scatter_(0, default_order.index_select(0, by_prio), at::arange(A, lopt));
  } else {
    rank.scatter_(0, default_order, at::arange(A, lopt));
  }
  auto count = at::zeros({E + 1}, lopt);
  count_kernel<<<blocks_for(A), kThreads, 0, stream>>>(expert_idx.data_ptr<int64_t>(), vp, A, k, E,
                                                       count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto key = at::empty({A}, lopt);
  key_kernel<<<blocks_for(A), kThreads, 0, stream>>>(expert_idx.data_ptr<int64_t>(), vp, rank.data_ptr<int64_t>(),
                                                     A, k, E, key.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto start = at::empty({E + 1}, lopt), kept_start = at::empty({E + 1}, lopt), drop_start = at::empty({E + 1}, lopt);
  const int64_t cap = capacity.has_value() ? *capacity : A;
  finish_counts_kernel<<<1, 1, 0, stream>>>(count.data_ptr<int64_t>(), E, cap, gs.data_ptr<int64_t>(),
                                            req.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                            kept_start.data_ptr<int64_t>(), drop_start.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  place_kernel<<<blocks_for(A), kThreads, 0, stream>>>(
      order.data_ptr<int64_t>(), expert_idx.data_ptr<int64_t>(), vp, A, k, E, cap, start.data_ptr<int64_t>(),
      kept_start.data_ptr<int64_t>(), drop_start.data_ptr<int64_t>(), slot.data_ptr<int64_t>(),
      keep.data_ptr<bool>(), tok.data_ptr<int64_t>(), asg.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gs, req, tok, asg, keep, slot};
}

// ------------------------------------------------------------------ permute / unpermute / gather_dot
namespace {

template <typename scalar_t>
__global__ void permute_kernel(const scalar_t* x, const int64_t* idx, const scalar_t* w, int64_t S, int64_t T,
                               int64_t d, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = blockIdx.x;
  if (s >= S) return;
  const int64_t t = idx[s];
  const bool ok = t >= 0 && t < T;
  const acc_t ws = w ? static_cast<acc_t>(w[s]) : acc_t(1);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    out[s * d + i] = ok ? static_cast<scalar_t>(static_cast<acc_t>(x[t * d + i]) * ws) : scalar_t(0);
}

template <typename scalar_t>
__global__ void unpermute_kernel(const scalar_t* y, const int64_t* idx, const scalar_t* w, int64_t S, int64_t T,
                                 int64_t d, float* acc) {
  const int64_t s = blockIdx.x;
  if (s >= S) return;
  const int64_t t = idx[s];
  if (t < 0 || t >= T) return;
  const float ws = w ? static_cast<float>(w[s]) : 1.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(acc + t * d + i, ws * static_cast<float>(y[s * d + i]));
}

template <typename scalar_t>
__global__ void unpermute_kernel_f64(const scalar_t* y, const int64_t* idx, const scalar_t* w, int64_t S, int64_t T,
                                     int64_t d, double* acc) {
  const int64_t s = blockIdx.x;
  if (s >= S) return;
  const int64_t t = idx[s];
  if (t < 0 || t >= T) return;
  const double ws = w ? static_cast<double>(w[s]) : 1.0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(acc + t * d + i, ws * static_cast<double>(y[s * d + i]));
}

template <typename scalar_t>
__global__ void gather_dot_kernel(const scalar_t* x, const int64_t* idx, const scalar_t* y, int64_t S, int64_t T,
                                  int64_t d, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kThreads];
  const int64_t s = blockIdx.x;
  if (s >= S) return;
  const int64_t t = idx[s];
  acc_t acc = 0;
  if (t >= 0 && t < T)
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
      acc += static_cast<acc_t>(x[t * d + i]) * static_cast<acc_t>(y[s * d + i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[s] = static_cast<scalar_t>(part[0]);
}

int row_threads(int64_t d) { return d >= 256 ? 256 : d >= 128 ? 128 : 64; }

}  // namespace

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& token_idx, const std::optional<at::Tensor>& weights) {
  const char* op = "flanmoe::permute";
  check_permute_args(x, token_idx, weights, op);
  const int64_t S = token_idx.size(0), T = x.size(0), d = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({S, d}, x.options());
  if (S == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flanmoe_permute_cuda", [&] {
    permute_kernel<scalar_t><<<S, row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(),
        weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr, S, T, d, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& token_idx, const std::optional<at::Tensor>& weights,
                          int64_t num_tokens) {
  const char* op = "flanmoe::unpermute";
  check_unpermute_args(y, token_idx, weights, num_tokens, op);
  const int64_t S = token_idx.size(0), d = y.size(1);
  c10::cuda::CUDAGuard guard(y.device());
  const bool f64 = y.scalar_type() == at::kDouble;
  auto acc = at::zeros({num_tokens, d}, y.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (S == 0 || d == 0 || num_tokens == 0) return acc.to(y.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "flanmoe_unpermute_cuda", [&] {
    const scalar_t* wp = weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr;
    if (f64)
      unpermute_kernel_f64<scalar_t><<<S, row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(), wp, S, num_tokens, d, acc.data_ptr<double>());
    else
      unpermute_kernel<scalar_t><<<S, row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(), wp, S, num_tokens, d, acc.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return acc.scalar_type() == y.scalar_type() ? acc : acc.to(y.scalar_type());
}

at::Tensor gather_dot_cuda(const at::Tensor& x, const at::Tensor& token_idx, const at::Tensor& y) {
  const char* op = "flanmoe::gather_dot";
  check_gather_dot_args(x, token_idx, y, op);
  const int64_t S = token_idx.size(0), T = x.size(0), d = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({S}, x.options());
  if (S == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flanmoe_gather_dot_cuda", [&] {
    gather_dot_kernel<scalar_t><<<S, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), S, T, d,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(flanmoe, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
  m.impl("route_plan", &route_plan_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("gather_dot", &gather_dot_cuda);
}

}  // namespace flanmoe
