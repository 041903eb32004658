// Register-tiled fp32 GEMMs for small row blocks (see sgemm_small.h for why), in two copies of
// sgemm_small_isa.inc: AVX-512F and AVX2+FMA, picked at run time by what the CPU has. Only functions
// marked with an ISA's target attribute contain its instructions; this file includes no torch header.
#include "sgemm_small.h"
#include "scratch.h"
#if defined(__x86_64__) || defined(__i386__)
#define FLANMOE_X86 1
#include <immintrin.h>
#else
#define FLANMOE_X86 0                                      // e.g. aarch64: no kernels here, BLAS throughout
#endif
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <unistd.h>
#include <vector>

namespace flanmoe {
namespace {

struct GemmScratch;                                        // per-thread packing buffer (scratch.h)
float* scratch(size_t n) { return thread_scratch<float, GemmScratch>(n); }

#if FLANMOE_X86
#define ISA_NS avx512
#define ISA_TARGET __attribute__((target("avx512f,fma")))
#define ISA_W 16
#include "sgemm_small_isa.inc"
#undef ISA_NS
#undef ISA_TARGET
#undef ISA_W

#define ISA_NS avx2
#define ISA_TARGET __attribute__((target("avx2,fma")))
#define ISA_W 8
#include "sgemm_small_isa.inc"
#undef ISA_NS
#undef ISA_TARGET
#undef ISA_W

SmallGemmIsa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return SmallGemmIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SmallGemmIsa::avx2;
  return SmallGemmIsa::none;
}
#else
SmallGemmIsa detect() { return SmallGemmIsa::none; }
#endif

bool parse(const std::string& mode, SmallGemmIsa* out) {
  const SmallGemmIsa best = small_gemm_best();
  if (mode == "auto") *out = best;
  else if (mode == "off" || mode == "blas" || mode == "0") *out = SmallGemmIsa::none;
  else if (mode == "avx2" && best != SmallGemmIsa::none) *out = SmallGemmIsa::avx2;
  else if (mode == "avx512" && best == SmallGemmIsa::avx512) *out = SmallGemmIsa::avx512;
  else return false;
  return true;
}

std::atomic<int>& active() {
  static std::atomic<int> isa([] {
    SmallGemmIsa v = small_gemm_best();
    const char* env = std::getenv("FLANMOE_SMALL_GEMM");
    if (env && !parse(env, &v)) v = SmallGemmIsa::none;   // an ISA the CPU lacks: BLAS, never a crash
    return int(v);
  }());
  return isa;
}

}  // namespace

SmallGemmIsa small_gemm_best() {
  static const SmallGemmIsa isa = detect();
  return isa;
}

SmallGemmIsa small_gemm_active() { return SmallGemmIsa(active().load(std::memory_order_relaxed)); }

namespace {
std::atomic<int>& expert_override(int slot) {   // -1: follow small_gemm_active()
  static std::atomic<int> v[6] = {-1, -1, -1, -1, -1, -1};
  return v[slot];
}
}  // namespace

const char* const kGemmProductNames[6] = {"nn_wide", "nn_tall", "nt_wide", "nt_tall", "tn_wide", "tn_tall"};

int gemm_product_slot(const std::string& name) {
  for (int i = 0; i < 6; ++i)
    if (name == kGemmProductNames[i]) return i;
  return -1;
}

SmallGemmIsa expert_gemm_active(GemmProduct p, bool tall) {
  const int v = expert_override(2 * int(p) + int(tall)).load(std::memory_order_relaxed);
  return v < 0 ? small_gemm_active() : SmallGemmIsa(v);
}

bool gemm_product_range(const std::string& product, int* lo, int* hi) {
  *lo = 0; *hi = 6;
  if (product == "all") return true;
  const bool pair = product == "nn" || product == "nt" || product == "tn";   // both orientations
  *lo = gemm_product_slot(pair ? product + "_wide" : product);
  *hi = *lo + (pair ? 2 : 1);
  return *lo >= 0;
}

std::string gemm_slots_summary(const std::function<std::string(int)>& name) {
  std::string all = name(0), each;
  bool same = true;
  for (int i = 0; i < 6; ++i) {
    same = same && name(i) == all;
    each += std::string(i ? "," : "") + kGemmProductNames[i] + "=" + name(i);
  }
  return same ? all : each;
}

bool set_expert_gemm(const std::string& mode, const std::string& product) {
  int lo, hi;                                             // the slots [lo, hi) to set
  if (!gemm_product_range(product, &lo, &hi)) return false;
  SmallGemmIsa v = SmallGemmIsa::none;
  if (mode != "follow" && !parse(mode, &v)) return false;
  for (int i = lo; i < hi; ++i) expert_override(i).store(mode == "follow" ? -1 : int(v));
  return true;
}

namespace {
std::atomic<bool>& prefetch_flag() {
  static std::atomic<bool> v([] { const char* e = std::getenv("FLANMOE_GEMM_PREFETCH"); return e && std::string(e) == "1"; }());
  return v;
}
}  // namespace

bool gemm_prefetch_active() { return prefetch_flag().load(std::memory_order_relaxed); }
void set_gemm_prefetch(bool on) { prefetch_flag().store(on); }

namespace {
std::atomic<bool>& nt_prefetch_flag() {
  static std::atomic<bool> v([] { const char* e = std::getenv("FLANMOE_GEMM_NT_PREFETCH"); return !(e && std::string(e) == "0"); }());
  return v;
}
}  // namespace

bool nt_prefetch_active() { return nt_prefetch_flag().load(std::memory_order_relaxed); }
void set_nt_prefetch(bool on) { nt_prefetch_flag().store(on); }

namespace {
int parse_stream(const std::string& m) { return m == "off" || m == "0" ? 0 : m == "on" || m == "1" ? 1 : m == "auto" ? 2 : -1; }
std::atomic<int>& stream_flag() {   // 0 off, 1 on, 2 auto (an unknown start value: auto; Python warns about it)
  static std::atomic<int> v([] { const char* e = std::getenv("FLANMOE_GEMM_STREAM"); const int m = e ? parse_stream(e) : 2; return m < 0 ? 2 : m; }());
  return v;
}
}  // namespace

std::string gemm_stream_mode() { const int m = stream_flag().load(); return m == 0 ? "off" : m == 1 ? "on" : "auto"; }

bool set_gemm_stream(const std::string& mode) {
  const int m = parse_stream(mode);
  if (m < 0) return false;
  stream_flag().store(m);
  return true;
}

int64_t last_level_cache_bytes() {
  static const int64_t v = [] {
    long b = 0;
#ifdef __linux__
    // the kernel's view of the caches cpu0 has, first: glibc's sysconf reads CPUID, which in a VM on a many-chiplet
    // EPYC reports the whole socket's L3 (384 MiB on a 2-core guest whose cores share one 32 MiB L3)
    for (int i = 0; i < 8 && b <= 0; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level(dir + "level"), size(dir + "size");
      int lv = 0;
      std::string sz;
      if (!(level >> lv) || lv != 3 || !(size >> sz) || sz.empty()) continue;
      const long n = std::atol(sz.c_str());
      const char unit = sz.back();
      b = unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
    }
    if (b > 0) return int64_t(b);
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)   // glibc; elsewhere the fallback below
    b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? int64_t(b) : int64_t(32) << 20;
  }();
  return v;
}

bool gemm_stream_pays(int64_t output_bytes) {
  const int m = stream_flag().load(std::memory_order_relaxed);
  return m == 1 || (m == 2 && output_bytes > last_level_cache_bytes());
}

bool set_small_gemm(const std::string& mode) {
  SmallGemmIsa v;
  if (!parse(mode, &v)) return false;
  active().store(int(v));
  return true;
}

std::string small_gemm_name(SmallGemmIsa isa) {
  return isa == SmallGemmIsa::avx512 ? "avx512" : isa == SmallGemmIsa::avx2 ? "avx2" : "blas";
}

std::vector<std::string> small_gemm_supported() {
  const SmallGemmIsa best = small_gemm_best();
  if (best == SmallGemmIsa::avx512) return {"avx2", "avx512"};
  if (best == SmallGemmIsa::avx2) return {"avx2"};
  return {};
}

#if FLANMOE_X86
#define FLANMOE_DISPATCH(fn, ...) \
  (isa == SmallGemmIsa::avx512 ? avx512::fn(__VA_ARGS__) : avx2::fn(__VA_ARGS__))
#else   // never called: small_gemm_active() is always none here
#define FLANMOE_DISPATCH(fn, ...) (void)isa
#endif

void sgemm_small_nn(SmallGemmIsa isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool relu_a) {
  FLANMOE_DISPATCH(nn, M, N, K, A, lda, B, ldb, C, ldc, relu_a);
}

void sgemm_small_nt(SmallGemmIsa isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, const float* mask, int64_t ldm) {
  FLANMOE_DISPATCH(nt, M, N, K, A, lda, B, ldb, C, ldc, mask, ldm);
}

void sgemm_small_tn(SmallGemmIsa isa, int64_t M, int64_t P, int64_t N, const float* A, int64_t lda, const float* D,
                    int64_t ldd, float* C, int64_t ldc, bool relu_a, bool stream) {
  FLANMOE_DISPATCH(tn, M, P, N, A, lda, D, ldd, C, ldc, relu_a, stream);
}

}  // namespace flanmoe
