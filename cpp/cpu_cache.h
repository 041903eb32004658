// Reused host memory for the large outputs of the CPU kernels (see cpu_cache.cpp).
#pragma once
#include <ATen/ATen.h>
#include <vector>

namespace flanmoe {
// An uninitialised CPU tensor; blocks >= 4 MiB come from (and return to) the flanmoe host cache.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt);
// {cached bytes, bytes in use, limit bytes, hits, misses}
std::vector<int64_t> cpu_cache_info();
// Return every cached free block to the OS.
void empty_cpu_cache();
// Change the bound on cached bytes (0 disables caching) and drop what is cached.
void set_cpu_cache_limit(int64_t bytes);
}  // namespace flanmoe
