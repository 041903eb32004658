// bf16 grouped GEMMs on oneDNN's brgemm ukernel (torch's at::native::cpublas::brgemm).
//
// The ukernel wants B in VNNI order: pairs of consecutive rows along the depth interleaved, in column blocks of
// NB = 64 ([depth/2][64][2]; oneDNN's "pack32" layout, the same for AMX and AVX512-BF16). Each work unit is one
// group's column block: it packs that block of the weight once (the weight is read once per product, as in
// any GEMM) and runs every row block of the group against it, MB = 32 rows (two AMX tiles) per call, into an
// fp32 block that is rounded to bf16 as it is stored. Units are spread over the intra-op threads longest first.
// Weight gradients a_g^T dy_g take dy_g as the packed operand (pairs of rows) and a_g transposed, the depth
// (the group's rows) zero-padded to 32 and cut into chunks of at most KC = 256: the ukernel is JIT-generated
// and cached per shape, so every call uses one of a few fixed shapes, never one per group size.
#include "grouped_mm_bf16.h"
#include "work_items.h"
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace flanmoe {
namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr int64_t NB = 64;    // packed column block
constexpr int64_t MB = 32;    // rows per ukernel call
constexpr int64_t KC = 256;   // depth chunk of the weight-gradient products (a multiple of 32)

template <typename T>
T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// dst[k2][n][2] = src[2 k2 + {0,1}][n] for n < nb (0 for nb <= n < NB, and for rows at or past `rows`);
// src row-major with leading dimension ld, k2 < pairs.
void pack_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t pairs, int64_t nb, uint16_t* dst) {
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    uint16_t* d = dst + k2 * NB * 2;
    const int64_t r = 2 * k2;
    const uint16_t* r0 = r < rows ? src + r * ld : nullptr;
    const uint16_t* r1 = r + 1 < rows ? src + (r + 1) * ld : nullptr;
    if (r0 && r1) {
      for (int64_t n = 0; n < nb; ++n) { d[2 * n] = r0[n]; d[2 * n + 1] = r1[n]; }
    } else {
      for (int64_t n = 0; n < nb; ++n) { d[2 * n] = r0 ? r0[n] : 0; d[2 * n + 1] = 0; }
    }
    if (nb < NB) std::memset(d + 2 * nb, 0, (NB - nb) * 2 * sizeof(uint16_t));
  }
}

// The same block of src^T: dst[k2][n][2] = src[n][2 k2 + {0,1}] (src [nb, 2*pairs] rows with leading dim ld):
// a transpose of 32-bit pairs, in 16-pair strips so that reads and writes both stay in cache lines.
void pack_cols(const uint16_t* src, int64_t ld, int64_t pairs, int64_t nb, uint16_t* dst) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
    const int64_t k1 = std::min(pairs, k0 + 16);
    for (int64_t n = 0; n < NB; ++n) {
      if (n < nb) {
        const uint16_t* s = src + n * ld;
        for (int64_t k2 = k0; k2 < k1; ++k2) {
          uint32_t v;
          std::memcpy(&v, s + 2 * k2, sizeof v);
          d[k2 * NB + n] = v;
        }
      } else {
        for (int64_t k2 = k0; k2 < k1; ++k2) d[k2 * NB + n] = 0;
      }
    }
  }
}

// out[i][n] = bf16(c[i][n]) for an [mb, nb] block of the fp32 accumulator (leading dim NB).
void store_block(const float* c, int64_t mb, int64_t nb, bf16* out, int64_t ldo) {
  for (int64_t i = 0; i < mb; ++i) {
    const float* ci = c + i * NB;
    bf16* oi = out + i * ldo;
    for (int64_t n = 0; n < nb; ++n) oi[n] = bf16(ci[n]);
  }
}

const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<bf16>()); }

bool probe() {
  try {
    if (!at::globalContext().userEnabledMkldnn()) return false;
    // [1, 2] @ [2, 16]: A = (1, 2), B rows (k) 0 and 1 = 1..16 and 2x that; C[n] = (n+1) + 2 * 2 (n+1) = 5 (n+1)
    bf16 a[2] = {bf16(1.f), bf16(2.f)};
    std::vector<bf16> b(2 * NB, bf16(0.f));
    for (int n = 0; n < 16; ++n) { b[2 * n] = bf16(float(n + 1)); b[2 * n + 1] = bf16(float(2 * (n + 1))); }
    std::vector<float> c(NB, -1.f);
    cpublas::brgemm(1, 16, 2, 2, NB, NB, false, a, b.data(), c.data(), true);
    cpublas::brgemm_release(true);
    for (int n = 0; n < 16; ++n)
      if (c[n] != 5.f * (n + 1)) return false;
    return true;
  } catch (...) {
    return false;
  }
}

enum class Mode { blas, brgemm };
std::atomic<int>& mode_ref() {
  static std::atomic<int> m{-1};
  return m;
}

}  // namespace

bool bf16_brgemm_available() {
  static const bool ok = probe();
  return ok;
}

bool set_bf16_gemm(const std::string& mode) {
  if (mode == "blas" || mode == "off") { mode_ref() = int(Mode::blas); return true; }
  if (mode == "brgemm") {
    if (!bf16_brgemm_available()) return false;
    mode_ref() = int(Mode::brgemm);
    return true;
  }
  // auto: blas for now. On a 2-core Xeon with AMX (grid job beside it) the ukernel path ran 1.1-1.9x the time
  // of one oneDNN matmul per row block at T=4096, d=512, f=2048, E=1..128: opt in with FLANMOE_BF16_GEMM=brgemm.
  if (mode == "auto") { mode_ref() = int(Mode::blas); return true; }
  return false;
}

std::string bf16_gemm_active() {
  if (mode_ref() < 0) {
    static std::once_flag once;
    std::call_once(once, [] {
      const char* env = std::getenv("FLANMOE_BF16_GEMM");
      if (!env || !set_bf16_gemm(env)) set_bf16_gemm("auto");
    });
  }
  return mode_ref() == int(Mode::brgemm) ? "brgemm" : "blas";
}

bool bf16_brgemm_applies(const at::Tensor& a, int64_t depth) {
  return a.scalar_type() == at::kBFloat16 && depth % 2 == 0 && bf16_gemm_active() == "brgemm";
}

void gmm_bf16_brgemm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                     at::Tensor& out) {
  const int64_t K = a.size(1), G = b.size(0), M = out.size(1), pairs = K / 2;
  const int64_t nblk = (M + NB - 1) / NB;
  std::vector<int64_t> ext(G);
  std::vector<double> work(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = off[g + 1] - off[g];
    ext[g] = rows ? nblk : 0;
    work[g] = double(rows + 1) * K * NB;   // +1: the block's packing
  }
  const uint16_t* A = u16(a);
  const uint16_t* B = u16(b);
  bf16* C = out.data_ptr<bf16>();
  run_items(make_items(ext, work, at::get_num_threads()), 2.0 * off[G] * K * M, [&](const Item& it) {
    thread_local std::vector<uint16_t> pbuf;
    thread_local std::vector<float> cbuf;
    uint16_t* packed = scratch(pbuf, size_t(pairs) * NB * 2);
    float* acc = scratch(cbuf, size_t(MB) * NB);
    const int64_t r0 = off[it.g], rows = off[it.g + 1] - r0;
    for (int64_t j = it.lo; j < it.hi; ++j) {
      const int64_t j0 = j * NB, nb = std::min(NB, M - j0);
      if (trans_b) pack_cols(B + (it.g * M + j0) * K, K, pairs, nb, packed);   // b[g] is [M, K]
      else pack_rows(B + it.g * K * M + j0, M, K, pairs, nb, packed);          // b[g] is [K, M]
      for (int64_t i0 = 0; i0 < rows; i0 += MB) {
        const int64_t mb = std::min(MB, rows - i0);
        cpublas::brgemm(mb, nb, K, K, NB, NB, false, reinterpret_cast<const bf16*>(A + (r0 + i0) * K),
                        reinterpret_cast<const bf16*>(packed), acc, true);
        store_block(acc, mb, nb, C + (r0 + i0) * M + j0, M);
      }
    }
  }, [] { cpublas::brgemm_release(true); });
}

void wgrad_bf16_brgemm(const at::Tensor& a, const at::Tensor& dy, const std::vector<int64_t>& off, at::Tensor& out) {
  const int64_t K = a.size(1), M = dy.size(1), G = int64_t(off.size()) - 1;
  const int64_t nblk = (M + NB - 1) / NB;
  // a_g^T per group, [K, R_g] with R_g = rows rounded up to 32, zero-padded: the ukernel's A operand
  std::vector<int64_t> R(G), toff(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    R[g] = (off[g + 1] - off[g] + 31) / 32 * 32;
    toff[g + 1] = toff[g] + K * R[g];
  }
  auto at_buf = at::empty({toff[G]}, a.options());
  uint16_t* T = reinterpret_cast<uint16_t*>(at_buf.data_ptr<bf16>());
  const uint16_t* A = u16(a);
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rows = off[g + 1] - off[g];
      uint16_t* t = T + toff[g];
      for (int64_t k0 = 0; k0 < K; k0 += 16)           // 16 columns of a_g at a time: each row read once
        for (int64_t r = 0; r < R[g]; ++r)
          for (int64_t k = k0; k < std::min(K, k0 + 16); ++k)
            t[k * R[g] + r] = r < rows ? A[(off[g] + r) * K + k] : 0;
    }
  });
  std::vector<int64_t> ext(G);
  std::vector<double> work(G);
  for (int64_t g = 0; g < G; ++g) { ext[g] = nblk; work[g] = double(R[g] + 1) * K * NB; }
  const uint16_t* D = u16(dy);
  bf16* C = out.data_ptr<bf16>();
  run_items(make_items(ext, work, at::get_num_threads()), 2.0 * off[G] * K * M, [&](const Item& it) {
    thread_local std::vector<uint16_t> pbuf;
    thread_local std::vector<float> cbuf;
    const int64_t rows = off[it.g + 1] - off[it.g], Rg = R[it.g];
    for (int64_t j = it.lo; j < it.hi; ++j) {
      const int64_t j0 = j * NB, nb = std::min(NB, M - j0);
      bf16* o = C + it.g * K * M + j0;
      if (rows == 0) {                                 // no rows: a zero gradient
        for (int64_t k = 0; k < K; ++k) std::fill(o + k * M, o + k * M + nb, bf16(0.f));
        continue;
      }
      uint16_t* packed = scratch(pbuf, size_t(Rg / 2) * NB * 2);
      float* acc = scratch(cbuf, size_t(MB) * NB);
      pack_rows(D + off[it.g] * M + j0, M, rows, Rg / 2, nb, packed);
      const uint16_t* t = T + toff[it.g];
      for (int64_t k0 = 0; k0 < K; k0 += MB) {
        const int64_t mb = std::min(MB, K - k0);
        for (int64_t c0 = 0; c0 < Rg; c0 += KC) {
          const int64_t kc = std::min(KC, Rg - c0);
          cpublas::brgemm(mb, nb, kc, Rg, NB, NB, c0 > 0, reinterpret_cast<const bf16*>(t + k0 * Rg + c0),
                          reinterpret_cast<const bf16*>(packed + c0 * NB), acc, true);
        }
        store_block(acc, mb, nb, o + k0 * M, M);
      }
    }
  }, [] { cpublas::brgemm_release(true); });
}

}  // namespace flanmoe
