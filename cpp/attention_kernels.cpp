// The fp32 attention and cross-entropy kernels (see attention_kernels.h), in three copies of attention_isa.inc: AVX-512F,
// AVX2+FMA and the baseline ISA of the build. This file includes no torch header.
#include "attention_kernels.h"
#include "scratch.h"
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>   // simd.h's masked loads and FMA
#endif

// The vector helpers take and return vectors wider than the baseline ABI's; they are always inlined, so no
// call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flanmoe {
namespace {

struct AttentionScratch;                   // per-thread buffer: packed columns and score rows of one head
float* scratch(size_t n) { return thread_scratch<float, AttentionScratch>(n); }

#define FLANMOE_ISA_FILE "attention_isa.inc"
#include "isa_copies.inc"

}  // namespace

void attention_fwd_f32(SmallGemmIsa isa, const AttnArgs& a, int64_t begin, int64_t end) {
  FLANMOE_ISA_CALL(fwd, a, begin, end);
}

void attention_bwd_f32(SmallGemmIsa isa, const AttnArgs& a, int64_t begin, int64_t end) {
  FLANMOE_ISA_CALL(bwd, a, begin, end);
}

float row_logsumexp_f32(SmallGemmIsa isa, const float* x, int64_t V) { return FLANMOE_ISA_CALL(row_logsumexp, x, V); }

void row_ce_grad_f32(SmallGemmIsa isa, const float* x, int64_t V, float lse, int64_t t, float g, float* dx) {
  FLANMOE_ISA_CALL(row_ce_grad, x, V, lse, t, g, dx);
}

}  // namespace flanmoe
