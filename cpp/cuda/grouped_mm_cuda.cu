// CUDA grouped GEMM and its weight gradient (fp32 / bf16 / fp16, and fp64 for gradcheck), the twin of
// grouped_mm_cpu.cpp. bf16 / fp16 run on tensor cores on sm_80+ (namespace tc), everything else on a SIMT
// tiled kernel. See common.cuh for what the host checks and what the kernels clamp.
#include "common.cuh"

namespace flanmoe {
namespace {

// ------------------------------------------------------------------ group offsets (device)
// off[0] = 0, off[g+1] = min(off[g] + max(gs[g], 0), n): clamped prefix sums, one thread (G is small).
__global__ void offsets_kernel(const int64_t* gs, int64_t G, int64_t n, int64_t* off) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t acc = 0;
  off[0] = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t v = gs[g] > 0 ? gs[g] : 0;
    acc = v < n - acc ? acc + v : n;                       // (acc + v could overflow)
    off[g + 1] = acc;
  }
}

at::Tensor device_offsets(const at::Tensor& group_sizes, int64_t n) {
  auto gs = group_sizes.contiguous();
  auto off = at::empty({gs.numel() + 1}, gs.options());
  offsets_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(gs.data_ptr<int64_t>(), gs.numel(), n,
                                                                 off.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return off;
}

// ------------------------------------------------------------------ tiled GEMM on one group
// C[i, j] = sum_k A(i, k) * B(k, j) for a BM x BN tile, A and B given by (row stride, column stride).
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;   // 256 threads, 4x4 outputs each

template <typename scalar_t>
__device__ void gemm_tile(const scalar_t* A, int64_t a_rs, int64_t a_cs, const scalar_t* B, int64_t b_rs,
                          int64_t b_cs, scalar_t* C, int64_t c_rs, int64_t m, int64_t n, int64_t kdim,
                          int64_t i0, int64_t j0) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t As[BK][BM];
  __shared__ acc_t Bs[BK][BN];
  const int tid = threadIdx.x;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);
  acc_t acc[TM][TN];
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TN; ++b) acc[a][b] = acc_t(0);
  for (int64_t k0 = 0; k0 < kdim; k0 += BK) {
    for (int e = tid; e < BK * BM; e += blockDim.x) {
      const int kk = e / BM, ii = e % BM;
      const int64_t i = i0 + ii, k = k0 + kk;
      As[kk][ii] = (i < m && k < kdim) ? static_cast<acc_t>(A[i * a_rs + k * a_cs]) : acc_t(0);
    }
    for (int e = tid; e < BK * BN; e += blockDim.x) {
      const int kk = e / BN, jj = e % BN;
      const int64_t j = j0 + jj, k = k0 + kk;
      Bs[kk][jj] = (j < n && k < kdim) ? static_cast<acc_t>(B[k * b_rs + j * b_cs]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[TM], bv[TN];
#pragma unroll
      for (int a = 0; a < TM; ++a) av[a] = As[kk][ty * TM + a];
#pragma unroll
      for (int b = 0; b < TN; ++b) bv[b] = Bs[kk][tx * TN + b];
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < TM; ++a) {
    const int64_t i = i0 + ty * TM + a;
    if (i >= m) continue;
#pragma unroll
    for (int b = 0; b < TN; ++b) {
      const int64_t j = j0 + tx * TN + b;
      if (j < n) C[i * c_rs + j] = static_cast<scalar_t>(acc[a][b]);
    }
  }
}

// Row tiles of all groups: blockIdx.x enumerates (group, row tile) pairs found on the device by a
// scan over the groups; blocks past the last tile exit. Rows past off[G] are left untouched (zeroed).
template <typename scalar_t>
__global__ void grouped_mm_kernel(const scalar_t* a, const scalar_t* b, const int64_t* off, int64_t G,
                                  int64_t K, int64_t M, bool trans_b, scalar_t* out) {
  int64_t tile = blockIdx.x, g = 0;
  for (; g < G; ++g) {
    const int64_t tiles = (off[g + 1] - off[g] + BM - 1) / BM;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (g >= G) return;
  const int64_t r0 = off[g], rows = off[g + 1] - off[g];
  const scalar_t* bg = b + g * K * M;
  // b[g] is [K, M] (B(k, j) = bg[k*M + j]) or, with trans_b, [M, K] (B(k, j) = bg[j*K + k]).
  gemm_tile<scalar_t>(a + r0 * K, K, 1, bg, trans_b ? 1 : M, trans_b ? K : 1, out + r0 * M, M, rows, M, K,
                      tile * BM, static_cast<int64_t>(blockIdx.y) * BN);
}

// out[g] = a[rows of g]^T @ dy[rows of g]: grid (G, K tiles, M tiles), inner loop over the group's rows.
template <typename scalar_t>
__global__ void grouped_wgrad_kernel(const scalar_t* a, const scalar_t* dy, const int64_t* off, int64_t K,
                                     int64_t M, scalar_t* out) {
  const int64_t g = blockIdx.x;
  const int64_t r0 = off[g], rows = off[g + 1] - off[g];
  // A(i, k) = a[(r0 + k) * K + i], B(k, j) = dy[(r0 + k) * M + j]; empty groups give zeros.
  gemm_tile<scalar_t>(a + r0 * K, 1, K, dy + r0 * M, M, 1, out + g * K * M, M, K, M, rows,
                      static_cast<int64_t>(blockIdx.y) * BM, static_cast<int64_t>(blockIdx.z) * BN);
}

// ------------------------------------------------------------------ tensor-core grouped GEMM (bf16 / fp16, sm_80+)
// Which path runs (decided on the host from shapes, dtypes and pointers; group sizes are never read):
//   FLANMOE_CUDA_GEMM=simt (read once per process): the SIMT kernels above, for every dtype.
//   default (unset or "auto"): bf16/fp16 on a device of compute capability >= 8.0 whose binary has sm_80+ code
//   for these kernels (device_info), with 16-byte aligned operands (tc_aligned: K % 8 == 0, M % 8 == 0 unless
//   trans_b, 16-byte aligned data pointers) -> the kernels below; everything else (fp32, fp64, odd K or M,
//   offset views) -> SIMT. A profiler trace tells them apart: tc_gemm_kernel vs grouped_{mm,wgrad}_kernel.
// Design: block tile BM x 128 x 32 (BM = 128, or 64 when groups are small on average or 128-row tiles would
// not fill the device), 8 warps as 2 x 4 (warp tile BM/2 x 32), a 4-stage cp.async global->shared pipeline,
// ldmatrix + mma.sync.m16n8k16 with fp32 accumulators, and an epilogue stored from registers with bounds checks.
// Shared memory rows are padded by 16 bytes, so the 8 row addresses of every ldmatrix hit distinct bank quads.
namespace tc {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FLANMOE_TC_DEVICE 1
#else
#define FLANMOE_TC_DEVICE 0
#endif

constexpr int kThreads = 256, kWarpsM = 2, kWarpsN = 4, BN = 128, BK = 32, kStages = 4, kPad = 8;

// NN: out = a @ b[g]; NT: out = a @ b[g]^T; TN: out[g] = a[rows of g]^T @ dy[rows of g].
enum class Prod { NN, NT, TN };

// Shared-memory layout of an operand slice (one BK step of the reduction) in a stage:
//   k-major [R][BK + kPad]: one smem row per m (or n), k contiguous    (A of NN/NT, B of NT)
//   k-rows  [BK][R + kPad]: one smem row per k, m (or n) contiguous    (A of TN, B of NN/TN)
template <Prod P> constexpr bool a_k_rows() { return P == Prod::TN; }
template <Prod P> constexpr bool b_k_rows() { return P != Prod::NT; }
template <int R, bool kKRows> constexpr int slice_elems() { return kKRows ? BK * (R + kPad) : R * (BK + kPad); }
template <Prod P, int BM> constexpr int stage_elems() {
  return slice_elems<BM, a_k_rows<P>()>() + slice_elems<BN, b_k_rows<P>()>();
}
template <Prod P, int BM> constexpr size_t smem_bytes() { return size_t(kStages) * stage_elems<P, BM>() * 2; }

// ---------------------------------------------------------------- PTX wrappers (sm_80+)
#if FLANMOE_TC_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// 16 bytes global -> shared, asynchronous; with valid == false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if FLANMOE_TC_DEVICE
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if FLANMOE_TC_DEVICE
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if FLANMOE_TC_DEVICE
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the address of row (l & 7) of matrix l >> 3, matrix q lands in r[q].
// Plain: lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each matrix (lower column in the
// low half). Trans: it receives rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the transposed matrix).
template <bool kTrans> __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
#if !FLANMOE_TC_DEVICE
  r[0] = r[1] = r[2] = r[3] = 0;   // (pre-sm_80 code is never run)
#else
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
#endif
}

// d += A (16x16, row) @ B (16x8, col), fp32 accumulate. With g = lane / 4, t = lane % 4, the fragments are
//   a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   a[2] = A(g, 2t+8..2t+9)   a[3] = A(g+8, 2t+8..2t+9)
//   b0 = B(2t..2t+1, g)     b1 = B(2t+8..2t+9, g)
//   d[0..1] = C(g, 2t..2t+1)    d[2..3] = C(g+8, 2t..2t+1)
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if FLANMOE_TC_DEVICE
  if constexpr (kBf16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------- fragment index math
// Element offset, in a stage slice, of the row address lane `l` passes to ldsm_x4 (matrix q = l >> 3, its row l & 7).
// A 16x16 at (m0, k0) must land as r0 = (m 0-7, k 0-7), r1 = (m 8-15, k 0-7), r2 = (m 0-7, k 8-15), r3 = (m 8-15,
// k 8-15), i.e. matrix q covers m + 8 (q & 1), k + 8 (q >> 1), which are then a[0..3] of mma_16816.
// B 16(k)x16(n) at (k0, n0), two n8 tiles: r0, r1 = b0, b1 of n 0-7 and r2, r3 = b0, b1 of n 8-15, i.e. matrix q
// covers k + 8 (q & 1), n + 8 (q >> 1).
// A k-major [BM][BK + kPad], plain ldmatrix: matrix rows are m, columns k.
__device__ __forceinline__ int a_frag_kmajor(int m0, int k0, int l) {
  return (m0 + (l & 7) + ((l >> 3) & 1) * 8) * (BK + kPad) + k0 + (l >> 4) * 8;
}
// A k-rows [BK][BM + kPad], ldmatrix.trans: matrix rows are k, columns m (transposed into the A fragment).
template <int BM> __device__ __forceinline__ int a_frag_krows(int m0, int k0, int l) {
  return (k0 + (l & 7) + (l >> 4) * 8) * (BM + kPad) + m0 + ((l >> 3) & 1) * 8;
}
// B k-major [BN][BK + kPad], plain ldmatrix: matrix rows are n, columns k (the .col B fragment as it is stored).
__device__ __forceinline__ int b_frag_kmajor(int n0, int k0, int l) {
  return (n0 + (l & 7) + (l >> 4) * 8) * (BK + kPad) + k0 + ((l >> 3) & 1) * 8;
}
// B k-rows [BK][BN + kPad], ldmatrix.trans: matrix rows are k, columns n.
__device__ __forceinline__ int b_frag_krows(int n0, int k0, int l) {
  return (k0 + (l & 7) + ((l >> 3) & 1) * 8) * (BN + kPad) + n0 + (l >> 4) * 8;
}

// ---------------------------------------------------------------- global -> shared slices
// An operand as the main loop sees it: element (r, c) is p[r * ld + c], valid for r < rows and c < cols.
// The reduction index runs down the rows (k-rows layout) or along the columns (k-major layout).
struct Operand { const uint16_t* p; int64_t ld, rows, cols; };

// Slice [R][C] of a row-major global matrix (element (r, c) at g[r * ld + c]) -> smem [R][C + kPad], in 16-byte
// chunks of 8 elements; a chunk outside r < rows, c < cols is zero-filled. tc_aligned guarantees that g, ld and
// cols are multiples of 8 elements (cols may also be anything >= C), so a chunk is wholly in or wholly out.
template <int R, int C>
__device__ __forceinline__ void load_slice(uint16_t* s, const uint16_t* g, int64_t ld, int64_t rows, int64_t cols) {
  constexpr int kPerRow = C / 8, kChunks = R * kPerRow;
  static_assert(kChunks % kThreads == 0, "a slice must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int c = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / kPerRow, col = (c % kPerRow) * 8;
    const bool ok = r < rows && col < cols;
    cp_async_16(s + r * (C + kPad) + col, ok ? g + r * ld + col : g, ok);
  }
}

// Reduction slice [k0, k0 + BK) of an operand with R rows (m or n) into a stage slice of layout kKRows.
template <int R, bool kKRows>
__device__ __forceinline__ void load_operand(uint16_t* s, const Operand& op, int64_t k0) {
  if constexpr (kKRows) load_slice<BK, R>(s, op.p + k0 * op.ld, op.ld, op.rows - k0, op.cols);
  else load_slice<R, BK>(s, op.p + k0, op.ld, op.rows, op.cols - k0);
}

// ---------------------------------------------------------------- row tiles of the groups
// Row tiles of all groups in order, then those of the padding rows [off[G], N) as a pseudo-group G whose tiles
// store zeros: tstart[g] is the first tile of group g (g <= G), tstart[G + 1] the number of tiles, at most
// ceil(N / BM) + G (a sum of G + 1 ceilings of parts summing to N). Tile `tile` is in the last g with
// tstart[g] <= tile: an empty group starts where the next one does and so is never chosen.
struct RowTile { int64_t g, r0, rows, i0; };   // group, its first row, its rows, the tile's first row within it

__device__ __forceinline__ bool find_row_tile(const int64_t* off, const int64_t* tstart, int64_t G, int64_t N,
                                              int64_t tile, int bm, RowTile& t) {
  if (tile >= tstart[G + 1]) return false;
  int64_t lo = 0, hi = G;                       // tstart[lo] <= tile throughout (tstart[0] = 0)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tstart[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  t.g = lo;
  t.r0 = off[lo];
  t.rows = (lo < G ? off[lo + 1] : N) - off[lo];
  t.i0 = (tile - tstart[lo]) * bm;
  return true;
}

// ---------------------------------------------------------------- epilogue
template <bool kBf16> __device__ __forceinline__ uint16_t to_u16(float v) {
  if constexpr (kBf16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return __half_as_ushort(__float2half_rn(v));
}

// C(row, col) = v0 and C(row, col + 1) = v1 where inside rows x cols; one 4-byte store when ldc is even (then
// the element index is even: callers' bases are at even offsets of a 256-byte aligned buffer).
template <bool kBf16>
__device__ __forceinline__ void store_pair(uint16_t* c, int64_t ldc, int64_t row, int64_t col, int64_t rows,
                                           int64_t cols, float v0, float v1) {
  if (row >= rows || col >= cols) return;
  uint16_t* p = c + row * ldc + col;
  if ((ldc & 1) == 0 && col + 1 < cols) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(to_u16<kBf16>(v0)) | (uint32_t(to_u16<kBf16>(v1)) << 16);
  } else {
    p[0] = to_u16<kBf16>(v0);
    if (col + 1 < cols) p[1] = to_u16<kBf16>(v1);
  }
}

// ---------------------------------------------------------------- one stage of MMAs
// acc[mi][ni] is the 16x8 block of the warp tile at (mi * 16, ni * 8); the warp tile starts at (wm0, wn0).
template <int BM, bool kAKRows, bool kBKRows, bool kBf16, int MI, int NI>
__device__ __forceinline__ void mma_stage(float (&acc)[MI][NI][4], const uint16_t* sA, const uint16_t* sB, int wm0,
                                          int wn0, int lane) {
#pragma unroll
  for (int k0 = 0; k0 < BK; k0 += 16) {
    uint32_t af[MI][4], bf[NI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int m0 = wm0 + mi * 16;
      if constexpr (kAKRows) ldsm_x4<true>(af[mi], sA + a_frag_krows<BM>(m0, k0, lane));
      else ldsm_x4<false>(af[mi], sA + a_frag_kmajor(m0, k0, lane));
    }
#pragma unroll
    for (int np = 0; np < NI / 2; ++np) {
      const int n0 = wn0 + np * 16;
      uint32_t r[4];
      if constexpr (kBKRows) ldsm_x4<true>(r, sB + b_frag_krows(n0, k0, lane));
      else ldsm_x4<false>(r, sB + b_frag_kmajor(n0, k0, lane));
      bf[2 * np][0] = r[0];
      bf[2 * np][1] = r[1];
      bf[2 * np + 1][0] = r[2];
      bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma_16816<kBf16>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
  }
}

// ---------------------------------------------------------------- the kernel
// NN / NT: grid (tstart[G + 1] bound = ceil(N / BM) + G, ceil(M / BN)); block (x, y) takes row tile x (found by
// find_row_tile) and columns [y * BN, y * BN + BN) of out [N, M]. TN: grid (G, ceil(K / BM), ceil(M / BN)) over
// out [G, K, M], the reduction running over the group's rows (none: the tile is stored as zeros).
// a, b, out are the bf16 / fp16 bits; off = clamped group offsets [G + 1], tstart = row-tile starts [G + 2] (NN/NT).
template <Prod P, int BM, bool kBf16>
__global__ void __launch_bounds__(kThreads, 2)
    tc_gemm_kernel(const uint16_t* __restrict__ a, const uint16_t* __restrict__ b, const int64_t* __restrict__ off,
                   const int64_t* __restrict__ tstart, int64_t G, int64_t N, int64_t K, int64_t M,
                   uint16_t* __restrict__ out) {
#if !FLANMOE_TC_DEVICE
  __trap();   // never launched: the host checks device_info().tc (capability, sm_80+ code present) first
#endif
  constexpr bool kAKRows = a_k_rows<P>(), kBKRows = b_k_rows<P>();
  constexpr int kAElems = slice_elems<BM, kAKRows>(), kStageElems = stage_elems<P, BM>();
  constexpr int WTM = BM / kWarpsM, WTN = BN / kWarpsN, MI = WTM / 16, NI = WTN / 8;
  static_assert(MI >= 1 && NI % 2 == 0, "warp tile must be a multiple of 16 x 16");
  extern __shared__ __align__(16) unsigned char tc_smem[];
  uint16_t* smem = reinterpret_cast<uint16_t*>(tc_smem);

  // This block computes the tile at (i0, j0) of C (rows x M, row stride M) = A (rows x kdim) @ B (kdim x M);
  // A and B are based at the tile's first row / column.
  Operand A, B;
  uint16_t* C;
  int64_t rows, kdim, i0;
  const int64_t j0 = static_cast<int64_t>(P == Prod::TN ? blockIdx.z : blockIdx.y) * BN;
  if constexpr (P == Prod::TN) {
    const int64_t g = blockIdx.x, r0 = off[g], n = off[g + 1] - off[g];
    i0 = static_cast<int64_t>(blockIdx.y) * BM;
    rows = K;
    kdim = n;
    C = out + g * K * M;
    A = {a + r0 * K + i0, K, n, K - i0};    // A(i, r) = a[(r0 + r) * K + i]: global rows are the reduction
    B = {b + r0 * M + j0, M, n, M - j0};    // B(r, j) = dy[(r0 + r) * M + j]
  } else {
    RowTile t;
    if (!find_row_tile(off, tstart, G, N, blockIdx.x, BM, t)) return;
    i0 = t.i0;
    rows = t.rows;
    kdim = t.g < G ? K : 0;                 // padding rows: no reduction, the tile stores zeros
    C = out + t.r0 * M;
    A = {a + (t.r0 + i0) * K, K, rows - i0, K};
    const uint16_t* bg = b + (t.g < G ? t.g : 0) * K * M;
    if constexpr (P == Prod::NN) B = {bg + j0, M, K, M - j0};      // B(k, j) = b[g][k * M + j]: rows are k
    else B = {bg + j0 * K, K, M - j0, K};                          // B(k, j) = b[g][j * K + k]: rows are j
  }

  auto load_stage = [&](int64_t kt, int stage) {
    uint16_t* s = smem + stage * kStageElems;
    load_operand<BM, kAKRows>(s, A, kt * BK);
    load_operand<BN, kBKRows>(s + kAElems, B, kt * BK);
  };

  // Pipeline: slices kt + 1 .. kt + kStages - 1 are in flight while slice kt is multiplied. One commit group
  // per slice (empty past the end) keeps the count exact: before slice kt is read, kStages - 1 + kt groups were
  // committed and wait<kStages - 2> leaves at most kStages - 2 pending, so groups 0..kt are complete; the
  // barrier then publishes every thread's copies and frees the stage multiplied in iteration kt - 1.
  const int64_t ktiles = (kdim + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / kWarpsN) * WTM, wn0 = (warp % kWarpsN) * WTN;
  int read_stage = 0, write_stage = kStages - 1;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < ktiles) load_stage(kt + kStages - 1, write_stage);
    cp_async_commit();
    const uint16_t* s = smem + read_stage * kStageElems;
    mma_stage<BM, kAKRows, kBKRows, kBf16>(acc, s, s + kAElems, wm0, wn0, lane);
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();

  // acc[mi][ni][2h + e] is C(i0 + wm0 + mi * 16 + lane / 4 + 8h, j0 + wn0 + ni * 8 + 2 (lane % 4) + e).
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store_pair<kBf16>(C, M, i0 + wm0 + mi * 16 + lane / 4 + 8 * h, j0 + wn0 + ni * 8 + (lane % 4) * 2, rows, M,
                          acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
}

// ---------------------------------------------------------------- host side
// Clamped group offsets (as device_offsets) and the row-tile starts of find_row_tile, one thread.
__global__ void tile_offsets_kernel(const int64_t* gs, int64_t G, int64_t n, int64_t bm, int64_t* off,
                                    int64_t* tstart) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t acc = 0, tiles = 0;
  off[0] = 0;
  tstart[0] = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t v = gs[g] > 0 ? gs[g] : 0;
    const int64_t next = v < n - acc ? acc + v : n;
    tiles += (next - acc + bm - 1) / bm;
    acc = next;
    off[g + 1] = acc;
    tstart[g + 1] = tiles;
  }
  tstart[G + 1] = tiles + (n - acc + bm - 1) / bm;   // the padding rows' tiles
}

// One int64 tensor: offsets at [0, G], row-tile starts at [G + 1, 2G + 2].
at::Tensor device_tile_offsets(const at::Tensor& group_sizes, int64_t n, int64_t bm) {
  auto gs = group_sizes.contiguous();
  const int64_t G = gs.numel();
  auto buf = at::empty({2 * G + 3}, gs.options());
  tile_offsets_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(gs.data_ptr<int64_t>(), G, n, bm,
                                                                      buf.data_ptr<int64_t>(),
                                                                      buf.data_ptr<int64_t>() + G + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

// FLANMOE_CUDA_GEMM, read once: "simt" forces the SIMT kernels, "auto" (or unset) picks per call.
bool simt_forced() {
  static const bool forced = [] {
    const char* e = std::getenv("FLANMOE_CUDA_GEMM");
    const std::string s = e ? e : "";
    FLANMOE_CHECK(s.empty() || s == "auto" || s == "simt",
                  "FLANMOE_CUDA_GEMM must be 'auto' or 'simt' (got '", s, "')");
    return s == "simt";
  }();
  return forced;
}

struct DeviceInfo { bool tc; int sms; };

// Per device, cached: compute capability >= 8.0, the kernels' code built for sm_80+ (not JIT from older PTX,
// whose tensor-core kernels would trap), enough opt-in shared memory; and the SM count.
DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  int major = 0, sms = 1, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr{};
  const bool have = cudaFuncGetAttributes(&attr, tc_gemm_kernel<Prod::NN, 128, true>) == cudaSuccess;
  if (!have) (void)cudaGetLastError();   // clear the (non-sticky) error of a missing kernel image
  const bool tc = major >= 8 && have && attr.ptxVersion >= 80 &&
                  static_cast<size_t>(optin) >= smem_bytes<Prod::NT, 128>();
  return cache.emplace(dev, DeviceInfo{tc, sms}).first->second;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// 16-byte cp.async chunks need every chunk start 16-byte aligned: the reduction-contiguous and the
// column-contiguous dimensions multiples of 8 elements, the data pointers 16-byte aligned.
bool tc_aligned(const at::Tensor& a, const at::Tensor& b, int64_t K, int64_t M, bool need_m8) {
  return K % 8 == 0 && (!need_m8 || M % 8 == 0) && aligned16(a) && aligned16(b);
}

bool use_tc(const at::Tensor& a) {
  const auto t = a.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) && !simt_forced() && device_info(a.get_device()).tc;
}

template <Prod P, int BM, bool kBf16>
void launch(dim3 grid, const at::Tensor& a, const at::Tensor& b, const int64_t* off, const int64_t* tstart, int64_t G,
            int64_t N, int64_t K, int64_t M, at::Tensor& out) {
  auto kernel = tc_gemm_kernel<P, BM, kBf16>;
  constexpr size_t smem = smem_bytes<P, BM>();
  // Above the 48 KiB default: opt in once per device (bit `dev` of `done`; devices past 63 opt in every call).
  static std::atomic<uint64_t> done{0};
  const int dev = a.get_device();
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (!(done.load() & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    done.fetch_or(bit);
  }
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint16_t*>(a.const_data_ptr()), static_cast<const uint16_t*>(b.const_data_ptr()), off, tstart,
      G, N, K, M, static_cast<uint16_t*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out [N, M] for grouped_mm (NN / NT); out is uninitialised: the padding rows are stored as zeros by the kernel.
void grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b, int64_t G,
                int64_t N, int64_t K, int64_t M, at::Tensor& out) {
  // 64-row tiles when groups average under 128 rows (128-row tiles would be mostly empty) or when 128-row
  // tiles would not give every SM a block; 128-row tiles otherwise.
  const int64_t col_tiles = (M + BN - 1) / BN;
  const bool small = N < 128 * G || ((N + 127) / 128) * col_tiles < device_info(a.get_device()).sms;
  const int bm = small ? 64 : 128;
  auto buf = device_tile_offsets(group_sizes, N, bm);
  const int64_t* off = buf.const_data_ptr<int64_t>();
  const dim3 grid(static_cast<unsigned>((N + bm - 1) / bm + G), static_cast<unsigned>(col_tiles));
  const bool bf16 = a.scalar_type() == at::kBFloat16;
#define FLANMOE_TC_MM(P, BM_)                                                                                   \
  (bf16 ? launch<P, BM_, true>(grid, a, b, off, off + G + 1, G, N, K, M, out)                                 \
        : launch<P, BM_, false>(grid, a, b, off, off + G + 1, G, N, K, M, out))
  if (trans_b) { if (small) FLANMOE_TC_MM(Prod::NT, 64); else FLANMOE_TC_MM(Prod::NT, 128); }
  else { if (small) FLANMOE_TC_MM(Prod::NN, 64); else FLANMOE_TC_MM(Prod::NN, 128); }
#undef FLANMOE_TC_MM
}

// out [G, K, M] for grouped_mm_wgrad (TN); every tile is stored (zeros for empty groups).
void grouped_wgrad(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& group_sizes, int64_t G, int64_t N,
                   int64_t K, int64_t M, at::Tensor& out) {
  auto off = device_offsets(group_sizes, N);
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>((K + 127) / 128),
                  static_cast<unsigned>((M + BN - 1) / BN));
  if (a.scalar_type() == at::kBFloat16)
    launch<Prod::TN, 128, true>(grid, a, dy, off.const_data_ptr<int64_t>(), nullptr, G, N, K, M, out);
  else
    launch<Prod::TN, 128, false>(grid, a, dy, off.const_data_ptr<int64_t>(), nullptr, G, N, K, M, out);
}

}  // namespace tc

}  // namespace

at::Tensor grouped_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& group_sizes, bool trans_b) {
  const char* op = "flanmoe::grouped_mm";
  check_rank(b, 3, op, "b");
  check_gmm_operands(a, b, op, "b");
  check_same_device(group_sizes, a, op, "group_sizes", "a");
  const int64_t N = a.size(0), K = a.size(1), G = b.size(0);
  const int64_t bK = trans_b ? b.size(2) : b.size(1), M = trans_b ? b.size(1) : b.size(2);
  FLANMOE_CHECK(bK == K, op, ": inner dimensions differ: a is ", shape_str(a), ", b is ", shape_str(b),
                trans_b ? " (trans_b=True: b must be [G, M, K])" : " (trans_b=False: b must be [G, K, M])");
  check_group_sizes(group_sizes, N, G, op);   // shape/dtype only on CUDA (no sync)
  c10::cuda::CUDAGuard guard(a.device());
  const char* what = trans_b ? "the output [rows of a, b.shape[1]]" : "the output [rows of a, b.shape[2]]";
  if (N == 0 || M == 0 || K == 0 || G == 0)
    return make_output(op, what, {N, M}, a.scalar_type(), [&] { return at::zeros({N, M}, a.options()); });
  check_grid(op, (N + 63) / 64 + G, (M + 63) / 64, 1, "a (rows) plus b (groups, columns) are");  // both kernels' grids
  if (tc::use_tc(a) && tc::tc_aligned(a, b, K, M, /*need_m8=*/!trans_b)) {   // tensor cores (see tc::)
    auto out = make_output(op, what, {N, M}, a.scalar_type(),                // padding rows: zeroed by the kernel
                           [&] { return at::empty({N, M}, a.options()); });
    tc::grouped_mm(a, b, group_sizes, trans_b, G, N, K, M, out);
    return out;
  }
  auto out = make_output(op, what, {N, M}, a.scalar_type(),                 // SIMT: padding rows stay zero
                         [&] { return at::zeros({N, M}, a.options()); });
  auto off = device_offsets(group_sizes, N);
  const dim3 grid(static_cast<unsigned>((N + BM - 1) / BM + G), static_cast<unsigned>((M + BN - 1) / BN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "flanmoe_grouped_mm_cuda", [&] {
    grouped_mm_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), G, K, M, trans_b,
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grouped_mm_wgrad_cuda(const at::Tensor& a, const at::Tensor& dy, const at::Tensor& group_sizes) {
  const char* op = "flanmoe::grouped_mm_wgrad";
  check_rank(dy, 2, op, "dy");
  check_gmm_operands(a, dy, op, "dy");
  check_same_device(group_sizes, a, op, "group_sizes", "a");
  FLANMOE_CHECK(dy.size(0) == a.size(0), op, ": a and dy must have the same number of rows (a is ", shape_str(a),
                ", dy is ", shape_str(dy), ")");
  check_rank(group_sizes, 1, op, "group_sizes");
  const int64_t N = a.size(0), K = a.size(1), M = dy.size(1), G = group_sizes.size(0);
  check_group_sizes(group_sizes, N, G, op, "a", "group_sizes");
  c10::cuda::CUDAGuard guard(a.device());
  auto out = make_output(op, "the output [entries of group_sizes, columns of a, columns of dy]", {G, K, M},
                         a.scalar_type(), [&] { return at::empty({G, K, M}, a.options()); });
  if (G == 0 || K == 0 || M == 0) return out;
  if (N == 0) return out.zero_();
  check_grid(op, G, (K + 63) / 64, (M + 63) / 64, "group_sizes (entries), a and dy (columns) are");
  if (tc::use_tc(a) && tc::tc_aligned(a, dy, K, M, /*need_m8=*/true)) {   // tensor cores (see tc::)
    tc::grouped_wgrad(a, dy, group_sizes, G, N, K, M, out);
    return out;
  }
  auto off = device_offsets(group_sizes, N);
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>((K + BM - 1) / BM),
                  static_cast<unsigned>((M + BN - 1) / BN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "flanmoe_grouped_wgrad_cuda", [&] {
    grouped_wgrad_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), K, M, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(flanmoe, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
}

}  // namespace flanmoe
