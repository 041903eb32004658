// Work items for the grouped GEMMs: a group's range of rows (products) or columns (weight gradients), cut
// to ~1/threads of the total and scheduled longest-first over the intra-op threads.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace flanmoe {

// Prefix sums of group_sizes, which check_group_sizes has validated (each size at most the rows left: no overflow).
inline std::vector<int64_t> group_offsets(const at::Tensor& group_sizes) {
  auto gs = group_sizes.contiguous();
  const int64_t* p = gs.const_data_ptr<int64_t>();
  std::vector<int64_t> off(gs.numel() + 1, 0);
  for (int64_t i = 0; i < gs.numel(); ++i) off[i + 1] = off[i] + p[i];
  return off;
}

// One piece of work: group g, the half-open range [lo, hi) of rows (products) or columns (weight grads).
struct Item { int64_t g, lo, hi; double work; };

// Cut each group's range [0, extent_g) into pieces no bigger than ~1/threads of the total, so that one
// big expert is shared by all threads and many small experts are spread over them.
inline std::vector<Item> make_items(const std::vector<int64_t>& extent, const std::vector<double>& work_per_unit,
                             int64_t nthreads) {
  double total = 0;
  for (size_t g = 0; g < extent.size(); ++g) total += extent[g] * work_per_unit[g];
  const double target = total / std::max<int64_t>(nthreads, 1);
  std::vector<Item> items;
  for (size_t g = 0; g < extent.size(); ++g) {
    const int64_t n = extent[g];
    if (n == 0) { items.push_back({int64_t(g), 0, 0, 0.0}); continue; }
    const double w = n * work_per_unit[g];
    const int64_t pieces = std::min<int64_t>(n, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(w / std::max(target, 1.0) - 1e-9))));
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t lo = n * p / pieces, hi = n * (p + 1) / pieces;
      items.push_back({int64_t(g), lo, hi, (hi - lo) * work_per_unit[g]});
    }
  }
  return items;
}

// Run every item, spreading them over the intra-op threads by longest-processing-time-first scheduling.
// Each GEMM then runs single-threaded inside the parallel region: no barrier inside BLAS per small GEMM.
// `done` runs once on each thread that ran items, after its last one (e.g. to release AMX tile state).
// run_items_ahead calls body(item, next), next the item this thread runs after it (nullptr after its last): a kernel
// can prefetch the next item's operands while it computes this one.
struct NoDone { void operator()() const {} };
template <typename F, typename D = NoDone>
void run_items_ahead(std::vector<Item> items, double total_flops, F body, D done = D()) {
  const int64_t nt = at::get_num_threads();
  auto run_list = [&](const std::vector<Item>& list) {
    for (size_t i = 0; i < list.size(); ++i) body(list[i], i + 1 < list.size() ? &list[i + 1] : nullptr);
    done();
  };
  if (nt <= 1 || items.size() <= 1 || total_flops < 2e6 || at::in_parallel_region()) return run_list(items);
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.work > b.work; });
  std::vector<std::vector<Item>> per(nt);
  std::vector<double> load(nt, 0.0);
  for (const auto& it : items) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    per[t].push_back(it);
    load[t] += it.work + 1.0;
  }
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t t = b; t < e; ++t) {
      if (per[t].empty()) { done(); continue; }
      run_list(per[t]);
    }
  });
}

template <typename F, typename D = NoDone>
void run_items(std::vector<Item> items, double total_flops, F body, D done = D()) {
  run_items_ahead(std::move(items), total_flops, [&](const Item& it, const Item*) { body(it); }, done);
}

}  // namespace flanmoe
