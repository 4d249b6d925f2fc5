// Pass 2 of the CUDA fused step on INT8 weight codes (DESIGN.md §4.4), the twin of
// int8_weight_update in csrc/cpu/fused_galore_step.cpp on the same shared math (lowrank/adam.h,
// lowrank/quant.h, lowrank/philox.h, lowrank/dct.h). Per group of `group_size` row-major
// elements of the m x n weight:
//
//   T  = back(N)                 right: N (m x r) . Q (r x n)    left: P (m x r) . N (r x n)
//   W' = decay * s(q - z) - us * T                   (fp32, apply_update of lowrank/adam.h)
//   s', z' from min/max of W';   q' = clamp(SR(W'/s') + z', 0, 255),
//   u = philox_uniform(philox_seed, row-major index),  philox_seed = rounding_philox_seed(seed, t)
//
// Pass 1 (N = adam(project(G)) with M, V updated) is launch 1 of fused_galore_step.cu.
// The basis (Q or P) is read in its stored format by a loader functor: dense fp32/bf16/fp16,
// packed INT4 dequantized per element, or DCT rows generated per element by lowrank/dct.h. No
// dequantized basis, back(N) or W' ever reaches global memory.
//
// Tiling: a CTA owns whole groups, so that it can reduce min/max before it writes a code.
//   tiled (n % group_size == 0, group_size <= 256): a CTA (8 warps) owns a 32-row x tile_cols
//     tile, tile_cols = the largest multiple of group_size <= 256. K = r runs in chunks of 16:
//     the 32 x 16 A chunk and the 16 x 256 B chunk are staged in shared memory as fp32 (thread t
//     loads column t of B: consecutive threads, consecutive columns), and warp w computes
//     columns [32w, 32w + 32) of T with mma.sync m16n8k8 tf32. T then goes to a 32 x 256 fp32
//     shared tile (aliasing the B chunk), thread t turns column t into W', and one warp per group
//     reduces min/max (shuffles) and writes the group's codes, s' and z'.
//   general (groups straddle rows, or group_size > 256): one warp per group in the flattened index
//     space; each lane computes its elements' dot products directly with fp32 FMA (loads from
//     L1/L2: broadcast A, coalesced B), keeps the first 8 per lane in registers and recomputes
//     any beyond (bitwise the same: one non-inlined function) after the min/max reduction.
//     Correct for every shape and group size; slower.
// Arithmetic: tiled: 3xTF32 (x = hi + lo in tf32; a_hi*b_hi + a_hi*b_lo + a_lo*b_hi, ~fp32
// accuracy), each 16-long K chunk summed on its own and added to T in IEEE fp32; general:
// T = fma(A[i,k], B[k,j], T) for k = 0, 1, ..., r-1. Every order is fixed, so runs are bitwise
// reproducible. Where T differs from the CPU kernel's BLAS sum by its rounding, a code can differ
// by one when u falls within that rounding of the fractional part (rare: ~1e-5 of codes), and a
// zero can flip when -min/s' sits on a .5; DCT values may also differ by an ulp (device
// cosf/sinf). W' itself is the same expression as on the CPU (apply_update, dequantize_code).
//
// DRAM bytes of this pass (L = m*r right, r*n left; d = n right, m left):
//   codes m*n read + m*n written, scales/zeros 8*groups read + 8*groups written, N 4*L read once
//   (its re-reads by other tiles hit L2), the basis d*r*s_p (+ INT4 scales/zeros) once, re-read
//   from L2 by every row tile. Nothing else.
#include "int8_update.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "lowrank/dct.h"
#include "lowrank/philox.h"
#include "lowrank/quant.h"

namespace lowrank {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;
constexpr int kTileCols = kThreads;  // thread t owns column t of a tile
constexpr int kTiledBlocksPerSm = 2;  // caps registers at 128: two 36 KB CTAs per SM
constexpr int kCachedPerLane = 8;  // general kernel: W' values held in registers per lane

// ---- operand loaders: element (row, col) of a logical row-major matrix, as fp32 ----
struct Fp32Matrix {
  const float* data;
  int64_t ld;
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const {
    return data[row * ld + col];
  }
};

template <typename scalar_t>
struct DenseMatrix {
  const scalar_t* data;
  int64_t ld;
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const {
    return static_cast<float>(data[row * ld + col]);
  }
};

// A packed INT4 basis (DESIGN.md §4.3): groups over the row-major elements of the logical matrix.
// index_t: uint32_t when the basis has fewer than 2^32 elements (a 32-bit division per element
// instead of a 64-bit one, which dominated the right side's B loads), else int64_t.
template <typename index_t>
struct Int4Matrix {
  const uint8_t* packed;
  const float* scales;
  const float* zeros;
  index_t ld, group_size;
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const {
    const index_t k = static_cast<index_t>(row) * ld + static_cast<index_t>(col);
    const index_t group = k / group_size;
    return dequantize_code(int4_code(packed, k), GroupQuant{scales[group], zeros[group]});
  }
};

// Rows `indices` of the size-d DCT-II basis: Q = C[idx, :] (right, kFrequencyRows) or its
// transpose P = C[idx, :]^T (left).
template <bool kFrequencyRows>
struct DctMatrix {
  const int32_t* indices;
  int64_t d;
  __device__ __forceinline__ float operator()(int64_t row, int64_t col) const {
    return kFrequencyRows ? dct_basis_value(indices[row], col, d)
                          : dct_basis_value(indices[col], row, d);
  }
};

struct Int8Weight {
  uint8_t* codes;
  float* scales;
  float* zeros;
};

__device__ __forceinline__ void warp_min_max(float& lo, float& hi) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, delta));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, delta));
  }
}

// The group epilogue of the tiled kernel: one warp per group of the W' tile (fp32, shared):
// min/max by shuffles, then s', z' and the stochastically rounded codes.
__device__ __forceinline__ void requantize_tile_groups(const float (*w_tile)[kTileCols],
                                                       const Int8Weight& w, int i0, int j0,
                                                       int rows, int cols, int n, int group_size,
                                                       uint64_t philox_seed) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups_per_tile_row = cols / group_size;
  for (int q = warp; q < rows * groups_per_tile_row; q += kWarps) {
    const int i = q / groups_per_tile_row;
    const int col0 = (q - i * groups_per_tile_row) * group_size;
    const float* values = &w_tile[i][col0];
    float lo = INFINITY, hi = -INFINITY;
    for (int k = lane; k < group_size; k += 32) {
      lo = fminf(lo, values[k]);
      hi = fmaxf(hi, values[k]);
    }
    warp_min_max(lo, hi);
    const GroupQuant fresh = group_quant_params(lo, hi, kInt8MaxCode);
    const int64_t first = static_cast<int64_t>(i0 + i) * n + j0 + col0;
    for (int k = lane; k < group_size; k += 32) {
      w.codes[first + k] = quantize_stochastic(
          values[k], philox_uniform(philox_seed, static_cast<uint64_t>(first + k)), fresh,
          kInt8MaxCode);
    }
    if (lane == 0) {
      const int64_t group = first / group_size;
      w.scales[group] = fresh.scale;
      w.zeros[group] = fresh.zero;
    }
  }
}

// ---- tiled kernel: n % group_size == 0, group_size <= kTileCols; T on tensor cores ----
// T is summed as a_hi*b_hi + a_hi*b_lo + a_lo*b_hi of the tf32 splits x = hi + lo (~fp32
// accuracy); each 16-long K chunk is summed on its own and added to the total in IEEE fp32
// (tensor cores truncate when they accumulate), in a fixed order.
constexpr int kMmaChunkK = 16;
constexpr int kPadA = 4, kPadB = 8;  // conflict-free fragment reads

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(x));
  const float rest = x - __uint_as_float(hi);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(rest));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename ALoader, typename BLoader>
__global__ void __launch_bounds__(kThreads, kTiledBlocksPerSm)
    int8_update_tiled_kernel(const ALoader a, const BLoader b, const Int8Weight w,
                                 const int m, const int n, const int r, const int group_size,
                                 const int tile_cols, const int tiles_n, const AdamCoeffs c,
                                 const uint64_t philox_seed) {
  constexpr int kWarpCols = kTileCols / kWarps;  // 32: warp w owns columns [32w, 32w + 32)
  static_assert(kTileRows == 32 && kWarpCols == 32, "fragment loops assume 32 x 32 warp tiles");
  static_assert(kMmaChunkK * (kTileCols + kPadB) <= kTileRows * kTileCols, "B chunk aliasing");
  __shared__ alignas(16) float a_chunk[kTileRows][kMmaChunkK + kPadA];
  // B chunks during the K loop, then T, then W' (row-major kTileRows x kTileCols)
  __shared__ alignas(16) float tile_storage[kTileRows * kTileCols];
  auto b_chunk = reinterpret_cast<float (*)[kTileCols + kPadB]>(tile_storage);
  auto w_tile = reinterpret_cast<float (*)[kTileCols]>(tile_storage);

  const int tid = threadIdx.x;
  const int tile_m = blockIdx.x / tiles_n, tile_n = blockIdx.x % tiles_n;
  const int i0 = tile_m * kTileRows, j0 = tile_n * tile_cols;
  const int rows = min(kTileRows, m - i0), cols = min(tile_cols, n - j0);
  const bool owns_column = tid < cols;
  const int j = j0 + tid;
  const int warp = tid / 32, lane = tid % 32, group = lane / 4, tig = lane % 4;
  const int warp_col = warp * kWarpCols;

  float acc[2][4][4] = {};
  for (int k0 = 0; k0 < r; k0 += kMmaChunkK) {
#pragma unroll
    for (int e = 0; e < kTileRows * kMmaChunkK / kThreads; ++e) {
      const int idx = tid + e * kThreads;
      const int i = idx / kMmaChunkK, kk = idx % kMmaChunkK;
      a_chunk[i][kk] = (i < rows && k0 + kk < r) ? a(i0 + i, k0 + kk) : 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kMmaChunkK; ++kk) {
      b_chunk[kk][tid] = (owns_column && k0 + kk < r) ? b(k0 + kk, j) : 0.f;
    }
    __syncthreads();
    float part[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < kMmaChunkK; ks += 8) {
      uint32_t b_hi[4][2], b_lo[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = warp_col + nt * 8 + group;
        split_tf32(b_chunk[ks + tig][col], b_hi[nt][0], b_lo[nt][0]);
        split_tf32(b_chunk[ks + tig + 4][col], b_hi[nt][1], b_lo[nt][1]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = mt * 16 + group;
        uint32_t a_hi[4], a_lo[4];
        split_tf32(a_chunk[row][ks + tig], a_hi[0], a_lo[0]);
        split_tf32(a_chunk[row + 8][ks + tig], a_hi[1], a_lo[1]);
        split_tf32(a_chunk[row][ks + tig + 4], a_hi[2], a_lo[2]);
        split_tf32(a_chunk[row + 8][ks + tig + 4], a_hi[3], a_lo[3]);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma_tf32(part[mt][nt], a_lo, b_hi[nt]);
          mma_tf32(part[mt][nt], a_hi, b_lo[nt]);
          mma_tf32(part[mt][nt], a_hi, b_hi[nt]);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mt][nt][q] += part[mt][nt][q];
    __syncthreads();  // the next chunk (or T below) overwrites b_chunk
  }

  // Accumulator q of an m16n8 tile sits at row group (+8 for q >= 2), column 2*tig (+1 if odd).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        w_tile[mt * 16 + group + (q >= 2 ? 8 : 0)][warp_col + nt * 8 + 2 * tig + (q & 1)] =
            acc[mt][nt][q];
      }
  __syncthreads();

  if (owns_column) {
    const int64_t groups_per_row = n / group_size;
    const int64_t column_group = j / group_size;
    for (int i = 0; i < rows; ++i) {
      const int64_t row = i0 + i;
      const int64_t group_index = row * groups_per_row + column_group;
      const GroupQuant old{w.scales[group_index], w.zeros[group_index]};
      w_tile[i][tid] =
          apply_update(dequantize_code(w.codes[row * n + j], old), w_tile[i][tid], c);
    }
  }
  __syncthreads();
  requantize_tile_groups(w_tile, w, i0, j0, rows, cols, n, group_size, philox_seed);
}

// ---- general kernel: one warp per group of the flattened index space ----
// W' of element e (row-major index): not inlined, so that its two calls for an element (before
// and after the min/max reduction) run the same instructions and agree bit for bit.
template <typename ALoader, typename BLoader>
__device__ __noinline__ float updated_weight(const ALoader a, const BLoader b, const uint8_t code,
                                             const GroupQuant old, const int64_t e,
                                             const int64_t n, const int r, const AdamCoeffs c) {
  const int64_t row = e / n, col = e - row * n;
  float t = 0.f;
  for (int k = 0; k < r; ++k) t = fmaf(a(row, k), b(k, col), t);
  return apply_update(dequantize_code(code, old), t, c);
}

template <typename ALoader, typename BLoader>
__global__ void __launch_bounds__(kThreads)
    int8_update_groups_kernel(const ALoader a, const BLoader b, const Int8Weight w,
                              const int64_t numel, const int64_t n, const int r,
                              const int64_t group_size, const int64_t groups, const AdamCoeffs c,
                              const uint64_t philox_seed) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (group >= groups) return;  // the whole warp: the shuffles below see all 32 lanes
  const int lane = threadIdx.x % 32;
  const int64_t first = group * group_size;
  const int64_t len = min(group_size, numel - first);
  const GroupQuant old{w.scales[group], w.zeros[group]};

  float cached[kCachedPerLane];
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int s = 0; s < kCachedPerLane; ++s) {
    const int64_t e = first + lane + 32 * s;
    if (e < first + len) {
      cached[s] = updated_weight(a, b, w.codes[e], old, e, n, r, c);
      lo = fminf(lo, cached[s]);
      hi = fmaxf(hi, cached[s]);
    }
  }
  for (int64_t e = first + lane + 32 * kCachedPerLane; e < first + len; e += 32) {
    const float v = updated_weight(a, b, w.codes[e], old, e, n, r, c);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  warp_min_max(lo, hi);
  const GroupQuant fresh = group_quant_params(lo, hi, kInt8MaxCode);
  // Each element is read (old code) and written (new code) by the same lane, in that order.
#pragma unroll
  for (int s = 0; s < kCachedPerLane; ++s) {
    const int64_t e = first + lane + 32 * s;
    if (e < first + len) {
      w.codes[e] = quantize_stochastic(cached[s], philox_uniform(philox_seed, e), fresh,
                                       kInt8MaxCode);
    }
  }
  for (int64_t e = first + lane + 32 * kCachedPerLane; e < first + len; e += 32) {
    const float v = updated_weight(a, b, w.codes[e], old, e, n, r, c);
    w.codes[e] = quantize_stochastic(v, philox_uniform(philox_seed, e), fresh, kInt8MaxCode);
  }
  if (lane == 0) {
    w.scales[group] = fresh.scale;
    w.zeros[group] = fresh.zero;
  }
}

template <typename ALoader, typename BLoader>
void launch_int8_update(const ALoader& a, const BLoader& b, const Int8Weight& w,
                        const StepGeometry& g, int64_t group_size, const AdamCoeffs& c,
                        uint64_t philox_seed, cudaStream_t stream) {
  const int r = static_cast<int>(g.r);
  if (g.n % group_size == 0 && group_size <= kTileCols) {
    const int tile_cols = static_cast<int>(group_size * (kTileCols / group_size));
    const int64_t tiles_n = (g.n + tile_cols - 1) / tile_cols;
    const int64_t tiles = (g.m + kTileRows - 1) / kTileRows * tiles_n;
    LOWRANK_CHECK(tiles < (int64_t{1} << 31), "fused_galore_step: too many tiles (", tiles, ")");
    int8_update_tiled_kernel<ALoader, BLoader><<<static_cast<unsigned>(tiles), kThreads, 0,
                                                 stream>>>(
        a, b, w, static_cast<int>(g.m), static_cast<int>(g.n), r, static_cast<int>(group_size),
        tile_cols, static_cast<int>(tiles_n), c, philox_seed);
  } else {
    const int64_t numel = g.m * g.n, groups = num_groups(numel, group_size);
    const int64_t blocks = (groups + kWarps - 1) / kWarps;
    LOWRANK_CHECK(blocks < (int64_t{1} << 31), "fused_galore_step: too many groups (", groups,
                  ")");
    int8_update_groups_kernel<ALoader, BLoader>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            a, b, w, numel, g.n, r, group_size, groups, c, philox_seed);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(loader) with the loader of the basis as a logical row-major matrix: Q (r x n) on the
// right, P (m x r) on the left.
template <typename F>
void with_basis_loader(const at::Tensor& proj, const std::optional<at::Tensor>& proj_scales,
                       const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                       const StepGeometry& g, const F& f) {
  const int64_t ld = g.right ? g.n : g.r;
  if (proj.scalar_type() == at::kInt) {
    const int32_t* indices = proj.data_ptr<int32_t>();
    if (g.right) {
      f(DctMatrix<true>{indices, g.n});
    } else {
      f(DctMatrix<false>{indices, g.m});
    }
  } else if (proj.scalar_type() == at::kByte) {
    const uint8_t* packed = proj.data_ptr<uint8_t>();
    const float* scales = proj_scales->data_ptr<float>();
    const float* zeros = proj_zeros->data_ptr<float>();
    if (g.r * (g.right ? g.n : g.m) < (int64_t{1} << 32) && proj_group_size < (int64_t{1} << 32)) {
      f(Int4Matrix<uint32_t>{packed, scales, zeros, static_cast<uint32_t>(ld),
                             static_cast<uint32_t>(proj_group_size)});
    } else {
      f(Int4Matrix<int64_t>{packed, scales, zeros, ld, proj_group_size});
    }
  } else if (proj.scalar_type() == at::kBFloat16) {
    f(DenseMatrix<c10::BFloat16>{proj.data_ptr<c10::BFloat16>(), ld});
  } else if (proj.scalar_type() == at::kHalf) {
    f(DenseMatrix<c10::Half>{proj.data_ptr<c10::Half>(), ld});
  } else {
    LOWRANK_CHECK_VALUE(proj.scalar_type() == at::kFloat,
                        "proj: expected dtype float32, bfloat16, float16, uint8 or int32, got ",
                        proj.scalar_type());
    f(DenseMatrix<float>{proj.data_ptr<float>(), ld});
  }
}

}  // namespace

void int8_weight_update_cuda(at::Tensor& codes, at::Tensor& scales, at::Tensor& zeros,
                             int64_t group_size, uint64_t philox_seed, const at::Tensor& proj,
                             const std::optional<at::Tensor>& proj_scales,
                             const std::optional<at::Tensor>& proj_zeros,
                             int64_t proj_group_size, const at::Tensor& normalized,
                             const StepGeometry& g, const AdamCoeffs& c, cudaStream_t stream) {
  const Int8Weight w{codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                     zeros.data_ptr<float>()};
  const float* n_ptr = normalized.data_ptr<float>();
  with_basis_loader(proj, proj_scales, proj_zeros, proj_group_size, g, [&](const auto& basis) {
    if (g.right) {
      launch_int8_update(Fp32Matrix{n_ptr, g.r}, basis, w, g, group_size, c, philox_seed,
                         stream);
    } else {
      launch_int8_update(basis, Fp32Matrix{n_ptr, g.n}, w, g, group_size, c, philox_seed,
                         stream);
    }
  });
}

}  // namespace lowrank
