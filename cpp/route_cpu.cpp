// CPU routing plan: per-expert counts, a stable counting sort of the T*k assignments by expert (then by
// priority), each assignment's slot inside its expert, and the keep mask under a capacity.
// T*k is small (thousands), so a serial O(T*k + E) pass beats any parallel scheme; only the optional
// priority order needs a comparison sort (std::stable_sort per expert, NaN ranks lowest).
#include "flanmoe.h"
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace flanmoe {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_cpu(
    const at::Tensor& expert_idx, int64_t num_experts, std::optional<int64_t> capacity,
    const std::optional<at::Tensor>& priority, const std::optional<at::Tensor>& valid) {
  const char* op = "flanmoe::route_plan";
  check_route_plan_args(expert_idx, num_experts, capacity, priority, valid, op);
  const int64_t T = expert_idx.size(0), k = expert_idx.size(1), A = T * k, E = num_experts;
  const auto lopt = expert_idx.options();
  auto group_sizes = make_output(op, "the output group_sizes [num_experts]", {E}, at::kLong,
                                 [&] { return at::zeros({E}, lopt); });
  auto requested = make_output(op, "the output requested [num_experts]", {E}, at::kLong,
                               [&] { return at::zeros({E}, lopt); });
  auto token_idx = at::empty({A}, lopt);
  auto assign_idx = at::empty({A}, lopt);
  auto keep = at::empty({T, k}, lopt.dtype(at::kBool));
  auto slot = at::empty({T, k}, lopt);
  if (A == 0) return {group_sizes, requested, token_idx, assign_idx, keep, slot};

  const int64_t* ei = expert_idx.data_ptr<int64_t>();
  const bool* vp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  // Range check first: never index with a bad value.
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = ei[a];
    FLANMOE_CHECK(e >= 0 && e < E, op, ": expert_idx must be in [0, num_experts=", E, ") (got expert_idx[",
                  a / k, ", ", a % k, "] = ", e, ")");
  }
  // Counting sort in the default priority order (choice j, then token t); bucket E holds invalid tokens.
  std::vector<int64_t> count, start;   // (E + 2 fits: check_route_plan_args)
  allocating(op, "the [num_experts + 2] bucket counts (num_experts=" + std::to_string(E) + ")", [&] {
    count.assign(E + 1, 0);
    start.assign(E + 2, 0);
    return 0;
  });
  auto bucket = [&](int64_t a) { return (vp && !vp[a / k]) ? E : ei[a]; };
  for (int64_t a = 0; a < A; ++a) ++count[bucket(a)];
  for (int64_t e = 0; e <= E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> order(A), fill(start.begin(), start.end() - 1);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t = 0; t < T; ++t) { const int64_t a = t * k + j; order[fill[bucket(a)]++] = a; }

  if (priority.has_value()) {
    auto pr = make_output(op, "a float64 copy of priority", priority->sizes(), at::kDouble,
                          [&] { return priority->to(at::kDouble).contiguous(); });
    const double* p = pr.data_ptr<double>();
    auto higher = [p](int64_t x, int64_t y) {  // strict weak order: descending, NaN last
      const double a = p[x], b = p[y];
      if (std::isnan(a)) return false;
      if (std::isnan(b)) return true;
      return a > b;
    };
    for (int64_t e = 0; e <= E; ++e) std::stable_sort(order.begin() + start[e], order.begin() + start[e + 1], higher);
  }

  const int64_t cap = capacity.has_value() ? *capacity : A;
  int64_t* gs = group_sizes.data_ptr<int64_t>();
  int64_t* rq = requested.data_ptr<int64_t>();
  int64_t* sl = slot.data_ptr<int64_t>();
  bool* kp = keep.data_ptr<bool>();
  int64_t* ti = token_idx.data_ptr<int64_t>();
  int64_t* ai = assign_idx.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) { rq[e] = count[e]; gs[e] = std::min(count[e], cap); }
  // Rows: kept (by expert, priority), then dropped (same order), then invalid assignments (by priority).
  int64_t kept_total = 0;
  for (int64_t e = 0; e < E; ++e) kept_total += gs[e];
  int64_t w_kept = 0, w_drop = kept_total;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = start[e]; i < start[e + 1]; ++i) {
      const int64_t a = order[i], s = i - start[e];
      sl[a] = s;
      kp[a] = s < cap;
      const int64_t w = s < cap ? w_kept++ : w_drop++;
      ti[w] = a / k; ai[w] = a;
    }
  }
  for (int64_t i = start[E]; i < start[E + 1]; ++i) {
    const int64_t a = order[i];
    sl[a] = -1; kp[a] = false; ti[w_drop] = a / k; ai[w_drop] = a; ++w_drop;
  }
  return {group_sizes, requested, token_idx, assign_idx, keep, slot};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("route_plan", &route_plan_cpu);
}

}  // namespace flanmoe
