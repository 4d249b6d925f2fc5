// CUDA C++ fused GaLore AdamW step, every projection and weight format (DESIGN.md §4.1-§4.5).
//
//   right (m >= n):  R = G Q^T (m x r)   N = adam(R; M, V)   W' = decay*W - us*(N Q)
//   left  (m <  n):  R = P^T G (r x n)   N = adam(R; M, V)   W' = decay*W - us*(P N)
//   decay = 1 - lr*wd, us = decay * lr*sqrt(1-b2^t)/(1-b1^t) * scale  (lowrank/adam.h)
//
// Where it stands: not the default. On CUDA tensors torch.ops.lowrank.fused_galore_step runs the
// Triton two-launch kernel (lowrank_kernels/_dispatch.py), measured 4-12x faster than this one on
// an H100 (bench/results/gpu_step_h100.csv: 1.96 vs 0.24 ms at 4096x11008, r=256, bf16). This
// kernel is registered under lowrank_cuda::fused_galore_step (lowrank_kernels.set_cuda_backend
// ("cuda_cxx"), backend="cuda"), and under lowrank:: for machines without Triton; it is an
// independently written GPU implementation that passed its tests on an H100 (dense, INT8 weights).
// A faster 16-bit tensor-core path (cp.async, ldmatrix) that never ran on a GPU lives in
// csrc/experimental/ and is not compiled by default.
//
// Two launches, each a tensor-core GEMM (mma.sync) with its own epilogue:
//   1. project + Adam: C = R (m x r right, r x n left). A CTA owns a tile of R and runs the
//      whole reduction over the long dimension (no split-K: the epilogue is nonlinear), then
//      updates its M, V tile in place and writes N to a low-rank workspace. CTAs sharing a block
//      of G are launched back to back, so the r/BN tiles of one block re-read it from L2.
//   2. back-project + update: C = back(N) (m x n), K = r. Each W tile is read and written once,
//      W' = decay*W - us*C in the epilogue; back(N) never reaches memory. INT8 weight codes are
//      requantized by int8_update.cu instead.
// Why two launches and not one CTA owning whole rows (right) / columns (left) through both
// phases: that CTA must hold a BM x r fp32 slice of R (r <= 512) and re-read the whole basis
// twice, so BM is small and the GEMMs run at low intensity. Two launches tile both GEMMs freely
// and cost only the low-rank N round trip and a second basis read.
//
// lowrank_gemm_kernel: 64x64 tiles staged in shared memory as fp32 whatever the source type, on
// an fp32 basis (a view when the basis is fp32, else a copy made per call), N fp32. DCT rows are
// a per-call fp32 copy too: generating them in the loader would evaluate a cos/sin per basis
// element in every CTA that reads it ((own/64) x r x d calls in launch 1), far more work than
// the r x d copy's bytes. G and the basis are read as dense row-major operands: strided ones are
// copied first (read-only inputs may have any strides, csrc/include/lowrank/checks.h).
// No m x n temporary exists for a dense G. DRAM bytes per step (s_* = element sizes, L = m*r
// right or r*n left, d = n right or m left; bench/traffic.py `fused_cuda` is this count):
//   floor:  G m*n*s_g  +  W 2*m*n*s_w  +  M, V 4*L*s_state  +  basis d*r*s_p
//   here:   + N 8*L; a 16-bit basis is copied to fp32 first (4*d*r written, read by both
//           launches: 8*d*r) instead of being read twice.
// Operand tiles re-read by several CTAs (G by the r/BN CTAs of one block, the basis and N by
// every CTA) come from L2.
//
// Precision: all products accumulate in fp32. Operands that are not exact in the MMA input type
// are split x = hi + lo (hi = round(x), lo = round(x - hi)) and multiplied as
// a_hi*b_hi + a_hi*b_lo + a_lo*b_hi: 3xTF32 for fp32 inputs (~fp32 accuracy), 2xBF16 for the
// fp32 N and an fp32 basis next to bf16/fp16 data; each 16-long K tile is summed in its own
// accumulator and added to the total in IEEE fp32 (no truncation drift over long K where Adam
// amplifies errors of R). Each stored value is rounded once. Every reduction has a fixed order:
// runs are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "int8_update.h"  // INT8 weight codes: pass 2 (csrc/cuda/int8_update.cu)
#include "lowrank/adam.h"
#include "lowrank/checks.h"
#include "lowrank/dct.h"
#include "mma.cuh"
#include "registration.h"

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
// (dequantized by the CUDA C++ lowrank_cuda::dequantize_int4 kernel). No m x n tensor is made.
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
            .findSchemaOrThrow("lowrank_cuda::dequantize_int4", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              at::IntArrayRef, int64_t)>();
    const std::vector<int64_t> shape =
        g.right ? std::vector<int64_t>{g.r, g.n} : std::vector<int64_t>{g.m, g.r};
    return dequantize_int4.call(proj, *proj_scales, *proj_zeros, shape, proj_group_size);
  }
  return proj.to(at::kFloat).contiguous();
}

void fused_galore_step_cuda(at::Tensor& param, const at::Tensor& grad_in,
                            const at::Tensor& proj_in, const std::optional<at::Tensor>& exp_avg_in,
                            at::Tensor& exp_avg_sq, const at::Scalar& lr_in, double beta1,
                            double beta2, double eps, const at::Scalar& weight_decay_in,
                            double scale, int64_t step,
                            const std::optional<at::Tensor>& proj_scales_in,
                            const std::optional<at::Tensor>& proj_zeros_in,
                            int64_t proj_group_size, const std::optional<at::Tensor>& param_scales,
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
      param, grad_in, proj_in, exp_avg_in, exp_avg_sq, beta1, beta2, eps, step, proj_scales_in,
      proj_zeros_in, proj_group_size, param_scales, param_zeros, param_group_size, seed, modes);
  const FullRankArgs full = check_full_rank(param, full_rank, full_rank_norm, limiter,
                                            limiter_growth, scale_front, scale);
  check_full_rank_combination(full_rank, modes, exp_avg_sq, g);
  // A factored second moment (DESIGN.md §4.12) is a mode of the Triton kernel only: the
  // dispatcher routes it there (lowrank_kernels._dispatch.cuda_cxx_serves); a direct call of
  // lowrank_cuda:: names the argument.
  LOWRANK_CHECK_VALUE(exp_avg_sq.dim() == 2,
                      "exp_avg_sq: a factored (1-D) second moment runs in the Triton kernel, not "
                      "in lowrank_cuda::fused_galore_step (call lowrank_kernels.ops."
                      "fused_galore_step(..., backend='triton'), or torch.ops.lowrank."
                      "fused_galore_step, which routes it there); expected the full (2-D) "
                      "second moment here");
  // The modes added after this kernel (AdaGrad, 8-bit moments, an explicit side, Fira/APOLLO)
  // run in the Triton kernel: lowrank_kernels._dispatch routes such calls there under
  // set_cuda_backend("cuda_cxx") too; a direct call of lowrank_cuda:: gets this error (this
  // kernel also has no finalize between its passes, which the full-rank modes need).
  LOWRANK_CHECK_NOT_IMPLEMENTED(!modes.adagrad && !exp_avg_scales && !exp_avg_sq_scales &&
                                    !right.has_value() && full.mode == FullRank::kNone,
                                "lowrank_cuda::fused_galore_step: inner='adagrad', 8-bit "
                                "moments, right= and full_rank='fira'/'apollo' run in the Triton "
                                "kernel (lowrank_kernels.ops.fused_galore_step(..., "
                                "backend='triton'))");
  at::Tensor exp_avg = *exp_avg_in;
  const double lr = lr_in.toDouble(), weight_decay = weight_decay_in.toDouble();
  // check_fused_galore_step puts every tensor on param's device; that device must be a GPU.
  LOWRANK_CHECK_VALUE(param.is_cuda(), "param: expected a CUDA tensor, got ", param.device());
  LOWRANK_CHECK_VALUE(g.m < (int64_t{1} << 31) && g.n < (int64_t{1} << 25),
                    "param: expected fewer than 2^31 rows and 2^25 columns, got ",
                    shape_str(param.sizes()));
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const AdamCoeffs c =
      make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step, seed);

  // These kernels address G and the basis as dense row-major operands: read-only inputs of other
  // strides are copied here (for a transposed G an m x n copy, which the default Triton kernels
  // avoid by reading G through both strides; this path is the opt-in one).
  const at::Tensor grad = grad_in.contiguous(), proj = proj_in.contiguous();
  std::optional<at::Tensor> proj_scales, proj_zeros;
  if (proj_scales_in) proj_scales = proj_scales_in->contiguous();
  if (proj_zeros_in) proj_zeros = proj_zeros_in->contiguous();

  // INT8 codes: pass 2 (int8_update.cu) reads the basis in its stored format
  const bool int8_weight = param.scalar_type() == at::kByte;
  const at::Tensor basis = fp32_basis(proj, g, proj_scales, proj_zeros, proj_group_size, stream);
  // The precision the basis values carry: generated DCT and dequantized INT4 values are fp32.
  const at::ScalarType proj_dtype = proj.scalar_type();
  const at::ScalarType basis_dtype = is_float_dtype(proj_dtype) ? proj_dtype : at::kFloat;
  at::Tensor normalized = at::empty(g.low_rank_shape(), param.options().dtype(at::kFloat));

  LOWRANK_FLOAT_SWITCH(grad.scalar_type(), grad_t, [&] {
    LOWRANK_BOOL_SWITCH(basis_needs_split(KindOf<grad_t>::value, basis_dtype), split, [&] {
      launch_project_adam<grad_t, split>(grad, basis, exp_avg, exp_avg_sq, normalized, g, c,
                                         stream);
    });
  });
  // ---- INT8 weight codes: launch 1 above is pass 1 (N, M, V); pass 2 requantizes W ----
  if (int8_weight) {
    at::Tensor scales = *param_scales, zeros = *param_zeros;
    int8_weight_update_cuda(param, scales, zeros, param_group_size,
                            rounding_philox_seed(seed, step), proj, proj_scales, proj_zeros,
                            proj_group_size, normalized, g, c, stream);
    return;
  }
  LOWRANK_FLOAT_SWITCH(param.scalar_type(), weight_t, [&] {
    LOWRANK_BOOL_SWITCH(basis_needs_split(kUpdateKind<weight_t>, basis_dtype), split, [&] {
      launch_back_project_update<weight_t, split>(param, basis, normalized, g, c, stream);
    });
  });
}

void register_kernels(torch::Library& m) { m.impl("fused_galore_step", &fused_galore_step_cuda); }

}  // namespace

LOWRANK_REGISTER_CUDA_KERNELS(register_kernels)

}  // namespace lowrank
