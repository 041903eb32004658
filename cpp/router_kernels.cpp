// The fp32 router projection kernels (see router_kernels.h), in three copies of router_isa.inc: AVX-512F,
// AVX2+FMA and the baseline ISA of the build. This file includes no torch header.
#include "router_kernels.h"
#include "scratch.h"
#include <algorithm>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>   // simd.h's masked loads and FMA
#endif

// The vector helpers take and return vectors wider than the baseline ABI's; they are always inlined, so no
// call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flanmoe {
namespace {

struct RouterScratch;                      // per-thread buffer: the weight packed as [d, E rounded up]
float* scratch(size_t n) { return thread_scratch<float, RouterScratch>(n); }

#define FLANMOE_ISA_FILE "router_isa.inc"
#include "isa_copies.inc"

}  // namespace

void router_fwd_f32(SmallGemmIsa isa, const float* x, int64_t ldx, const float* w, const float* bias, float* out,
                    int64_t t0, int64_t t1, int64_t d, int64_t E) {
  FLANMOE_ISA_CALL(fwd, x, ldx, w, bias, out, t0, t1, d, E);
}

void router_bwd_f32(SmallGemmIsa isa, const float* g, const float* x, int64_t ldx, const float* w, float* dx,
                    bool accumulate_dx, float* dw, int64_t t0, int64_t t1, int64_t d, int64_t E) {
  FLANMOE_ISA_CALL(bwd, g, x, ldx, w, dx, accumulate_dx, dw, t0, t1, d, E);
}

}  // namespace flanmoe
