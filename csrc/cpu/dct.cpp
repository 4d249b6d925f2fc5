// DCT-II column selection and basis rows on the CPU (DESIGN.md §4.5).
//
//   lines = rows of G (right, m >= n, d = n)  or  columns of G (left, m < n, d = m)
//   X[l, k] = sum_i C[k, i] * line_l[i]           the DCT-II of every line (C from lowrank/dct.h)
//   score_k = sum_l |X[l, k]|  (norm=1)  or  sum_l X[l, k]^2  (norm=2; same order as the norm)
//   idx = the r largest scores, ties to the lower k, returned in increasing k
//   low_rank = X[:, idx] (m x r, right)  or  X[:, idx]^T (r x n, left): no second GEMM.
//
// Two ways to get X, picked by d (kFftMinSize, measured by bench/bench_refresh.py):
//   dense: X = lines @ C^T through at::mm, 2*lines*d^2 flops, C generated once per call;
//   fft:   Makhoul's reordering v = (x0, x2, x4, ..., x5, x3, x1), V = rfft(v) (real input), then
//          X_k = c_k * Re(exp(-i*pi*k/(2d)) * V_k), with V_k = conj(V_{d-k}) for k > d/2:
//          O(lines * d * log d) and no d x d matrix.
// Tiling: a tile is a block of consecutive lines; partial scores are per tile and summed in tile
// order, so the result does not depend on the thread count.
//   fft, two passes over G and no X: each task gathers a tile in Makhoul order (converted to
//   fp32; columns of G through a blocked transpose) into a cache-resident buffer and runs one
//   batched rfft on it. Pass 1 turns the spectrum into the tile's partial scores; pass 2 (after
//   the top-r) redoes the tile's rfft and evaluates only the r chosen coefficients into R. A
//   second gather + rfft costs less than writing X (lines x d fp32, fresh pages) and reading it
//   back for r scattered columns per line (measured at 2048 x 5504 by bench/bench_refresh.py).
//   dense: X = lines @ C^T into a lines x d buffer, then per-tile scores and a gather of R.
// DRAM (fft): G read twice, R written once; nothing of size lines x d.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "dct_cpu.h"
#include "lowrank/checks.h"
#include "lowrank/dct.h"

namespace lowrank {

namespace {

// From this basis size on, the fft path beats the dense GEMM (one thread, 4096 lines: d=32 dense
// 0.2 ms vs fft 0.45 ms; d=64 about even; d=128 fft 1.5-1.9 ms vs dense 2.5 ms; d=512 11 vs 54 ms;
// bench/bench_refresh.py --crossover re-measures it).
constexpr int64_t kFftMinSize = 64;

// cos(pi * j / (2d)) for every phase j in [0, 4d): the values of dct_cos_phase, computed once so
// that generating r x d basis values costs a table lookup each, not a cosf.
std::vector<float> phase_table(int64_t d) {
  std::vector<float> table(static_cast<size_t>(4 * d));
  for (int64_t j = 0; j < 4 * d; ++j) table[j] = dct_cos_phase(j, d);
  return table;
}

}  // namespace

at::Tensor dct_rows_cpu(int64_t d, const at::Tensor& indices) {
  const at::Tensor idx = indices.contiguous();
  const int64_t r = idx.size(0);
  at::Tensor out = at::empty({r, d}, at::TensorOptions().dtype(at::kFloat));
  const std::vector<float> table = phase_table(d);
  const int32_t* rows = idx.data_ptr<int32_t>();
  float* values = out.data_ptr<float>();
  at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = rows[j];
      const float c = dct_scale(k, d);
      const int64_t stride = (2 * k) % (4 * d);  // phase of i+1 = phase of i + 2k (mod 4d)
      int64_t phase = k % (4 * d);
      float* row = values + j * d;
      for (int64_t i = 0; i < d; ++i) {
        row[i] = c * table[phase];  // == dct_basis_value(k, i, d)
        phase += stride;
        if (phase >= 4 * d) phase -= 4 * d;
      }
    }
  });
  return out;
}

namespace {

// Element p of line l is G's element l * line_stride + p * pos_stride (G of any strides: a
// transposed gradient is read in place, never copied).
struct Geometry {
  int64_t m, n, d, lines;
  bool right;
  int64_t line_stride, pos_stride;
  // lines are gathered across: consecutive lines are adjacent in memory, positions are not
  // (the left side of a row-major G, the right side of a transposed one)
  bool across() const { return line_stride == 1 && pos_stride != 1; }
};

// Lines per tile: a tile's fp32 input and its rfft output (~12 bytes x lines x d) stay in L2 when
// each line is read along its own run. Gathering across lines (the left side of a row-major G)
// reads runs of `lines` elements from d different places: it needs runs of >= 512 bytes
// (measured: 32 lines cost ~1.2x, 128 lines ~1.0x the time of one projection GEMM at
// 2048 x 5504), so its tiles spill to L3.
int64_t tile_lines(const Geometry& g) {
  return std::clamp<int64_t>((int64_t{1} << 15) / g.d, g.across() ? 128 : 32, 256);
}

// Floats added to a tile row: with d a power of two, rows d floats apart map to the same cache
// sets, and the left side's blocked transpose writes one short run into each of 128 rows.
constexpr int64_t kRowPad = 16;

// Twiddle factors c_k * cos(pi k / 2d) and c_k * sin(pi k / 2d), rounded once from double.
struct Twiddles {
  std::vector<float> cos, sin;
  explicit Twiddles(int64_t d) : cos(d), sin(d) {
    for (int64_t k = 0; k < d; ++k) {
      const double c = k == 0 ? std::sqrt(1.0 / d) : std::sqrt(2.0 / d);
      const double angle = M_PI * static_cast<double>(k) / (2.0 * d);
      cos[k] = static_cast<float>(c * std::cos(angle));
      sin[k] = static_cast<float>(c * std::sin(angle));
    }
  }
};

// Source position of each Makhoul-ordered element: evens ascending, then odds descending.
std::vector<int64_t> makhoul_order(int64_t d) {
  std::vector<int64_t> order(static_cast<size_t>(d));
  const int64_t evens = (d + 1) / 2;
  for (int64_t p = 0; p < d; ++p) order[p] = p < evens ? 2 * p : 2 * (d - 1 - p) + 1;
  return order;
}

// partial[k] += |x[k]| (norm 1) or x[k]^2 (norm 2). A partial covers one tile (<= 256 lines), so
// fp32 keeps it to ~1e-6 relative; tiles are then summed in double.
void add_line_scores(const float* __restrict__ x, int64_t d, int64_t norm,
                     float* __restrict__ partial) {
  if (norm == 1) {
    for (int64_t k = 0; k < d; ++k) partial[k] += std::fabs(x[k]);
  } else {
    for (int64_t k = 0; k < d; ++k) partial[k] += x[k] * x[k];
  }
}

// Copies lines [start, start+len) of G in Makhoul order into dst (len x d, fp32).
template <typename scalar_t>
void gather_tile(const scalar_t* grad, const Geometry& g, const std::vector<int64_t>& order,
                 int64_t start, int64_t len, float* dst, int64_t ld) {
  if (!g.across()) {  // each line along its own run (a row of a row-major G on the right)
    const int64_t step = g.pos_stride;
    for (int64_t t = 0; t < len; ++t) {
      const scalar_t* src = grad + (start + t) * g.line_stride;
      float* out = dst + t * ld;
      for (int64_t p = 0; p < g.d; ++p) out[p] = static_cast<float>(src[order[p] * step]);
    }
    return;
  }
  // Consecutive lines are adjacent (a column of a row-major G): a blocked transpose, reading
  // kBlock positions side by side so that each write fills kBlock consecutive floats (one cache
  // line) of a line.
  constexpr int64_t kBlock = 16;
  for (int64_t p0 = 0; p0 < g.d; p0 += kBlock) {
    const int64_t width = std::min(kBlock, g.d - p0);
    const scalar_t* rows[kBlock];
    for (int64_t u = 0; u < width; ++u) rows[u] = grad + order[p0 + u] * g.pos_stride + start;
    int64_t t = 0;
#if defined(__SSE2__)
    // fp32 full blocks: 4 x 4 register transposes instead of one scalar load per element (the
    // scalar form was the largest cost of the left side's pass, above the rfft, in perf).
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (width == kBlock) {
        for (; t + 4 <= len; t += 4) {
          for (int64_t u = 0; u < kBlock; u += 4) {
            __m128 r0 = _mm_loadu_ps(rows[u] + t), r1 = _mm_loadu_ps(rows[u + 1] + t);
            __m128 r2 = _mm_loadu_ps(rows[u + 2] + t), r3 = _mm_loadu_ps(rows[u + 3] + t);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            float* out = dst + t * ld + p0 + u;
            _mm_storeu_ps(out, r0);
            _mm_storeu_ps(out + ld, r1);
            _mm_storeu_ps(out + 2 * ld, r2);
            _mm_storeu_ps(out + 3 * ld, r3);
          }
        }
      }
    }
#endif
    for (; t < len; ++t) {
      float* out = dst + t * ld + p0;
      for (int64_t u = 0; u < width; ++u) out[u] = static_cast<float>(rows[u][t]);
    }
  }
}

// Runs fn(tile, start, len, spectrum) for every tile of lines, in parallel: spectrum holds the
// (re, im) pairs of rfft(line in Makhoul order) of line start + t at 2 * t * (d / 2 + 1).
template <typename Fn>
void for_each_spectrum_tile(const at::Tensor& grad, const Geometry& g, int64_t lines_per,
                            const Fn& fn) {
  const int64_t d = g.d, bins = d / 2 + 1;
  const std::vector<int64_t> order = makhoul_order(d);
  const int64_t tiles = (g.lines + lines_per - 1) / lines_per;
  const auto f32 = grad.options().dtype(at::kFloat);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t ld = d + kRowPad;
    at::Tensor in = at::empty({lines_per, ld}, f32).narrow(1, 0, d);
    at::Tensor spec = at::empty({lines_per, bins}, f32.dtype(at::kComplexFloat));
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = tile * lines_per;
      const int64_t len = std::min(lines_per, g.lines - start);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(),
                                      "lowrank_dct_gather", [&] {
        gather_tile<scalar_t>(grad.data_ptr<scalar_t>(), g, order, start, len,
                              in.data_ptr<float>(), ld);
      });
      at::Tensor spec_tile = spec.narrow(0, 0, len);
      at::fft_rfft_out(spec_tile, in.narrow(0, 0, len), std::nullopt, /*dim=*/1);
      fn(tile, start, len,
         reinterpret_cast<const float*>(spec_tile.data_ptr<c10::complex<float>>()));
    }
  });
}

// Pass 1 of the fft path: the per-tile partial scores (see the file comment).
void fft_scores(const at::Tensor& grad, const Geometry& g, int64_t norm, int64_t lines_per,
                float* partials) {
  const int64_t d = g.d, bins = d / 2 + 1;
  const Twiddles tw(d);
  // Twiddles of k = d - j for j = 1, 2, ...: the upper half walked from its end.
  std::vector<float> cs_upper(static_cast<size_t>(d)), sn_upper(static_cast<size_t>(d));
  for (int64_t j = 1; j < d; ++j) {
    cs_upper[j - 1] = tw.cos[d - j];
    sn_upper[j - 1] = tw.sin[d - j];
  }
  for_each_spectrum_tile(grad, g, lines_per, [&](int64_t tile, int64_t, int64_t len,
                                                  const float* v) {
    std::vector<float> line_buf(static_cast<size_t>(d)), upper_buf(static_cast<size_t>(d));
    const float* __restrict__ cs = tw.cos.data();
    const float* __restrict__ sn = tw.sin.data();
    const float* __restrict__ cs_rev = cs_upper.data();
    const float* __restrict__ sn_rev = sn_upper.data();
    float* __restrict__ upper = upper_buf.data();
    float* __restrict__ x = line_buf.data();
    float* __restrict__ partial = partials + tile * d;
    const int64_t low = std::min(bins, d);
    for (int64_t t = 0; t < len; ++t) {
      const float* __restrict__ vl = v + 2 * t * bins;
      for (int64_t k = 0; k < low; ++k) x[k] = vl[2 * k] * cs[k] + vl[2 * k + 1] * sn[k];
      // k > d/2: V_k = conj(V_{d-k}). Walk j = d-k upwards (the same stride-2 loads as above,
      // so it vectorizes) into `upper`, then store it reversed.
      for (int64_t j = 1; j <= d - low; ++j) {
        upper[j - 1] = vl[2 * j] * cs_rev[j - 1] - vl[2 * j + 1] * sn_rev[j - 1];
      }
      for (int64_t j = 1; j <= d - low; ++j) x[d - j] = upper[j - 1];
      add_line_scores(x, d, norm, partial);
    }
  });
}

// Pass 2 of the fft path: R from the chosen coefficients only, X_k = re(V_b) cos_k + s im(V_b)
// sin_k with b = k, s = 1 (k <= d/2) or b = d - k, s = -1: the same products as pass 1.
void fft_selected(const at::Tensor& grad, const Geometry& g, int64_t lines_per,
                  const std::vector<int32_t>& chosen, float* low_rank) {
  const int64_t d = g.d, bins = d / 2 + 1, rank = static_cast<int64_t>(chosen.size());
  const Twiddles tw(d);
  std::vector<int64_t> bin(static_cast<size_t>(rank));
  std::vector<float> cos_k(static_cast<size_t>(rank)), sin_k(static_cast<size_t>(rank));
  for (int64_t j = 0; j < rank; ++j) {
    const int64_t k = chosen[j];
    const bool lower = k < bins;
    bin[j] = lower ? k : d - k;
    cos_k[j] = tw.cos[k];
    sin_k[j] = lower ? tw.sin[k] : -tw.sin[k];
  }
  for_each_spectrum_tile(grad, g, lines_per, [&](int64_t, int64_t start, int64_t len,
                                                  const float* v) {
    for (int64_t t = 0; t < len; ++t) {
      const float* vl = v + 2 * t * bins;
      if (g.right) {  // R[i, j] = X[i, idx_j]: a row of R per line
        float* out = low_rank + (start + t) * rank;
        for (int64_t j = 0; j < rank; ++j) {
          out[j] = vl[2 * bin[j]] * cos_k[j] + vl[2 * bin[j] + 1] * sin_k[j];
        }
      } else {  // R[j, c] = X[c, idx_j]: a column of R per line; the tile's writes share lines
        for (int64_t j = 0; j < rank; ++j) {
          low_rank[j * g.n + start + t] = vl[2 * bin[j]] * cos_k[j] + vl[2 * bin[j] + 1] * sin_k[j];
        }
      }
    }
  });
}

// X = lines @ C^T with the full d x d basis, then the per-tile partial scores.
void dense_coefficients(const at::Tensor& grad, const Geometry& g, int64_t norm,
                        int64_t lines_per, at::Tensor& x_lines, float* partials) {
  at::Tensor all = at::arange(g.d, at::TensorOptions().dtype(at::kInt));
  const at::Tensor basis = dct_rows_cpu(g.d, all);  // C, d x d
  const at::Tensor g32 = grad.to(at::kFloat);
  at::mm_out(x_lines, g.right ? g32 : g32.t(), basis.t());
  const float* x = x_lines.data_ptr<float>();
  const int64_t tiles = (g.lines + lines_per - 1) / lines_per;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t stop = std::min(g.lines, (tile + 1) * lines_per);
      for (int64_t l = tile * lines_per; l < stop; ++l) {
        add_line_scores(x + l * g.d, g.d, norm, partials + tile * g.d);
      }
    }
  });
}

// The r best frequencies (NaN ranks highest, as in torch.sort; ties go to the lower index), in
// increasing order.
std::vector<int32_t> top_r(const std::vector<double>& scores, int64_t r) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  auto better = [&](int32_t a, int32_t b) {
    const double sa = scores[a], sb = scores[b];
    const bool nan_a = std::isnan(sa), nan_b = std::isnan(sb);
    if (nan_a != nan_b) return nan_a;
    if (!nan_a && sa != sb) return sa > sb;
    return a < b;
  };
  std::nth_element(order.begin(), order.begin() + (r - 1), order.end(), better);
  order.resize(r);
  std::sort(order.begin(), order.end());
  return order;
}

std::tuple<at::Tensor, at::Tensor> dct_select_cpu(const at::Tensor& grad, int64_t rank,
                                                  int64_t norm, c10::string_view method) {
  check_dct_select(grad, rank, norm, method);
  LOWRANK_CHECK_VALUE(grad.device().is_cpu(), "grad: expected a CPU tensor, got ", grad.device());
  const int64_t m = grad.size(0), n = grad.size(1);
  Geometry g{m, n, 0, 0, m >= n, 0, 0};
  g.d = g.right ? n : m;
  g.lines = g.right ? m : n;
  g.line_stride = grad.stride(g.right ? 0 : 1);
  g.pos_stride = grad.stride(g.right ? 1 : 0);
  const bool use_fft = method == "fft" || (method == "auto" && g.d >= kFftMinSize);

  const int64_t lines_per = tile_lines(g);
  const int64_t tiles = (g.lines + lines_per - 1) / lines_per;
  std::vector<float> partials(static_cast<size_t>(tiles * g.d), 0.0f);
  at::Tensor x;  // dense path only: X, line-major
  if (use_fft) {
    fft_scores(grad, g, norm, lines_per, partials.data());
  } else {
    x = at::empty({g.lines, g.d}, grad.options().dtype(at::kFloat));
    dense_coefficients(grad, g, norm, lines_per, x, partials.data());
  }
  // Tile partials summed in tile order (double): independent of the thread count.
  std::vector<double> scores(static_cast<size_t>(g.d), 0.0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    for (int64_t k = 0; k < g.d; ++k) scores[k] += partials[tile * g.d + k];
  }
  const std::vector<int32_t> chosen = top_r(scores, rank);

  at::Tensor indices = at::empty({rank}, grad.options().dtype(at::kInt));
  std::copy(chosen.begin(), chosen.end(), indices.data_ptr<int32_t>());
  at::Tensor low_rank = at::empty(g.right ? std::vector<int64_t>{m, rank}
                                          : std::vector<int64_t>{rank, n},
                                  grad.options().dtype(at::kFloat));
  float* out = low_rank.data_ptr<float>();
  if (use_fft) {
    fft_selected(grad, g, lines_per, chosen, out);
    return {indices, low_rank};
  }
  const float* xs = x.data_ptr<float>();
  if (g.right) {  // R[i, j] = X[i, idx_j]
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < rank; ++j) out[i * rank + j] = xs[i * g.d + chosen[j]];
      }
    });
  } else {  // R[j, c] = X[c, idx_j]: blocks of columns, so each write run is contiguous
    constexpr int64_t kBlock = 64;
    at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t c1 = std::min(n, (b + 1) * kBlock);
        for (int64_t j = 0; j < rank; ++j) {
          for (int64_t c = b * kBlock; c < c1; ++c) out[j * n + c] = xs[c * g.d + chosen[j]];
        }
      }
    });
  }
  return {indices, low_rank};
}

at::Tensor dct_basis_cpu(int64_t d, const at::Tensor& indices) {
  LOWRANK_CHECK_VALUE(d >= 1, "d: expected a basis size >= 1, got ", d);
  check_dct_indices(indices, d, "indices");
  return dct_rows_cpu(d, indices);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("dct_select", &dct_select_cpu);
  m.impl("dct_basis", &dct_basis_cpu);
}

}  // namespace lowrank
