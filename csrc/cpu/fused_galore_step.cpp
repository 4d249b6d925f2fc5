// CPU fused GaLore AdamW step (DESIGN.md §4.1-§4.2).
//
//   right (m >= n):  R = G Q^T (m x r)   N = adam(R; M, V)   W' = decay*W - us*(N Q)
//   left  (m <  n):  R = P^T G (r x n)   N = adam(R; M, V)   W' = decay*W - us*(P N)
//   decay = 1 - lr*wd, us = decay * lr*sqrt(1-b2^t)/(1-b1^t) * scale  (lowrank/adam.h)
//   inner="adagrad": V <- V + R^2, N = R/(sqrt(V)+eps), us = decay*lr*scale, no M (§4.10)
// `right` (optional) overrides the side rule m >= n (a row shard under FSDP2); every loop below
// follows g.right.
//
// Tiling: R's rows (right) depend only on the same rows of G, and W's rows only on the same rows
// of N; for the left side the same holds for columns. So each task owns a tile of whole rows
// (columns) and runs project -> Adam -> back-project -> update on it while the tile is still in
// cache, with single-threaded BLAS inside at::parallel_for. DRAM traffic: G read once, W read and
// written once, M and V read and written once, the basis once per tile (kept in L2/L3).
// Moments are fp32, bf16 (stochastic rounding) or 8-bit codes with fp32 block scales (§4.9:
// decoded into an fp32 tile, updated, re-encoded with the Philox words of the bf16 moments).
// fp32 weights fold the update into the GEMM (addmm: beta=decay, alpha=-us); bf16/fp16 weights
// go through an fp32 tile of back(N), so every weight is rounded exactly once.
// The elementwise loops (Adam, the 16-bit update) are cloned for AVX2 (csrc/cpu/cpu_clones.h).
// A factored V (a 1-D exp_avg_sq, §4.12: its rank factors sum over every line) runs the tiles in
// two phases, R kept in an fp32 low-rank workspace (written once, read once more) and the factors
// reduced in between (see project_adam_tiles).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_clones.h"
#include "dct_cpu.h"
#include "lowrank/adam.h"
#include "lowrank/checks.h"
#include "lowrank/moments8.h"
#include "quant_cpu.h"

namespace lowrank {
namespace {

// Rows (right) or columns (left) per tile. Each tile re-reads the r x d basis (from L2/L3), so a
// tile spans about r lines: that keeps the re-read at most the G traffic while the fp32 G and
// back(N) tiles of low-precision weights stay cache-resident (measured on 2048x5504, r=256, bf16:
// r lines 0.98x the two-GEMM floor, 2r lines 1.05x, r/2 lines 1.21x). The upper bound keeps
// enough tiles to balance the cores. A tile also has a fixed cost (ATen dispatch of its narrow,
// two GEMM and update calls, ~15 us), so it gets at least kMinTileFlops of GEMM work: small
// weights run as one or a few tiles (llama-tiny's 128x344, r=32: 6 tiles -> 2, 1.5x faster).
constexpr int64_t kMinTileFlops = int64_t{1} << 22;
constexpr int64_t kLineUnit = 16;

// `lines` cut into `tiles` consecutive ranges whose lengths differ by at most one `unit`, every
// boundary but the last a multiple of `unit`. With a tile count that is a multiple of the thread
// count, every core gets the same work: 2736 columns in 256-wide tiles were 11 tiles, 6 on one
// core and 5 (one of them short) on the other (a fifth of that core idle); now 12 of 224-240.
struct LineTiles {
  int64_t lines, unit, tiles;

  int64_t units() const { return (lines + unit - 1) / unit; }
  int64_t start(int64_t tile) const { return std::min(lines, tile * units() / tiles * unit); }
  int64_t length(int64_t tile) const { return start(tile + 1) - start(tile); }
  int64_t max_length() const { return std::min(lines, (units() + tiles - 1) / tiles * unit); }
};

// Tiles of about `extent` lines (whole units), their count rounded up to a multiple of the
// thread count when there are at least as many tiles as threads.
LineTiles balanced_tiles(int64_t lines, int64_t extent, int64_t unit = 1) {
  const int64_t threads = at::get_num_threads();
  const int64_t units = (lines + unit - 1) / unit;
  const int64_t per_tile = (std::max<int64_t>(extent, 1) + unit - 1) / unit;  // never below extent
  int64_t tiles = (units + per_tile - 1) / per_tile;
  if (tiles >= threads) tiles = (tiles + threads - 1) / threads * threads;
  return {lines, unit, std::min(tiles, units)};
}

LineTiles step_tiles(int64_t lines, int64_t span, int64_t r) {
  const int64_t threads = at::get_num_threads();
  int64_t extent = std::clamp<int64_t>(r, 64, 1024);
  const int64_t balanced = (lines + 2 * threads - 1) / (2 * threads);
  extent = std::min(extent, std::max<int64_t>(balanced, 16));
  const int64_t flops_per_line = 4 * span * r;  // two GEMMs, 2 flops per multiply-add
  extent = std::max(extent, (kMinTileFlops + flops_per_line - 1) / flops_per_line);
  // whole multiples of 16 lines: BLAS is slower on tile widths off its vector width (125- and
  // 250-column tiles of 2752 and 5504 columns measured 15% and 8% slower than 128 and 256)
  return balanced_tiles(lines, std::max<int64_t>(1, std::min(extent, lines)), kLineUnit);
}

// at::parallel_for over tiles (one or more per task). Worker threads start with grad mode on, so
// the views taken of a parameter that requires grad would be recorded by autograd and refuse
// in-place writes; the step is not differentiable, so each task runs under NoGradGuard.
template <typename F>
void parallel_tiles(int64_t tiles, const F& body) {
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;
    body(begin, end);
  });
}

// Adam on `len` consecutive elements of M and V (row-major index of the first: `first`), R read
// and overwritten by N. fp32 moments are stored as they are.
LOWRANK_CPU_CLONES void adam_run(float* r_then_n, float* exp_avg, float* exp_avg_sq, int64_t len,
                                 int64_t /*first*/, const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;  // a local copy: no aliasing with the arrays, so the loop vectorizes
  for (int64_t j = 0; j < len; ++j) {
    r_then_n[j] = adam_normalized_update(r_then_n[j], exp_avg[j], exp_avg_sq[j], c);
  }
}

// AdaGrad (coefficients (0, 1, 1, 1), lowrank/adam.h): the Adam arithmetic with M = 0 held in a
// register, never loaded or stored.
[[gnu::always_inline]] inline float adagrad_normalized_update(float r, float& v,
                                                              const AdamCoeffs& c) {
  float m = 0.0f;
  return adam_normalized_update(r, m, v, c);
}

LOWRANK_CPU_CLONES void adagrad_run(float* r_then_n, float* exp_avg_sq, int64_t len,
                                    int64_t /*first*/, const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  for (int64_t j = 0; j < len; ++j) {
    r_then_n[j] = adagrad_normalized_update(r_then_n[j], exp_avg_sq[j], c);
  }
}

// The Philox words of `len` consecutive state elements from row-major index `first`, in a loop
// of independent lanes the compiler vectorizes (inlined into each clone that calls it).
[[gnu::always_inline]] inline void moment_words_run(PhiloxPair* words, int64_t len, int64_t first,
                                                    const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    words[e] = moment_words(c, first + e);
  }
}

// body(j, words of j) for j in [0, len), state element j having row-major index first + j: the
// Philox words of a chunk are drawn first, in a loop of independent lanes the compiler
// vectorizes, then the chunk's elements run (inlined into each clone that calls it).
template <typename Body>
[[gnu::always_inline]] inline void with_moment_words(int64_t len, int64_t first,
                                                     const AdamCoeffs& c, const Body& body) {
  constexpr int64_t kChunk = 64;
  PhiloxPair words[kChunk];
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t n = std::min(kChunk, len - start);
    moment_words_run(words, n, first + start, c);
    for (int64_t e = 0; e < n; ++e) body(start + e, words[e]);
  }
}

// bf16 moments are stored rounded stochastically (lowrank/adam.h).
LOWRANK_CPU_CLONES void adam_run(float* r_then_n, at::BFloat16* exp_avg,
                                 at::BFloat16* exp_avg_sq, int64_t len, int64_t first,
                                 const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  with_moment_words(len, first, c, [&](int64_t j, const PhiloxPair& words) {
    float m = static_cast<float>(exp_avg[j]);
    float v = static_cast<float>(exp_avg_sq[j]);
    r_then_n[j] = adam_normalized_update(r_then_n[j], m, v, c);
    const MomentBits bits = stochastic_round_moments(m, v, words);
    exp_avg[j] = c10::BFloat16(bits.exp_avg, c10::BFloat16::from_bits());
    exp_avg_sq[j] = c10::BFloat16(bits.exp_avg_sq, c10::BFloat16::from_bits());
  });
}

// AdaGrad on a bf16 V: only V is rounded (the second word, as with Adam).
LOWRANK_CPU_CLONES void adagrad_run(float* r_then_n, at::BFloat16* exp_avg_sq, int64_t len,
                                    int64_t first, const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  with_moment_words(len, first, c, [&](int64_t j, const PhiloxPair& words) {
    float v = static_cast<float>(exp_avg_sq[j]);
    r_then_n[j] = adagrad_normalized_update(r_then_n[j], v, c);
    exp_avg_sq[j] = c10::BFloat16(stochastic_round_bf16_bits(v, words.second),
                                  c10::BFloat16::from_bits());
  });
}

// Adam on a rows x cols block of the low-rank state, with leading dimension ld (elements);
// `first` is the row-major index of the block's first element in M and V. R is read and
// overwritten by N (contiguous rows x cols).
template <typename state_t>
void adam_block(float* r_then_n, state_t* exp_avg, state_t* exp_avg_sq, int64_t rows,
                int64_t cols, int64_t ld, int64_t first, const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) {
    adam_run(r_then_n + i * cols, exp_avg + i * ld, exp_avg_sq + i * ld, cols, first + i * ld, c);
  }
}

// W' = decay*W - us*T on one row of a 16-bit W; T fp32. Inlined into each clone below.
template <typename weight_t>
[[gnu::always_inline]] inline void update_run(weight_t* w, const float* back_n, int64_t len,
                                              const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  for (int64_t j = 0; j < len; ++j) {
    w[j] = static_cast<weight_t>(apply_update(static_cast<float>(w[j]), back_n[j], c));
  }
}

LOWRANK_CPU_CLONES void update_run(at::BFloat16* w, const float* back_n, int64_t len,
                                   const AdamCoeffs& c) {
  update_run<at::BFloat16>(w, back_n, len, c);
}

LOWRANK_CPU_CLONES void update_run(at::Half* w, const float* back_n, int64_t len,
                                   const AdamCoeffs& c) {
  update_run<at::Half>(w, back_n, len, c);
}

// W' = decay*W - us*T on a rows x cols block of W (leading dimension ld); T contiguous fp32.
template <typename weight_t>
void update_block(weight_t* w, const float* back_n, int64_t rows, int64_t cols, int64_t ld,
                  const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) update_run(w + i * ld, back_n + i * cols, cols, c);
}

// AdaGrad on a rows x cols block of V (leading dimension ld), as adam_block.
template <typename state_t>
void adagrad_block(float* r_then_n, state_t* exp_avg_sq, int64_t rows, int64_t cols, int64_t ld,
                   int64_t first, const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) {
    adagrad_run(r_then_n + i * cols, exp_avg_sq + i * ld, cols, first + i * ld, c);
  }
}

// The factors a tile sees of a factored V (DESIGN.md §4.12): V_hat_ij = a_i * c_j.
struct FactoredV {
  const float* a = nullptr;  // r rank factors (the head of exp_avg_sq), this step's
  const float* c = nullptr;  // own line factors b_j / max(mean(a), 1e-30)
};

// The moments of one step (DESIGN.md §4.2, §4.9-§4.10, §4.12), as the tiles see them.
struct StepState {
  at::Tensor exp_avg;  // undefined: AdaGrad (no first moment)
  at::Tensor exp_avg_sq;  // 1-D: the factored second moment, r + own fp32 factors
  at::Tensor exp_avg_scales, exp_avg_sq_scales;  // fp32 block scales of 8-bit codes
  int64_t block;  // 8-bit block along the rank axis
  FactoredV factors = {};  // set between the two phases of a factored step
  bool factored() const { return exp_avg_sq.dim() == 1; }
  bool eight_bit() const {  // M or V in 8-bit codes (M alone with a factored V)
    return exp_avg_sq.scalar_type() == at::kByte ||
           (exp_avg.defined() && exp_avg.scalar_type() == at::kChar);
  }
};

// ---- the factored second moment, elementwise (the reductions: factored_reduce below) ----
// One tile row of M and R -> N, V_hat = line * factor[j]: on the right side a row is an own-line
// (line = c_j, factor = a along the rank), on the left a rank (line = a_i, factor = c along the
// tile's lines). fp32 M is stored as is; bf16 M is rounded with the first Philox word of its
// element, as with a full V.
LOWRANK_CPU_CLONES void factored_run(float* r_then_n, float* exp_avg, const float* factor,
                                     float line, int64_t len, int64_t /*first*/,
                                     const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  for (int64_t j = 0; j < len; ++j) {
    r_then_n[j] = factored_normalized_update(r_then_n[j], exp_avg[j], line * factor[j], c);
  }
}

LOWRANK_CPU_CLONES void factored_run(float* r_then_n, at::BFloat16* exp_avg,
                                     const float* factor, float line, int64_t len,
                                     int64_t first, const AdamCoeffs& coeffs) {
  const AdamCoeffs c = coeffs;
  with_moment_words(len, first, c, [&](int64_t j, const PhiloxPair& words) {
    float m = static_cast<float>(exp_avg[j]);
    r_then_n[j] = factored_normalized_update(r_then_n[j], m, line * factor[j], c);
    exp_avg[j] = c10::BFloat16(stochastic_round_bf16_bits(m, words.first),
                               c10::BFloat16::from_bits());
  });
}

// The factored rule on a rows x cols block of M (leading dimension ld, state index `first` of
// its element (0, 0)), the tile of lines [start, start + len).
template <typename state_t>
void factored_block(float* r_then_n, state_t* exp_avg, int64_t rows, int64_t cols, int64_t ld,
                    int64_t first, const FactoredV& f, const StepGeometry& g, int64_t start,
                    const AdamCoeffs& c) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* factor = g.right ? f.a : f.c + start;
    const float line = g.right ? f.c[start + i] : f.a[i];
    factored_run(r_then_n + i * cols, exp_avg + i * ld, factor, line, cols, first + i * ld, c);
  }
}

// ---- 8-bit moments (lowrank/moments8.h) ----
// A tile's codes are decoded into fp32 buffers laid out as its R tile (rows x cols contiguous:
// len x r right, r x len left), updated by the fp32 loops above, and encoded again: the block
// scales first (absmax along the rank axis: along a row on the right, down a column on the
// left), then the codes, with the Philox words of the bf16 moments. Every elementwise loop runs
// over one tile row with that row's scales expanded into a contiguous array first (right: the
// row's blocks repeated B times; left: one scale per column, for the row's block), so that the
// decode and encode loops are branch-free lanes the compiler vectorizes.

// The scales of tile row i, one per element, into `out` (cols floats).
void expand_row_scales(const float* scales, const StepGeometry& g, int64_t start, int64_t i,
                       int64_t cols, int64_t block, float* out) {
  const int64_t blocks = (g.r + block - 1) / block;
  if (g.right) {  // row i is line start + i; its elements j run along the rank
    const float* line = scales + (start + i) * blocks;
    for (int64_t j = 0; j < cols; ++j) out[j] = line[j / block];
  } else {  // row i is rank i; element j is line start + j
    const float* column = scales + start * blocks + i / block;
    for (int64_t j = 0; j < cols; ++j) out[j] = column[j * blocks];
  }
}

LOWRANK_CPU_CLONES void decode_exp_avg_run(float* out, const int8_t* codes, const float* scale,
                                           int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = decode_exp_avg(codes[j], scale[j]);
}

LOWRANK_CPU_CLONES void decode_exp_avg_sq_run(float* out, const uint8_t* codes,
                                              const float* scale, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = decode_exp_avg_sq(codes[j], scale[j]);
}

LOWRANK_CPU_CLONES void sqrt_run(float* x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) x[j] = sqrtf(x[j]);
}

// The codes of `len` consecutive fp32 values (M, or sqrt(V) when !signed_codes) whose first has
// state index `first`, given their scales; the Philox words of the bf16 moments (the first word
// for M, the second for V).
template <bool signed_codes, typename code_t>
[[gnu::always_inline]] inline void encode_run(const float* values, const float* scale,
                                              code_t* codes, int64_t len, int64_t first,
                                              const AdamCoeffs& c) {
  with_moment_words(len, first, c, [&](int64_t j, const PhiloxPair& words) {
    if constexpr (signed_codes) {
      codes[j] = encode_exp_avg(values[j], scale[j], words.first);
    } else {
      codes[j] = encode_exp_avg_sq(values[j], scale[j], words.second);
    }
  });
}

LOWRANK_CPU_CLONES void encode_exp_avg_run(const float* values, const float* scale,
                                           int8_t* codes, int64_t len, int64_t first,
                                           const AdamCoeffs& c) {
  encode_run<true>(values, scale, codes, len, first, c);
}

LOWRANK_CPU_CLONES void encode_exp_avg_sq_run(const float* roots, const float* scale,
                                              uint8_t* codes, int64_t len, int64_t first,
                                              const AdamCoeffs& c) {
  encode_run<false>(roots, scale, codes, len, first, c);
}

// Running absmax of |x| into acc (NaN-propagating), lane by lane.
LOWRANK_CPU_CLONES void absmax_lanes(float* acc, const float* x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) acc[j] = absmax_step(acc[j], fabsf(x[j]));
}

// The block scales (absmax / max_value) of the rows x cols fp32 tile `x`, written to
// scales[line * blocks + b]; the rank axis is the columns (right) or the rows (left). `work`:
// room for max(cols, B) floats.
void block_scales(const float* x, int64_t rows, int64_t cols, const StepGeometry& g,
                  int64_t start, int64_t block, float max_value, float* scales, float* work) {
  const int64_t blocks = (g.r + block - 1) / block;
  if (g.right) {  // row i = line start + i, each block B contiguous ranks of the row
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t first = b * block, len = std::min(g.r, first + block) - first;
        std::fill(work, work + len, 0.0f);
        absmax_lanes(work, x + i * cols + first, len);
        float amax = 0.0f;
        for (int64_t k = 0; k < len; ++k) amax = absmax_step(amax, work[k]);
        scales[(start + i) * blocks + b] = amax / max_value;
      }
    }
    return;
  }
  for (int64_t b = 0; b < blocks; ++b) {  // column j = line start + j, a block B rows of it
    std::fill(work, work + cols, 0.0f);
    for (int64_t k = b * block; k < std::min(g.r, (b + 1) * block); ++k) {
      absmax_lanes(work, x + k * cols, cols);
    }
    for (int64_t j = 0; j < cols; ++j) scales[(start + j) * blocks + b] = work[j] / max_value;
  }
}

// Adam (or AdaGrad) on the 8-bit moments of the tile of lines [start, start + len).
void moments8_tile(float* r_then_n, const StepState& s, const StepGeometry& g, int64_t start,
                   int64_t len, const AdamCoeffs& c) {
  const int64_t rows = g.right ? len : g.r, cols = g.right ? g.r : len;
  const int64_t ld = g.right ? g.r : g.n;               // the state's row length
  const int64_t first = g.right ? start * g.r : start;  // state index of tile element (0, 0)
  const int64_t block = s.block;
  const bool has_m = s.exp_avg.defined();
  const bool has_v = !s.factored();  // a factored V is fp32 factors, never codes
  int8_t* m_codes = has_m ? s.exp_avg.data_ptr<int8_t>() + first : nullptr;
  uint8_t* v_codes = has_v ? s.exp_avg_sq.data_ptr<uint8_t>() + first : nullptr;
  float* m_scales = has_m ? s.exp_avg_scales.data_ptr<float>() : nullptr;
  float* v_scales = has_v ? s.exp_avg_sq_scales.data_ptr<float>() : nullptr;
  // per task: the fp32 M and V of the tile, a row of scales, the absmax lanes
  thread_local std::vector<float> buffer;
  const int64_t span = std::max(cols, block);
  buffer.resize(static_cast<size_t>(2 * rows * cols + 2 * span));
  float* m32 = buffer.data();
  float* v32 = m32 + rows * cols;
  float* row_scale = v32 + rows * cols;
  float* work = row_scale + span;
  for (int64_t i = 0; i < rows; ++i) {
    if (has_m) {
      expand_row_scales(m_scales, g, start, i, cols, block, row_scale);
      decode_exp_avg_run(m32 + i * cols, m_codes + i * ld, row_scale, cols);
    }
    if (!has_v) continue;
    expand_row_scales(v_scales, g, start, i, cols, block, row_scale);
    decode_exp_avg_sq_run(v32 + i * cols, v_codes + i * ld, row_scale, cols);
  }
  if (!has_v) {
    factored_block<float>(r_then_n, m32, rows, cols, cols, 0, s.factors, g, start, c);
  } else if (has_m) {
    adam_block<float>(r_then_n, m32, v32, rows, cols, cols, 0, c);
  } else {
    adagrad_block<float>(r_then_n, v32, rows, cols, cols, 0, c);
  }
  if (has_v) sqrt_run(v32, rows * cols);  // sqrt(V): what the codes hold
  if (has_m) {
    block_scales(m32, rows, cols, g, start, block, kExpAvgFormat.max_value, m_scales, work);
  }
  if (has_v) {
    block_scales(v32, rows, cols, g, start, block, kExpAvgSqFormat.max_value, v_scales, work);
  }
  for (int64_t i = 0; i < rows; ++i) {
    if (has_m) {
      expand_row_scales(m_scales, g, start, i, cols, block, row_scale);
      encode_exp_avg_run(m32 + i * cols, row_scale, m_codes + i * ld, cols, first + i * ld, c);
    }
    if (!has_v) continue;
    expand_row_scales(v_scales, g, start, i, cols, block, row_scale);
    encode_exp_avg_sq_run(v32 + i * cols, row_scale, v_codes + i * ld, cols, first + i * ld, c);
  }
}

template <typename state_t>
void float_moments_tile(float* r_then_n, const StepState& s, const StepGeometry& g,
                        int64_t start, int64_t len, const AdamCoeffs& c) {
  const int dim = g.right ? 0 : 1;
  const int64_t first = g.right ? start * g.r : start;
  if (s.factored()) {
    const at::Tensor m_tile = s.exp_avg.narrow(dim, start, len);
    factored_block<state_t>(r_then_n, m_tile.data_ptr<state_t>(), m_tile.size(0),
                            m_tile.size(1), m_tile.stride(0), first, s.factors, g, start, c);
    return;
  }
  const at::Tensor v_tile = s.exp_avg_sq.narrow(dim, start, len);
  if (s.exp_avg.defined()) {
    adam_block<state_t>(r_then_n, s.exp_avg.narrow(dim, start, len).data_ptr<state_t>(),
                        v_tile.data_ptr<state_t>(), v_tile.size(0), v_tile.size(1),
                        v_tile.stride(0), first, c);
  } else {
    adagrad_block<state_t>(r_then_n, v_tile.data_ptr<state_t>(), v_tile.size(0),
                           v_tile.size(1), v_tile.stride(0), first, c);
  }
}

// Adam (AdaGrad) on the moments of the lines [start, start + len) (rows right, columns left);
// R (r_tile, contiguous) is read and overwritten by N.
void run_moments_tile(at::Tensor& r_tile, const StepState& s, const StepGeometry& g,
                      int64_t start, int64_t len, const AdamCoeffs& c) {
  float* r_then_n = r_tile.data_ptr<float>();
  // the format of M (V's is M's, or the fp32 factors); AdaGrad: V's
  const at::ScalarType t = (s.exp_avg.defined() ? s.exp_avg : s.exp_avg_sq).scalar_type();
  if (s.eight_bit()) {
    moments8_tile(r_then_n, s, g, start, len, c);
  } else if (t == at::kFloat) {
    float_moments_tile<float>(r_then_n, s, g, start, len, c);
  } else {
    float_moments_tile<at::BFloat16>(r_then_n, s, g, start, len, c);
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

// The basis as an fp32 BLAS operand, r x n (right) or m x r (left), from any proj format: dense
// (a view when already fp32), DCT indices (generated) or packed INT4 (dequantized once).
at::Tensor fp32_basis(const at::Tensor& proj, const StepGeometry& g,
                      const std::optional<at::Tensor>& proj_scales,
                      const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size) {
  if (proj.scalar_type() == at::kInt) return dct_projection_basis(proj, g);
  if (proj.scalar_type() == at::kByte) {
    const std::vector<int64_t> shape =
        g.right ? std::vector<int64_t>{g.r, g.n} : std::vector<int64_t>{g.m, g.r};
    return dequantize_int4_cpu(proj, *proj_scales, *proj_zeros, shape, proj_group_size);
  }
  return proj.to(at::kFloat).contiguous();
}

// out[l] = sum_j a[l*s_line + j*s_long] * b[l*s_line + j*s_long] for l < lines, j < span, in an
// order fixed by the strides alone (never by the tiling): a contiguous line is summed in eight
// interleaved partial sums combined in lane order, other layouts line by line along j.
LOWRANK_CPU_CLONES void line_dot_sums(const float* a, const float* b, int64_t lines, int64_t span,
                                      int64_t s_line, int64_t s_long, float* out) {
  if (s_long == 1) {
    for (int64_t l = 0; l < lines; ++l) {
      const float* x = a + l * s_line;
      const float* y = b + l * s_line;
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      int64_t j = 0;
      for (; j + 8 <= span; j += 8) {
        for (int k = 0; k < 8; ++k) acc[k] += x[j + k] * y[j + k];
      }
      float tail = 0.0f;
      for (; j < span; ++j) tail += x[j] * y[j];
      out[l] = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) +
               tail;
    }
    return;
  }
  for (int64_t l = 0; l < lines; ++l) out[l] = 0.0f;
  for (int64_t j = 0; j < span; ++j) {
    const float* x = a + j * s_long;
    const float* y = b + j * s_long;
    for (int64_t l = 0; l < lines; ++l) out[l] += x[l * s_line] * y[l * s_line];
  }
}

// Per-line sums of a matrix whose lines are its rows (right side) or its columns (left side).
void own_line_dot_sums(const at::Tensor& a, const at::Tensor& b, bool right, float* out) {
  const int64_t line_dim = right ? 0 : 1, long_dim = right ? 1 : 0;
  line_dot_sums(a.data_ptr<float>(), b.data_ptr<float>(), a.size(line_dim), a.size(long_dim),
                a.stride(line_dim), a.stride(long_dim), out);
}

// No work between the projection and Adam (the default of project_adam_tiles).
struct NoProjectedHook {
  void operator()(int64_t, int64_t, const at::Tensor&, const at::Tensor&) const {}
};

// R of the tile of lines [start, start + len) into r_tile (len x r right, r x len left);
// returns the tile of G in fp32 (a view, or converted into g_buf).
at::Tensor project_tile(const at::Tensor& grad, const at::Tensor& basis, const StepGeometry& g,
                        int64_t start, int64_t len, at::Tensor& g_buf, at::Tensor& r_tile) {
  at::Tensor g32 = grad_tile_f32(grad.narrow(g.right ? 0 : 1, start, len), g_buf);
  if (g.right) {
    at::mm_out(r_tile, g32, basis.t());  // (len x n) @ (n x r)
  } else {
    at::mm_out(r_tile, basis.t(), g32);  // (r x m) @ (m x len)
  }
  return g32;
}

// ---- the factored second moment (DESIGN.md §4.12): a step in two phases ----
// a_i sums R_ij^2 over every own-line j, i.e. over all tiles, so a factored step cannot run
// project -> moments -> update tile by tile:
//   phase 1 (parallel over the tiles): R = project(G tile) into an fp32 workspace of the
//     low-rank size, each tile's rows x cols block contiguous at offset start*r; per own-line
//     the sum over the rank (b_j's EMA at once: it is line-local); per chunk of kFactoredChunk
//     consecutive lines, every rank's sum over the chunk's lines.
//   reduce (one thread, O(r * own / chunk)): a_i from the chunk sums, mean(a), c_j.
//   phase 2 (parallel over the same tiles): M, N and the epilogue on each tile's block of R.
// R is kept rather than recomputed: recomputing would read G from DRAM a second time and repeat
// the projection GEMM (half the step's flops), while the workspace is r*own*4 bytes, transient,
// the size of an fp32 M (and of the N buffer the INT8-weight path already allocates).
// The chunks are fixed runs of lines, not tiles (whose bounds move with the thread count; every
// tile bound is a multiple of the chunk), and every sum runs in a fixed order: the factors, and
// so the step, are the same at any thread count. The cross-chunk sums are double (rounded once).
constexpr int64_t kFactoredChunk = kLineUnit;

// Per chunk k of the tile of lines [start, start + len) (R: rows x cols contiguous, len x r
// right, r x len left): out[k * r + i] = the sum over the chunk's lines j, in order, of R_ij^2.
LOWRANK_CPU_CLONES void chunk_square_sums(const float* r_tile, bool right, int64_t r,
                                          int64_t start, int64_t len, float* out) {
  for (int64_t j0 = start; j0 < start + len; j0 += kFactoredChunk) {
    const int64_t lines = std::min(start + len - j0, kFactoredChunk);
    float* acc = out + j0 / kFactoredChunk * r;
    if (right) {  // lines are rows: rank lanes, rows in order
      for (int64_t i = 0; i < r; ++i) acc[i] = 0.0f;
      for (int64_t j = 0; j < lines; ++j) {
        const float* row = r_tile + (j0 - start + j) * r;
        for (int64_t i = 0; i < r; ++i) acc[i] += row[i] * row[i];
      }
    } else {  // lines are columns: along each rank's row
      for (int64_t i = 0; i < r; ++i) {
        const float* row = r_tile + i * len + (j0 - start);
        float sum = 0.0f;
        for (int64_t j = 0; j < lines; ++j) sum += row[j] * row[j];
        acc[i] = sum;
      }
    }
  }
}

// Phase 1 on the tile of lines [start, start + len) whose R is r_tile: b_j's EMA with the
// line's mean square over the rank, and the tile's chunk sums (into chunk_sq).
void factored_line_sums(const at::Tensor& r_tile, float* factors, const StepGeometry& g,
                        int64_t start, int64_t len, const AdamCoeffs& c, float* line_sq,
                        float* chunk_sq) {
  own_line_dot_sums(r_tile, r_tile, g.right, line_sq);
  float* b = factors + g.r + start;
  const float rank = static_cast<float>(g.r);
  for (int64_t j = 0; j < len; ++j) b[j] = factored_ema(b[j], line_sq[j] / rank, c);
  chunk_square_sums(r_tile.data_ptr<float>(), g.right, g.r, start, len, chunk_sq);
}

// The reduction between the phases: a_i's EMA with its mean square over all `own` lines (the
// chunk sums added in chunk order, in double), then c_j = b_j / max(mean(a), 1e-30) into
// `line` (own floats).
void factored_reduce(float* factors, const float* chunk_sq, int64_t chunks, int64_t own,
                     const StepGeometry& g, const AdamCoeffs& c, float* line) {
  std::vector<double> sums(static_cast<size_t>(g.r), 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < g.r; ++i) sums[i] += chunk_sq[k * g.r + i];
  }
  float* a = factors;
  double total = 0.0;
  for (int64_t i = 0; i < g.r; ++i) {
    a[i] = factored_ema(a[i], static_cast<float>(sums[i]) / static_cast<float>(own), c);
    total += a[i];
  }
  float mean = static_cast<float>(total) / static_cast<float>(g.r);
  mean = mean < kFactoredFloor ? kFactoredFloor : mean;  // NaN stays NaN (torch.clamp's rule)
  const float* b = factors + g.r;
  for (int64_t j = 0; j < own; ++j) line[j] = b[j] / mean;
}

// The tile loop shared by every weight format and by fused_gradnorm_step. Per tile of whole
// lines (rows right, columns left): R = project(G tile), projected(start, len, g32, r_tile) (R
// before the moments overwrite it: the full-rank modes' per-line sums), the moment rule on that
// slice of the state -> N (fp32, in cache), then epilogue(start, len, n_tile, back_buf, g32) (g32:
// the tile of G in fp32, still in cache). Workspaces are allocated once per task; back_buf (room
// for one fp32 tile of back(N)) only when need_back_buf. A factored V runs the two phases above
// (no `projected` hook there: the full-rank modes and GradNormLoRP refuse a factored V; the
// epilogue's g32 is then undefined).
template <typename Epilogue, typename Projected = NoProjectedHook>
void project_adam_tiles(const at::Tensor& grad, const at::Tensor& basis, const StepState& state,
                        const StepGeometry& g, const AdamCoeffs& c, bool need_back_buf,
                        const Epilogue& epilogue, const Projected& projected = Projected()) {
  const int64_t lines = g.right ? g.m : g.n;  // rows (right) or columns (left) of W
  const int64_t span = g.right ? g.n : g.m;   // length of one line
  const LineTiles split = step_tiles(lines, span, g.r);
  const int64_t extent = split.max_length();
  const bool lowp_g = grad.scalar_type() != at::kFloat;
  const auto f32 = grad.options().dtype(at::kFloat);
  if (!state.factored()) {
    parallel_tiles(split.tiles, [&](int64_t begin, int64_t end) {
      at::Tensor g_buf = lowp_g ? at::empty({extent * span}, f32) : at::Tensor();
      at::Tensor back_buf = need_back_buf ? at::empty({extent * span}, f32) : at::Tensor();
      at::Tensor r_buf = at::empty({extent * g.r}, f32);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t start = split.start(tile), len = split.length(tile);
        at::Tensor r_tile = contiguous_view(r_buf, g.right ? len : g.r, g.right ? g.r : len);
        const at::Tensor g32 = project_tile(grad, basis, g, start, len, g_buf, r_tile);
        projected(start, len, g32, r_tile);
        run_moments_tile(r_tile, state, g, start, len, c);
        epilogue(start, len, r_tile, back_buf, g32);
      }
    });
    return;
  }
  TORCH_INTERNAL_ASSERT((std::is_same_v<Projected, NoProjectedHook>),
                        "a factored second moment has no per-tile projection hook");
  TORCH_INTERNAL_ASSERT(split.unit % kFactoredChunk == 0);
  const int64_t chunks = (lines + kFactoredChunk - 1) / kFactoredChunk;
  at::Tensor low_rank = at::empty({lines * g.r}, f32);
  std::vector<float> chunk_sq(static_cast<size_t>(chunks * g.r)), line(lines);
  float* factors = state.exp_avg_sq.data_ptr<float>();
  // the tile's block of R (then N) in the workspace
  const auto r_block = [&](int64_t start, int64_t len) {
    return low_rank.narrow(0, start * g.r, len * g.r)
        .view({g.right ? len : g.r, g.right ? g.r : len});
  };
  parallel_tiles(split.tiles, [&](int64_t begin, int64_t end) {
    at::Tensor g_buf = lowp_g ? at::empty({extent * span}, f32) : at::Tensor();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = split.start(tile), len = split.length(tile);
      at::Tensor r_tile = r_block(start, len);
      project_tile(grad, basis, g, start, len, g_buf, r_tile);
      factored_line_sums(r_tile, factors, g, start, len, c, line.data() + start,
                         chunk_sq.data());
    }
  });
  factored_reduce(factors, chunk_sq.data(), chunks, lines, g, c, line.data());
  StepState phase2 = state;
  phase2.factors = FactoredV{factors, line.data()};
  parallel_tiles(split.tiles, [&](int64_t begin, int64_t end) {
    at::Tensor back_buf = need_back_buf ? at::empty({extent * span}, f32) : at::Tensor();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = split.start(tile), len = split.length(tile);
      at::Tensor n_tile = r_block(start, len);
      run_moments_tile(n_tile, phase2, g, start, len, c);
      epilogue(start, len, n_tile, back_buf, at::Tensor());
    }
  });
}

// Float weights: back-project each N tile and update the same tile of W, once.
void dense_step_tiles(at::Tensor& param, const at::Tensor& grad, const at::Tensor& basis,
                      const StepState& state, const StepGeometry& g, const AdamCoeffs& c) {
  const int dim = g.right ? 0 : 1;
  const bool lowp_w = param.scalar_type() != at::kFloat;
  project_adam_tiles(grad, basis, state, g, c, lowp_w,
                     [&](int64_t start, int64_t len, at::Tensor& n_tile, at::Tensor& back_buf,
                         const at::Tensor&) {
                       at::Tensor w_tile = param.narrow(dim, start, len);
                       if (g.right) {
                         update_tile(w_tile, n_tile, basis, back_buf, c);  // (len x r) @ (r x n)
                       } else {
                         update_tile(w_tile, basis, n_tile, back_buf, c);  // (m x r) @ (r x len)
                       }
                     });
}

// ---- Q-GaLore formats: packed INT4 basis and/or INT8 weight codes (DESIGN.md §4.3-§4.4) ----
//
// INT4 basis: expanded once per step into an fp32 r x d buffer (the BLAS operand; never m x n).
// Float weight: the dense tile loop above runs on that buffer unchanged.
// INT8 weight, two passes, each tensor still crossing memory once:
//   1. low rank: N = adam(project(G)) into an fp32 buffer of the low-rank shape (M, V updated);
//   2. per tile of whole rows that covers whole groups: T = back(N) for the tile (fp32, in cache),
//      then per group: W' = decay * s(q - z) - us * T, new s', z' from min/max of W',
//      q' = clamp(SR(W'/s') + z', 0, 255) with u = philox(seed + 2^32 step, row-major index).
// Pass 2 needs all of back(N)'s rows in a tile, which a left-side column tile cannot give when
// groups straddle rows; hence the low-rank pass first for both sides.

// Pass 1: N (m x r right, r x n left) in fp32; the moments are updated in place.
at::Tensor normalized_low_rank(const at::Tensor& grad, const at::Tensor& basis,
                               const StepState& state, const StepGeometry& g,
                               const AdamCoeffs& c) {
  at::Tensor normalized = at::empty(g.low_rank_shape(), grad.options().dtype(at::kFloat));
  const int dim = g.right ? 0 : 1;
  project_adam_tiles(grad, basis, state, g, c, /*need_back_buf=*/false,
                     [&](int64_t start, int64_t len, at::Tensor& n_tile, at::Tensor&,
                         const at::Tensor&) {
                       normalized.narrow(dim, start, len).copy_(n_tile);
                     });
  return normalized;
}

// Pass-2 tiles: rows in multiples of group_size / gcd(n, group_size), so that every tile but
// the last starts and ends on a group boundary; at most about 256K elements per tile and at least
// one tile per thread where the units allow, a tile count that is a multiple of the thread count,
// of equal tiles, so that the cores finish together.
LineTiles group_aligned_tiles(int64_t m, int64_t n, int64_t group_size) {
  const int64_t unit = group_size / std::gcd(n, group_size);
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::min((int64_t{1} << 18) / n, (m + threads - 1) / threads);
  return balanced_tiles(m, std::max<int64_t>(1, rows), unit);
}

// Pass 2 on the rows [row_begin, row_end) whose fp32 back(N) is `back_n` (row-major, n columns).
void update_int8_rows(uint8_t* codes, float* scales, float* zeros, float* back_n,
                      int64_t row_begin, int64_t row_end, int64_t n, int64_t numel,
                      int64_t group_size, uint64_t philox_seed, const AdamCoeffs& c) {
  const int64_t first = row_begin * n, stop = row_end * n;
  for (int64_t gi = first / group_size; gi * group_size < stop; ++gi) {
    const int64_t g_first = gi * group_size;
    const int64_t len = std::min(group_size, numel - g_first);
    uint8_t* q = codes + g_first;
    float* w = back_n + (g_first - first);  // overwritten by W' (fp32, never stored to memory)
    const GroupQuant old{scales[gi], zeros[gi]};
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    dequantize_update_chunk(q, old, c, len, w, lo, hi);
    const GroupQuant fresh = group_quant_params(lo, hi, kInt8MaxCode);
    stochastic_round_group(w, len, fresh, philox_seed, g_first, q);
    scales[gi] = fresh.scale;
    zeros[gi] = fresh.zero;
  }
}

// The G term of the full-rank modes' update (Fira, APOLLO; DESIGN.md §4.6-§4.7):
// W' = decay*W - us*back(N') - grad_coef[line]*G, line = row (right) or column (left).
struct GradTerm {
  const at::Tensor& grad;  // m x n, any strides
  const float* grad_coef;  // one per own-line
  bool back;               // Fira: back(N') as well; APOLLO: the G term alone
};

// T <- us*T + gc*G (or gc*G without back) on rows [start, start + len) of an INT8 weight, T the
// contiguous fp32 len x n tile and `grad` the same rows of G (strides gs0, gs1): the requantizing
// update then takes W' = decay*W - 1*T.
LOWRANK_CPU_CLONES void fold_grad_term_rows(float* t, const float* grad, int64_t gs0, int64_t gs1,
                                            const float* grad_coef, bool right, bool back,
                                            int64_t start, int64_t len, int64_t n, float us) {
  for (int64_t i = 0; i < len; ++i) {
    float* row = t + i * n;
    const float* g_row = grad + i * gs0;
    const float row_coef = right ? grad_coef[start + i] : 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float coef = right ? row_coef : grad_coef[j];
      row[j] = back ? us * row[j] + coef * g_row[j * gs1] : coef * g_row[j * gs1];
    }
  }
}

void int8_weight_update(at::Tensor& codes, at::Tensor& scales, at::Tensor& zeros,
                        int64_t group_size, uint64_t philox_seed, const at::Tensor& basis,
                        const at::Tensor& normalized, const StepGeometry& g,
                        const AdamCoeffs& c, const GradTerm* term = nullptr) {
  const LineTiles split = group_aligned_tiles(g.m, g.n, group_size);
  const auto f32 = codes.options().dtype(at::kFloat);
  AdamCoeffs folded = c;  // with a G term, T holds the whole update: W' = decay*W - 1*T
  folded.update_scale = 1.0f;
  parallel_tiles(split.tiles, [&](int64_t begin, int64_t end) {
    at::Tensor t_buf = at::empty({split.max_length() * g.n}, f32);
    at::Tensor g_buf = term != nullptr && term->grad.scalar_type() != at::kFloat
                           ? at::empty({split.max_length() * g.n}, f32) : at::Tensor();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = split.start(tile), len = split.length(tile);
      at::Tensor t = contiguous_view(t_buf, len, g.n);
      if (term == nullptr || term->back) {
        if (g.right) {
          at::mm_out(t, normalized.narrow(0, start, len), basis);  // (len x r) @ (r x n)
        } else {
          at::mm_out(t, basis.narrow(0, start, len), normalized);  // (len x r) @ (r x n)
        }
      }
      if (term != nullptr) {
        const at::Tensor g32 = grad_tile_f32(term->grad.narrow(0, start, len), g_buf);
        fold_grad_term_rows(t.data_ptr<float>(), g32.data_ptr<float>(),
                            g32.stride(0), g32.stride(1), term->grad_coef, g.right, term->back,
                            start, len, g.n, c.update_scale);
      }
      update_int8_rows(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                       zeros.data_ptr<float>(), t.data_ptr<float>(), start, start + len, g.n,
                       g.m * g.n, group_size, philox_seed, term != nullptr ? folded : c);
    }
  });
}

// ---- Fira and APOLLO: the scaled full-rank term (DESIGN.md §4.6-§4.7, docs/methods.md §3-§4) ----
//
//   pass 1 (project_adam_tiles, G read once): per own-line i, gamma_i = ||G_i||^2,
//     rho_i = ||R_i||^2, nu_i = ||N_i||^2 and, for Fira, quad_i = R_i K R_i^T with the r x r Gram
//     K = Q Q^T (P^T P left) of the basis as the GEMMs see it (exact for any basis format);
//     N, and R for Fira, kept in fp32 low-rank buffers (r * own * 4 bytes each, never m x n).
//   finalize (one thread, lines in index order, double sums: the same numbers at any thread
//     count, so a resumed run continues bit for bit): phi_i = sqrt(nu_i)/(sqrt(rho_i) + 1e-8)
//     (or one phi from the sums over lines), s_i = phi_i^2 max(gamma_i - 2a rho_i + a^2 quad_i, 0)
//     (Fira) or a^[scale_front] phi_i^2 gamma_i (APOLLO), ||S|| = sqrt(sum s_i), the limiter
//     (f, and the state ||S||/f written in place) and per line c_i = phi_i/f,
//     gc_i = grad_scale * c_i.
//   pass 2 (G read again, W read and written once): Fira N' = N - c (.) R, then
//     W' = decay*W - us*back(N') - gc_i*G_i; APOLLO W' = decay*W - gc_i*G_i (no GEMM).
// With channel phi and no limiter nothing crosses lines: pass 2 runs inside pass 1's tile loop
// while the tile of G is in cache (G read once). INT8 weights always take the two passes (their
// update tiles are rows of whole quantization groups on either side).
// grad_scale = fl(decay*alpha_t) (Fira) or fl(decay*alpha_t*sqrt(a)) (APOLLO), computed on the
// host in double like every per-step scalar (lowrank/adam.h); us as for GaLore.
constexpr float kNormGuard = 1e-8f;  // the peers' "+ 1e-8" in phi's and the limiter's denominators

struct FullRankWork {
  FullRankArgs args;
  bool fira;
  float scale;       // a
  float grad_scale;  // fl(decay*alpha_t) (Fira) or fl(decay*alpha_t*sqrt(a)) (APOLLO)
  std::vector<float> grad_sq, low_sq, norm_sq, quad;  // gamma, rho, nu, R K R^T per own-line
  std::vector<float> line_coef, grad_coef;            // c_i, gc_i
  at::Tensor gram;        // K (Fira)
  at::Tensor low_rank;    // R (Fira), fp32, low-rank shape
  at::Tensor normalized;  // N, fp32, low-rank shape (two-pass runs)
};

float line_factor(float nu, float rho) { return sqrtf(nu) / (sqrtf(rho) + kNormGuard); }

// N' = N - c (.) R on the lines [start, start + len) of low-rank tiles (n, r: (len x r) right,
// (r x len) left, any strides), in place in n.
void fold_low_rank_tile(at::Tensor& n_tile, const at::Tensor& r_tile, const float* coef,
                        bool right) {
  const int64_t lines = n_tile.size(right ? 0 : 1), rank = n_tile.size(right ? 1 : 0);
  float* n = n_tile.data_ptr<float>();
  const float* r = r_tile.data_ptr<float>();
  const int64_t nl = n_tile.stride(right ? 0 : 1), nk = n_tile.stride(right ? 1 : 0);
  const int64_t rl = r_tile.stride(right ? 0 : 1), rk = r_tile.stride(right ? 1 : 0);
  for (int64_t l = 0; l < lines; ++l) {
    const float c = coef[l];
    for (int64_t k = 0; k < rank; ++k) n[l * nl + k * nk] -= c * r[l * rl + k * rk];
  }
}

// W' = decay*W [- us*T] - gc*G on a rows x cols tile of W (leading dimension ldw), T contiguous
// fp32 (or null), G fp32 with strides (gs0, gs1), gc per row (per_row) or per column.
template <typename weight_t>
[[gnu::always_inline]] inline void grad_term_tile(weight_t* w, int64_t ldw, const float* back,
                                                  const float* g, int64_t gs0, int64_t gs1,
                                                  int64_t rows, int64_t cols, const float* coef,
                                                  bool per_row, float decay, float us) {
  for (int64_t i = 0; i < rows; ++i) {
    weight_t* w_row = w + i * ldw;
    const float* g_row = g + i * gs0;
    const float row_coef = per_row ? coef[i] : 0.0f;
    if (back != nullptr) {
      const float* t = back + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const float x = decay * static_cast<float>(w_row[j]) - us * t[j];
        w_row[j] = static_cast<weight_t>(x - (per_row ? row_coef : coef[j]) * g_row[j * gs1]);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const float x = decay * static_cast<float>(w_row[j]);
        w_row[j] = static_cast<weight_t>(x - (per_row ? row_coef : coef[j]) * g_row[j * gs1]);
      }
    }
  }
}

#define LOWRANK_GRAD_TERM_CLONE(weight_t)                                                        \
  LOWRANK_CPU_CLONES void grad_term_tile_cloned(weight_t* w, int64_t ldw, const float* back,     \
                                                const float* g, int64_t gs0, int64_t gs1,        \
                                                int64_t rows, int64_t cols, const float* coef,   \
                                                bool per_row, float decay, float us) {           \
    grad_term_tile<weight_t>(w, ldw, back, g, gs0, gs1, rows, cols, coef, per_row, decay, us); \
  }
LOWRANK_GRAD_TERM_CLONE(float)
LOWRANK_GRAD_TERM_CLONE(at::BFloat16)
LOWRANK_GRAD_TERM_CLONE(at::Half)
#undef LOWRANK_GRAD_TERM_CLONE

// The pass-2 update of one tile of whole lines [start, start + len) of a float W: n_tile holds
// N (Fira: folded into N' here), r_tile R (Fira), g32 the tile of G in fp32.
void full_rank_update_tile(at::Tensor& param, const at::Tensor& g32, at::Tensor& n_tile,
                           const at::Tensor& r_tile, const at::Tensor& basis,
                           at::Tensor& back_buf, int64_t start, int64_t len,
                           const FullRankWork& work, const StepGeometry& g, const AdamCoeffs& c) {
  at::Tensor w_tile = param.narrow(g.right ? 0 : 1, start, len);
  const float* grad_coef = work.grad_coef.data() + start;
  float decay = c.decay;
  at::Tensor back;
  if (work.fira) {
    fold_low_rank_tile(n_tile, r_tile, work.line_coef.data() + start, g.right);
    if (w_tile.scalar_type() == at::kFloat) {  // decay and back(N') by BLAS, in place
      if (g.right) {
        w_tile.addmm_(n_tile, basis, /*beta=*/c.decay, /*alpha=*/-c.update_scale);
      } else {
        w_tile.addmm_(basis, n_tile, /*beta=*/c.decay, /*alpha=*/-c.update_scale);
      }
      decay = 1.0f;
    } else {
      back = contiguous_view(back_buf, w_tile.size(0), w_tile.size(1));
      if (g.right) {
        at::mm_out(back, n_tile, basis);
      } else {
        at::mm_out(back, basis, n_tile);
      }
    }
  }
  const float* back_ptr = back.defined() ? back.data_ptr<float>() : nullptr;
  const auto run = [&](auto* w) {
    grad_term_tile_cloned(w, w_tile.stride(0), back_ptr, g32.data_ptr<float>(), g32.stride(0),
                          g32.stride(1), w_tile.size(0), w_tile.size(1), grad_coef, g.right,
                          decay, c.update_scale);
  };
  switch (w_tile.scalar_type()) {
    case at::kFloat: run(w_tile.data_ptr<float>()); break;
    case at::kBFloat16: run(w_tile.data_ptr<at::BFloat16>()); break;
    default: run(w_tile.data_ptr<at::Half>()); break;
  }
}

// phi, ||S||, the limiter and the per-line coefficients from pass 1's sums (see above).
void finalize_full_rank(FullRankWork& work, int64_t own) {
  const float a = work.scale;
  float phi_all = 0.0f;
  if (work.args.tensor_norm) {
    double nu = 0.0, rho = 0.0;
    for (int64_t l = 0; l < own; ++l) {
      nu += work.norm_sq[l];
      rho += work.low_sq[l];
    }
    phi_all = line_factor(static_cast<float>(nu), static_cast<float>(rho));
  }
  double total = 0.0;
  for (int64_t l = 0; l < own; ++l) {
    const float phi =
        work.args.tensor_norm ? phi_all : line_factor(work.norm_sq[l], work.low_sq[l]);
    work.line_coef[l] = phi;
    float residual = work.grad_sq[l];
    if (work.fira) {
      residual = std::max(residual - (2.0f * a) * work.low_sq[l] + (a * a) * work.quad[l], 0.0f);
    } else if (work.args.scale_front) {
      residual = a * residual;
    }
    total += (phi * phi) * residual;
  }
  float divisor = 1.0f;  // f
  if (work.args.limiter.has_value()) {
    float* stored = work.args.limiter->data_ptr<float>();
    const float norm = sqrtf(static_cast<float>(total));
    if (*stored < 0.0f) {
      *stored = norm;
    } else {
      const float growth = static_cast<float>(work.args.growth);
      divisor = std::max(norm / (*stored + kNormGuard), growth) / growth;
      *stored = norm / divisor;
    }
  }
  for (int64_t l = 0; l < own; ++l) {
    const float coef = work.line_coef[l] / divisor;
    work.line_coef[l] = coef;
    work.grad_coef[l] = work.grad_scale * coef;
  }
}

void full_rank_step(at::Tensor& param, const at::Tensor& grad, const at::Tensor& basis,
                    const StepState& state, const StepGeometry& g,
                    const AdamCoeffs& c, FullRankWork& work,
                    const std::optional<at::Tensor>& param_scales,
                    const std::optional<at::Tensor>& param_zeros, int64_t param_group_size,
                    uint64_t philox_seed) {
  const int64_t own = g.right ? g.m : g.n;
  const int dim = g.right ? 0 : 1;
  const auto f32 = grad.options().dtype(at::kFloat);
  const bool int8_weight = param.scalar_type() == at::kByte;
  // channel phi without a limiter: nothing crosses lines, one pass
  const bool one_pass = !work.args.tensor_norm && !work.args.limiter.has_value() && !int8_weight;
  for (auto* v : {&work.grad_sq, &work.low_sq, &work.norm_sq, &work.line_coef, &work.grad_coef}) {
    v->assign(own, 0.0f);
  }
  if (work.fira) {
    work.quad.assign(own, 0.0f);
    work.gram = g.right ? at::mm(basis, basis.t()) : at::mm(basis.t(), basis);  // r x r
    work.low_rank = at::empty(g.low_rank_shape(), f32);
  }
  if (!one_pass) work.normalized = at::empty(g.low_rank_shape(), f32);
  const auto projected = [&](int64_t start, int64_t len, const at::Tensor& g32,
                             const at::Tensor& r_tile) {
    own_line_dot_sums(g32, g32, g.right, work.grad_sq.data() + start);
    own_line_dot_sums(r_tile, r_tile, g.right, work.low_sq.data() + start);
    if (!work.fira) return;
    work.low_rank.narrow(dim, start, len).copy_(r_tile);
    const at::Tensor kr = g.right ? at::mm(r_tile, work.gram) : at::mm(work.gram, r_tile);
    own_line_dot_sums(kr, r_tile, g.right, work.quad.data() + start);
  };
  const bool lowp_w = param.scalar_type() != at::kFloat && !int8_weight;
  project_adam_tiles(
      grad, basis, state, g, c, one_pass && lowp_w && work.fira,
      [&](int64_t start, int64_t len, at::Tensor& n_tile, at::Tensor& back_buf,
          const at::Tensor& g32) {
        own_line_dot_sums(n_tile, n_tile, g.right, work.norm_sq.data() + start);
        if (!one_pass) {
          work.normalized.narrow(dim, start, len).copy_(n_tile);
          return;
        }
        for (int64_t l = start; l < start + len; ++l) {
          work.line_coef[l] = line_factor(work.norm_sq[l], work.low_sq[l]);
          work.grad_coef[l] = work.grad_scale * work.line_coef[l];
        }
        const at::Tensor r_tile =
            work.fira ? work.low_rank.narrow(dim, start, len) : at::Tensor();
        full_rank_update_tile(param, g32, n_tile, r_tile, basis, back_buf, start, len, work, g,
                              c);
      },
      projected);
  if (one_pass) return;
  finalize_full_rank(work, own);
  const GradTerm term{grad, work.grad_coef.data(), work.fira};
  if (int8_weight) {
    if (work.fira) {
      fold_low_rank_tile(work.normalized, work.low_rank, work.line_coef.data(), g.right);
    }
    at::Tensor scales = *param_scales, zeros = *param_zeros;
    int8_weight_update(param, scales, zeros, param_group_size, philox_seed, basis,
                       work.normalized, g, c, &term);
    return;
  }
  const LineTiles split = step_tiles(own, g.right ? g.n : g.m, g.r);
  const int64_t extent = split.max_length(), span = g.right ? g.n : g.m;
  parallel_tiles(split.tiles, [&](int64_t begin, int64_t end) {
    at::Tensor g_buf = grad.scalar_type() != at::kFloat ? at::empty({extent * span}, f32)
                                                        : at::Tensor();
    at::Tensor back_buf = lowp_w && work.fira ? at::empty({extent * span}, f32) : at::Tensor();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = split.start(tile), len = split.length(tile);
      const at::Tensor g32 = grad_tile_f32(grad.narrow(dim, start, len), g_buf);
      at::Tensor n_tile = work.normalized.narrow(dim, start, len);
      const at::Tensor r_tile = work.fira ? work.low_rank.narrow(dim, start, len) : at::Tensor();
      full_rank_update_tile(param, g32, n_tile, r_tile, basis, back_buf, start, len, work, g, c);
    }
  });
}

// grad_scale of the full-rank modes (see above), in double like make_adam_coeffs' scalars.
float full_rank_grad_scale(double lr, double beta1, double beta2, double weight_decay,
                           double scale, int64_t step, bool fira) {
  const double alpha_t = lr * std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))) /
                         (1.0 - std::pow(beta1, static_cast<double>(step)));
  const double decay = 1.0 - lr * weight_decay;
  return static_cast<float>(decay * alpha_t * (fira ? 1.0 : std::sqrt(scale)));
}

void fused_galore_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                           const std::optional<at::Tensor>& exp_avg, at::Tensor& exp_avg_sq,
                           const at::Scalar& lr, double beta1, double beta2, double eps,
                           const at::Scalar& weight_decay, double scale, int64_t step,
                           const std::optional<at::Tensor>& proj_scales,
                           const std::optional<at::Tensor>& proj_zeros, int64_t proj_group_size,
                           const std::optional<at::Tensor>& param_scales,
                           const std::optional<at::Tensor>& param_zeros, int64_t param_group_size,
                           int64_t seed, c10::string_view inner,
                           const std::optional<at::Tensor>& exp_avg_scales,
                           const std::optional<at::Tensor>& exp_avg_sq_scales,
                           int64_t state_block_size, std::optional<bool> right,
                           c10::string_view full_rank, c10::string_view full_rank_norm,
                           const std::optional<at::Tensor>& limiter, double limiter_growth,
                           bool scale_front) {
  const StepModes modes{parse_inner_rule(inner), exp_avg_scales, exp_avg_sq_scales,
                        state_block_size, right};
  const StepGeometry g = check_fused_galore_step(
      param, grad, proj, exp_avg, exp_avg_sq, beta1, beta2, eps, step, proj_scales, proj_zeros,
      proj_group_size, param_scales, param_zeros, param_group_size, seed, modes);
  const FullRankArgs full = check_full_rank(param, full_rank, full_rank_norm, limiter,
                                            limiter_growth, scale_front, scale);
  check_full_rank_combination(full_rank, modes, exp_avg_sq, g);
  LOWRANK_CHECK_VALUE(param.device().is_cpu(), "param: expected a CPU tensor, got ", param.device());
  const AdamCoeffs c = make_adam_coeffs(lr.toDouble(), beta1, beta2, eps,
                                        weight_decay.toDouble(), scale, step, seed,
                                        modes.adagrad);
  const StepState state{exp_avg.value_or(at::Tensor()), exp_avg_sq,
                        exp_avg_scales.value_or(at::Tensor()),
                        exp_avg_sq_scales.value_or(at::Tensor()), state_block_size};
  const at::Tensor basis = fp32_basis(proj, g, proj_scales, proj_zeros, proj_group_size);
  if (full.mode != FullRank::kNone) {
    FullRankWork work{full, full.mode == FullRank::kFira, static_cast<float>(scale),
                      full_rank_grad_scale(lr.toDouble(), beta1, beta2, weight_decay.toDouble(),
                                           scale, step, full.mode == FullRank::kFira)};
    full_rank_step(param, grad, basis, state, g, c, work, param_scales,
                   param_zeros, param_group_size, rounding_philox_seed(seed, step));
    return;
  }
  if (param.scalar_type() != at::kByte) {
    dense_step_tiles(param, grad, basis, state, g, c);
    return;
  }
  const at::Tensor normalized = normalized_low_rank(grad, basis, state, g, c);
  at::Tensor scales = *param_scales, zeros = *param_zeros;
  int8_weight_update(param, scales, zeros, param_group_size, rounding_philox_seed(seed, step),
                     basis, normalized, g, c);
}

// ---- GradNormLoRP: fused_gradnorm_step (DESIGN.md §4.8) ----
//
//   c_i = row_norm_i / row_scale_i      gamma_i = sum_j G_ij W_ij      dg_i = gamma_i / row_scale_i
//   N = adam(R; M, V)      N_g = adam(dg; M_g, V_g)      g'_i = decay * (row_norm_i - alpha_t N_g,i)
//   v'_i = (decay c_i) W_i - us back(N)_i      W_i <- (g'_i / ||v'_i||) v'_i
//   row_scale <- g', row_norm <- ||v'||      (us = decay alpha_t scale, as in the GaLore step)
//
// ||v'_i|| needs the whole row i of back(N). Right side (m >= n): the tiles of whole rows of the
// GaLore loop have it, so each tile runs R = G Q^T -> Adam -> gamma (from the G tile in cache)
// -> T = N Q -> v', ||v'|| -> W, in cache: G read once, W read and written once (read twice
// from cache). Left side (m < n): the column tiles (R = P^T G needs whole columns) hold no
// whole row, so 1. column tiles: R -> Adam -> N into an r x n fp32 buffer, and per (tile, row)
// partial sums of gamma; 2. row tiles: T = P[rows] N (fp32, in cache), gamma summed over the
// tiles in order, the row update as on the right. G read once, W read twice and written once.
// ||v'|| is summed from v' directly (the Triton kernel's right side uses a Gram form instead).
// Tile temporaries (elementwise products, v') live in the tile's back(N) buffer: never m x n.

struct GradNormRows {
  float* scale;  // g
  float* norm;  // ||v||
  float* exp_avg;  // g's Adam moments
  float* exp_avg_sq;
};

// The per-row scalars of rows [first, first + len): g's Adam step, g' (out: g_new) and v's
// factor a_i = decay * c_i (out: a), from gamma_i (in).
void gradnorm_row_scalars(const float* gamma, int64_t first, int64_t len,
                          const GradNormRows& rows, const AdamCoeffs& c, float* a,
                          float* g_new) {
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = first + k;
    const float grad_scale = gamma[k] / rows.scale[i];
    const float normalized =
        adam_normalized_update(grad_scale, rows.exp_avg[i], rows.exp_avg_sq[i], c);
    a[k] = c.decay * (rows.norm[i] / rows.scale[i]);
    g_new[k] = (rows.norm[i] - c.step_size * normalized) * c.decay;
  }
}

// The row update of the rows [first, first + len) of W (w_tile, any float dtype): back_n holds
// T = back(N) of those rows in fp32 on entry and v' on exit; gamma their gamma_i.
void gradnorm_update_rows(at::Tensor& w_tile, at::Tensor& back_n, const at::Tensor& gamma,
                          int64_t first, const GradNormRows& rows, const AdamCoeffs& c) {
  const int64_t len = w_tile.size(0);
  const auto f32 = back_n.options();
  at::Tensor a = at::empty({len, 1}, f32), g_new = at::empty({len}, f32);
  gradnorm_row_scalars(gamma.data_ptr<float>(), first, len, rows, c, a.data_ptr<float>(),
                       g_new.data_ptr<float>());
  back_n.mul_(-c.update_scale).addcmul_(a, w_tile);  // v' = a_i W - us T
  const at::Tensor norm = at::linalg_vector_norm(back_n, 2, {1}, /*keepdim=*/false, at::kFloat);
  back_n.mul_((g_new / norm).unsqueeze(1));
  w_tile.copy_(back_n);  // rounded once to W's dtype
  at::Tensor(at::from_blob(rows.scale + first, {len}, f32)).copy_(g_new);
  at::Tensor(at::from_blob(rows.norm + first, {len}, f32)).copy_(norm);
}

// gamma of the tile: sum_j G_ij W_ij over the tile's columns, by rows; `scratch` (room for the
// tile) holds the products.
at::Tensor row_sums_of_products(const at::Tensor& g32, const at::Tensor& w_tile,
                                const at::Tensor& scratch_buf) {
  at::Tensor products = contiguous_view(scratch_buf, g32.size(0), g32.size(1));
  at::mul_out(products, g32, w_tile);
  return products.sum(1);
}

void gradnorm_right(at::Tensor& param, const at::Tensor& grad, const at::Tensor& basis,
                    const StepState& state, const GradNormRows& rows,
                    const StepGeometry& g, const AdamCoeffs& c) {
  project_adam_tiles(grad, basis, state, g, c, /*need_back_buf=*/true,
                     [&](int64_t start, int64_t len, at::Tensor& n_tile, at::Tensor& back_buf,
                         const at::Tensor& g32) {
                       at::Tensor w_tile = param.narrow(0, start, len);
                       const at::Tensor gamma = row_sums_of_products(g32, w_tile, back_buf);
                       at::Tensor t = contiguous_view(back_buf, len, g.n);
                       at::mm_out(t, n_tile, basis);  // (len x r) @ (r x n)
                       gradnorm_update_rows(w_tile, t, gamma, start, rows, c);
                     });
}

void gradnorm_left(at::Tensor& param, const at::Tensor& grad, const at::Tensor& basis,
                   const StepState& state, const GradNormRows& rows,
                   const StepGeometry& g, const AdamCoeffs& c) {
  const auto f32 = grad.options().dtype(at::kFloat);
  const LineTiles columns = step_tiles(g.n, g.m, g.r);
  at::Tensor normalized = at::empty({g.r, g.n}, f32);
  at::Tensor gamma_parts = at::empty({columns.tiles, g.m}, f32);
  project_adam_tiles(grad, basis, state, g, c, /*need_back_buf=*/true,
                     [&](int64_t start, int64_t len, at::Tensor& n_tile, at::Tensor& back_buf,
                         const at::Tensor& g32) {
                       normalized.narrow(1, start, len).copy_(n_tile);
                       // project_adam_tiles cuts the columns as `columns` does: find the tile
                       int64_t tile = 0;
                       while (columns.start(tile) != start) ++tile;
                       gamma_parts[tile].copy_(
                           row_sums_of_products(g32, param.narrow(1, start, len), back_buf));
                     });
  const int64_t threads = at::get_num_threads();
  const int64_t per_tile = std::min((int64_t{1} << 18) / g.n + 1, (g.m + threads - 1) / threads);
  const LineTiles row_split = balanced_tiles(g.m, std::max<int64_t>(1, per_tile));
  const float* parts = gamma_parts.data_ptr<float>();
  parallel_tiles(row_split.tiles, [&](int64_t begin, int64_t end) {
    at::Tensor t_buf = at::empty({row_split.max_length() * g.n}, f32);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t start = row_split.start(tile), len = row_split.length(tile);
      at::Tensor gamma = at::zeros({len}, f32);
      float* gamma_ptr = gamma.data_ptr<float>();
      for (int64_t part = 0; part < columns.tiles; ++part) {  // a fixed order
        for (int64_t k = 0; k < len; ++k) gamma_ptr[k] += parts[part * g.m + start + k];
      }
      at::Tensor t = contiguous_view(t_buf, len, g.n);
      at::mm_out(t, basis.narrow(0, start, len), normalized);  // (len x r) @ (r x n)
      at::Tensor w_tile = param.narrow(0, start, len);
      gradnorm_update_rows(w_tile, t, gamma, start, rows, c);
    }
  });
}

void fused_gradnorm_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& proj,
                             at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& row_scale,
                             at::Tensor& row_norm, at::Tensor& scale_exp_avg,
                             at::Tensor& scale_exp_avg_sq, double lr, double beta1, double beta2,
                             double eps, double weight_decay, double scale, int64_t step,
                             const std::optional<at::Tensor>& proj_scales,
                             const std::optional<at::Tensor>& proj_zeros,
                             int64_t proj_group_size, int64_t seed,
                             const std::optional<at::Tensor>& exp_avg_scales,
                             const std::optional<at::Tensor>& exp_avg_sq_scales,
                             int64_t state_block_size) {
  const StepGeometry g = check_fused_gradnorm_step(
      param, grad, proj, exp_avg, exp_avg_sq, row_scale, row_norm, scale_exp_avg,
      scale_exp_avg_sq, beta1, beta2, eps, step, proj_scales, proj_zeros, proj_group_size, seed,
      exp_avg_scales, exp_avg_sq_scales, state_block_size);
  LOWRANK_CHECK_VALUE(param.device().is_cpu(), "param: expected a CPU tensor, got ", param.device());
  const AdamCoeffs c = make_adam_coeffs(lr, beta1, beta2, eps, weight_decay, scale, step, seed);
  const at::Tensor basis = fp32_basis(proj, g, proj_scales, proj_zeros, proj_group_size);
  const GradNormRows rows{row_scale.data_ptr<float>(), row_norm.data_ptr<float>(),
                          scale_exp_avg.data_ptr<float>(), scale_exp_avg_sq.data_ptr<float>()};
  const StepState state{exp_avg, exp_avg_sq, exp_avg_scales.value_or(at::Tensor()),
                        exp_avg_sq_scales.value_or(at::Tensor()), state_block_size};
  if (g.right) {
    gradnorm_right(param, grad, basis, state, rows, g, c);
  } else {
    gradnorm_left(param, grad, basis, state, rows, g, c);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("fused_galore_step", &fused_galore_step_cpu);
  m.impl("fused_gradnorm_step", &fused_gradnorm_step_cpu);
}

}  // namespace lowrank
