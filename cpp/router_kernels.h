// fp32 router projection `logits = x W^T` for the few outputs of an MoE router (E experts, E << d) and its
// backward in one call: per block of tokens, dx = g W and that block's share of dW = g^T x (BLAS runs them as
// three skinny GEMMs, and autograd the sum of x's two gradients as a pass of its own). All three are
// register-tiled outer products: the forward against W^T packed per call as [d, E rounded up to a vector],
// dx = g W in tiles of tokens x columns over the experts (added in place to a gradient dx already holds: the
// experts' share), dW = g^T x in tiles of experts x columns whose accumulators stay in registers over a whole
// block of tokens. No torch header here (the kernels are compiled once per ISA with target attributes);
// router_cpu.cpp is the op.
#pragma once
#include <cstdint>
#include "sgemm_small.h"

namespace flanmoe {

// out[t, e] = <x[t], w[e]> (+ bias[e]) for tokens t in [t0, t1); x [T, d] rows ldx apart, w [E, d] contiguous,
// out [T, E] contiguous; bias nullable.
void router_fwd_f32(SmallGemmIsa isa, const float* x, int64_t ldx, const float* w, const float* bias, float* out,
                    int64_t t0, int64_t t1, int64_t d, int64_t E);
// For tokens t in [t0, t1): dx[t] = sum_e g[t, e] w[e] (dx nullable: skipped; [T, d] contiguous; with
// accumulate_dx added to what dx holds) and dw[e] = sum_t g[t, e] x[t] (dw nullable: skipped; [E, d] contiguous,
// overwritten). g [T, E] contiguous.
void router_bwd_f32(SmallGemmIsa isa, const float* g, const float* x, int64_t ldx, const float* w, float* dx,
                    bool accumulate_dx, float* dw, int64_t t0, int64_t t1, int64_t d, int64_t E);

}  // namespace flanmoe
