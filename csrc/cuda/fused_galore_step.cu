// CUDA fused GaLore AdamW step, dense projection, floating-point weight (DESIGN.md §4.1-§4.2).
//
//   right (m >= n):  R = G Q^T (m x r)   N = adam(R; M, V)   W' = decay*W - us*(N Q)
//   left  (m <  n):  R = P^T G (r x n)   N = adam(R; M, V)   W' = decay*W - us*(P N)
//   decay = 1 - lr*wd, us = decay * lr*sqrt(1-b2^t)/(1-b1^t) * scale  (lowrank/adam.h)
//
// Two launches, each a tensor-core GEMM (mma.sync) with its own epilogue:
//   1. project + Adam: C = R (m x r right, r x n left). A CTA owns a tile of R and runs the
//      whole reduction over the long dimension (no split-K: the epilogue is nonlinear), then
//      updates its M, V tile in place and writes N to a low-rank workspace. CTAs sharing a block
//      of G are launched back to back, so the r/BN tiles of one block re-read it from L2.
//   2. back-project + update: C = back(N) (m x n), K = r. Each W tile is read and written once,
//      W' = decay*W - us*C in the epilogue; back(N) never reaches memory.
// Why two launches and not one CTA owning whole rows (right) / columns (left) through both
// phases: that CTA must hold a BM x r fp32 slice of R (r <= 512) and re-read the whole basis
// twice, so BM is small and the GEMMs run at low intensity. Two launches tile both GEMMs freely
// and cost only the low-rank N round trip and a second basis read.
//
// Fast path (the common case): G of a 16-bit type T (bf16 or fp16) and a basis dense in T or
// packed INT4.
//   gemm16_kernel: operand tiles go global -> shared as T by cp.async (multi-stage, rows padded
//   by 16 bytes: conflict-free ldmatrix), shared -> registers by ldmatrix (.trans for an operand
//   whose contiguous axis is not K), m16n8k16 MMAs with fp32 accumulators. Launch 1: CTA tile
//   64 (owned axis) x 128 (rank), 8 warps of 32x32, 5 stages. Launch 2 (when W is T too): W
//   tiles of 128x128, 8 warps of 64x32, 3 stages, N stored in T by launch 1 (rounded once, on
//   store), so both of its operands are T too. Row-major operands whose rows are not 16-byte
//   aligned (n or r not a multiple of 8) are loaded by plain loads into the same tiles.
//   The tile loader is a policy: DenseOperand16 copies T; Int4Operand16 dequantizes a packed
//   INT4 basis, s*(q - z) in fp32 as lowrank/quant.h, straight into the tile, rounded to T and,
//   in launch 1, with its residual in a second tile (2xT products: R feeds fp32 moments); no
//   fp32 basis is made. Launch 2 takes it rounded to T = W's type, as a dense T basis is.
// General path (fp32 G or W, mixed dense types, DCT indices): lowrank_gemm_kernel, 64x64 tiles
//   staged in shared memory as fp32 whatever the source type, on an fp32 basis (a view when the
//   basis is fp32, else a copy made per call), N fp32; the fast launch 1 feeds it when only W
//   is not G's type. DCT rows stay a per-call fp32 copy: generating them in the loader would
//   evaluate a cos/sin per basis element in every CTA that reads it ((own/64) x r x d calls in
//   launch 1), far more work than the r x d copy's bytes.
// No m x n temporary exists. DRAM bytes per step (s_* = element sizes, L = m*r right or r*n
// left, d = n right or m left; bench/traffic.py `fused_cuda` is this count):
//   floor:  G m*n*s_g  +  W 2*m*n*s_w  +  M, V 4*L*s_state  +  basis d*r*s_p
//   fast:   + N written and read once 2*L*s_w  + the basis read again by launch 2 d*r*s_p.
//           4096x11008, r=512, bf16, fp32 states: floor 365 MB, extra 26.7 MB (+7.3%).
//   INT4 fast: as fast, the basis being d*r/2 bytes of codes + 8 bytes per group.
//   general: + N 8*L; a 16-bit basis is copied to fp32 first (4*d*r written, read by both
//           launches: 8*d*r) instead of being read twice.
// Operand tiles re-read by several CTAs (G by the r/BN CTAs of one block, the basis and N by
// every CTA) come from L2.
//
// Precision: all products accumulate in fp32. Fast path: products of T values are exact in the
// fp32 accumulators, which the tensor cores add with truncation (as cuBLAS and Triton do for
// 16-bit GEMMs); N in T is the rounding the plain-torch baseline (and galore-torch) makes too.
// General path: operands that are not exact in the MMA input type are split x = hi + lo
// (hi = round(x), lo = round(x - hi)) and multiplied as a_hi*b_hi + a_hi*b_lo + a_lo*b_hi:
// 3xTF32 for fp32 inputs (~fp32 accuracy), 2xBF16 for the fp32 N and an fp32 basis next to
// bf16/fp16 data; each 16-long K tile is summed in its own accumulator and added to the total
// in IEEE fp32 (no truncation drift over long K where Adam amplifies errors of R). Each stored
// value is rounded once. Every reduction has a fixed order: runs are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "lowrank/adam.h"
#include "lowrank/checks.h"
#include "lowrank/dct.h"
#include "int8_update.h"  // INT8 weight codes: pass 2 (csrc/cuda/int8_update.cu)

// Runtime dtype -> compile-time type (flash-attention style): each body is a plain template.
#define LOWRANK_FLOAT_SWITCH(DTYPE, TYPE, ...)                                   \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case at::kFloat: {                                                         \
        using TYPE = float;                                                      \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case at::kBFloat16: {                                                      \
        using TYPE = __nv_bfloat16;                                              \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case at::kHalf: {                                                          \
        using TYPE = __half;                                                     \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default:                                                                   \
        LOWRANK_CHECK_VALUE(false, "unsupported floating dtype ", DTYPE);          \
    }                                                                            \
  }()

// Runtime bool -> constexpr bool.
#define LOWRANK_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    }                                        \
    constexpr bool NAME = false;             \
    return __VA_ARGS__();                    \
  }()

namespace lowrank {
namespace {

// ---------------------------------------------------------------------------------------------
// scalar conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------
// tensor-core MMA kinds: bf16/fp16 m16n8k16 and tf32 m16n8k8, fp32 accumulators
// ---------------------------------------------------------------------------------------------
enum class MmaKind { kBF16, kF16, kTF32 };

template <typename T>
struct KindOf;
template <>
struct KindOf<float> { static constexpr MmaKind value = MmaKind::kTF32; };
template <>
struct KindOf<__nv_bfloat16> { static constexpr MmaKind value = MmaKind::kBF16; };
template <>
struct KindOf<__half> { static constexpr MmaKind value = MmaKind::kF16; };

// Kernel 2's MMA: tf32 for fp32 weights; bf16 for bf16/fp16 weights, where 2xBF16 products of
// the fp32 N carry 16 significant bits, beyond either weight format.
template <typename TW>
constexpr MmaKind kUpdateKind = std::is_same_v<TW, float> ? MmaKind::kTF32 : MmaKind::kBF16;

// Whether a basis stored as `proj_dtype` must be split to be exact as an operand of `kind`.
bool basis_needs_split(MmaKind kind, at::ScalarType proj_dtype) {
  switch (kind) {
    case MmaKind::kTF32: return proj_dtype == at::kFloat;  // bf16, fp16 are exact in tf32
    case MmaKind::kBF16: return proj_dtype != at::kBFloat16;
    case MmaKind::kF16: return proj_dtype != at::kHalf;
  }
  return true;
}

template <MmaKind K>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (K == MmaKind::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (K == MmaKind::kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
}

// x -> tf32 hi (+ lo = tf32(x - hi) when SPLIT).
template <bool SPLIT>
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  if constexpr (SPLIT) lo = to_tf32(x - __uint_as_float(hi));
}

// (x0, x1) -> a packed 16-bit pair, x0 in the low half (+ the pair of residuals when SPLIT).
template <MmaKind K, bool SPLIT>
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  if constexpr (K == MmaKind::kBF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    if constexpr (SPLIT) {
      const __nv_bfloat162 l =
          __floats2bfloat162_rn(x0 - __low2float(h), x1 - __high2float(h));
      lo = *reinterpret_cast<const uint32_t*>(&l);
    }
  } else {
    const __half2 h = __floats2half2_rn(x0, x1);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    if constexpr (SPLIT) {
      const __half2 l = __floats2half2_rn(x0 - __low2float(h), x1 - __high2float(h));
      lo = *reinterpret_cast<const uint32_t*>(&l);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the GEMM: C (M x N) = A (M x K) . B (K x N), one 64x64 C tile per CTA, handed to an epilogue
// ---------------------------------------------------------------------------------------------
// 64x64x16 tiles of 4 warps keep registers low enough for three CTAs per SM, whose interleaving
// hides the latency of the next tile's loads (BK = 32 needs ~255 registers and spills).
constexpr int kThreads = 128, kMinBlocksPerSm = 3;
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 16;
constexpr int kWarpsM = 2, kWarpsN = 2;                 // warp tile 32 x 32
constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;
constexpr int kMmaTilesM = kWarpM / 16, kMmaTilesN = kWarpN / 8;
constexpr int kLoadsA = kBlockM * kBlockK / kThreads, kLoadsB = kBlockK * kBlockN / kThreads;

// Operand addressing. A(i, k) is a[i*lda + k] when A_K_CONTIGUOUS, else a[k*lda + i];
// B(k, j) is b[j*ldb + k] when B_K_CONTIGUOUS, else b[k*ldb + j]. Tiles are staged in shared
// memory as fp32 whatever the source dtype, so one MMA loop serves every operand format.
template <typename TA, typename TB>
struct GemmArgs {
  const TA* a;
  const TB* b;
  int lda, ldb;  // below 2^25 (checked on the host): offsets inside a tile fit in an int
  int M, N, K;
  bool m_fastest;  // consecutive CTAs walk down M (they share a block of B) or along N
};

// SPLIT_A / SPLIT_B: the operand is not exact in the MMA input type, so its residual products
// are added (compile-time: a runtime test would cut the MMA loop into small blocks).
template <MmaKind K, typename TA, bool A_K_CONTIGUOUS, bool SPLIT_A, typename TB,
          bool B_K_CONTIGUOUS, bool SPLIT_B, typename Epilogue>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    lowrank_gemm_kernel(const GemmArgs<TA, TB> args, const Epilogue epilogue) {
  // Paddings chosen so that the fragment reads below are free of bank conflicts.
  constexpr int kPadA = K == MmaKind::kTF32 ? 4 : 8;
  constexpr int kPadB = K == MmaKind::kTF32 ? 8 : 4;
  __shared__ alignas(16) float a_tile[kBlockM][kBlockK + kPadA];
  __shared__ alignas(16) float b_tile[kBlockK][kBlockN + kPadB];

  const int tiles_m = (args.M + kBlockM - 1) / kBlockM;
  const int tiles_n = (args.N + kBlockN - 1) / kBlockN;
  const int block = blockIdx.x;
  const int tile_m = args.m_fastest ? block % tiles_m : block / tiles_n;
  const int tile_n = args.m_fastest ? block / tiles_m : block % tiles_n;
  const int m0 = tile_m * kBlockM, n0 = tile_n * kBlockN;

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, thread_in_group = lane % 4;
  const int warp_m = (warp / kWarpsN) * kWarpM, warp_n = (warp % kWarpsN) * kWarpN;

  // Element e of this thread's share of a tile; consecutive threads take consecutive addresses.
  auto a_coord = [&](int e, int& i, int& k) {
    const int idx = tid + e * kThreads;
    if (A_K_CONTIGUOUS) { i = idx / kBlockK; k = idx % kBlockK; }
    else                { k = idx / kBlockM; i = idx % kBlockM; }
  };
  auto b_coord = [&](int e, int& k, int& j) {
    const int idx = tid + e * kThreads;
    if (B_K_CONTIGUOUS) { j = idx / kBlockK; k = idx % kBlockK; }
    else                { k = idx / kBlockN; j = idx % kBlockN; }
  };

  // Tile origins in 64-bit pointers; element offsets from them are 32-bit (fewer registers).
  const TA* a_origin = args.a + (A_K_CONTIGUOUS ? static_cast<int64_t>(m0) * args.lda : m0);
  const TB* b_origin = args.b + (B_K_CONTIGUOUS ? static_cast<int64_t>(n0) * args.ldb : n0);
  float a_next[kLoadsA], b_next[kLoadsB];  // the next K tile, loaded while this one is used
  auto load_tiles = [&](int k0) {
    const TA* a_k = a_origin + (A_K_CONTIGUOUS ? k0 : static_cast<int64_t>(k0) * args.lda);
    const TB* b_k = b_origin + (B_K_CONTIGUOUS ? k0 : static_cast<int64_t>(k0) * args.ldb);
#pragma unroll
    for (int e = 0; e < kLoadsA; ++e) {
      int i, k;
      a_coord(e, i, k);
      const int off = A_K_CONTIGUOUS ? i * args.lda + k : k * args.lda + i;
      a_next[e] = (m0 + i < args.M && k0 + k < args.K) ? to_float(a_k[off]) : 0.f;
    }
#pragma unroll
    for (int e = 0; e < kLoadsB; ++e) {
      int k, j;
      b_coord(e, k, j);
      const int off = B_K_CONTIGUOUS ? j * args.ldb + k : k * args.ldb + j;
      b_next[e] = (k0 + k < args.K && n0 + j < args.N) ? to_float(b_k[off]) : 0.f;
    }
  };

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  load_tiles(0);
  for (int k0 = 0; k0 < args.K; k0 += kBlockK) {
#pragma unroll
    for (int e = 0; e < kLoadsA; ++e) {
      int i, k;
      a_coord(e, i, k);
      a_tile[i][k] = a_next[e];
    }
#pragma unroll
    for (int e = 0; e < kLoadsB; ++e) {
      int k, j;
      b_coord(e, k, j);
      b_tile[k][j] = b_next[e];
    }
    __syncthreads();
    if (k0 + kBlockK < args.K) load_tiles(k0 + kBlockK);

    // Each K tile is summed on its own and then added to acc in plain fp32 round-to-nearest:
    // tensor cores accumulate with truncation, which over a long K drifts ~1e-6 relative, too much
    // where Adam amplifies errors in R (small V).
    float part[kMmaTilesM][kMmaTilesN][4] = {};

    if constexpr (K == MmaKind::kTF32) {
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += 8) {
        uint32_t b_hi[kMmaTilesN][2], b_lo[kMmaTilesN][2];
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt) {
          const int col = warp_n + nt * 8 + group;
          split_tf32<SPLIT_B>(b_tile[kk + thread_in_group][col], b_hi[nt][0], b_lo[nt][0]);
          split_tf32<SPLIT_B>(b_tile[kk + thread_in_group + 4][col], b_hi[nt][1], b_lo[nt][1]);
        }
#pragma unroll
        for (int mt = 0; mt < kMmaTilesM; ++mt) {
          const int row = warp_m + mt * 16 + group;
          uint32_t a_hi[4], a_lo[4];
          split_tf32<SPLIT_A>(a_tile[row][kk + thread_in_group], a_hi[0], a_lo[0]);
          split_tf32<SPLIT_A>(a_tile[row + 8][kk + thread_in_group], a_hi[1], a_lo[1]);
          split_tf32<SPLIT_A>(a_tile[row][kk + thread_in_group + 4], a_hi[2], a_lo[2]);
          split_tf32<SPLIT_A>(a_tile[row + 8][kk + thread_in_group + 4], a_hi[3], a_lo[3]);
#pragma unroll
          for (int nt = 0; nt < kMmaTilesN; ++nt) {
            if constexpr (SPLIT_A) mma<K>(part[mt][nt], a_lo, b_hi[nt]);
            if constexpr (SPLIT_B) mma<K>(part[mt][nt], a_hi, b_lo[nt]);
            mma<K>(part[mt][nt], a_hi, b_hi[nt]);
          }
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += 16) {
        const int k_lo = kk + 2 * thread_in_group;
        uint32_t b_hi[kMmaTilesN][2], b_lo[kMmaTilesN][2];
#pragma unroll
        for (int nt = 0; nt < kMmaTilesN; ++nt) {
          const int col = warp_n + nt * 8 + group;
          split_pack<K, SPLIT_B>(b_tile[k_lo][col], b_tile[k_lo + 1][col], b_hi[nt][0],
                                 b_lo[nt][0]);
          split_pack<K, SPLIT_B>(b_tile[k_lo + 8][col], b_tile[k_lo + 9][col], b_hi[nt][1],
                                 b_lo[nt][1]);
        }
#pragma unroll
        for (int mt = 0; mt < kMmaTilesM; ++mt) {
          const int row = warp_m + mt * 16 + group;
          const float2 x0 = *reinterpret_cast<const float2*>(&a_tile[row][k_lo]);
          const float2 x1 = *reinterpret_cast<const float2*>(&a_tile[row + 8][k_lo]);
          const float2 x2 = *reinterpret_cast<const float2*>(&a_tile[row][k_lo + 8]);
          const float2 x3 = *reinterpret_cast<const float2*>(&a_tile[row + 8][k_lo + 8]);
          uint32_t a_hi[4], a_lo[4];
          split_pack<K, SPLIT_A>(x0.x, x0.y, a_hi[0], a_lo[0]);
          split_pack<K, SPLIT_A>(x1.x, x1.y, a_hi[1], a_lo[1]);
          split_pack<K, SPLIT_A>(x2.x, x2.y, a_hi[2], a_lo[2]);
          split_pack<K, SPLIT_A>(x3.x, x3.y, a_hi[3], a_lo[3]);
#pragma unroll
          for (int nt = 0; nt < kMmaTilesN; ++nt) {
            if constexpr (SPLIT_A) mma<K>(part[mt][nt], a_lo, b_hi[nt]);
            if constexpr (SPLIT_B) mma<K>(part[mt][nt], a_hi, b_lo[nt]);
            mma<K>(part[mt][nt], a_hi, b_hi[nt]);
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMmaTilesM; ++mt)
#pragma unroll
      for (int nt = 0; nt < kMmaTilesN; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mt][nt][q] += part[mt][nt][q];
    __syncthreads();
  }

  // Accumulator (q) of an m16n8 tile sits at row group (+8 for q >= 2), column 2*tig (+1 if odd).
#pragma unroll
  for (int mt = 0; mt < kMmaTilesM; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kMmaTilesN; ++nt) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int i = m0 + warp_m + mt * 16 + group + (q >= 2 ? 8 : 0);
        const int j = n0 + warp_n + nt * 8 + 2 * thread_in_group + (q & 1);
        if (i < args.M && j < args.N) epilogue(i, j, acc[mt][nt][q]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the 16-bit GEMM (fast path): bf16/fp16 operands staged as they are in shared memory
// ---------------------------------------------------------------------------------------------
// C (M x N) = A (M x K) . B (K x N) with A and B of one 16-bit type T. Operand tiles go from
// global to shared memory by cp.async (16 bytes = 8 elements per copy, STAGES deep), from
// shared memory to mma.sync.m16n8k16 fragments by ldmatrix (.trans for an operand whose
// contiguous axis is not K). Each smem row is padded by 8 elements (16 bytes): the 8 row
// addresses of one ldmatrix phase then fall in 8 distinct 16-byte bank groups for every row
// length used here (40, 72, 136 elements). fp32 accumulators; K is walked in a fixed order.
constexpr int kBlockK16 = 32;
constexpr int kPad16 = 8;  // elements

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; the bytes past `src_bytes` (0..16) are zero-filled and not read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8, and register
// q of every lane receives its part of matrix q (row lane/4, columns 2*(lane%4) and +1; with
// TRANS, column lane/4 of rows 2*(lane%4) and +1).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
}

__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint16_t bits16(__half x) { return __half_as_ushort(x); }

__device__ __forceinline__ uint4 pack8(const uint16_t (&v)[8]) {
  uint4 packed;
  packed.x = v[0] | (uint32_t{v[1]} << 16);
  packed.y = v[2] | (uint32_t{v[3]} << 16);
  packed.z = v[4] | (uint32_t{v[5]} << 16);
  packed.w = v[6] | (uint32_t{v[7]} << 16);
  return packed;
}

// Operand loader policies. A tile is copied in chunks of 8 elements along the operand's
// contiguous (inner) axis of global memory; `outer`, `inner` are global coordinates in that
// layout. load_chunk fills the chunk, zero past the matrix edge. A policy with kSplit also fills
// the same chunk of a second tile (dst_lo) with the residuals x - T(x) of values not exact in T;
// the GEMM then adds their products (2xBF16 / 2xFP16). Policies: DenseOperand16 (T in memory),
// Int4Operand16 (a packed INT4 basis dequantized in the loader).
template <typename T>
struct DenseOperand16 {
  static constexpr bool kSplit = false;
  const T* ptr;
  int64_t ld;
  int outer_limit, inner_limit;
  bool aligned;  // ld % 8 == 0 and ptr 16-byte aligned: every chunk is one 16-byte cp.async

  __device__ __forceinline__ void load_chunk(uint16_t* dst, uint16_t* /*dst_lo*/, int outer,
                                             int inner) const {
    const int left = outer < outer_limit ? inner_limit - inner : 0;
    const int valid = left < 0 ? 0 : (left > 8 ? 8 : left);
    const auto* src = reinterpret_cast<const uint16_t*>(ptr) + outer * ld + inner;
    if (aligned) {
      cp_async_16(smem_address(dst), valid > 0 ? static_cast<const void*>(src) : ptr, 2 * valid);
    } else {
      // Rows that do not start on 16 bytes (odd leading dimensions): plain loads, still zero
      // past the edge; visible to the MMA after the same barrier as the cp.async data.
      uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = e < valid ? src[e] : uint16_t{0};
      *reinterpret_cast<uint4*>(dst) = pack8(v);
    }
  }
};

template <typename T>
DenseOperand16<T> dense_operand16(const T* ptr, int64_t ld, int outer_limit, int inner_limit) {
  const bool aligned = ld % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return DenseOperand16<T>{ptr, ld, outer_limit, inner_limit, aligned};
}

// A packed INT4 basis (lowrank/quant.h): element (outer, inner) is flat index outer*ld + inner
// of the row-major basis, dequantized s*(q - z) in fp32 exactly as dequantize_int4 does, then
// rounded to T (+ its residual when SPLIT). The group of consecutive elements is tracked
// incrementally: one division per chunk.
template <typename T, bool SPLIT>
struct Int4Operand16 {
  static constexpr bool kSplit = SPLIT;
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  int64_t ld;
  int outer_limit, inner_limit;
  int64_t group_size;

  __device__ __forceinline__ void load_chunk(uint16_t* dst, uint16_t* dst_lo, int outer,
                                             int inner) const {
    const int left = outer < outer_limit ? inner_limit - inner : 0;
    const int valid = left < 0 ? 0 : (left > 8 ? 8 : left);
    uint16_t hi[8], lo[8];
    const int64_t first = outer * ld + inner;
    int64_t group = valid > 0 ? first / group_size : 0;
    int64_t in_group = first - group * group_size;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float x = 0.f;
      if (e < valid) {
        x = dequantize_code(int4_code(packed, first + e), GroupQuant{scales[group], zeros[group]});
        if (++in_group == group_size) {
          ++group;
          in_group = 0;
        }
      }
      const T rounded = from_float<T>(x);
      hi[e] = bits16(rounded);
      if constexpr (SPLIT) lo[e] = bits16(from_float<T>(x - to_float(rounded)));
    }
    *reinterpret_cast<uint4*>(dst) = pack8(hi);
    if constexpr (SPLIT) *reinterpret_cast<uint4*>(dst_lo) = pack8(lo);
  }
};

// Tile shape of one GEMM instantiation. A_K / B_K: the operand's contiguous axis is K (A is
// stored M x K row-major, B is stored N x K row-major); otherwise A is stored K x M, B K x N.
// SPLIT_A / SPLIT_B: the operand's policy fills a residual tile too (stored after A and B).
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, bool A_K_, bool B_K_,
          bool SPLIT_A_ = false, bool SPLIT_B_ = false>
struct Gemm16Shape {
  static constexpr int BM = BM_, BN = BN_, BK = kBlockK16, STAGES = STAGES_;
  static constexpr int kWarpsM = WARPS_M_, kWarpsN = WARPS_N_;
  static constexpr int kThreads = 32 * WARPS_M_ * WARPS_N_;
  static constexpr bool A_K = A_K_, B_K = B_K_, SPLIT_A = SPLIT_A_, SPLIT_B = SPLIT_B_;
  static constexpr int kWarpM = BM / WARPS_M_, kWarpN = BN / WARPS_N_;
  static constexpr int kTilesM = kWarpM / 16, kTilesN = kWarpN / 8;
  // shared-memory tiles: rows x cols (+ pad), cols along the global contiguous axis
  static constexpr int kARows = A_K ? BM : BK, kACols = A_K ? BK : BM;
  static constexpr int kBRows = B_K ? BN : BK, kBCols = B_K ? BK : BN;
  static constexpr int kALd = kACols + kPad16, kBLd = kBCols + kPad16;
  static constexpr int kAElems = kARows * kALd, kBElems = kBRows * kBLd;
  static constexpr int kALoOffset = kAElems + kBElems;  // inside a stage
  static constexpr int kBLoOffset = kALoOffset + (SPLIT_A ? kAElems : 0);
  static constexpr int kStageElems = kBLoOffset + (SPLIT_B ? kBElems : 0);
  static constexpr int kSmemBytes = STAGES * kStageElems * 2;
  static constexpr int kAChunks = kARows * kACols / 8, kBChunks = kBRows * kBCols / 8;
  static_assert(kWarpM * kWarpsM == BM && kWarpN * kWarpsN == BN, "warps cover the tile");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile: whole 16x16 ldmatrix blocks");
  static_assert(kAChunks % kThreads == 0 && kBChunks % kThreads == 0, "even chunk split");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages");
};

template <typename Shape, MmaKind K, typename OpA, typename OpB, typename Epilogue>
__global__ void __launch_bounds__(Shape::kThreads, 2)
    gemm16_kernel(const OpA op_a, const OpB op_b, const int M, const int N, const int Kdim,
                  const bool m_fastest, const Epilogue epilogue) {
  extern __shared__ __align__(16) uint16_t smem16[];
  constexpr int BM = Shape::BM, BN = Shape::BN, BK = Shape::BK, STAGES = Shape::STAGES;
  constexpr bool A_K = Shape::A_K, B_K = Shape::B_K;
  static_assert(OpA::kSplit == Shape::SPLIT_A && OpB::kSplit == Shape::SPLIT_B,
                "operand policies and the shape agree on residual tiles");

  const int tiles_m = (M + BM - 1) / BM;
  const int tiles_n = (N + BN - 1) / BN;
  const int block = blockIdx.x;
  const int tile_m = m_fastest ? block % tiles_m : block / tiles_n;
  const int tile_n = m_fastest ? block / tiles_m : block % tiles_n;
  const int m0 = tile_m * BM, n0 = tile_n * BN;

  const int tid = threadIdx.x;
  const int lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, thread_in_group = lane % 4;
  const int warp_m = (warp / Shape::kWarpsN) * Shape::kWarpM;
  const int warp_n = (warp % Shape::kWarpsN) * Shape::kWarpN;

  auto load_stage = [&](int stage, int k0) {
    uint16_t* a_s = smem16 + stage * Shape::kStageElems;
    uint16_t* b_s = a_s + Shape::kAElems;
#pragma unroll
    for (int c = tid; c < Shape::kAChunks; c += Shape::kThreads) {
      const int row = c / (Shape::kACols / 8), col = c % (Shape::kACols / 8) * 8;
      const int at = row * Shape::kALd + col;
      op_a.load_chunk(a_s + at, a_s + Shape::kALoOffset + at, A_K ? m0 + row : k0 + row,
                      A_K ? k0 + col : m0 + col);
    }
#pragma unroll
    for (int c = tid; c < Shape::kBChunks; c += Shape::kThreads) {
      const int row = c / (Shape::kBCols / 8), col = c % (Shape::kBCols / 8) * 8;
      const int at = row * Shape::kBLd + col;
      op_b.load_chunk(b_s + at, a_s + Shape::kBLoOffset + at, B_K ? n0 + row : k0 + row,
                      B_K ? k0 + col : n0 + col);
    }
  };

  // Per-lane ldmatrix offsets (elements) inside a stage, for the first 16-wide K step; mapping
  // lane -> (row, column) so that matrix q lands in register q of the m16n8k16 fragments:
  //   A regs: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  //   B regs (two n8 tiles): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
  const int quad = lane / 8, in_quad = lane % 8;
  int a_offset, b_offset, a_kstep, b_kstep;  // kstep: offset of the next 16 K
  if constexpr (A_K) {  // smem A[m][k]: row = m
    a_offset = (warp_m + quad % 2 * 8 + in_quad) * Shape::kALd + quad / 2 * 8;
    a_kstep = 16;
  } else {  // smem A[k][m], transposed load: row = k
    a_offset = (quad / 2 * 8 + in_quad) * Shape::kALd + warp_m + quad % 2 * 8;
    a_kstep = 16 * Shape::kALd;
  }
  if constexpr (B_K) {  // smem B[n][k]: row = n
    b_offset = (warp_n + quad / 2 * 8 + in_quad) * Shape::kBLd + quad % 2 * 8;
    b_kstep = 16;
  } else {  // smem B[k][n], transposed load: row = k
    b_offset = (quad % 2 * 8 + in_quad) * Shape::kBLd + warp_n + quad / 2 * 8;
    b_kstep = 16 * Shape::kBLd;
  }
  // Offsets of the next 16 rows of A (m) / 16 columns of B (n) of this warp.
  constexpr int kAMStep = A_K ? 16 * Shape::kALd : 16;
  constexpr int kBNStep = B_K ? 16 * Shape::kBLd : 16;

  float acc[Shape::kTilesM][Shape::kTilesN][4] = {};
  const int k_tiles = (Kdim + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed (at most STAGES-2 younger groups in flight), and every warp is done
    // with tile kt-1, whose stage the load below refills.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next * BK);
    cp_async_commit();

    const uint16_t* a_s = smem16 + (kt % STAGES) * Shape::kStageElems;
    const uint16_t* b_s = a_s + Shape::kAElems;
    const uint32_t a_base = smem_address(a_s + a_offset);
    const uint32_t b_base = smem_address(b_s + b_offset);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      // [0]: the tile, [1]: its residual tile (only loaded for a split operand)
      uint32_t a_frag[Shape::SPLIT_A ? 2 : 1][Shape::kTilesM][4];
      uint32_t b_frag[Shape::SPLIT_B ? 2 : 1][Shape::kTilesN][2];
#pragma unroll
      for (int part = 0; part < (Shape::SPLIT_A ? 2 : 1); ++part) {
        const uint32_t base = a_base + 2 * part * Shape::kALoOffset;
#pragma unroll
        for (int mt = 0; mt < Shape::kTilesM; ++mt)
          ldmatrix_x4<!A_K>(a_frag[part][mt], base + 2 * (kk * a_kstep + mt * kAMStep));
      }
#pragma unroll
      for (int part = 0; part < (Shape::SPLIT_B ? 2 : 1); ++part) {
        const uint32_t base = b_base + 2 * part * (Shape::kBLoOffset - Shape::kAElems);
#pragma unroll
        for (int np = 0; np < Shape::kTilesN / 2; ++np) {
          uint32_t r[4];
          ldmatrix_x4<!B_K>(r, base + 2 * (kk * b_kstep + np * kBNStep));
          b_frag[part][2 * np][0] = r[0];
          b_frag[part][2 * np][1] = r[1];
          b_frag[part][2 * np + 1][0] = r[2];
          b_frag[part][2 * np + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int mt = 0; mt < Shape::kTilesM; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Shape::kTilesN; ++nt) {
          if constexpr (Shape::SPLIT_A) mma<K>(acc[mt][nt], a_frag[1][mt], b_frag[0][nt]);
          if constexpr (Shape::SPLIT_B) mma<K>(acc[mt][nt], a_frag[0][mt], b_frag[1][nt]);
          mma<K>(acc[mt][nt], a_frag[0][mt], b_frag[0][nt]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Accumulators (2*half, 2*half + 1) of an m16n8 tile sit at row group + 8*half, columns
  // 2*tig and 2*tig + 1. The epilogue reads what it updates (W; M and V) before writing: all
  // loads of one 16-row slice are issued before its stores, since the compiler cannot move a
  // load past a store that might alias it (one DRAM round trip per slice, not per pair).
#pragma unroll
  for (int mt = 0; mt < Shape::kTilesM; ++mt) {
    typename Epilogue::Loaded loaded[Shape::kTilesN][2];
#pragma unroll
    for (int nt = 0; nt < Shape::kTilesN; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = m0 + warp_m + mt * 16 + group + 8 * half;
        const int j = n0 + warp_n + nt * 8 + 2 * thread_in_group;
        if (i < M && j < N) loaded[nt][half] = epilogue.load(i, j, j + 1 < N);
      }
    }
#pragma unroll
    for (int nt = 0; nt < Shape::kTilesN; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = m0 + warp_m + mt * 16 + group + 8 * half;
        const int j = n0 + warp_n + nt * 8 + 2 * thread_in_group;
        if (i < M && j < N) {
          epilogue.store(i, j, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1], j + 1 < N,
                         loaded[nt][half]);
        }
      }
    }
  }
}

template <typename Shape, MmaKind K, typename OpA, typename OpB, typename Epilogue>
void launch_gemm16(const OpA& op_a, const OpB& op_b, int M, int N, int Kdim, bool m_fastest,
                   const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t tiles = static_cast<int64_t>((M + Shape::BM - 1) / Shape::BM) *
                        ((N + Shape::BN - 1) / Shape::BN);
  LOWRANK_CHECK(tiles < (int64_t{1} << 31), "fused_galore_step: too many tiles (", tiles, ")");
  auto* kernel = gemm16_kernel<Shape, K, OpA, OpB, Epilogue>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in; set on every call (a cheap host
  // call) so that each device the kernel runs on has it.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Shape::kSmemBytes));
  kernel<<<static_cast<unsigned>(tiles), Shape::kThreads, Shape::kSmemBytes, stream>>>(
      op_a, op_b, M, N, Kdim, m_fastest, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// epilogues
// ---------------------------------------------------------------------------------------------
// Kernel 1: C = R; M, V and the N workspace share R's row-major layout (ld = N of the GEMM).
// N is stored in the type launch 2 multiplies it in (TN): fp32, or W's 16-bit type on the fast
// path, rounded once here.
template <typename TN>
struct AdamEpilogue {
  void* exp_avg;
  void* exp_avg_sq;
  TN* normalized;
  int64_t ld;
  bool state_bf16;
  AdamCoeffs coeffs;

  __device__ __forceinline__ void operator()(int i, int j, float r) const {
    const int64_t idx = i * ld + j;
    float m, v;
    if (state_bf16) {
      m = __bfloat162float(static_cast<const __nv_bfloat16*>(exp_avg)[idx]);
      v = __bfloat162float(static_cast<const __nv_bfloat16*>(exp_avg_sq)[idx]);
    } else {
      m = static_cast<const float*>(exp_avg)[idx];
      v = static_cast<const float*>(exp_avg_sq)[idx];
    }
    normalized[idx] = from_float<TN>(adam_normalized_update(r, m, v, coeffs));
    store_moments(idx, m, v);
  }

  // M and V of element idx in their dtype: fp32, or bf16 rounded stochastically (adam.h).
  __device__ __forceinline__ void store_moments(int64_t idx, float m, float v) const {
    if (state_bf16) {
      const MomentBits bits = stochastic_round_moments(m, v, moment_words(coeffs, idx));
      static_cast<__nv_bfloat16*>(exp_avg)[idx] = __ushort_as_bfloat16(bits.exp_avg);
      static_cast<__nv_bfloat16*>(exp_avg_sq)[idx] = __ushort_as_bfloat16(bits.exp_avg_sq);
    } else {
      static_cast<float*>(exp_avg)[idx] = m;
      static_cast<float*>(exp_avg_sq)[idx] = v;
    }
  }

  // The 16-bit GEMM's two-phase form, on C(i, j) and, when `second`, C(i, j + 1): load the
  // moments, then update them and write N.
  struct Loaded {
    float m[2], v[2];
  };
  __device__ __forceinline__ float load_state(const void* state, int64_t idx) const {
    return state_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(state)[idx])
                      : static_cast<const float*>(state)[idx];
  }
  __device__ __forceinline__ Loaded load(int i, int j, bool second) const {
    const int64_t idx = i * ld + j;
    Loaded s{};
    for (int e = 0; e < (second ? 2 : 1); ++e) {
      s.m[e] = load_state(exp_avg, idx + e);
      s.v[e] = load_state(exp_avg_sq, idx + e);
    }
    return s;
  }
  __device__ __forceinline__ void store(int i, int j, float r0, float r1, bool second,
                                        Loaded s) const {
    const int64_t idx = i * ld + j;
    const float r[2] = {r0, r1};
    for (int e = 0; e < (second ? 2 : 1); ++e) {
      float m = s.m[e], v = s.v[e];
      normalized[idx + e] = from_float<TN>(adam_normalized_update(r[e], m, v, coeffs));
      store_moments(idx + e, m, v);
    }
  }
};

// Kernel 2: C = back(N); W' = decay*W - us*C, rounded once to W's dtype.
template <typename TW>
struct UpdateEpilogue {
  TW* weight;
  int64_t ld;
  AdamCoeffs coeffs;

  __device__ __forceinline__ void operator()(int i, int j, float back_n) const {
    TW& w = weight[i * ld + j];
    w = from_float<TW>(apply_update(to_float(w), back_n, coeffs));
  }
};

// The 16-bit GEMM's update epilogue, two-phase (load W, then write W'), on W(i, j) and, when
// `second`, W(i, j + 1): one 32-bit access for both when the pair is 4-byte aligned (j is even;
// `paired`: ld even and W 4-byte aligned).
template <typename TW>
struct UpdateEpilogue16 : UpdateEpilogue<TW> {
  bool paired;

  struct Loaded {
    TW w[2];
  };
  __device__ __forceinline__ Loaded load(int i, int j, bool second) const {
    const TW* w = this->weight + i * this->ld + j;
    Loaded s;
    if (second && paired) {
      const uint32_t bits = *reinterpret_cast<const uint32_t*>(w);
      memcpy(s.w, &bits, 4);
    } else {
      s.w[0] = w[0];
      s.w[1] = second ? w[1] : s.w[0];
    }
    return s;
  }
  __device__ __forceinline__ void store(int i, int j, float c0, float c1, bool second,
                                        Loaded s) const {
    TW* w = this->weight + i * this->ld + j;
    Loaded out;
    out.w[0] = from_float<TW>(apply_update(to_float(s.w[0]), c0, this->coeffs));
    out.w[1] = from_float<TW>(apply_update(to_float(s.w[1]), c1, this->coeffs));
    if (second && paired) {
      uint32_t bits;
      memcpy(&bits, out.w, 4);
      *reinterpret_cast<uint32_t*>(w) = bits;
    } else {
      w[0] = out.w[0];
      if (second) w[1] = out.w[1];
    }
  }
};

template <MmaKind K, typename TA, bool A_K_CONTIGUOUS, bool SPLIT_A, typename TB,
          bool B_K_CONTIGUOUS, bool SPLIT_B, typename Epilogue>
void launch_gemm(const GemmArgs<TA, TB>& args, const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t tiles = static_cast<int64_t>((args.M + kBlockM - 1) / kBlockM) *
                        ((args.N + kBlockN - 1) / kBlockN);
  LOWRANK_CHECK(tiles < (int64_t{1} << 31), "fused_galore_step: too many tiles (", tiles, ")");
  lowrank_gemm_kernel<K, TA, A_K_CONTIGUOUS, SPLIT_A, TB, B_K_CONTIGUOUS, SPLIT_B, Epilogue>
      <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(args, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Kernel 1: R = project(G), Adam on R, N -> workspace.
template <typename TG, bool BASIS_SPLIT>
void launch_project_adam(const at::Tensor& grad, const at::Tensor& basis, at::Tensor& exp_avg,
                         at::Tensor& exp_avg_sq, at::Tensor& normalized, const StepGeometry& g,
                         const AdamCoeffs& c, cudaStream_t stream) {
  constexpr MmaKind kKind = KindOf<TG>::value;
  constexpr bool kGradSplit = kKind == MmaKind::kTF32;  // fp32 G is not exact in tf32
  const auto* grad_ptr = reinterpret_cast<const TG*>(grad.data_ptr());
  const float* basis_ptr = basis.data_ptr<float>();
  AdamEpilogue<float> epilogue{exp_avg.data_ptr(),  exp_avg_sq.data_ptr(),
                               normalized.data_ptr<float>(), normalized.size(1),
                               exp_avg.scalar_type() == at::kBFloat16, c};
  const int m = static_cast<int>(g.m), n = static_cast<int>(g.n), r = static_cast<int>(g.r);
  if (g.right) {
    // R (m x r) = G (m x n, k contiguous) . Q^T, Q^T(k, j) = Q[j*n + k]. The CTAs of one row
    // block of G (its r/64 column tiles of R) run back to back.
    GemmArgs<TG, float> args{grad_ptr, basis_ptr, n, n, m, r, n, false};
    launch_gemm<kKind, TG, true, kGradSplit, float, true, BASIS_SPLIT>(args, epilogue, stream);
  } else {
    // R (r x n) = P^T . G, P^T(i, k) = P[k*r + i], G(k, j) = G[k*n + j]; CTAs of one column
    // block of G run back to back.
    GemmArgs<float, TG> args{basis_ptr, grad_ptr, r, n, r, n, m, true};
    launch_gemm<kKind, float, false, BASIS_SPLIT, TG, false, kGradSplit>(args, epilogue, stream);
  }
}

// Kernel 2: W' = decay*W - us*back(N), streaming W once. Both sides are A (m x r, k contiguous)
// . B (r x n, j contiguous): right A = N, B = Q; left A = P, B = N. N is fp32 and always split.
template <typename TW, bool BASIS_SPLIT>
void launch_back_project_update(at::Tensor& param, const at::Tensor& basis,
                                const at::Tensor& normalized, const StepGeometry& g,
                                const AdamCoeffs& c, cudaStream_t stream) {
  constexpr MmaKind kKind = kUpdateKind<TW>;
  UpdateEpilogue<TW> epilogue{reinterpret_cast<TW*>(param.data_ptr()), g.n, c};
  const int m = static_cast<int>(g.m), n = static_cast<int>(g.n), r = static_cast<int>(g.r);
  const float* basis_ptr = basis.data_ptr<float>();
  const float* n_ptr = normalized.data_ptr<float>();
  if (g.right) {
    GemmArgs<float, float> args{n_ptr, basis_ptr, r, n, m, n, r, false};
    launch_gemm<kKind, float, true, true, float, false, BASIS_SPLIT>(args, epilogue, stream);
  } else {
    GemmArgs<float, float> args{basis_ptr, n_ptr, r, n, m, n, r, false};
    launch_gemm<kKind, float, true, BASIS_SPLIT, float, false, true>(args, epilogue, stream);
  }
}

// The 16-bit fast path: G of a 16-bit type T and a basis that is dense in T or packed INT4
// (launch 2 also needs W of type T). Launch 1 tiles are 64 rows of the owned axis x 128 ranks
// (right: M = own, N = r; left: M = r, N = own), 8 warps of 32x32: r <= 128 still gives own/64
// CTAs. At small r that is ~1 CTA per SM streaming G, so its pipeline is 5 stages deep (4 tiles
// of G in flight per CTA: 75 KiB right, 65 KiB left); with an INT4 basis, whose loader is
// synchronous, 3 (75 and 64 KiB with the residual tiles). Launch 2 (K = r, a few tiles) tiles
// W 128x128 with 8 warps of 64x32, 3 stages, 56 KiB.
template <bool SPLIT>
using ProjectRight16 = Gemm16Shape<64, 128, 2, 4, SPLIT ? 3 : 5, /*A_K=*/true, /*B_K=*/true,
                                   false, SPLIT>;
template <bool SPLIT>
using ProjectLeft16 = Gemm16Shape<128, 64, 4, 2, SPLIT ? 3 : 5, /*A_K=*/false, /*B_K=*/false,
                                  SPLIT, false>;
using Update16 = Gemm16Shape<128, 128, 2, 4, 3, /*A_K=*/true, /*B_K=*/false>;

// Basis sources of the fast path: operand(ld, outer_limit, inner_limit) is the loader policy of
// the row-major basis (r x n right, m x r left). kSplitProjection: launch 1 adds residual
// products, as the basis values are not exact in T and R feeds fp32 moments. Launch 2 takes the
// basis rounded to T = W's type, the rounding the dense 16-bit basis (and galore-torch) has.
template <typename T>
struct DenseBasis16 {
  static constexpr bool kSplitProjection = false;
  const T* ptr;
  template <bool SPLIT>
  DenseOperand16<T> operand(int64_t ld, int outer_limit, int inner_limit) const {
    static_assert(!SPLIT, "a basis stored in T is exact in T");
    return dense_operand16(ptr, ld, outer_limit, inner_limit);
  }
};

template <typename T>
struct Int4Basis16 {
  static constexpr bool kSplitProjection = true;
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  int64_t group_size;
  template <bool SPLIT>
  Int4Operand16<T, SPLIT> operand(int64_t ld, int outer_limit, int inner_limit) const {
    return Int4Operand16<T, SPLIT>{packed, scales, zeros, ld, outer_limit, inner_limit,
                                   group_size};
  }
};

// Kernel 1, fast path: N is stored as TN (T when launch 2 runs on the fast path, else fp32).
template <typename T, typename TN, typename Basis>
void launch_project_adam16(const at::Tensor& grad, const Basis& basis, at::Tensor& exp_avg,
                           at::Tensor& exp_avg_sq, at::Tensor& normalized,
                           const StepGeometry& g, const AdamCoeffs& c, cudaStream_t stream) {
  constexpr MmaKind kKind = KindOf<T>::value;
  constexpr bool kSplit = Basis::kSplitProjection;
  const auto* grad_ptr = reinterpret_cast<const T*>(grad.data_ptr());
  AdamEpilogue<TN> epilogue{exp_avg.data_ptr(),
                            exp_avg_sq.data_ptr(),
                            reinterpret_cast<TN*>(normalized.data_ptr()),
                            normalized.size(1),
                            exp_avg.scalar_type() == at::kBFloat16,
                            c};
  const int m = static_cast<int>(g.m), n = static_cast<int>(g.n), r = static_cast<int>(g.r);
  if (g.right) {
    // R (m x r) = G Q^T: A = G (m x n, K contiguous), B(k, j) = Q[j*n + k] (K contiguous). The
    // CTAs of one row block of G run back to back and share it through L2.
    launch_gemm16<ProjectRight16<kSplit>, kKind>(dense_operand16(grad_ptr, n, m, n),
                                                 basis.template operand<kSplit>(n, r, n), m, r,
                                                 n, /*m_fastest=*/false, epilogue, stream);
  } else {
    // R (r x n) = P^T G: A(i, k) = P[k*r + i] (stored K x M), B(k, j) = G[k*n + j] (K x N).
    launch_gemm16<ProjectLeft16<kSplit>, kKind>(basis.template operand<kSplit>(r, m, r),
                                                dense_operand16(grad_ptr, n, m, n), r, n, m,
                                                /*m_fastest=*/true, epilogue, stream);
  }
}

// Kernel 2, fast path: W (m x n) = A (m x r) . B (r x n), right A = N, B = Q; left A = P, B = N;
// N already in T.
template <typename T, typename Basis>
void launch_back_project_update16(at::Tensor& param, const Basis& basis,
                                  const at::Tensor& normalized, const StepGeometry& g,
                                  const AdamCoeffs& c, cudaStream_t stream) {
  constexpr MmaKind kKind = KindOf<T>::value;
  auto* weight = reinterpret_cast<T*>(param.data_ptr());
  const bool paired = g.n % 2 == 0 && reinterpret_cast<uintptr_t>(weight) % 4 == 0;
  UpdateEpilogue16<T> epilogue{{weight, g.n, c}, paired};
  const auto* n_ptr = reinterpret_cast<const T*>(normalized.data_ptr());
  const int m = static_cast<int>(g.m), n = static_cast<int>(g.n), r = static_cast<int>(g.r);
  if (g.right) {
    launch_gemm16<Update16, kKind>(dense_operand16(n_ptr, r, m, r),
                                   basis.template operand<false>(n, r, n), m, n, r,
                                   /*m_fastest=*/false, epilogue, stream);
  } else {
    launch_gemm16<Update16, kKind>(basis.template operand<false>(r, m, r),
                                   dense_operand16(n_ptr, n, r, n), m, n, r,
                                   /*m_fastest=*/false, epilogue, stream);
  }
}

// Both fast launches (the second when W is T too) on one basis source.
template <typename T, typename Basis>
void launch_fast_path(at::Tensor& param, const at::Tensor& grad, const Basis& basis,
                      at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& normalized,
                      bool fast_update, const StepGeometry& g, const AdamCoeffs& c,
                      cudaStream_t stream) {
  if (fast_update) {
    launch_project_adam16<T, T>(grad, basis, exp_avg, exp_avg_sq, normalized, g, c, stream);
    launch_back_project_update16<T>(param, basis, normalized, g, c, stream);
  } else {
    launch_project_adam16<T, float>(grad, basis, exp_avg, exp_avg_sq, normalized, g, c, stream);
  }
}

// The fast path on the basis source `proj` stands for (dense in T or packed INT4). A template,
// so that the fp32 case of the dtype switch instantiates nothing.
template <typename T>
void launch_fast_path_on(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                         const std::optional<at::Tensor>& proj_scales,
                         const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                         at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& normalized,
                         bool fast_update, const StepGeometry& g, const AdamCoeffs& c,
                         cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    LOWRANK_CHECK(false, "fused_galore_step: the 16-bit path got an fp32 gradient");
  } else if (proj.scalar_type() == at::kByte) {
    const Int4Basis16<T> int4{proj.data_ptr<uint8_t>(), proj_scales->data_ptr<float>(),
                              proj_zeros->data_ptr<float>(), proj_group_size};
    launch_fast_path<T>(param, grad, int4, exp_avg, exp_avg_sq, normalized, fast_update, g, c,
                        stream);
  } else {
    const DenseBasis16<T> dense{reinterpret_cast<const T*>(proj.data_ptr())};
    launch_fast_path<T>(param, grad, dense, exp_avg, exp_avg_sq, normalized, fast_update, g, c,
                        stream);
  }
}

// Rows `indices` of the size-d DCT-II basis (r x d fp32), one thread per value, from the same
// lowrank/dct.h arithmetic as the CPU kernels. O(r*d): low rank, like the states.
__global__ void dct_rows_kernel(const int32_t* __restrict__ indices, int64_t r, int64_t d,
                                float* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= r * d) return;
  out[idx] = dct_basis_value(indices[idx / d], idx % d, d);
}

// The basis as an fp32 operand, r x n (right) or m x r (left), from any projection format:
// dense (a view when already fp32, else an r x d copy), DCT indices (generated), packed INT4
// (dequantized by the registered lowrank::dequantize_int4 kernel). No m x n tensor is made.
at::Tensor fp32_basis(const at::Tensor& proj, const StepGeometry& g,
                      const std::optional<at::Tensor>& proj_scales,
                      const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                      cudaStream_t stream) {
  if (proj.scalar_type() == at::kInt) {
    const int64_t d = g.right ? g.n : g.m;
    at::Tensor rows = at::empty({g.r, d}, proj.options().dtype(at::kFloat));
    const int64_t total = g.r * d;
    constexpr int kThreads = 256;
    dct_rows_kernel<<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0,
                      stream>>>(proj.data_ptr<int32_t>(), g.r, d, rows.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return g.right ? rows : rows.t().contiguous();
  }
  if (proj.scalar_type() == at::kByte) {
    static const auto dequantize_int4 =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lowrank::dequantize_int4", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              at::IntArrayRef, int64_t)>();
    const std::vector<int64_t> shape =
        g.right ? std::vector<int64_t>{g.r, g.n} : std::vector<int64_t>{g.m, g.r};
    return dequantize_int4.call(proj, *proj_scales, *proj_zeros, shape, proj_group_size);
  }
  return proj.to(at::kFloat).contiguous();
}

// The 16-bit fast path was written after the last GPU session and has run only in emulation
// (compiled for sm_89/sm_90; fragment layouts checked by a Python model): until its CUDA tests
// (tests/test_fused_galore_step_cuda.py, both paths) pass on hardware it is opt-in, with
// LOWRANK_CUDA_FAST_PATH=1. The general path is the one verified on an H100.
bool fast_path_enabled() {
  const char* flag = std::getenv("LOWRANK_CUDA_FAST_PATH");
  return flag != nullptr && flag[0] == '1' && flag[1] == '\0';
}

void fused_galore_step_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                            at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr, double beta1,
                            double beta2, double eps, double weight_decay, double scale,
                            int64_t step, const std::optional<at::Tensor>& proj_scales,
                            const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                            const std::optional<at::Tensor>& param_scales,
                            const std::optional<at::Tensor>& param_zeros,
                            int64_t param_group_size, int64_t seed) {
  const StepGeometry g = check_fused_galore_step(
      param, grad, proj, exp_avg, exp_avg_sq, beta1, beta2, eps, step, proj_scales, proj_zeros,
      proj_group_size, param_scales, param_zeros, param_group_size, seed);
  // check_fused_galore_step puts every tensor on param's device; that device must be a GPU.
  LOWRANK_CHECK_VALUE(param.is_cuda(), "param: expected a CUDA tensor, got ", param.device());
  LOWRANK_CHECK_VALUE(g.m < (int64_t{1} << 31) && g.n < (int64_t{1} << 25),
                    "param: expected fewer than 2^31 rows and 2^25 columns, got ",
                    shape_str(param.sizes()));
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamCoeffs c =
      make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step, seed);

  // Fast path: a 16-bit G with a dense basis of its type (used as it is) or a packed INT4 basis
  // (dequantized in the tile loader) goes to the tensor cores without an fp32 basis; when W has
  // G's type too, N is stored in it (rounded once) for a fast launch 2. Every other combination
  // (fp32 G, mixed dense types, DCT indices) takes the fp32-staged GEMM on an fp32 basis, made
  // below when the basis is not fp32; so does launch 2 when W is not G's type.
  const at::ScalarType proj_dtype = proj.scalar_type(), grad_dtype = grad.scalar_type();
  const bool grad_16bit = grad_dtype == at::kBFloat16 || grad_dtype == at::kHalf;
  const bool int4_basis = proj_dtype == at::kByte;
  const bool fast_project =
      fast_path_enabled() && grad_16bit && (proj_dtype == grad_dtype || int4_basis);
  const bool fast_update = fast_project && param.scalar_type() == grad_dtype;
  // INT8 codes: pass 2 (int8_update.cu) reads the basis in its stored format
  const bool int8_weight = param.scalar_type() == at::kByte;

  at::Tensor basis;  // fp32 basis of the general path
  if (!fast_project || (!fast_update && !int8_weight)) {
    basis = fp32_basis(proj, g, proj_scales, proj_zeros, proj_group_size, stream);
  }
  // The precision the basis values carry: generated DCT and dequantized INT4 values are fp32.
  const at::ScalarType basis_dtype = is_float_dtype(proj_dtype) ? proj_dtype : at::kFloat;
  at::Tensor normalized = at::empty(
      g.low_rank_shape(), param.options().dtype(fast_update ? param.scalar_type() : at::kFloat));

  if (fast_project) {
    LOWRANK_FLOAT_SWITCH(grad_dtype, grad_t, [&] {
      launch_fast_path_on<grad_t>(param, grad, proj, proj_scales, proj_zeros, proj_group_size,
                                  exp_avg, exp_avg_sq, normalized, fast_update, g, c, stream);
    });
  } else {
    LOWRANK_FLOAT_SWITCH(grad_dtype, grad_t, [&] {
      LOWRANK_BOOL_SWITCH(basis_needs_split(KindOf<grad_t>::value, basis_dtype), split, [&] {
        launch_project_adam<grad_t, split>(grad, basis, exp_avg, exp_avg_sq, normalized, g, c,
                                           stream);
      });
    });
  }
  // ---- INT8 weight codes: launch 1 above is pass 1 (N, M, V); pass 2 requantizes W ----
  if (int8_weight) {
    at::Tensor scales = *param_scales, zeros = *param_zeros;
    int8_weight_update_cuda(param, scales, zeros, param_group_size,
                            rounding_philox_seed(seed, step), proj, proj_scales, proj_zeros,
                            proj_group_size, normalized, g, c, stream);
    return;
  }
  if (!fast_update) {
    LOWRANK_FLOAT_SWITCH(param.scalar_type(), weight_t, [&] {
      LOWRANK_BOOL_SWITCH(basis_needs_split(kUpdateKind<weight_t>, basis_dtype), split, [&] {
        launch_back_project_update<weight_t, split>(param, basis, normalized, g, c, stream);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CUDA, m) { m.impl("fused_galore_step", &fused_galore_step_cuda); }

}  // namespace lowrank
