// CPU fused GaLore AdamW step (DESIGN.md §4.1-§4.2).
//
//   right (m >= n):  R = G Q^T (m x r)   N = adam(R; M, V)   W' = decay*W - us*(N Q)
//   left  (m <  n):  R = P^T G (r x n)   N = adam(R; M, V)   W' = decay*W - us*(P N)
//   decay = 1 - lr*wd, us = decay * lr*sqrt(1-b2^t)/(1-b1^t) * scale  (lowrank/adam.h)
//
// Tiling: R's rows (right) depend only on the same rows of G, and W's rows only on the same rows
// of N; for the left side the same holds for columns. So each task owns a tile of whole rows
// (columns) and runs project -> Adam -> back-project -> update on it while the tile is still in
// cache, with single-threaded BLAS inside at::parallel_for. DRAM traffic: G read once, W read and
// written once, M and V read and written once, the basis once per tile (kept in L2/L3).
// fp32 weights fold the update into the GEMM (addmm: beta=decay, alpha=-us); bf16/fp16 weights
// go through an fp32 tile of back(N), so every weight is rounded exactly once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "dct_cpu.h"
#include "lowrank/adam.h"
#include "lowrank/checks.h"

namespace lowrank {
namespace {

// Rows (right) or columns (left) per tile. Each tile re-reads the r x d basis, so a tile spans at
// least ~2r lines to keep that re-read under half the G traffic; the upper bound keeps enough tiles
// to balance the cores.
int64_t tile_extent(int64_t lines, int64_t r) {
  const int64_t threads = at::get_num_threads();
  int64_t extent = std::clamp<int64_t>(2 * r, 64, 1024);
  const int64_t balanced = (lines + 2 * threads - 1) / (2 * threads);
  extent = std::min(extent, std::max<int64_t>(balanced, 16));
  return std::max<int64_t>(1, std::min(extent, lines));
}

// Adam on a rows x cols block of the low-rank state, with leading dimension ld (elements).
// R is read and overwritten by N (contiguous rows x cols).
template <typename state_t>
void adam_block(float* r_then_n, state_t* exp_avg, state_t* exp_avg_sq, int64_t rows,
                int64_t cols, int64_t ld, const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) {
    float* rn = r_then_n + i * cols;
    state_t* mrow = exp_avg + i * ld;
    state_t* vrow = exp_avg_sq + i * ld;
    for (int64_t j = 0; j < cols; ++j) {
      float m = static_cast<float>(mrow[j]);
      float v = static_cast<float>(vrow[j]);
      rn[j] = adam_normalized_update(rn[j], m, v, c);
      mrow[j] = static_cast<state_t>(m);
      vrow[j] = static_cast<state_t>(v);
    }
  }
}

// W' = decay*W - us*T on a rows x cols block of W (leading dimension ld); T contiguous fp32.
template <typename weight_t>
void update_block(weight_t* w, const float* back_n, int64_t rows, int64_t cols, int64_t ld,
                  const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) {
    weight_t* wrow = w + i * ld;
    const float* trow = back_n + i * cols;
    for (int64_t j = 0; j < cols; ++j) {
      wrow[j] = static_cast<weight_t>(apply_update(static_cast<float>(wrow[j]), trow[j], c));
    }
  }
}

template <typename state_t>
void adam_tile(at::Tensor& r_tile, const at::Tensor& m_tile, const at::Tensor& v_tile,
               const AdamCoeffs& c) {
  adam_block<state_t>(r_tile.data_ptr<float>(), m_tile.data_ptr<state_t>(),
                      v_tile.data_ptr<state_t>(), m_tile.size(0), m_tile.size(1),
                      m_tile.stride(0), c);
}

void run_adam_tile(at::Tensor& r_tile, const at::Tensor& m_tile, const at::Tensor& v_tile,
                   const AdamCoeffs& c) {
  if (m_tile.scalar_type() == at::kFloat) {
    adam_tile<float>(r_tile, m_tile, v_tile, c);
  } else {
    adam_tile<at::BFloat16>(r_tile, m_tile, v_tile, c);
  }
}

// The first rows*cols elements of a flat fp32 workspace, as a contiguous rows x cols matrix.
at::Tensor contiguous_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// W_tile' = decay*W_tile - us*(a @ b), with a single rounding to W's dtype.
void update_tile(at::Tensor& w_tile, const at::Tensor& a, const at::Tensor& b,
                 at::Tensor& back_n_buf, const AdamCoeffs& c) {
  if (w_tile.scalar_type() == at::kFloat) {
    w_tile.addmm_(a, b, /*beta=*/c.decay, /*alpha=*/-c.update_scale);
    return;
  }
  at::Tensor t = contiguous_view(back_n_buf, a.size(0), b.size(1));
  at::mm_out(t, a, b);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w_tile.scalar_type(), "lowrank_update_tile", [&] {
    update_block<scalar_t>(w_tile.data_ptr<scalar_t>(), t.data_ptr<float>(), w_tile.size(0),
                           w_tile.size(1), w_tile.stride(0), c);
  });
}

// A tile of G in fp32: a view when G is already fp32, else converted into `buf`.
at::Tensor grad_tile_f32(const at::Tensor& g_tile, at::Tensor& buf) {
  if (g_tile.scalar_type() == at::kFloat) return g_tile;
  at::Tensor dst = contiguous_view(buf, g_tile.size(0), g_tile.size(1));
  dst.copy_(g_tile);
  return dst;
}

// ---- DCT indices (DESIGN.md §4.5) ----
// An int32 proj names rows of the size-d DCT-II basis. Their values are generated here from
// lowrank/dct.h (r x d, O(r*d), far below the GEMMs) and then serve as the dense basis, so every
// path below (dense or INT8 weights) is shared: Q = C[idx, :] (right) or P = C[idx, :]^T (left).
at::Tensor dct_projection_basis(const at::Tensor& indices, const StepGeometry& g) {
  const at::Tensor rows = dct_rows_cpu(g.right ? g.n : g.m, indices);
  return g.right ? rows : rows.t().contiguous();
}

void fused_galore_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                           at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double lr, double beta1,
                           double beta2, double eps, double weight_decay, double scale,
                           int64_t step, const std::optional<at::Tensor>& proj_scales,
                           const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                           const std::optional<at::Tensor>& param_scales,
                           const std::optional<at::Tensor>& param_zeros, int64_t param_group_size,
                           int64_t seed) {
  (void)proj_group_size;  // INT4/INT8 formats: not accepted by the dense checks yet
  (void)param_group_size;
  (void)seed;
  const StepGeometry g =
      check_fused_galore_step(param, grad, proj, exp_avg, exp_avg_sq, beta1, beta2, eps, step,
                              proj_scales, proj_zeros, param_scales, param_zeros);
  TORCH_CHECK_VALUE(param.device().is_cpu(), "param: expected a CPU tensor, got ", param.device());
  const AdamCoeffs c = make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step);

  // The basis in fp32 (a view when it already is): r x n (right) or m x r (left).
  const at::Tensor basis = proj.scalar_type() == at::kInt ? dct_projection_basis(proj, g)
                                                          : proj.to(at::kFloat).contiguous();
  const int64_t lines = g.right ? g.m : g.n;  // rows (right) or columns (left) of W
  const int64_t extent = tile_extent(lines, g.r);
  const int64_t tiles = (lines + extent - 1) / extent;
  const int64_t span = g.right ? g.n : g.m;  // length of one line
  const bool lowp_w = param.scalar_type() != at::kFloat;
  const bool lowp_g = grad.scalar_type() != at::kFloat;
  const auto f32 = param.options().dtype(at::kFloat);

  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    // Per-task flat workspaces, reused across this task's tiles (no allocation in the loop).
    at::Tensor g_buf = lowp_g ? at::empty({extent * span}, f32) : at::Tensor();
    at::Tensor t_buf = lowp_w ? at::empty({extent * span}, f32) : at::Tensor();
    at::Tensor r_buf = at::empty({extent * g.r}, f32);
    const int dim = g.right ? 0 : 1;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = tile * extent;
      const int64_t len = std::min(extent, lines - start);
      at::Tensor g32 = grad_tile_f32(grad.narrow(dim, start, len), g_buf);
      at::Tensor w_tile = param.narrow(dim, start, len);
      at::Tensor r_tile = contiguous_view(r_buf, g.right ? len : g.r, g.right ? g.r : len);
      if (g.right) {
        at::mm_out(r_tile, g32, basis.t());  // (len x n) @ (n x r)
      } else {
        at::mm_out(r_tile, basis.t(), g32);  // (r x m) @ (m x len)
      }
      run_adam_tile(r_tile, exp_avg.narrow(dim, start, len), exp_avg_sq.narrow(dim, start, len), c);
      if (g.right) {
        update_tile(w_tile, r_tile, basis, t_buf, c);  // (len x r) @ (r x n)
      } else {
        update_tile(w_tile, basis, r_tile, t_buf, c);  // (m x r) @ (r x len)
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) { m.impl("fused_galore_step", &fused_galore_step_cpu); }

}  // namespace lowrank
