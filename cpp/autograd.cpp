// Autograd of the flanmoe ops, in C++ (TORCH_LIBRARY_IMPL(flanmoe, Autograd, m)): one torch::autograd::Function
// per differentiable op, whose backward is again flanmoe ops called through the dispatcher (so it runs on any
// device, records its own graph under create_graph, and traces under torch.compile). Written here rather than
// with torch.library.register_autograd so that an eager step pays no Python per op in either direction: at the
// small shapes of a T5 layer on CPU that overhead was larger than some of the kernels.
#include <torch/autograd.h>
#include "flanmoe.h"

namespace flanmoe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_of(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor gmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gs, bool trans_b) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("flanmoe::grouped_mm");
  return op.call(a, b, gs, trans_b);
}
at::Tensor wgrad(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& gs) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("flanmoe::grouped_mm_wgrad");
  return op.call(a, dy, gs);
}
at::Tensor permute_op(const at::Tensor& x, const at::Tensor& idx, const OptT& w) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>("flanmoe::permute");
  return op.call(x, idx, w);
}
at::Tensor unpermute_op(const at::Tensor& y, const at::Tensor& idx, const OptT& w, int64_t n) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, int64_t)>("flanmoe::unpermute");
  return op.call(y, idx, w, n);
}
at::Tensor gather_dot_op(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& y) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("flanmoe::gather_dot");
  return op.call(x, idx, y);
}
std::tuple<at::Tensor, at::Tensor> attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& b,
                                                const OptT& km, const OptT& mult) {
  static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                                            const OptT&, const OptT&)>("flanmoe::attention");
  return op.call(q, k, v, b, km, mult);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& p, bool bg,
    bool batched, const OptT& mult) {
  static auto op = op_of<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool,
      const OptT&)>("flanmoe::attention_backward");
  return op.call(dout, q, k, v, p, bg, batched, mult);
}
std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>("flanmoe::rms_norm");
  return op.call(x, w, eps);
}
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                        const at::Tensor& r, bool nx, bool nw) {
  static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, bool, bool)>("flanmoe::rms_norm_backward");
  return op.call(dy, x, w, r, nx, nw);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_op(const at::Tensor& x, const at::Tensor& t, int64_t ignore) {
  static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
      "flanmoe::cross_entropy");
  return op.call(x, t, ignore);
}
at::Tensor cross_entropy_backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& lse,
                                     int64_t ignore) {
  static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "flanmoe::cross_entropy_backward");
  return op.call(g, x, t, lse, ignore);
}

at::Tensor dropout_op(const at::Tensor& x, double p, int64_t seed) {
  static auto op = op_of<at::Tensor(const at::Tensor&, double, int64_t)>("flanmoe::dropout");
  return op.call(x, p, seed);
}

at::Tensor contig(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// ---- grouped_mm: out = a @ b[g] (b[g].T with trans_b); da = dy @ b[g].T, db = a.T @ dy (per group)
struct GroupedMmFn : torch::autograd::Function<GroupedMmFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b, const at::Tensor& gs,
                            bool trans_b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, b, gs});
    ctx->saved_data["trans_b"] = trans_b;
    return gmm(a, b, gs, trans_b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool trans_b = ctx->saved_data["trans_b"].toBool();
    const at::Tensor dy = contig(grads[0]);
    at::Tensor da, db;
    if (ctx->needs_input_grad(0)) da = gmm(dy, s[1], s[2], !trans_b);
    if (ctx->needs_input_grad(1)) db = trans_b ? wgrad(dy, s[0], s[2]) : wgrad(s[0], dy, s[2]);
    return {da, db, at::Tensor(), at::Tensor()};
  }
};

// ---- relu_grouped_mm: out = relu(h) @ b[g]; dh, db from relu_grouped_mm_backward (under create_graph: the
// composite grouped_mm / masked_fill / grouped_mm_wgrad, so double backward is exact)
struct ReluGroupedMmFn : torch::autograd::Function<ReluGroupedMmFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& b, const at::Tensor& gs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, b, gs});
    static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("flanmoe::relu_grouped_mm");
    return op.call(h, b, gs);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, bool, bool)>("flanmoe::relu_grouped_mm_backward");
    const bool nh = ctx->needs_input_grad(0), nb = ctx->needs_input_grad(1);
    const at::Tensor dy = contig(grads[0]);
    if (at::GradMode::is_enabled()) {            // create_graph: the composite, whose ops are differentiable again
      at::Tensor dh, db;
      if (nh) dh = gmm(dy, s[1], s[2], true).masked_fill(s[0].le(0), 0);
      if (nb) db = wgrad(s[0].clamp_min(0), dy, s[2]);
      return {dh, db, at::Tensor()};
    }
    auto [dh, db] = op.call(dy, s[0], s[1], s[2], nh, nb);
    return {nh ? dh : at::Tensor(), nb ? db : at::Tensor(), at::Tensor()};
  }
};

// ---- grouped_mm_wgrad: out[g] = a_g^T dy_g; da_g = dy_g dout_g^T, ddy_g = a_g dout_g
struct WgradFn : torch::autograd::Function<WgradFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& dy, const at::Tensor& gs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, dy, gs});
    return wgrad(a, dy, gs);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor dout = contig(grads[0]);
    at::Tensor da, ddy;
    if (ctx->needs_input_grad(0)) da = gmm(s[1], dout, s[2], true);
    if (ctx->needs_input_grad(1)) ddy = gmm(s[0], dout, s[2], false);
    return {da, ddy, at::Tensor()};
  }
};

// ---- permute: out[s] = x[idx[s]] * w[s];  dx = unpermute(g, idx, w), dw = gather_dot(x, idx, g)
struct PermuteFn : torch::autograd::Function<PermuteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& idx, const OptT& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_w = w.has_value() && w->defined();
    ctx->save_for_backward({x, idx, has_w ? *w : at::Tensor()});
    ctx->saved_data["rows"] = x.size(0);
    return permute_op(x, idx, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor g = contig(grads[0]);
    const OptT w = s[2].defined() ? OptT(s[2]) : std::nullopt;
    at::Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = unpermute_op(g, s[1], w, ctx->saved_data["rows"].toInt());
    if (w && ctx->needs_input_grad(2)) dw = gather_dot_op(s[0], s[1], g);
    return {dx, at::Tensor(), dw};
  }
};

// ---- unpermute: out[t] = sum_{s: idx[s]=t} w[s] y[s];  dy = permute(g, idx, w), dw = gather_dot(g, idx, y)
// (on CPU both at once, unpermute_backward: one read of g's gathered rows instead of two)
struct UnpermuteFn : torch::autograd::Function<UnpermuteFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& idx, const OptT& w,
                            int64_t num_tokens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool has_w = w.has_value() && w->defined();
    ctx->save_for_backward({y, idx, has_w ? *w : at::Tensor()});
    return unpermute_op(y, idx, w, num_tokens);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor g = contig(grads[0]);
    const OptT w = s[2].defined() ? OptT(s[2]) : std::nullopt;
    const bool ny = ctx->needs_input_grad(0), nw = w && ctx->needs_input_grad(2);
    if (ny && nw && g.is_cpu() && !at::GradMode::is_enabled()) {   // both from one read of each row of g
      static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptT&,
                                                                const at::Tensor&, bool, bool)>("flanmoe::unpermute_backward");
      auto [dy, dw] = op.call(g, s[1], w, s[0], true, true);
      return {dy, at::Tensor(), dw, at::Tensor()};
    }
    at::Tensor dy, dw;
    if (ny) dy = permute_op(g, s[1], w);
    if (nw) dw = gather_dot_op(g, s[1], s[0]);
    return {dy, at::Tensor(), dw, at::Tensor()};
  }
};

// ---- gather_dot: out[s] = <x[idx[s]], y[s]>;  dx = unpermute(y, idx, g), dy = permute(x, idx, g)
struct GatherDotFn : torch::autograd::Function<GatherDotFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& idx, const at::Tensor& y) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, idx, y});
    ctx->saved_data["rows"] = x.size(0);
    return gather_dot_op(x, idx, y);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor g = contig(grads[0]);
    at::Tensor dx, dy;
    if (ctx->needs_input_grad(0)) dx = unpermute_op(s[2], s[1], g, ctx->saved_data["rows"].toInt());
    if (ctx->needs_input_grad(2)) dy = permute_op(s[0], s[1], g);
    return {dx, at::Tensor(), dy};
  }
};

// ---- attention: (out, probs); probs are kept for the backward only (not differentiable); the key mask and the
// dropout multiplier get no gradient (the Python wrapper refuses a key mask that requires one)
struct AttentionFn : torch::autograd::Function<AttentionFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptT& bias, const OptT& key_mask, const OptT& dropout_mult) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, probs] = attention_op(q, k, v, bias, key_mask, dropout_mult);
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_mult = dropout_mult.has_value() && dropout_mult->defined();
    ctx->save_for_backward({q, k, v, probs, has_mult ? *dropout_mult : at::Tensor()});
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) {
      ctx->saved_data["bias_shape"] = bias->sizes().vec();
      ctx->saved_data["bias_batched"] = bias->size(0) != 1;    // else the kernel sums its gradient over the batch
    }
    ctx->mark_non_differentiable({probs});
    ctx->set_materialize_grads(false);
    return {out, probs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    const bool bias_grad = has_bias && ctx->needs_input_grad(3);
    const bool batched = bias_grad && ctx->saved_data["bias_batched"].toBool();
    const OptT mult = s[4].defined() ? OptT(s[4]) : std::nullopt;
    auto [dq, dk, dv, db] = attention_backward_op(contig(grads[0]), s[0], s[1], s[2], s[3], bias_grad, batched, mult);
    if (bias_grad) db = db.sum_to_size(ctx->saved_data["bias_shape"].toIntVector());
    return {ctx->needs_input_grad(0) ? dq : at::Tensor(), ctx->needs_input_grad(1) ? dk : at::Tensor(),
            ctx->needs_input_grad(2) ? dv : at::Tensor(), bias_grad ? db : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- router_join: (logits = x w^T (+ b), x as a view) -> dx = d(view) + dlogits w (in place where d(view) is
// the experts' fresh gradient), dw = dlogits^T x, db = sum dlogits: router_linear_backward reads x once for both;
// under create_graph the composite mm / sum, differentiable again
bool stealable(const at::Tensor& t, const at::Tensor& like) {   // (the test of autograd's own in-place sum)
  return t.use_count() == 1 && t.has_storage() && t.storage().use_count() == 1 && !t.is_view() &&
         !t.requires_grad() && t.is_contiguous() && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
         t.device() == like.device();
}

struct RouterJoinFn : torch::autograd::Function<RouterJoinFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w});
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();   // (an absent bias is no input: no needs_input_grad(2))
    ctx->set_materialize_grads(false);
    static auto op = op_of<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&)>("flanmoe::router_linear");
    return {op.call(x, w, b), x};                                     // (autograd returns the input as a view)
  }
  // (grads by reference: CppNode passes its own list, so the moved-out view gradient can be the only reference)
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), nb = has_bias && ctx->needs_input_grad(2);
    variable_list out{at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor dxv = std::move(grads[1]);
    if (!grads[0].defined()) {                                        // the logits took no part in the loss
      if (nx) out[0] = dxv;
      return out;
    }
    const auto s = ctx->get_saved_variables();
    const at::Tensor g = contig(grads[0]);
    if (at::GradMode::is_enabled()) {             // create_graph: the composite, whose ops are differentiable again
      if (nx) out[0] = dxv.defined() ? dxv + g.mm(s[1]) : g.mm(s[1]);
      if (nw) out[1] = g.t().mm(s[0]);
      if (nb) out[2] = g.sum(0);
      return out;
    }
    static auto op = op_of<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, bool, bool, bool)>(
        "flanmoe::router_linear_backward");
    const bool acc = nx && dxv.defined() && stealable(dxv, s[0]);
    auto [dx, dw, db] = op.call(g, s[0], s[1], acc ? OptT(dxv) : std::nullopt, nx, nw, nb);
    if (nx) out[0] = acc ? dxv : dxv.defined() ? dx.add_(dxv) : dx;
    if (nw) out[1] = dw;
    if (nb) out[2] = db;
    return out;
  }
};

// ---- attention_qkv: attention on the q, k, v views of one packed qkv [B, L, 3, H, D]; the backward returns the
// packed dqkv (written in place by the kernel: no stack of dq, dk, dv); otherwise as attention above
struct AttentionQkvFn : torch::autograd::Function<AttentionQkvFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const OptT& bias, const OptT& key_mask,
                               const OptT& dropout_mult) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptT&, const OptT&,
                                                              const OptT&)>("flanmoe::attention_qkv");
    auto [out, probs] = op.call(qkv, bias, key_mask, dropout_mult);
    const bool has_bias = bias.has_value() && bias->defined();
    const bool has_mult = dropout_mult.has_value() && dropout_mult->defined();
    ctx->save_for_backward({qkv, probs, has_mult ? *dropout_mult : at::Tensor()});
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) {
      ctx->saved_data["bias_shape"] = bias->sizes().vec();
      ctx->saved_data["bias_batched"] = bias->size(0) != 1;
    }
    ctx->mark_non_differentiable({probs});
    ctx->set_materialize_grads(false);
    return {out, probs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    const bool bias_grad = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(1);
    const bool batched = bias_grad && ctx->saved_data["bias_batched"].toBool();
    const OptT mult = s[2].defined() ? OptT(s[2]) : std::nullopt;
    static auto op = op_of<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              bool, bool, const OptT&)>("flanmoe::attention_qkv_backward");
    auto [dqkv, db] = op.call(contig(grads[0]), s[0], s[1], bias_grad, batched, mult);
    if (bias_grad) db = db.sum_to_size(ctx->saved_data["bias_shape"].toIntVector());
    return {ctx->needs_input_grad(0) ? dqkv : at::Tensor(), bias_grad ? db : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- rms_norm: (y, rstd); rstd is kept for the backward only
struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = rms_norm_op(x, w, eps);
    ctx->save_for_backward({x, w, rstd});
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {y, rstd};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1);
    auto [dx, dw] = rms_norm_backward_op(contig(grads[0]), s[0], s[1], s[2], nx, nw);
    return {nx ? dx : at::Tensor(), nw ? dw : at::Tensor(), at::Tensor()};
  }
};

// ---- dropout: y = x * m with m a function of (seed, index); dx = dropout(g) with the same seed
struct DropoutFn : torch::autograd::Function<DropoutFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, int64_t seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return dropout_op(x, p, seed);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {dropout_op(grads[0], ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt()), at::Tensor(),
            at::Tensor()};
  }
};

// ---- cross_entropy: (loss, lse); lse is kept for the backward only
struct CrossEntropyFn : torch::autograd::Function<CrossEntropyFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] = cross_entropy_op(logits, target, ignore_index);
    ctx->save_for_backward({logits, target, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {loss, lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    return {cross_entropy_backward_op(grads[0], s[0], s[1], s[2], ctx->saved_data["ignore_index"].toInt()), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor grouped_mm_ad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gs, bool trans_b) {
  return GroupedMmFn::apply(a, b, gs, trans_b);
}
at::Tensor wgrad_ad(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& gs) { return WgradFn::apply(a, dy, gs); }
at::Tensor relu_grouped_mm_ad(const at::Tensor& h, const at::Tensor& b, const at::Tensor& gs) {
  return ReluGroupedMmFn::apply(h, b, gs);
}
at::Tensor permute_ad(const at::Tensor& x, const at::Tensor& idx, const OptT& w) { return PermuteFn::apply(x, idx, w); }
at::Tensor unpermute_ad(const at::Tensor& y, const at::Tensor& idx, const OptT& w, int64_t n) {
  return UnpermuteFn::apply(y, idx, w, n);
}
at::Tensor gather_dot_ad(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& y) {
  return GatherDotFn::apply(x, idx, y);
}
std::tuple<at::Tensor, at::Tensor> attention_ad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const OptT& bias, const OptT& key_mask, const OptT& dropout_mult) {
  auto r = AttentionFn::apply(q, k, v, bias, key_mask, dropout_mult);
  return {r[0], r[1]};
}
at::Tensor dropout_ad(const at::Tensor& x, double p, int64_t seed) { return DropoutFn::apply(x, p, seed); }
std::tuple<at::Tensor, at::Tensor> cross_entropy_ad(const at::Tensor& x, const at::Tensor& t, int64_t ignore) {
  auto r = CrossEntropyFn::apply(x, t, ignore);
  return {r[0], r[1]};
}
at::Tensor router_linear_ad(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  return RouterJoinFn::apply(x, w, b)[0];
}
std::tuple<at::Tensor, at::Tensor> attention_qkv_ad(const at::Tensor& qkv, const OptT& bias, const OptT& key_mask,
                                                    const OptT& dropout_mult) {
  auto r = AttentionQkvFn::apply(qkv, bias, key_mask, dropout_mult);
  return {r[0], r[1]};
}
std::tuple<at::Tensor, at::Tensor> rms_norm_ad(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto r = RmsNormFn::apply(x, w, eps);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flanmoe, Autograd, m) {
  m.impl("grouped_mm", &grouped_mm_ad);
  m.impl("grouped_mm_wgrad", &wgrad_ad);
  m.impl("relu_grouped_mm", &relu_grouped_mm_ad);
  m.impl("permute", &permute_ad);
  m.impl("unpermute", &unpermute_ad);
  m.impl("gather_dot", &gather_dot_ad);
  m.impl("attention", &attention_ad);
  m.impl("attention_qkv", &attention_qkv_ad);
  m.impl("rms_norm", &rms_norm_ad);
  m.impl("cross_entropy", &cross_entropy_ad);
  m.impl("dropout", &dropout_ad);
  m.impl("router_linear", &router_linear_ad);
}

std::tuple<at::Tensor, at::Tensor> router_join(const at::Tensor& x, const at::Tensor& weight, const OptT& bias) {
  auto r = RouterJoinFn::apply(x, weight, bias);
  return {r[0], r[1]};
}

}  // namespace flanmoe
