// CUDA permute, unpermute and gather_dot, the twins of permute_cpu.cpp: one block per row of the
// expert-sorted buffer. See common.cuh.
#include "common.cuh"

namespace flanmoe {

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

// out[t] += w[s] * y[s] for every row s of token t, accumulated in acc_t (float, or double for fp64) by atomics.
template <typename scalar_t, typename acc_t>
__global__ void unpermute_kernel(const scalar_t* y, const int64_t* idx, const scalar_t* w, int64_t S, int64_t T,
                                 int64_t d, acc_t* acc) {
  const int64_t s = blockIdx.x;
  if (s >= S) return;
  const int64_t t = idx[s];
  if (t < 0 || t >= T) return;
  const acc_t ws = w ? static_cast<acc_t>(w[s]) : acc_t(1);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(acc + t * d + i, ws * static_cast<acc_t>(y[s * d + i]));
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
  auto out = make_output(op, "the output [entries of token_idx, columns of x]", {S, d}, x.scalar_type(),
                         [&] { return at::empty({S, d}, x.options()); });
  if (S == 0 || d == 0) return out;
  check_grid(op, S, 1, 1, "token_idx (entries, one block each) is");
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
  auto acc = make_output(op, "the output [num_tokens, columns of y]", {num_tokens, d}, f64 ? at::kDouble : at::kFloat,
                         [&] { return at::zeros({num_tokens, d}, y.options().dtype(f64 ? at::kDouble : at::kFloat)); });
  if (S == 0 || d == 0 || num_tokens == 0) return acc.to(y.scalar_type());
  check_grid(op, S, 1, 1, "token_idx (entries, one block each) is");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "flanmoe_unpermute_cuda", [&] {
    const scalar_t* wp = weights.has_value() ? weights->data_ptr<scalar_t>() : nullptr;
    if (f64)
      unpermute_kernel<scalar_t, double><<<S, row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
          y.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(), wp, S, num_tokens, d, acc.data_ptr<double>());
    else
      unpermute_kernel<scalar_t, float><<<S, row_threads(d), 0, c10::cuda::getCurrentCUDAStream()>>>(
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
  check_grid(op, S, 1, 1, "token_idx (entries, one block each) is");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flanmoe_gather_dot_cuda", [&] {
    gather_dot_kernel<scalar_t><<<S, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), token_idx.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), S, T, d,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(flanmoe, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("gather_dot", &gather_dot_cuda);
}

}  // namespace flanmoe
