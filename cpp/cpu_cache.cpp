// Host memory for the big outputs of the CPU kernels (hidden activations, permuted rows, expert weight
// gradients: E*d*f elements per weight), reused from step to step.
//
// Why: ATen's CPU allocator hands large blocks straight back to the OS, so every training step faults
// fresh pages in, and the kernel zeroes each page before our GEMM overwrites it. For 128 experts the
// weight gradients alone are ~1 GB per step, and the faults can cost as much as the GEMMs. Blocks >= 4 MiB are therefore 2 MiB-aligned, advised to use transparent huge pages
// (Linux), and on release kept in a size-keyed free list (like the CUDA caching allocator) up to a bound:
// FLANMOE_CPU_CACHE_MB (default 4096; 0 disables caching). `flanmoe_nb.extension.cpu_cache_info()` reports
// it and `empty_cpu_cache()` returns the free blocks to the OS.
#include "cpu_cache.h"
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace flanmoe {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

struct Cache {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // padded size -> blocks
  size_t cached = 0, in_use = 0, limit = 0;
  int64_t hits = 0, misses = 0;
  Cache() {
    const char* env = std::getenv("FLANMOE_CPU_CACHE_MB");
    long long mb = env ? std::atoll(env) : 4096;
    limit = mb > 0 ? size_t(mb) << 20 : 0;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed during interpreter teardown
  return *c;
}

void* take(size_t padded) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.free_blocks.find(padded);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached -= padded;
      c.in_use += padded;
      ++c.hits;
      return p;
    }
    ++c.misses;
  }
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, padded) != 0) return nullptr;
#ifdef __linux__
  madvise(p, padded, MADV_HUGEPAGE);
#endif
  std::lock_guard<std::mutex> lock(cache().mu);
  cache().in_use += padded;
  return p;
}

void give_back(void* p, size_t padded) {
  auto& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.in_use -= padded;
    if (c.cached + padded <= c.limit) {
      c.free_blocks[padded].push_back(p);
      c.cached += padded;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  // The byte count, overflow-checked: a wrapped product (e.g. [2**62 + 2**20, 1] floats: 4 MiB mod 2**64) would
  // hand out a block far smaller than the tensor. On overflow (or a negative size) at::empty raises its error.
  uint64_t nbytes = c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  bool bad = false;
  for (auto s : sizes) bad |= s < 0 || __builtin_mul_overflow(nbytes, static_cast<uint64_t>(s), &nbytes);
  if (bad || nbytes > static_cast<uint64_t>(INT64_MAX)) return at::empty(sizes, opt);
  if (opt.device().is_cpu() && nbytes >= 2 * kHuge) {
    const size_t padded = (nbytes + kHuge - 1) / kHuge * kHuge;
    if (void* p = take(padded))
      return at::from_blob(p, sizes, [padded](void* q) { give_back(q, padded); }, opt);
  }
  return at::empty(sizes, opt);
}

std::vector<int64_t> cpu_cache_info() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {int64_t(c.cached), int64_t(c.in_use), int64_t(c.limit), c.hits, c.misses};
}

void empty_cpu_cache() {
  auto& c = cache();
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto& kv : c.free_blocks) drop.insert(drop.end(), kv.second.begin(), kv.second.end());
    c.free_blocks.clear();
    c.cached = 0;
  }
  for (void* p : drop) std::free(p);
}

void set_cpu_cache_limit(int64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    cache().limit = bytes > 0 ? size_t(bytes) : 0;
  }
  empty_cpu_cache();
}

}  // namespace flanmoe
