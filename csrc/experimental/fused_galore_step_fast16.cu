// EXPERIMENTAL, not compiled by default: the CUDA fused step's 16-bit tensor-core path.
//
// Status: written after the last GPU session; it has run only in emulation (compiled for sm_89
// and sm_90 by nvcc, fragment layouts checked by a Python model), never on a GPU. So it is on no
// default path and in no default build: LOWRANK_EXPERIMENTAL_CUDA=1 at build time (setup.py,
// CMake option LOWRANK_EXPERIMENTAL_CUDA) compiles this file and registers
// torch.ops.lowrank_experimental.fused_galore_step (schema from csrc/lowrank.cpp), which takes
// this path for the inputs it serves and hands every other call to lowrank_cuda::fused_galore_step
// (the general CUDA C++ path). tests/test_fused_galore_step_cuda.py runs it (cuda_paths fixture,
// tests/conftest.py) when it is built and a GPU is present.
//
// What would earn it a return to a default path: its GPU tests passing on hardware, and then
// bench/bench_gpu_step.py (provider "cuda-fast16") beating the default Triton two-launch kernel
// in the same run at the 7B shapes (4096x11008, 11008x4096, 4096x4096; r = 128-1024, bf16), by
// more than the run-to-run spread. The traffic model puts both at 1.04-1.09x the DRAM floor
// (bench/traffic.py `fused_cuda`), so only a measurement can tell them apart.
//
// What it computes: the step of csrc/cuda/fused_galore_step.cu (DESIGN.md §4.1-§4.2) when G and
// W share a 16-bit type T (bf16 or fp16) and the basis is dense in T or packed INT4 (float
// weights; INT8 weight codes and mixed types go to the general path).
//   gemm16_kernel: operand tiles go global -> shared as T by cp.async (multi-stage, rows padded
//   by 16 bytes: conflict-free ldmatrix), shared -> registers by ldmatrix (.trans for an operand
//   whose contiguous axis is not K), m16n8k16 MMAs with fp32 accumulators. Launch 1: CTA tile
//   64 (owned axis) x 128 (rank), 8 warps of 32x32, 5 stages. Launch 2: W tiles of 128x128,
//   8 warps of 64x32, 3 stages, N stored in T by launch 1 (rounded once, on store), so both of
//   its operands are T too. Row-major operands whose rows are not 16-byte aligned (n or r not a
//   multiple of 8) are loaded by plain loads into the same tiles.
//   The tile loader is a policy: DenseOperand16 copies T; Int4Operand16 dequantizes a packed
//   INT4 basis, s*(q - z) in fp32 as lowrank/quant.h, straight into the tile, rounded to T and,
//   in launch 1, with its residual in a second tile (2xT products: R feeds fp32 moments); no
//   fp32 basis is made. Launch 2 takes it rounded to T = W's type, as a dense T basis is.
// DRAM bytes per step (s_* = element sizes, L = m*r right or r*n left, d = n right or m left):
//   floor:  G m*n*s_g  +  W 2*m*n*s_w  +  M, V 4*L*s_state  +  basis d*r*s_p
//   here:   + N written and read once 2*L*s_w  + the basis read again by launch 2 d*r*s_p.
//           4096x11008, r=512, bf16, fp32 states: floor 365 MB, extra 26.7 MB (+7.3%).
//   INT4: as above, the basis being d*r/2 bytes of codes + 8 bytes per group.
// Precision: products of T values are exact in the fp32 accumulators, which the tensor cores add
// with truncation (as cuBLAS and Triton do for 16-bit GEMMs); N in T is the rounding the
// plain-torch baseline (and galore-torch) makes too.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../cuda/mma.cuh"
#include "lowrank/adam.h"
#include "lowrank/checks.h"

namespace lowrank {
namespace {

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
// epilogues in the 16-bit GEMM's two-phase form
// ---------------------------------------------------------------------------------------------
// Launch 1 on C(i, j) and, when `second`, C(i, j + 1): load the moments, then update them and
// write N (csrc/cuda/mma.cuh's AdamEpilogue does the arithmetic).
template <typename TN>
struct AdamEpilogue16 : AdamEpilogue<TN> {
  struct Loaded {
    float m[2], v[2];
  };
  __device__ __forceinline__ float load_state(const void* state, int64_t idx) const {
    return this->state_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(state)[idx])
                            : static_cast<const float*>(state)[idx];
  }
  __device__ __forceinline__ Loaded load(int i, int j, bool second) const {
    const int64_t idx = i * this->ld + j;
    Loaded s{};
    for (int e = 0; e < (second ? 2 : 1); ++e) {
      s.m[e] = load_state(this->exp_avg, idx + e);
      s.v[e] = load_state(this->exp_avg_sq, idx + e);
    }
    return s;
  }
  __device__ __forceinline__ void store(int i, int j, float r0, float r1, bool second,
                                        Loaded s) const {
    const int64_t idx = i * this->ld + j;
    const float r[2] = {r0, r1};
    for (int e = 0; e < (second ? 2 : 1); ++e) {
      float m = s.m[e], v = s.v[e];
      this->normalized[idx + e] =
          from_float<TN>(adam_normalized_update(r[e], m, v, this->coeffs));
      this->store_moments(idx + e, m, v);
    }
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
  AdamEpilogue16<TN> epilogue{{exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                               reinterpret_cast<TN*>(normalized.data_ptr()), normalized.size(1),
                               exp_avg.scalar_type() == at::kBFloat16, c}};
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

bool serves(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
            const std::optional<at::Tensor>& proj_scales,
            const std::optional<at::Tensor>& proj_zeros, const StepGeometry& g) {
  const at::ScalarType t = grad.scalar_type();
  const bool dense_operands = grad.is_contiguous() && proj.is_contiguous() &&
                              (!proj_scales || proj_scales->is_contiguous()) &&
                              (!proj_zeros || proj_zeros->is_contiguous());
  return param.is_cuda() && (t == at::kBFloat16 || t == at::kHalf) && param.scalar_type() == t &&
         (proj.scalar_type() == t || proj.scalar_type() == at::kByte) && dense_operands &&
         g.m < (int64_t{1} << 31) && g.n < (int64_t{1} << 25);
}

void fused_galore_step_fast16(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                              const std::optional<at::Tensor>& exp_avg_in,
                              at::Tensor& exp_avg_sq, const at::Scalar& lr, double beta1,
                              double beta2, double eps, const at::Scalar& weight_decay,
                              double scale, int64_t step,
                              const std::optional<at::Tensor>& proj_scales,
                              const std::optional<at::Tensor>& proj_zeros,
                              int64_t proj_group_size,
                              const std::optional<at::Tensor>& param_scales,
                              const std::optional<at::Tensor>& param_zeros,
                              int64_t param_group_size, int64_t seed, c10::string_view inner,
                              const std::optional<at::Tensor>& exp_avg_scales,
                              const std::optional<at::Tensor>& exp_avg_sq_scales,
                              int64_t state_block_size, std::optional<bool> right,
                              c10::string_view full_rank, c10::string_view full_rank_norm,
                              const std::optional<at::Tensor>& limiter, double limiter_growth,
                              bool scale_front) {
  const StepModes modes{parse_inner_rule(inner), exp_avg_scales, exp_avg_sq_scales,
                        state_block_size, right};
  const StepGeometry g = check_fused_galore_step(
      param, grad, proj, exp_avg_in, exp_avg_sq, beta1, beta2, eps, step, proj_scales,
      proj_zeros, proj_group_size, param_scales, param_zeros, param_group_size, seed, modes);
  // a factored (1-D) exp_avg_sq goes to the general kernel, which refuses it by name
  const bool default_modes = !modes.adagrad && !exp_avg_scales && !exp_avg_sq_scales &&
                             !right.has_value() && full_rank == "none" && exp_avg_sq.dim() == 2;
  if (!default_modes || !serves(param, grad, proj, proj_scales, proj_zeros, g)) {
    static const auto general =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("lowrank_cuda::fused_galore_step", "")
            .typed<decltype(fused_galore_step_fast16)>();
    general.call(param, grad, proj, exp_avg_in, exp_avg_sq, lr, beta1, beta2, eps,
                 weight_decay, scale, step, proj_scales, proj_zeros, proj_group_size,
                 param_scales, param_zeros, param_group_size, seed, inner, exp_avg_scales,
                 exp_avg_sq_scales, state_block_size, right, full_rank, full_rank_norm, limiter,
                 limiter_growth, scale_front);
    return;
  }
  at::Tensor exp_avg = *exp_avg_in;
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamCoeffs c = make_adam_coeffs(lr.toDouble(), beta1, beta2, eps,
                                        weight_decay.toDouble(), scale, step, seed);
  at::Tensor normalized = at::empty(g.low_rank_shape(), param.options());
  LOWRANK_FLOAT_SWITCH(grad.scalar_type(), grad_t, [&] {
    launch_fast_path_on<grad_t>(param, grad, proj, proj_scales, proj_zeros, proj_group_size,
                                exp_avg, exp_avg_sq, normalized, /*fast_update=*/true, g, c,
                                stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_experimental, CUDA, m) {
  m.impl("fused_galore_step", &fused_galore_step_fast16);
}

}  // namespace lowrank
