// bf16 grouped GEMMs on oneDNN's brgemm ukernel (torch's at::native::cpublas::brgemm).
//
// The ukernel wants B in VNNI order: pairs of consecutive rows along the depth interleaved, in column blocks of
// NB = 64 ([depth/2][64][2]; oneDNN's "pack32" layout, the same for AMX and AVX512-BF16). Each work unit of a
// product is one group's chunk of up to RC rows; the group's weight is packed whole, once per thread, group and
// call, as panels PW = 256 columns wide (reading it row by row, front to back; a transposed weight of a one-chunk
// group is packed panel by panel next to its use instead), and every MB = 32-row block (two AMX
// tiles) of the chunk runs against each panel in one ukernel call, into an fp32 block that is rounded to bf16 as
// it is stored. Units are spread over the intra-op threads longest first.
// Weight gradients a_g^T dy_g take dy_g as the packed operand (pairs of rows) and a_g transposed, the depth
// (the group's rows) zero-padded to 32 and cut into chunks of at most KC = 256: the ukernel is JIT-generated
// and cached per shape, so every call uses one of a few fixed shapes, never one per group size.
#include "grouped_mm_bf16.h"
#include "scratch.h"
#include "work_items.h"
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include "bf16_avx512.h"

namespace flanmoe {
namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr int64_t NB = 64;    // packed column block
constexpr int64_t MB = 32;    // rows per ukernel call
constexpr int64_t RC = 256;   // rows per unit of a product (with K = 512: 256 KiB of a, kept in cache)
constexpr int64_t PB = 4;     // column blocks per unit (a 256-column panel of the weight, packed once)
constexpr int64_t PW = NB * PB;   // the panel's width: packed as one block, N of each ukernel call
constexpr int64_t KC = 256;   // depth chunk of the weight-gradient products (a multiple of 32)

// dst[k2][n][2] = src[2 k2 + {0,1}][n] for n < nb (0 for nb <= n < W, and for rows at or past `rows`);
// src row-major with leading dimension ld, k2 < pairs; W (a multiple of 16) is the packed block's width.
void pack_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t pairs, int64_t nb, uint16_t* dst, int64_t W) {
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    uint16_t* d = dst + k2 * W * 2;
    const int64_t r = 2 * k2;
    const uint16_t* r0 = r < rows ? src + r * ld : nullptr;
    const uint16_t* r1 = r + 1 < rows ? src + (r + 1) * ld : nullptr;
    if (r0 && r1) {
      for (int64_t n = 0; n < nb; ++n) { d[2 * n] = r0[n]; d[2 * n + 1] = r1[n]; }
    } else {
      for (int64_t n = 0; n < nb; ++n) { d[2 * n] = r0 ? r0[n] : 0; d[2 * n + 1] = 0; }
    }
    if (nb < W) std::memset(d + 2 * nb, 0, (W - nb) * 2 * sizeof(uint16_t));
  }
}

// The same block of src^T: dst[k2][n][2] = src[n][2 k2 + {0,1}] (src [nb, 2*pairs] rows with leading dim ld):
// a transpose of 32-bit pairs, in 16-pair strips so that reads and writes both stay in cache lines.
void pack_cols(const uint16_t* src, int64_t ld, int64_t pairs, int64_t nb, uint16_t* dst, int64_t W) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
    const int64_t k1 = std::min(pairs, k0 + 16);
    for (int64_t n = 0; n < W; ++n) {
      if (n < nb) {
        const uint16_t* s = src + n * ld;
        for (int64_t k2 = k0; k2 < k1; ++k2) {
          uint32_t v;
          std::memcpy(&v, s + 2 * k2, sizeof v);
          d[k2 * W + n] = v;
        }
      } else {
        for (int64_t k2 = k0; k2 < k1; ++k2) d[k2 * W + n] = 0;
      }
    }
  }
}

// out[i][n] = bf16(c[i][n]) for an [mb, nb] block of the fp32 accumulator (leading dim ldc).
void store_block(const float* c, int64_t mb, int64_t nb, bf16* out, int64_t ldo, int64_t ldc) {
  for (int64_t i = 0; i < mb; ++i) {
    const float* ci = c + i * ldc;
    bf16* oi = out + i * ldo;
    for (int64_t n = 0; n < nb; ++n) oi[n] = bf16(ci[n]);
  }
}

#if defined(__x86_64__)
// AVX-512 (F+BW) versions of the three loops above (the packings in bf16_avx512.h); the ukernel itself needs
// AVX-512, so wherever it runs these do.

FLANMOE_AVX512BW void store_block_avx512(const float* c, int64_t mb, int64_t nb, bf16* out, int64_t ldo, int64_t ldc) {
  for (int64_t i = 0; i < mb; ++i) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out + i * ldo);
    for (int64_t n = 0; n < nb; n += 16) {
      const int64_t left = std::min<int64_t>(16, nb - n);
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm512_mask_cvtepi32_storeu_epi16(o + n, m, bf16_round(_mm512_maskz_loadu_ps(m, c + i * ldc + n)));
    }
  }
}

bool has_avx512bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}
#else
bool has_avx512bw() { return false; }
void pack_rows_avx512(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*, int64_t) {}
void pack_cols_avx512(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {}
void store_block_avx512(const float*, int64_t, int64_t, bf16*, int64_t, int64_t) {}
#endif

void pack_rows_any(const uint16_t* src, int64_t ld, int64_t rows, int64_t pairs, int64_t nb, uint16_t* dst, int64_t W = NB) {
  if (has_avx512bw()) pack_rows_avx512(src, ld, rows, pairs, nb, dst, W); else pack_rows(src, ld, rows, pairs, nb, dst, W);
}
void pack_cols_any(const uint16_t* src, int64_t ld, int64_t pairs, int64_t nb, uint16_t* dst, int64_t W = NB) {
  if (has_avx512bw()) pack_cols_avx512(src, ld, pairs, nb, dst, W); else pack_cols(src, ld, pairs, nb, dst, W);
}
void store_block_any(const float* c, int64_t mb, int64_t nb, bf16* out, int64_t ldo, int64_t ldc = NB) {
  if (has_avx512bw()) store_block_avx512(c, mb, nb, out, ldo, ldc); else store_block(c, mb, nb, out, ldo, ldc);
}

const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<bf16>()); }

// dst[i][k] = relu(src[i][k]) for `rows` rows of `K` (src leading dim K): the A operand of a relu product.
void relu_rows(const uint16_t* src, int64_t rows, int64_t K, uint16_t* dst) {
  const int64_t n = rows * K;
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_relu_bits(src[i]);
}

// c[i][n] = 0 wherever mask[i][n] <= 0, for an [mb, nb] block of the fp32 accumulator (leading dim ldc; mask ld
// ldm): the input gradient through a relu, as torch's threshold_backward (NaN in the mask lets the gradient through).
void mask_block(float* c, int64_t mb, int64_t nb, const uint16_t* mask, int64_t ldm, int64_t ldc) {
  for (int64_t i = 0; i < mb; ++i)
    for (int64_t n = 0; n < nb; ++n)
      if (bf16_nonpos(mask[i * ldm + n])) c[i * ldc + n] = 0.f;
}

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

// The path of each product slot (sgemm_small.h's kGemmProductNames order); -1 until first read: FLANMOE_BF16_GEMM.
std::atomic<int>& slot_ref(int slot) {
  static std::atomic<int> m[6] = {-1, -1, -1, -1, -1, -1};
  return m[slot];
}

const char* path_name(int p) { return p == int(Bf16Path::brgemm) ? "brgemm" : p == int(Bf16Path::dp) ? "avx512bf16" : "blas"; }

// mode -> path (-1: unknown name or not runnable here); auto = blas: the faster path per shape is chosen by measurement
// in Python (gemm.choose_expert_gemm), which sets each product's path explicitly.
int parse_mode(const std::string& mode) {
  if (mode == "blas" || mode == "off" || mode == "auto") return int(Bf16Path::blas);
  if (mode == "brgemm") return bf16_brgemm_available() ? int(Bf16Path::brgemm) : -1;
  if (mode == "avx512bf16") return bf16_dp_available() ? int(Bf16Path::dp) : -1;
  return -1;
}

void init_slots() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("FLANMOE_BF16_GEMM");
    const int p = env ? parse_mode(env) : -1;
    for (int i = 0; i < 6; ++i) {
      int expect = -1;
      slot_ref(i).compare_exchange_strong(expect, p < 0 ? int(Bf16Path::blas) : p);
    }
  });
}

}  // namespace

bool bf16_brgemm_available() {
  static const bool ok = probe();
  return ok;
}

Bf16Path bf16_gemm_path(GemmProduct p, bool tall) {
  const int slot = 2 * int(p) + int(tall);
  int v = slot_ref(slot).load(std::memory_order_relaxed);
  if (v < 0) { init_slots(); v = slot_ref(slot).load(); }
  return Bf16Path(v);
}

std::string bf16_gemm_active(const std::string& product) {
  auto name = [](int slot) { return std::string(path_name(int(bf16_gemm_path(GemmProduct(slot / 2), slot % 2)))); };
  if (product == "all") return gemm_slots_summary(name);
  const int slot = gemm_product_slot(product);
  return slot < 0 ? std::string() : name(slot);
}

bool set_bf16_gemm(const std::string& mode, const std::string& product) {
  int lo, hi;
  if (!gemm_product_range(product, &lo, &hi)) return false;
  const int p = parse_mode(mode);
  if (p < 0) return false;
  init_slots();
  for (int i = lo; i < hi; ++i) slot_ref(i).store(p);
  return true;
}

void gmm_bf16_brgemm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& off, bool trans_b,
                     at::Tensor& out, bool relu_a, const at::Tensor* mask) {
  // A unit is one group's chunk of up to RC rows. Its weight is packed whole, panel after panel (PW columns each),
  // reading b[g] row by row from start to end (sequential streams: at large E the weights come from memory, and
  // one short segment per row and panel defeated the prefetcher), once per thread, group and call: a thread that
  // takes several chunks of one group packs it once. Then every MB-row block of the chunk runs against each panel
  // (panel outer: it stays in cache while the chunk's rows, RC x K bf16, pass through).
  const int64_t K = a.size(1), G = b.size(0), M = out.size(1), pairs = K / 2;
  const int64_t nblk = (M + NB - 1) / NB, npanel = (nblk + PB - 1) / PB, pstride = pairs * PW * 2;
  std::vector<int64_t> ext(G);
  std::vector<double> work(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t rows = off[g + 1] - off[g];
    ext[g] = (rows + RC - 1) / RC;                   // units: row chunks
    work[g] = double(std::min(rows, RC) + 1) * K * M;
  }
  static std::atomic<int64_t> calls{0};
  const int64_t call = ++calls;                      // the packed weight a thread keeps is valid for this call only
  const uint16_t* A = u16(a);
  const uint16_t* B = u16(b);
  const uint16_t* Mk = mask ? u16(*mask) : nullptr;
  bf16* C = out.data_ptr<bf16>();
  run_items(make_items(ext, work, at::get_num_threads()), 2.0 * off[G] * K * M, [&](const Item& it) {
    thread_local std::vector<uint16_t> pbuf, abuf;
    thread_local std::vector<float> cbuf;
    thread_local int64_t packed_call = 0, packed_g = -1;
    uint16_t* packed = grown(pbuf, size_t(npanel) * pstride);
    float* acc = grown(cbuf, size_t(MB) * PW);
    const int64_t g0 = off[it.g], rows = off[it.g + 1] - g0;
    // b[g] as [M, K] (trans_b) is packed panel by panel next to its use (a panel is 256 contiguous rows: read
    // front to back already, and it stays in cache) unless the group has several chunks to share it
    const bool whole = !trans_b || rows > RC;
    if (whole && (packed_call != call || packed_g != it.g)) {
      if (trans_b) {                                 // b[g] is [M, K]: 16 rows at a time, each read whole
        for (int64_t p = 0; p < npanel; ++p)
          pack_cols_any(B + (it.g * M + p * PW) * K, K, pairs, std::min(PW, M - p * PW), packed + p * pstride, PW);
      } else {                                       // b[g] is [K, M]: a pair of rows at a time, across every panel
        const uint16_t* Bg = B + it.g * K * M;
        for (int64_t k2 = 0; k2 < pairs; ++k2)
          for (int64_t p = 0; p < npanel; ++p)
            pack_rows_any(Bg + 2 * k2 * M + p * PW, M, K - 2 * k2, 1, std::min(PW, M - p * PW),
                          packed + p * pstride + k2 * PW * 2, PW);
      }
      packed_call = call; packed_g = it.g;
    }
    for (int64_t u = it.lo; u < it.hi; ++u) {
      const int64_t c0 = u * RC, crows = std::min(RC, rows - c0);
      const uint16_t* Ac = A + (g0 + c0) * K;        // the chunk's rows of a (relu'd into a buffer for a relu product)
      if (relu_a) { uint16_t* r = grown(abuf, size_t(crows) * K); relu_rows(Ac, crows, K, r); Ac = r; }
      for (int64_t p = 0; p < npanel; ++p) {
        const int64_t j0 = p * PW, pw = std::min(PW, M - j0);   // the panel: columns j0 .. j0 + pw
        const uint16_t* pk = packed + (whole ? p * pstride : 0);
        if (!whole) {
          pack_cols_any(B + (it.g * M + j0) * K, K, pairs, pw, packed, PW);
          packed_g = -1;                             // (the buffer no longer holds a whole packed weight)
        }
        for (int64_t i0 = 0; i0 < crows; i0 += MB) {   // one ukernel call per row block and panel: few calls, wide N
          const int64_t mb = std::min(MB, crows - i0), r = g0 + c0 + i0;
          cpublas::brgemm(mb, pw, K, K, PW, PW, false, reinterpret_cast<const bf16*>(Ac + i0 * K),
                          reinterpret_cast<const bf16*>(pk), acc, true);
          if (Mk) mask_block(acc, mb, pw, Mk + r * M + j0, M, PW);
          store_block_any(acc, mb, pw, C + r * M + j0, M, PW);
        }
      }
    }
  }, [] { cpublas::brgemm_release(true); });
}

void wgrad_bf16_brgemm(const at::Tensor& a, const at::Tensor& dy, const std::vector<int64_t>& off, at::Tensor& out,
                       bool relu_a) {
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
            t[k * R[g] + r] = r < rows ? (relu_a ? bf16_relu_bits(A[(off[g] + r) * K + k]) : A[(off[g] + r) * K + k]) : 0;
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
      uint16_t* packed = grown(pbuf, size_t(Rg / 2) * NB * 2);
      float* acc = grown(cbuf, size_t(MB) * NB);
      pack_rows_any(D + off[it.g] * M + j0, M, rows, Rg / 2, nb, packed);
      const uint16_t* t = T + toff[it.g];
      for (int64_t k0 = 0; k0 < K; k0 += MB) {
        const int64_t mb = std::min(MB, K - k0);
        for (int64_t c0 = 0; c0 < Rg; c0 += KC) {
          const int64_t kc = std::min(KC, Rg - c0);
          cpublas::brgemm(mb, nb, kc, Rg, NB, NB, c0 > 0, reinterpret_cast<const bf16*>(t + k0 * Rg + c0),
                          reinterpret_cast<const bf16*>(packed + c0 * NB), acc, true);
        }
        store_block_any(acc, mb, nb, o + k0 * M, M);
      }
    }
  }, [] { cpublas::brgemm_release(true); });
}

}  // namespace flanmoe
