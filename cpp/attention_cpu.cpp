// CPU flanmoe::attention / flanmoe::attention_backward: `softmax(q k^T + bias) v` per (batch, head) with
// q, k, v in [B, L, H, D] (any strides with a contiguous last dimension, e.g. the views of one fused qkv
// projection) and an additive bias broadcasting to [B, H, Lq, Lk] (T5's position bias plus masks; no
// 1/sqrt(D) scaling), plus optionally an additive key mask [B, Lk] (padding), kept apart from the bias so that a
// bias shared by the batch (the position bias) is neither expanded to [B, H, Lq, Lk] nor its gradient: the
// backward sums that over the batch itself. The forward also returns the probabilities the backward needs. float32 runs the
// vectorised kernels of attention_kernels.cpp; float64 (gradcheck) a plain loop of the same formulas.
#include "flanmoe.h"
#include "attention_kernels.h"
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace flanmoe {
namespace {

struct Dims { int64_t B, H, Lq, Lk, D; };
// What the messages about the bias, key mask, dropout multiplier, dout and probs call the tensors that give their
// shapes: q and k, or qkv for the packed ops (whose q, k, v are views of it).
struct Names { const char *q = "q", *k = "k"; };

Dims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& bias, const char* op,
                          const std::optional<at::Tensor>& key_mask = std::nullopt, Names n = {}) {
  check_rank(q, 4, op, "q");
  check_rank(k, 4, op, "k");
  check_rank(v, 4, op, "v");
  FLANMOE_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
                ": q must be float32 or float64 (got ", q.scalar_type(), ")");
  check_device_of(q, op, "q", false);
  const at::Tensor* others[] = {&k, &v};
  const char* names[] = {"k", "v"};
  for (int i = 0; i < 2; ++i) {
    FLANMOE_CHECK(others[i]->scalar_type() == q.scalar_type(), op, ": ", names[i], " must have the dtype of q (q is ",
                  q.scalar_type(), ", ", names[i], " is ", others[i]->scalar_type(), ")");
    check_same_device(*others[i], q, op, names[i], "q");
  }
  const Dims d{q.size(0), q.size(2), q.size(1), k.size(1), q.size(3)};
  FLANMOE_CHECK(k.size(0) == d.B && k.size(2) == d.H && k.size(3) == d.D, op,
                ": k must be [B, Lk, H, D] with B, H, D of q [B, Lq, H, D] (q is ", shape_str(q), ", k is ",
                shape_str(k), ")");
  FLANMOE_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k (k is ", shape_str(k), ", v is ",
                shape_str(v), ")");
  const at::Tensor* qkv[] = {&q, &k, &v};
  const char* qkv_names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i)
    FLANMOE_CHECK(qkv[i]->size(3) <= 1 || qkv[i]->stride(3) == 1, op, ": ", qkv_names[i],
                  " must have a contiguous last dimension (got shape ", shape_str(*qkv[i]), " with strides ",
                  qkv[i]->strides(), ")");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_rank(b, 4, op, "bias");
    FLANMOE_CHECK(b.scalar_type() == q.scalar_type(), op, ": bias must have the dtype of ", n.q, " (", n.q, " is ",
                  q.scalar_type(), ", bias is ", b.scalar_type(), ")");
    check_same_device(b, q, op, "bias", n.q);
    const int64_t want[] = {d.B, d.H, d.Lq, d.Lk};
    for (int i = 0; i < 3; ++i)
      FLANMOE_CHECK(b.size(i) == want[i] || b.size(i) == 1, op, ": bias must broadcast to [B, H, Lq, Lk] = [",
                    d.B, ", ", d.H, ", ", d.Lq, ", ", d.Lk, "] (B, Lq, H of ", n.q, "; Lk of ", n.k, "; got ", shape_str(b), ")");
    FLANMOE_CHECK(b.size(3) == d.Lk && (d.Lk <= 1 || b.stride(3) == 1), op,
                  ": bias must have Lk = ", d.Lk, " columns (Lk of ", n.k, ") with stride 1 (got shape ", shape_str(b),
                  " with strides ", b.strides(), ")");
  }
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    check_rank(m, 2, op, "key_mask");
    FLANMOE_CHECK(m.scalar_type() == q.scalar_type(), op, ": key_mask must have the dtype of ", n.q, " (", n.q, " is ",
                  q.scalar_type(), ", key_mask is ", m.scalar_type(), ")");
    check_same_device(m, q, op, "key_mask", n.q);
    FLANMOE_CHECK((m.size(0) == d.B || m.size(0) == 1) && m.size(1) == d.Lk && (d.Lk <= 1 || m.stride(1) == 1), op,
                  ": key_mask must be [B, Lk] = [", d.B, ", ", d.Lk, "] (B of ", n.q, ", Lk of ", n.k,
                  "; additive, contiguous rows; got shape ",
                  shape_str(m), " with strides ", m.strides(), ")");
  }
  return d;
}

int64_t bstride(const at::Tensor& b, int i) { return b.size(i) == 1 ? 0 : b.stride(i); }

// The dropout multiplier of the probabilities: keep / (1 - p), [B, H, Lq, Lk] contiguous, the dtype of q.
void check_dropout_mult(const std::optional<at::Tensor>& m, const Dims& d, const at::Tensor& q, const char* op,
                        Names n = {}) {
  if (!m.has_value()) return;
  const std::vector<int64_t> want{d.B, d.H, d.Lq, d.Lk};
  FLANMOE_CHECK(m->sizes() == at::IntArrayRef(want) && m->scalar_type() == q.scalar_type() && m->is_contiguous(), op,
                ": dropout_mult must be a contiguous [B, H, Lq, Lk] = ", at::IntArrayRef(want),
                " tensor of ", n.q, "'s dtype (B, Lq, H of ", n.q, "; Lk of ", n.k, "; got ",
                shape_str(*m), " ", m->scalar_type(), ")");
  check_same_device(*m, q, op, "dropout_mult", n.q);
}

int64_t head_grain(const Dims& d) {     // heads per task: ~64k multiply-adds at least
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d.Lq * d.Lk * d.D));
}

// ---- float64: the same formulas as plain loops (for gradcheck and opcheck) ----
template <typename T>
struct View4 {      // element (b, l, h, d) of a [B, L, H, D] tensor
  const T* p; int64_t sb, sl, sh;
  const T* row(int64_t b, int64_t l, int64_t h) const { return p + b * sb + l * sl + h * sh; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) { return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void fwd_loops(const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask, const T* mult, T* probs,
               T* out) {
  const auto Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v);
  at::parallel_for(0, d.B * d.H, head_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<T> s(d.Lk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      for (int64_t i = 0; i < d.Lq; ++i) {
        const T* qi = Q.row(b, i, h);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < d.Lk; ++j) {
          T acc = bias ? bias->data_ptr<T>()[b * bstride(*bias, 0) + h * bstride(*bias, 1) + i * bstride(*bias, 2) + j] : T(0);
          if (key_mask) acc += key_mask->data_ptr<T>()[b * bstride(*key_mask, 0) + j];
          const T* kj = K.row(b, j, h);
          for (int64_t x = 0; x < d.D; ++x) acc += qi[x] * kj[x];
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        T sum = 0;
        for (int64_t j = 0; j < d.Lk; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
        T* p = probs + (bh * d.Lq + i) * d.Lk;
        for (int64_t j = 0; j < d.Lk; ++j) p[j] = s[j] / sum;
        T* o = out + ((b * d.Lq + i) * d.H + h) * d.D;
        for (int64_t x = 0; x < d.D; ++x) {
          T acc = 0;
          for (int64_t j = 0; j < d.Lk; ++j)
            acc += p[j] * (mult ? mult[(bh * d.Lq + i) * d.Lk + j] : T(1)) * V.row(b, j, h)[x];
          o[x] = acc;
        }
      }
    }
  });
}

template <typename T>
void bwd_loops(const Dims& d, const T* dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const T* probs, const T* mult, T* dq, T* dk, T* dv, int64_t ld_out, T* dscores) {
  const auto Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v);
  const int64_t HD = d.H * d.D;
  at::parallel_for(0, d.B * d.H, head_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<T> ds(d.Lq * d.Lk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      const T* P = probs + bh * d.Lq * d.Lk;
      for (int64_t i = 0; i < d.Lq; ++i) {
        const T* go = dout + (b * d.Lq + i) * HD + h * d.D;
        T delta = 0;
        for (int64_t j = 0; j < d.Lk; ++j) {
          T dp = 0;
          for (int64_t x = 0; x < d.D; ++x) dp += go[x] * V.row(b, j, h)[x];
          if (mult) dp *= mult[(bh * d.Lq + i) * d.Lk + j];
          ds[i * d.Lk + j] = dp;
          delta += P[i * d.Lk + j] * dp;
        }
        for (int64_t j = 0; j < d.Lk; ++j) ds[i * d.Lk + j] = P[i * d.Lk + j] * (ds[i * d.Lk + j] - delta);
      }
      if (dscores) std::copy(ds.begin(), ds.end(), dscores + bh * d.Lq * d.Lk);
      for (int64_t i = 0; i < d.Lq; ++i)
        for (int64_t x = 0; x < d.D; ++x) {
          T acc = 0;
          for (int64_t j = 0; j < d.Lk; ++j) acc += ds[i * d.Lk + j] * K.row(b, j, h)[x];
          dq[(b * d.Lq + i) * ld_out + h * d.D + x] = acc;
        }
      for (int64_t j = 0; j < d.Lk; ++j)
        for (int64_t x = 0; x < d.D; ++x) {
          T ak = 0, av = 0;
          for (int64_t i = 0; i < d.Lq; ++i) {
            ak += ds[i * d.Lk + j] * Q.row(b, i, h)[x];
            av += P[i * d.Lk + j] * (mult ? mult[(bh * d.Lq + i) * d.Lk + j] : T(1)) * dout[(b * d.Lq + i) * HD + h * d.D + x];
          }
          dk[(b * d.Lk + j) * ld_out + h * d.D + x] = ak;
          dv[(b * d.Lk + j) * ld_out + h * d.D + x] = av;
        }
    }
  });
}

AttnArgs f32_args(const Dims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  AttnArgs a{};
  a.B = d.B; a.H = d.H; a.Lq = d.Lq; a.Lk = d.Lk; a.D = d.D;
  a.q = q.data_ptr<float>(); a.q_b = q.stride(0); a.q_l = q.stride(1); a.q_h = q.stride(2);
  a.k = k.data_ptr<float>(); a.k_b = k.stride(0); a.k_l = k.stride(1); a.k_h = k.stride(2);
  a.v = v.data_ptr<float>(); a.v_b = v.stride(0); a.v_l = v.stride(1); a.v_h = v.stride(2);
  return a;
}

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& key_mask,
                                                const std::optional<at::Tensor>& dropout_mult, Names n = {}) {
  const Dims d = check_attention_args(q, k, v, bias, op, key_mask, n);
  check_dropout_mult(dropout_mult, d, q, op, n);
  auto out = make_output(op, std::string("the output [B, Lq, H, D] (B, Lq, H, D of ") + n.q + ")", {d.B, d.Lq, d.H, d.D},
                         q.scalar_type(),
                         [&] { return at::empty({d.B, d.Lq, d.H, d.D}, q.options()); });
  auto probs = make_output(op, std::string("probs [B, H, Lq, Lk] (B, Lq, H of ") + n.q + "; Lk of " + n.k + ")",
                           {d.B, d.H, d.Lq, d.Lk}, q.scalar_type(),
                           [&] { return at::empty({d.B, d.H, d.Lq, d.Lk}, q.options()); });
  if (out.numel() == 0) return {out, probs};
  if (d.Lk == 0) { out.zero_(); return {out, probs}; }
  if (q.scalar_type() == at::kDouble) {
    fwd_loops<double>(d, q, k, v, bias, key_mask, dropout_mult ? dropout_mult->data_ptr<double>() : nullptr,
                      probs.data_ptr<double>(), out.data_ptr<double>());
    return {out, probs};
  }
  AttnArgs a = f32_args(d, q, k, v);
  if (bias.has_value()) {
    a.bias = bias->data_ptr<float>();
    a.bias_b = bstride(*bias, 0); a.bias_h = bstride(*bias, 1); a.bias_i = bstride(*bias, 2);
  }
  if (key_mask.has_value()) { a.key_mask = key_mask->data_ptr<float>(); a.key_mask_b = bstride(*key_mask, 0); }
  if (dropout_mult.has_value()) a.dropout_mult = dropout_mult->data_ptr<float>();
  a.probs = probs.data_ptr<float>();
  a.out = out.data_ptr<float>();
  const SmallGemmIsa isa = small_gemm_active();
  at::parallel_for(0, d.B * d.H, head_grain(d), [&](int64_t b, int64_t e) { attention_fwd_f32(isa, a, b, e); });
  return {out, probs};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& key_mask,
                                                 const std::optional<at::Tensor>& dropout_mult) {
  return forward_impl("flanmoe::attention", q, k, v, bias, key_mask, dropout_mult);
}

namespace {

// The gradients into dq, dk, dv ([B, L, H, D] views whose rows are ld_out apart: H*D, or 3*H*D in a packed dqkv)
// and the bias gradient (allocated here); the arguments checked by the caller.
at::Tensor backward_into(const Dims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& probs, bool bias_grad, bool bias_batched,
                         const std::optional<at::Tensor>& dropout_mult, at::Tensor& dq, at::Tensor& dk,
                         at::Tensor& dv, int64_t ld_out, const char* op) {
  const auto go = contiguous_arg(dout, op, "dout"), p = contiguous_arg(probs, op, "probs");
  const std::vector<int64_t> pshape{d.B, d.H, d.Lq, d.Lk};
  // the bias gradient per batch row ([B, H, Lq, Lk]) or summed over the batch ([1, H, Lq, Lk]: a bias shared by it)
  const bool batched = bias_batched || d.B <= 1;
  const std::vector<int64_t> dbshape = batched ? pshape : std::vector<int64_t>{1, d.H, d.Lq, d.Lk};
  auto dbias = bias_grad ? make_output(op, "dbias (the shape of probs)", dbshape, q.scalar_type(),
                                       [&] { return at::empty(dbshape, q.options()); })
                         : at::empty({0}, q.options());
  if (d.B * d.H == 0) return dbias;
  if (d.Lq == 0 || d.Lk == 0 || d.D == 0) {   // an empty contraction: every gradient is 0
    dq.zero_(); dk.zero_(); dv.zero_(); dbias.zero_();
    return dbias;
  }
  if (q.scalar_type() == at::kDouble) {
    auto full = bias_grad && !batched ? make_output(op, "dbias per batch row (the shape of probs)", pshape,
                                                    q.scalar_type(), [&] { return at::empty(pshape, q.options()); })
                                      : dbias;
    bwd_loops<double>(d, go.data_ptr<double>(), q, k, v, p.data_ptr<double>(),
                      dropout_mult ? dropout_mult->data_ptr<double>() : nullptr, dq.data_ptr<double>(),
                      dk.data_ptr<double>(), dv.data_ptr<double>(), ld_out, bias_grad ? full.data_ptr<double>() : nullptr);
    if (bias_grad && !batched) dbias.copy_(full.sum(0, true));
    return dbias;
  }
  AttnArgs a = f32_args(d, q, k, v);
  a.probs = const_cast<float*>(p.data_ptr<float>());
  a.dout = go.data_ptr<float>();
  a.dq = dq.data_ptr<float>(); a.dk = dk.data_ptr<float>(); a.dv = dv.data_ptr<float>();
  a.dq_l = a.dk_l = a.dv_l = ld_out;
  a.dscores = bias_grad ? dbias.data_ptr<float>() : nullptr;
  a.dscores_batched = batched;
  if (dropout_mult.has_value()) a.dropout_mult = dropout_mult->data_ptr<float>();
  const SmallGemmIsa isa = small_gemm_active();
  const int64_t n = bias_grad && !batched ? d.H : d.B * d.H;   // summed over the batch: tasks are heads h
  at::parallel_for(0, n, bias_grad && !batched ? 1 : head_grain(d),
                   [&](int64_t b, int64_t e) { attention_bwd_f32(isa, a, b, e); });
  return dbias;
}

void check_backward_args(const Dims& d, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& probs,
                         const char* op, Names n = {}) {
  FLANMOE_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), op,
                ": dout must be [B, Lq, H, D] = ", shape_str(q), " ", q.scalar_type(), " (B, Lq, H, D and dtype of ", n.q,
                "; got ", shape_str(dout), " ", dout.scalar_type(), ")");
  const std::vector<int64_t> pshape{d.B, d.H, d.Lq, d.Lk};
  FLANMOE_CHECK(probs.sizes() == at::IntArrayRef(pshape) && probs.scalar_type() == q.scalar_type(), op,
                ": probs must be the [B, H, Lq, Lk] = ", at::IntArrayRef(pshape),
                " probabilities from attention (B, Lq, H of ", n.q, "; Lk of ", n.k, "; got ", shape_str(probs), " ",
                probs.scalar_type(), ")");
  check_same_device(dout, q, op, "dout", n.q);
  check_same_device(probs, q, op, "probs", n.q);
}

// qkv [B, L, 3, H, D], float32/float64 on the CPU, contiguous along D: its q, k, v views (checked here, so that the
// checks of q, k, v that follow cannot fail and a refusal names qkv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack_qkv(const at::Tensor& qkv, const char* op) {
  check_rank(qkv, 5, op, "qkv");
  FLANMOE_CHECK(qkv.size(2) == 3, op, ": qkv must be [B, L, 3, H, D] (q, k, v along dim 2; got shape ",
                shape_str(qkv), ")");
  FLANMOE_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble, op,
                ": qkv must be float32 or float64 (got ", qkv.scalar_type(), ")");
  check_device_of(qkv, op, "qkv", false);
  FLANMOE_CHECK(qkv.size(4) <= 1 || qkv.stride(4) == 1, op, ": qkv must have a contiguous last dimension (got shape ",
                shape_str(qkv), " with strides ", qkv.strides(), ")");
  return {qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& probs,
    bool bias_grad, bool bias_batched, const std::optional<at::Tensor>& dropout_mult) {
  const char* op = "flanmoe::attention_backward";
  const Dims d = check_attention_args(q, k, v, std::nullopt, op);
  check_dropout_mult(dropout_mult, d, q, op);
  check_backward_args(d, dout, q, probs, op);
  auto grad_like = [&](const at::Tensor& t, const char* what) {
    return make_output(op, what, t.sizes(), t.scalar_type(),
                       [&] { return at::empty_like(t, at::MemoryFormat::Contiguous); });
  };
  auto dq = grad_like(q, "dq (the shape of q)"), dk = grad_like(k, "dk (the shape of k)"),
       dv = grad_like(v, "dv (the shape of v)");
  auto dbias = backward_into(d, dout, q, k, v, probs, bias_grad, bias_batched, dropout_mult, dq, dk, dv, d.H * d.D, op);
  return {dq, dk, dv, dbias};
}

// Self attention on a packed projection qkv [B, L, 3, H, D]: the op above on its q, k, v views, and a backward
// that writes dq, dk, dv into one packed dqkv (no stack of three gradients, as unbind's backward would do).
std::tuple<at::Tensor, at::Tensor> attention_qkv_cpu(const at::Tensor& qkv, const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& key_mask,
                                                     const std::optional<at::Tensor>& dropout_mult) {
  const char* op = "flanmoe::attention_qkv";
  auto [q, k, v] = unpack_qkv(qkv, op);
  return forward_impl(op, q, k, v, bias, key_mask, dropout_mult, Names{"qkv", "qkv"});
}

std::tuple<at::Tensor, at::Tensor> attention_qkv_backward_cpu(const at::Tensor& dout, const at::Tensor& qkv,
                                                              const at::Tensor& probs, bool bias_grad,
                                                              bool bias_batched,
                                                              const std::optional<at::Tensor>& dropout_mult) {
  const char* op = "flanmoe::attention_qkv_backward";
  auto [q, k, v] = unpack_qkv(qkv, op);
  const Names n{"qkv", "qkv"};
  const Dims d = check_attention_args(q, k, v, std::nullopt, op, std::nullopt, n);
  check_dropout_mult(dropout_mult, d, q, op, n);
  check_backward_args(d, dout, q, probs, op, n);
  auto dqkv = make_output(op, "dqkv (the shape of qkv)", qkv.sizes(), qkv.scalar_type(),
                          [&] { return at::empty(qkv.sizes(), qkv.options()); });
  at::Tensor dq = dqkv.select(2, 0), dk = dqkv.select(2, 1), dv = dqkv.select(2, 2);
  auto dbias = backward_into(d, dout, q, k, v, probs, bias_grad, bias_batched, dropout_mult, dq, dk, dv,
                             3 * d.H * d.D, op);
  return {dqkv, dbias};
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_qkv", &attention_qkv_cpu);
  m.impl("attention_qkv_backward", &attention_qkv_backward_cpu);
}

}  // namespace flanmoe
