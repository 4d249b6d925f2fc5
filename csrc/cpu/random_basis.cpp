// CPU random_basis (DESIGN.md §4.7): APOLLO's Gaussian basis, rank x d fp32 rows of N(0, 1/rank)
// values generated from (seed, refresh) by csrc/include/lowrank/gaussian.h, the same bits as the
// reference and the Triton kernel.
//
// Work: one Philox-4x32-10 call per four elements, one log, sqrt and cos/sin pair per two; rows
// are split across threads. Output bytes: 4 * rank * d, written once.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_clones.h"
#include "lowrank/checks.h"
#include "lowrank/gaussian.h"

namespace lowrank {
namespace {

// One row of the basis: `calls` Philox calls, the last possibly partial (d % 4 lanes). The
// values of a chunk are computed into a buffer first, in a loop of independent lanes the
// compiler vectorizes, then scaled and stored.
LOWRANK_CPU_CLONES void basis_row(float* row, int64_t d, uint64_t philox_seed, uint64_t first_call,
                                  float root_rank) {
  constexpr int64_t kChunk = 64;  // Philox calls per chunk
  float values[kChunk][4];
  const int64_t calls = (d + 3) / 4;
  for (int64_t start = 0; start < calls; start += kChunk) {
    const int64_t count = std::min(kChunk, calls - start);
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) {
      gaussian_quad(philox_seed, first_call + static_cast<uint64_t>(start + c), values[c]);
    }
    const int64_t first = start * 4;
    const int64_t len = std::min(count * 4, d - first);
    const float* flat = &values[0][0];
    for (int64_t j = 0; j < len; ++j) row[first + j] = flat[j] / root_rank;
  }
}

at::Tensor random_basis_cpu(int64_t d, int64_t rank, int64_t seed, int64_t refresh,
                            std::optional<at::Device> device) {
  check_random_basis(d, rank, seed, refresh);
  LOWRANK_CHECK_VALUE(!device.has_value() || device->is_cpu(),
                      "device: the CPU kernel of random_basis needs a CPU device, got ", *device);
  at::Tensor out = at::empty({rank, d}, at::TensorOptions().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  const uint64_t philox_seed = rounding_philox_seed(seed, refresh);
  const float root_rank = sqrtf(static_cast<float>(rank));  // the reference's sqrt(fp32(r))
  const int64_t calls = (d + 3) / 4;
  // about 16K elements per task: generation costs ~10-20 ns per element
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / d);
  at::parallel_for(0, rank, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      basis_row(data + k * d, d, philox_seed, static_cast<uint64_t>(k * calls), root_rank);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("random_basis", &random_basis_cpu); }

}  // namespace lowrank
