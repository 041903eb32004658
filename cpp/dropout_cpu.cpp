// CPU flanmoe::dropout: y = x * keep / (1 - p) with keep drawn from a counter-based hash of (seed, element index),
// so the mask needs no storage (the backward applies the same op to the gradient, with the same seed) and any
// chunk of the tensor can be drawn independently (parallel, vectorisable). torch's own CPU dropout draws a
// Bernoulli per element from the mt19937 generator, ~4 ns each: at the tiny preset with dropout 0.1 that was
// about half of a training step. Callers draw the seed from torch's generator (one draw per call), so
// torch.manual_seed and a checkpointed RNG state reproduce the masks.
#include "flanmoe.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>

namespace flanmoe {
namespace {

// splitmix64 finaliser: a bijective mix of the 64-bit counter; two 32-bit uniforms per call.
inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void apply_mask(const T* x, T* y, int64_t n, double p, int64_t seed) {
  using acc_t = at::opmath_type<T>;                          // float for float/bf16, double for double
  // keep element i iff its 32-bit uniform u >= threshold = p * 2^32 (exact to 2^-32)
  const uint64_t thr = static_cast<uint64_t>(std::llround(p * 4294967296.0));
  const uint64_t key = mix64(static_cast<uint64_t>(seed));
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  at::parallel_for(0, (n + 1) / 2, 8192, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const uint64_t r = mix64(key ^ static_cast<uint64_t>(c) * 0xD6E8FEB86659FD93ull);
      const int64_t i = 2 * c;
      y[i] = (r & 0xFFFFFFFFull) >= thr ? static_cast<T>(static_cast<acc_t>(x[i]) * scale) : T(0);
      if (i + 1 < n) y[i + 1] = (r >> 32) >= thr ? static_cast<T>(static_cast<acc_t>(x[i + 1]) * scale) : T(0);
    }
  });
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  const char* op = "flanmoe::dropout";
  check_float_dtype(x, op, "x");
  check_device_of(x, op, "x", false);
  FLANMOE_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1) (got p=", p, ")");
  const auto xc = contiguous_arg(x, op, "x");
  auto y = make_output(op, "the output (the shape of x)", xc.sizes(), xc.scalar_type(), [&] { return at::empty_like(xc); });
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "flanmoe_dropout", [&] {
    apply_mask(xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), p, seed);
  });
  return y;
}

TORCH_LIBRARY_IMPL(flanmoe, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace flanmoe
