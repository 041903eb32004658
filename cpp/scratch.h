// Scratch memory of the CPU kernels: buffers grown on demand and kept for the next call, so that a kernel
// called per expert block allocates nothing in steady state.
#pragma once
#include <cstddef>
#include <vector>

namespace flanmoe {

// buf's data, grown to at least n elements (contents unspecified).
template <typename T>
inline T* grown(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// A buffer of at least n elements owned by the calling thread, one per (T, Tag): kernels that may run inside one
// another's calls use different tags, so one never resizes the buffer the other is reading.
template <typename T, typename Tag>
inline T* thread_scratch(size_t n) {
  thread_local std::vector<T> buf;
  return grown(buf, n);
}

}  // namespace flanmoe
