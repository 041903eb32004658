// Shared by the CUDA kernel files (grouped_mm_cuda.cu, route_cuda.cu, permute_cuda.cu), the twins of the CPU ones.
// No host synchronisation anywhere: group sizes, offsets and counts stay on the device. Values that
// the CPU kernels reject (expert or token indices out of range, group sizes that sum to more than the
// rows) cannot be checked here without a sync; the kernels clamp instead and never read or write out
// of bounds: an out-of-range expert index is treated like an invalid token (never kept), an
// out-of-range token index reads zeros / is skipped, group offsets are clamped to the buffer.
// What the host can check without a sync it does, as the CPU ops do (flanmoe.h): shapes, num_experts and
// num_tokens against int64 overflow, output sizes (make_output: an allocation that fails names the argument), and
// launch grids against CUDA's limits (a grid cast to unsigned would otherwise silently drop blocks).
#pragma once
#include "flanmoe.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

namespace flanmoe {

constexpr int kThreads = 256;
inline int64_t blocks_for(int64_t n, int64_t per = kThreads) { return std::max<int64_t>(1, (n + per - 1) / per); }

// A launch grid computed from the operands' sizes must fit CUDA's limits (x < 2^31, y and z < 2^16): past them
// the cast to unsigned would launch fewer blocks than rows or columns, leaving outputs unwritten. `what` names
// the arguments whose sizes give the grid.
inline void check_grid(const char* op, int64_t x, int64_t y, int64_t z, const char* what) {
  FLANMOE_CHECK(x <= INT32_MAX && y <= 65535 && z <= 65535, op, ": ", what, " too large for one CUDA launch (grid ", x,
                " x ", y, " x ", z, "; at most 2147483647 x 65535 x 65535)");
}

}  // namespace flanmoe
