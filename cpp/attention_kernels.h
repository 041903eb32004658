// fp32 attention `softmax(q k^T + bias) v` per (batch, head), forward and backward, for the short
// sequences and small head sizes of T5 layers, where one batched-GEMM + softmax + batched-GEMM chain
// (and its backward) costs more in copies and op overhead than in arithmetic. One pass per head keeps
// its scores in cache; q/k/v are read in place in their [B, L, H, D] layout (the rows of a fused qkv
// projection), outputs are written in [B, L, H, D] (ready for the output projection). No torch header
// here (the kernels are compiled once per ISA with target attributes); attention_cpu.cpp is the op.
#pragma once
#include <cstdint>
#include "sgemm_small.h"

namespace flanmoe {

struct AttnArgs {
  int64_t B, H, Lq, Lk, D;
  const float *q, *k, *v;            // element (b, l, h, d) at p[b*s_b + l*s_l + h*s_h + d]
  int64_t q_b, q_l, q_h, k_b, k_l, k_h, v_b, v_l, v_h;
  const float* bias;                 // nullable; (b, h, i, j) at bias[b*bias_b + h*bias_h + i*bias_i + j] (0 = broadcast)
  int64_t bias_b, bias_h, bias_i;
  const float* key_mask;             // nullable; additive, (b, j) at key_mask[b*key_mask_b + j]
  int64_t key_mask_b;
  float* probs;                      // [B, H, Lq, Lk]: written by the forward, read by the backward (before dropout)
  const float* dropout_mult;         // nullable; [B, H, Lq, Lk] contiguous: keep / (1 - p), multiplies the probabilities
  float* out;                        // forward: [B, Lq, H, D]
  const float* dout;                 // backward: [B, Lq, H, D] contiguous
  float *dq, *dk, *dv;               // backward: [B, Lq|Lk, H, D], (b, l, h, d) at p[(b*L + l)*d?_l + h*D + d]:
  int64_t dq_l, dk_l, dv_l;          // rows d?_l apart (H*D contiguous; 3*H*D in a packed [B, L, 3, H, D] dqkv)
  float* dscores;                    // backward, nullable: the gradient of the bias, [B, H, Lq, Lk], or with
  bool dscores_batched;              // dscores_batched false summed over the batch: [1, H, Lq, Lk]
};

// Heads [begin, end) of B*H (head bh = b*H + h); callers split that range over threads. The backward with
// dscores summed over the batch (dscores_batched false) ranges over h in [0, H) instead.
// `isa` picks the AVX-512F, AVX2+FMA or baseline copy of the same code.
void attention_fwd_f32(SmallGemmIsa isa, const AttnArgs& a, int64_t begin, int64_t end);
void attention_bwd_f32(SmallGemmIsa isa, const AttnArgs& a, int64_t begin, int64_t end);

// Cross-entropy rows (the same vectorised exp): logsumexp of x[0, V), and dx = (softmax(x) - onehot(t)) * g.
float row_logsumexp_f32(SmallGemmIsa isa, const float* x, int64_t V);
void row_ce_grad_f32(SmallGemmIsa isa, const float* x, int64_t V, float lse, int64_t t, float g, float* dx);

}  // namespace flanmoe
