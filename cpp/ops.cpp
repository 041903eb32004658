// Operator schemas of the `flanmoe` namespace and the Python module `flanmoe_nb._C`.
// Kernels live in cpp/*_cpu.cpp (TORCH_LIBRARY_IMPL(flanmoe, CPU, m)) and cpp/cuda/*.cu (CUDA);
// autograd in cpp/autograd.cpp (C++, every differentiable op); fake (meta) kernels from Python in flanmoe_nb/gemm.py, layer_ops.py and moe_ops.py.
#include <torch/extension.h>
#include "flanmoe.h"
#include "cpu_cache.h"
#include "sgemm_small.h"
#include "grouped_mm_bf16.h"

#ifndef FLANMOE_TORCH_VERSION
#define FLANMOE_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(flanmoe, m) {
  // out[rows of group g] = a[rows of group g] @ (trans_b ? b[g].T : b[g])
  m.def("grouped_mm(Tensor a, Tensor b, Tensor group_sizes, bool trans_b=False) -> Tensor");
  // out[g] = a[rows of g].T @ dy[rows of g]   (the weight gradient of grouped_mm), [G, K, M]
  m.def("grouped_mm_wgrad(Tensor a, Tensor dy, Tensor group_sizes) -> Tensor");
  // relu(h) @ b[g] per group (CPU): the relu applied as h is read; its backward zeroes dh where h <= 0 in the
  // same pass as the product and reads relu(h) for the weight gradient (no relu pass either way)
  m.def("relu_grouped_mm(Tensor h, Tensor b, Tensor group_sizes) -> Tensor");
  m.def("relu_grouped_mm_backward(Tensor dy, Tensor h, Tensor b, Tensor group_sizes, bool need_dh, bool need_db) "
        "-> (Tensor, Tensor)");
  // Routing plan of expert_idx [T, k]: (group_sizes [E], requested [E], token_idx [T*k], assign_idx [T*k],
  // keep [T, k], slot [T, k]). Rows of token_idx/assign_idx: the kept assignments sorted by expert then
  // priority (sum(group_sizes) of them), then the dropped ones, then those of invalid tokens.
  m.def("route_plan(Tensor expert_idx, int num_experts, int? capacity=None, Tensor? priority=None, "
        "Tensor? valid=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out[s] = x[token_idx[s]] * weights[s]                                  [S, d]
  m.def("permute(Tensor x, Tensor token_idx, Tensor? weights=None) -> Tensor");
  // out[t] = sum_{s: token_idx[s] = t} weights[s] * y[s]                    [num_tokens, d]
  m.def("unpermute(Tensor y, Tensor token_idx, Tensor? weights, int num_tokens) -> Tensor");
  // out[s] = dot(x[token_idx[s]], y[s])                                    [S]
  m.def("gather_dot(Tensor x, Tensor token_idx, Tensor y) -> Tensor");
  // unpermute's two gradients from one read of each gathered row of grad [num_tokens, d] (CPU): (dy [S, d] =
  // weights[s] * grad[token_idx[s]], dweights [S] = <grad[token_idx[s]], y[s]>); one not asked for comes back as [0].
  m.def("unpermute_backward(Tensor grad, Tensor token_idx, Tensor? weights, Tensor y, bool need_dy, "
        "bool need_dweights) -> (Tensor, Tensor)");
  // An MoE router's projection x @ weight^T (+ bias): x [T, d] (contiguous last dim), weight [E, d] -> [T, E]. CPU only.
  m.def("router_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // Its gradients (dx [T, d], dweight [E, d], dbias [E]) from one pass over x; one not asked for comes back as [0].
  // With dx_acc (x's shape, contiguous) dx is added to it in place and comes back as [0].
  m.def("router_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor(a!)? dx_acc, bool need_dx, "
        "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  // softmax(q k^T + bias) v per (batch, head); q [B, Lq, H, D], k/v [B, Lk, H, D] (contiguous last dim),
  // bias broadcasting to [B, H, Lq, Lk]: (out [B, Lq, H, D], probs [B, H, Lq, Lk]). CPU only.
  // key_mask: an additive [B, Lk] (padding) mask added to every head's scores.
  // dropout_mult: keep / (1 - p) per probability (attention dropout), [B, H, Lq, Lk].
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, Tensor? key_mask=None, Tensor? dropout_mult=None) "
        "-> (Tensor, Tensor)");
  // Its gradients (dq, dk, dv contiguous; dbias [B, H, Lq, Lk], with bias_batched=False summed over the batch to
  // [1, H, Lq, Lk], or [0] without bias_grad).
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor probs, bool bias_grad, "
        "bool bias_batched=True, Tensor? dropout_mult=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Self attention on a packed projection qkv [B, L, 3, H, D] (q, k, v along dim 2): as attention on its views, with a
  // backward that returns the packed dqkv [B, L, 3, H, D] (no stack of three gradients). CPU only.
  m.def("attention_qkv(Tensor qkv, Tensor? bias=None, Tensor? key_mask=None, Tensor? dropout_mult=None) "
        "-> (Tensor, Tensor)");
  m.def("attention_qkv_backward(Tensor dout, Tensor qkv, Tensor probs, bool bias_grad, bool bias_batched=True, "
        "Tensor? dropout_mult=None) -> (Tensor, Tensor)");
  // x * keep / (1 - p), keep drawn from a counter-based hash of (seed, index): the same seed, the same mask. CPU only.
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  // T5 layer norm over the last dim: (x * rstd * weight, rstd [x.shape[:-1]]), rstd = 1/sqrt(mean(x^2) + eps). CPU only.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Its gradients (dx, dweight); a gradient not asked for comes back as an empty [0] tensor.
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, bool need_dx, bool need_dweight) "
        "-> (Tensor, Tensor)");
  // Mean cross-entropy of logits [N, V] against target [N] (ignore_index rows excluded): (loss [], lse [N]). CPU only.
  m.def("cross_entropy(Tensor logits, Tensor target, int ignore_index=-100) -> (Tensor, Tensor)");
  // Its gradient with respect to the logits for the scalar gradient `grad` of the loss.
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, Tensor lse, int ignore_index) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "flanmoe_nb compiled MoE core; ops are registered under torch.ops.flanmoe";
  mod.def("torch_version", []() { return std::string(FLANMOE_TORCH_VERSION); },
          "torch version this extension was compiled against");
  mod.def("with_cuda", []() {
#ifdef FLANMOE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether CUDA kernels were compiled in");
  mod.def("cpu_cache_info", &flanmoe::cpu_cache_info,
          "host cache of large CPU outputs: [cached bytes, bytes in use, limit bytes, hits, misses]");
  mod.def("empty_cpu_cache", &flanmoe::empty_cpu_cache, "return the host cache's free blocks to the OS");
  mod.def("set_cpu_cache_limit", &flanmoe::set_cpu_cache_limit, "bound the host cache (bytes; 0 disables)");
  mod.def("small_gemm_supported", &flanmoe::small_gemm_supported, "ISAs of the small-row GEMMs this CPU can run");
  mod.def("small_gemm_active", []() { return flanmoe::small_gemm_name(flanmoe::small_gemm_active()); },
          "which small-row GEMMs grouped_mm uses now ('blas': none)");
  mod.def("set_small_gemm", &flanmoe::set_small_gemm,
          "choose the small-row GEMMs: 'blas' (off), 'avx2', 'avx512' or 'auto'; False if this CPU lacks it");
  mod.def("expert_gemm_active", [](const std::string& product) {
    using flanmoe::GemmProduct;
    auto name = [](int slot) { return flanmoe::small_gemm_name(flanmoe::expert_gemm_active(GemmProduct(slot / 2), slot % 2)); };
    if (product != "all") {
      const int slot = flanmoe::gemm_product_slot(product);
      if (slot < 0)
        throw std::invalid_argument("expert_gemm_active: product must be one of nn_wide, nn_tall, nt_wide, nt_tall, tn_wide, "
                                    "tn_tall or 'all' (got '" + product + "')");
      return name(slot);
    }
    return flanmoe::gemm_slots_summary(name);
  }, pybind11::arg("product") = "all",
          "which GEMMs grouped_mm's fp32 products use now ('blas': none): of one product (nn forward, nt input gradient, "
          "tn weight gradient; _wide for a [d, f] weight, _tall for [f, d]), or for 'all' one name if they agree, else "
          "'nn_wide=..,nn_tall=..,...'");
  mod.def("set_expert_gemm", &flanmoe::set_expert_gemm, pybind11::arg("mode"), pybind11::arg("product") = "all",
          "override grouped_mm's fp32 GEMMs: mode 'follow' (small_gemm_active), 'auto', 'avx2', 'avx512' or 'blas'; "
          "product nn_wide, nn_tall, nt_wide, nt_tall, tn_wide, tn_tall, nn / nt / tn (both) or 'all'; False if this CPU "
          "lacks it or a name is unknown");
  mod.def("gemm_prefetch_active", &flanmoe::gemm_prefetch_active,
          "whether the fp32 NN kernel prefetches the next block of its weight while multiplying the current one");
  mod.def("set_gemm_prefetch", &flanmoe::set_gemm_prefetch, "switch the fp32 NN kernel's weight prefetch on or off");
  mod.def("nt_prefetch_active", &flanmoe::nt_prefetch_active,
          "whether the fp32 NT kernel prefetches the next tile's rows of its weight while multiplying");
  mod.def("set_nt_prefetch", &flanmoe::set_nt_prefetch, "switch the fp32 NT kernel's weight prefetch on or off");
  mod.def("gemm_stream_mode", &flanmoe::gemm_stream_mode,
          "non-temporal stores of the fp32 weight gradients: 'auto' (outputs larger than the last-level cache), 'on', 'off'");
  mod.def("set_gemm_stream", &flanmoe::set_gemm_stream, "set the weight gradients' store mode ('auto', 'on', 'off'); False for an unknown name");
  mod.def("last_level_cache_bytes", &flanmoe::last_level_cache_bytes, "the last-level cache size the 'auto' store mode compares with");
  mod.def("bf16_brgemm_available", &flanmoe::bf16_brgemm_available,
          "whether oneDNN's brgemm ukernel runs bf16 products on this CPU (AMX or AVX512-BF16)");
  mod.def("bf16_dp_available", &flanmoe::bf16_dp_available,
          "whether the own AVX512-BF16 (vdpbf16ps) kernels run bf16 products on this CPU");
  mod.def("bf16_gemm_active", [](const std::string& product) {
    const std::string v = flanmoe::bf16_gemm_active(product);
    if (v.empty())
      throw std::invalid_argument("bf16_gemm_active: product must be one of nn_wide, nn_tall, nt_wide, nt_tall, tn_wide, "
                                  "tn_tall or 'all' (got '" + product + "')");
    return v;
  }, pybind11::arg("product") = "all",
          "what bf16 grouped products use now ('blas', 'brgemm' or 'avx512bf16'): of one product, or for 'all' one name if "
          "they agree, else 'nn_wide=..,nn_tall=..,...'");
  mod.def("set_bf16_gemm", &flanmoe::set_bf16_gemm, pybind11::arg("mode"), pybind11::arg("product") = "all",
          "choose the bf16 grouped products' path: 'brgemm', 'avx512bf16', 'blas' or 'auto' (= blas), for product "
          "nn_wide, nn_tall, nt_wide, nt_tall, tn_wide, tn_tall, nn / nt / tn (both) or 'all'; False if the path does not "
          "run here or a name is unknown");
  mod.def("router_join", &flanmoe::router_join, pybind11::arg("x"), pybind11::arg("weight"),
          pybind11::arg("bias") = pybind11::none(),
          "(router_linear(x, weight, bias), x as a view): the view's gradient (the experts' share of x's) and the "
          "logits' are summed in the router's backward pass, in place (CPU float32/float64)");
  mod.def("openmp_threads", []() { return at::get_num_threads(); }, "intra-op threads");
}
