// CUDA dct_select and dct_basis (DESIGN.md §4.5), the twins of csrc/cpu/dct.cpp and
// triton_kernels/dct_select.py on the shared basis math of lowrank/dct.h:
//
//   lines = rows of G (right, m >= n, d = n)  or  columns of G (left, m < n, d = m)
//   X[l, k] = sum_j line_l[j] * C[k, j]
//   score_k = sum_l |X[l, k]| (norm 1)  or  sum_l X[l, k]^2 (norm 2: the order of the l2 norm)
//   idx = the r largest scores, ties to the lower k, increasing (at::sort, stable)
//   R = G Q^T (m x r, right)  or  P^T G (r x n, left), Q = C[idx, :]
//
// Tiling: one 256-thread block owns kLines lines x kFreqs frequencies of X and sums over d in
// chunks of kChunk: a (chunk x lines) tile of G and a (chunk x freqs) tile of C^T in shared
// memory, 4 x 4 fp32 accumulators per thread. The basis tile is generated, never loaded as C:
// C[k, j0 + t] = c_k cos A_k cos T_tk - c_k sin A_k sin T_tk with A_k = (2 j0 + 1) k and
// T_tk = 2 t k (phases in units of pi/(2d), reduced mod 4d in integers, values from dct.h): the
// T table is built once per block, c_k (cos, sin) A_k comes from a (2 x d/kChunk x nfreq) table
// that a small kernel fills before each pass, so a basis value costs two multiply-adds against
// kLines multiply-adds of the product. The scores pass writes one partial row per line
// tile (a (line tiles x d) buffer, reduced over the tile's lines in a fixed order), summed on the
// host side in float64 in tile order: deterministic, no atomics. The R pass runs the same kernel
// on the r selected frequencies and stores the tile.
// DRAM: blocks are numbered frequency tile fastest, so the blocks of one line tile run together
// and share its rows of G through L2: G is read about once per pass (two passes), plus the
// (line tiles x d) partials and R. No m x n or d x d temporary.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lowrank/checks.h"
#include "lowrank/dct.h"
#include "registration.h"

namespace lowrank {
namespace {

constexpr int kLines = 64;   // lines per block
constexpr int kFreqs = 64;   // frequencies per block
constexpr int kChunk = 16;   // d-axis chunk per shared-memory stage
constexpr int kThreads = 256;
constexpr int kMicro = 4;    // a thread's accumulators: kMicro lines x kMicro frequencies
constexpr int kGroups = kThreads / (kFreqs / kMicro);  // threads sharing a frequency column
constexpr int kLinePad = 4;  // keeps float4 rows aligned; the right side's writes 2-way at most
static_assert(kGroups * kMicro == kLines, "thread grid must cover the tile");
static_assert(2 * kFreqs <= kThreads, "one thread per frequency for cos A and one for sin A");

enum class Mode { kCoefficients, kScoresL1, kScoresL2 };

// table[0][c][f] = c_k cos(pi A / (2d)), table[1][c][f] = c_k sin(pi A / (2d)) for chunk c and
// frequency k = freqs[f], A = (2 c kChunk + 1) k mod 4d (lowrank/dct.h). Evaluated here once per
// call so that the tile kernel's main loop makes no cosf/sinf call: their slow-path argument
// reduction is a real call, and the registers live across it spilled on sm_89.
__global__ void chunk_phase_kernel(const int32_t* __restrict__ freqs, float* __restrict__ table,
                                   int64_t nfreq, int64_t chunks, int64_t d) {
  const int64_t total = chunks * nfreq, period = 4 * d;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t chunk = e / nfreq, k = freqs[e % nfreq];
    const int64_t phase = ((2 * chunk * kChunk + 1) % period) * k % period;  // < 4 d^2
    const float scale = dct_scale(k, d);
    table[e] = scale * dct_cos_reduced_phase(phase, d);
    table[total + e] = scale * dct_sin_reduced_phase(phase, d);
  }
}

template <typename scalar_t, bool kRight, Mode kMode>
__global__ void __launch_bounds__(kThreads)
    dct_tile_kernel(const scalar_t* __restrict__ grad, const int32_t* __restrict__ freqs,
                    const float* __restrict__ chunk_table, float* __restrict__ out,
                    int64_t lines, int64_t d, int64_t nfreq, int64_t stride_g,
                    int64_t stride_out, int64_t freq_tiles) {
  __shared__ __align__(16) float g_s[kChunk][kLines + kLinePad];
  __shared__ __align__(16) float basis_s[kChunk][kFreqs];
  __shared__ float rot_cos[kChunk][kFreqs];
  __shared__ float rot_sin[kChunk][kFreqs];
  __shared__ float a_cos[kFreqs];
  __shared__ float a_sin[kFreqs];

  const int tid = threadIdx.x;
  const int tx = tid % (kFreqs / kMicro), ty = tid / (kFreqs / kMicro);
  const int64_t freq0 = (blockIdx.x % freq_tiles) * kFreqs;
  const int64_t line_tile = blockIdx.x / freq_tiles;
  const int64_t line0 = line_tile * kLines;
  const int64_t period = 4 * d;
  const int64_t table_half = ((d + kChunk - 1) / kChunk) * nfreq;

  for (int e = tid; e < kChunk * kFreqs; e += kThreads) {
    const int t = e / kFreqs, c = e % kFreqs;
    const int64_t k = freq0 + c < nfreq ? freqs[freq0 + c] : 0;
    const int64_t phase = (2 * t * k) % period;
    rot_cos[t][c] = dct_cos_reduced_phase(phase, d);
    rot_sin[t][c] = dct_sin_reduced_phase(phase, d);
  }
  // Threads tid < 2 kFreqs stage frequency freq0 + tid % kFreqs's c_k cos A (first kFreqs) or
  // c_k sin A (next kFreqs) for each chunk; frequencies past nfreq get 0 (their X is not stored).
  const int own = tid % kFreqs;
  const bool stages_phase = tid < 2 * kFreqs && freq0 + own < nfreq;
  const float* table_column = chunk_table + (tid < kFreqs ? 0 : table_half) + freq0 + own;
  if (tid < 2 * kFreqs && !stages_phase) (tid < kFreqs ? a_cos : a_sin)[own] = 0.0f;

  float acc[kMicro][kMicro] = {};
  for (int64_t j0 = 0; j0 < d; j0 += kChunk) {
    for (int e = tid; e < kLines * kChunk; e += kThreads) {
      // consecutive threads walk G's contiguous axis: j on the right, lines on the left
      const int l = kRight ? e / kChunk : e % kLines;
      const int t = kRight ? e % kChunk : e / kLines;
      const int64_t line = line0 + l, j = j0 + t;
      float v = 0.0f;
      if (line < lines && j < d) {
        v = static_cast<float>(kRight ? grad[line * stride_g + j] : grad[j * stride_g + line]);
      }
      g_s[t][l] = v;
    }
    if (stages_phase) {
      (tid < kFreqs ? a_cos : a_sin)[own] = table_column[(j0 / kChunk) * nfreq];
    }
    __syncthreads();
    for (int e = tid; e < kChunk * kFreqs; e += kThreads) {
      const int t = e / kFreqs, c = e % kFreqs;
      basis_s[t][c] = a_cos[c] * rot_cos[t][c] - a_sin[c] * rot_sin[t][c];
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      const float4 a = *reinterpret_cast<const float4*>(&g_s[t][ty * kMicro]);
      const float4 b = *reinterpret_cast<const float4*>(&basis_s[t][tx * kMicro]);
      const float av[kMicro] = {a.x, a.y, a.z, a.w};
      const float bv[kMicro] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int c = 0; c < kMicro; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
      }
    }
    __syncthreads();
  }

  if constexpr (kMode == Mode::kCoefficients) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t line = line0 + ty * kMicro + i;
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const int64_t f = freq0 + tx * kMicro + c;
        if (line < lines && f < nfreq) {
          out[kRight ? line * stride_out + f : f * stride_out + line] = acc[i][c];
        }
      }
    }
  } else {
    // Lines past `lines` read zeros, so their accumulators are exactly 0 and add nothing. The
    // tile's partial sums go through shared memory (reusing g_s: kGroups x kFreqs floats) and
    // are added in group order.
    static_assert(kGroups * kFreqs <= kChunk * (kLines + kLinePad), "g_s too small to reuse");
    float* partial = &g_s[0][0];
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        s += kMode == Mode::kScoresL1 ? fabsf(acc[i][c]) : acc[i][c] * acc[i][c];
      }
      partial[ty * kFreqs + tx * kMicro + c] = s;
    }
    __syncthreads();
    if (tid < kFreqs && freq0 + tid < nfreq) {
      float s = 0.0f;
      for (int group = 0; group < kGroups; ++group) s += partial[group * kFreqs + tid];
      out[line_tile * stride_out + freq0 + tid] = s;
    }
  }
}

template <Mode kMode>
void launch_tiles(const at::Tensor& grad, const at::Tensor& freqs, at::Tensor& out,
                  int64_t stride_out) {
  const int64_t m = grad.size(0), n = grad.size(1);
  const bool right = m >= n;
  const int64_t d = right ? n : m, lines = right ? m : n;
  const int64_t nfreq = freqs.numel();
  const int64_t freq_tiles = (nfreq + kFreqs - 1) / kFreqs;
  const int64_t blocks = freq_tiles * ((lines + kLines - 1) / kLines);
  LOWRANK_CHECK_VALUE(blocks < (int64_t{1} << 31), "grad: too many tiles for one launch, shape ",
                      shape_str(grad.sizes()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  at::Tensor chunk_table = at::empty({2, chunks, nfreq}, freqs.options().dtype(at::kFloat));
  const int64_t table_blocks = std::min<int64_t>((chunks * nfreq + kThreads - 1) / kThreads,
                                                 65536);
  chunk_phase_kernel<<<static_cast<unsigned>(table_blocks), kThreads, 0, stream>>>(
      freqs.data_ptr<int32_t>(), chunk_table.data_ptr<float>(), nfreq, chunks, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "dct_select_cuda",
                                  [&] {
    auto kernel = right ? dct_tile_kernel<scalar_t, true, kMode>
                        : dct_tile_kernel<scalar_t, false, kMode>;
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), freqs.data_ptr<int32_t>(), chunk_table.data_ptr<float>(),
        out.data_ptr<float>(), lines, d, nfreq, grad.stride(0), stride_out, freq_tiles);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> dct_select_cuda(const at::Tensor& grad, int64_t rank,
                                                   int64_t norm, c10::string_view method) {
  check_dct_select(grad, rank, norm, method);  // one method here: tiled products, C generated
  LOWRANK_CHECK_VALUE(grad.is_cuda(), "grad: expected a CUDA tensor, got ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor src = grad.stride(1) == 1 ? grad : grad.contiguous();
  const int64_t m = src.size(0), n = src.size(1);
  const bool right = m >= n;
  const int64_t d = right ? n : m, lines = right ? m : n;
  const auto options = src.options();

  at::Tensor all = at::arange(d, options.dtype(at::kInt));
  at::Tensor partials = at::empty({(lines + kLines - 1) / kLines, d}, options.dtype(at::kFloat));
  if (norm == 1) {
    launch_tiles<Mode::kScoresL1>(src, all, partials, d);
  } else {
    launch_tiles<Mode::kScoresL2>(src, all, partials, d);
  }
  const std::vector<int64_t> tile_axis{0};
  const at::Tensor scores = partials.sum(tile_axis, /*keepdim=*/false, at::kDouble);
  // Stable descending sort: ties to the lower index, NaN first (as torch.sort and the CPU kernel)
  const at::Tensor best = std::get<1>(at::sort(scores, /*stable=*/true, 0, /*descending=*/true));
  const at::Tensor indices = std::get<0>(at::sort(best.narrow(0, 0, rank))).to(at::kInt);

  at::Tensor low_rank = at::empty(right ? std::vector<int64_t>{m, rank}
                                        : std::vector<int64_t>{rank, n},
                                  options.dtype(at::kFloat));
  launch_tiles<Mode::kCoefficients>(src, indices, low_rank, low_rank.stride(0));
  return {indices, low_rank};
}

__global__ void dct_rows_kernel(const int32_t* __restrict__ rows, float* __restrict__ out,
                                int64_t rank, int64_t d) {
  const int64_t total = rank * d;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    out[e] = dct_basis_value(rows[e / d], e % d, d);
  }
}

at::Tensor dct_basis_cuda(int64_t d, const at::Tensor& indices) {
  LOWRANK_CHECK_VALUE(d >= 1, "d: expected a basis size >= 1, got ", d);
  check_dct_indices(indices, d, "indices");  // values stay unchecked on the GPU (no host sync)
  LOWRANK_CHECK_VALUE(indices.is_cuda(), "indices: expected a CUDA tensor, got ",
                      indices.device());
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor rows = indices.contiguous();
  const int64_t rank = rows.size(0);
  at::Tensor out = at::empty({rank, d}, rows.options().dtype(at::kFloat));
  const int64_t blocks = std::min<int64_t>((rank * d + kThreads - 1) / kThreads, 65536);
  dct_rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                    c10::cuda::getCurrentCUDAStream()>>>(rows.data_ptr<int32_t>(),
                                                         out.data_ptr<float>(), rank, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void register_kernels(torch::Library& m) {
  m.impl("dct_select", &dct_select_cuda);
  m.impl("dct_basis", &dct_basis_cuda);
}

}  // namespace

LOWRANK_REGISTER_CUDA_KERNELS(register_kernels)

}  // namespace lowrank
