// CUDA route_plan, the twin of route_cpu.cpp: counts, a stable sort by (expert, priority rank), and each
// assignment's slot, keep flag and row of the expert-sorted buffer. See common.cuh.
#include "common.cuh"

namespace flanmoe {

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
  auto gs = make_output(op, "the output group_sizes [num_experts]", {E}, at::kLong, [&] { return at::zeros({E}, lopt); });
  auto req = make_output(op, "the output requested [num_experts]", {E}, at::kLong, [&] { return at::zeros({E}, lopt); });
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
  auto count = make_output(op, "the [num_experts + 1] bucket counts", {E + 1}, at::kLong,   // (E + 2 fits: checked)
                           [&] { return at::zeros({E + 1}, lopt); });
  count_kernel<<<blocks_for(A), kThreads, 0, stream>>>(expert_idx.data_ptr<int64_t>(), vp, A, k, E,
                                                       count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto key = at::empty({A}, lopt);
  key_kernel<<<blocks_for(A), kThreads, 0, stream>>>(expert_idx.data_ptr<int64_t>(), vp, rank.data_ptr<int64_t>(),
                                                     A, k, E, key.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto starts = make_output(op, "the 3 x [num_experts + 1] bucket starts", {3, E + 1}, at::kLong,
                            [&] { return at::empty({3, E + 1}, lopt); });
  auto start = starts[0], kept_start = starts[1], drop_start = starts[2];
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

TORCH_LIBRARY_IMPL(flanmoe, CUDA, m) {
  m.impl("route_plan", &route_plan_cuda);
}

}  // namespace flanmoe
