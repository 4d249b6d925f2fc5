// CPU kernels of the Q-GaLore quantization ops (DESIGN.md §4.3-§4.4; formulas in
// csrc/include/lowrank/quant.h, random numbers in csrc/include/lowrank/philox.h):
//
//   philox_uniform   u[i] = tl.rand(seed, offsets[i])
//   quantize_int4    per group: s, z from min/max; q = clamp(round(x/s) + z, 0, 15), packed
//   dequantize_int4  x~ = s (q - z)
//   quantize_int8    as INT4 with 255 levels; stochastic: q = clamp(SR(x/s) + z, 0, 255) with
//                    u = philox_uniform(seed, row-major index)
//   dequantize_int8  x~ = s (q - z)
//
// Tiling: at::parallel_for over whole groups; each task reads its groups once (min/max, then
// codes from L1/L2). DRAM traffic: the input once, the codes once, scales and zeros once.
// The hot loops are cloned for AVX2 and may if-convert compares (csrc/cpu/cpu_clones.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "cpu_clones.h"
#ifdef LOWRANK_HAVE_AVX2_CLONES
#define LOWRANK_AVX2_KERNELS 1
#include <immintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lowrank/checks.h"
#include "quant_cpu.h"

namespace lowrank {

#ifdef LOWRANK_AVX2_KERNELS
namespace {

// High and low 32-bit words of a * b in 8 lanes (AVX2 multiplies only even lanes to 64 bits;
// vpmulld gives the low words in one instruction, cheaper than recombining them).
__attribute__((target("avx2"))) inline void mul_wide_u32x8(__m256i a, __m256i b, __m256i& high,
                                                            __m256i& low) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32));
  high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  low = _mm256_mullo_epi32(a, b);
}

// The ten round keys of a seed, broadcast once per call instead of once per round.
struct PhiloxKeys {
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
};

__attribute__((target("avx2"))) inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = _mm256_set1_epi32(static_cast<int>(k0));
    keys.k1[round] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return keys;
}

// u for the 8*V consecutive offsets starting at `first` (whose high word is `high_word` in every
// lane). V independent vectors go through each round together: one vector's round is a chain of
// dependent multiplies and xors, so interleaving hides their latency (measured on the CI's AMD
// EPYC: V = 1 2.8 ns per value, V = 4 1.55 ns with vpmulld).
template <int V>
__attribute__((target("avx2"))) inline void philox_uniform_x8(const PhiloxKeys& keys,
                                                              uint64_t first, __m256i high_word,
                                                              float* u) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + 8 * v)), lane);
    c1[v] = high_word;
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int v = 0; v < V; ++v) {
      __m256i high_b, low_b, high_a, low_a;
      mul_wide_u32x8(round_b, c2[v], high_b, low_b);
      mul_wide_u32x8(round_a, c0[v], high_a, low_a);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(high_b, c1[v]), keys.k0[round]);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(high_a, c3[v]), keys.k1[round]);
      c1[v] = low_b;
      c3[v] = low_a;
    }
  }
  const __m256 to_unit = _mm256_set1_ps(kUint31ToUnit);
  for (int v = 0; v < V; ++v) {
    const __m256i bits = _mm256_xor_si256(c0[v], _mm256_srai_epi32(c0[v], 31));  // ~x if < 0
    _mm256_storeu_ps(u + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(bits), to_unit));
  }
}

// dequantize_update_chunk 8 elements at a time: the same fp32 operations as the scalar loop
// (dequantize_code, apply_update; no FMA), with the group's min and max kept per lane — vminps
// and vmaxps compare exactly as the scalar `low < x ? low : x` does — and folded at the end. The
// compiler vectorizes the update but not that reduction (it would reorder it). The order matters
// only in a group holding NaN: the scalar loop forgets a NaN at the next element, the lanes at
// their next element, so such a group's range (and scale, zero) differs between the two — and
// from the reference's, which propagates NaN. Returns how many elements it did.
__attribute__((target("avx2"))) int64_t dequantize_update_avx2(const uint8_t* codes, GroupQuant p,
                                                                const AdamCoeffs& c, int64_t count,
                                                                float* back_n, float& lo,
                                                                float& hi) {
  const __m256 scale = _mm256_set1_ps(p.scale), zero = _mm256_set1_ps(p.zero);
  const __m256 decay = _mm256_set1_ps(c.decay), update_scale = _mm256_set1_ps(c.update_scale);
  __m256 low = _mm256_set1_ps(lo), high = _mm256_set1_ps(hi);
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k));
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    const __m256 w = _mm256_mul_ps(scale, _mm256_sub_ps(q, zero));
    const __m256 updated = _mm256_sub_ps(_mm256_mul_ps(decay, w),
                                         _mm256_mul_ps(update_scale, _mm256_loadu_ps(back_n + k)));
    _mm256_storeu_ps(back_n + k, updated);
    low = _mm256_min_ps(low, updated);
    high = _mm256_max_ps(high, updated);
  }
  alignas(32) float lows[8], highs[8];
  _mm256_store_ps(lows, low);
  _mm256_store_ps(highs, high);
  for (int lane = 0; lane < 8; ++lane) {
    lo = lo < lows[lane] ? lo : lows[lane];
    hi = hi > highs[lane] ? hi : highs[lane];
  }
  return k;
}

// philox_uniform (lowrank/philox.h) for a run of consecutive offsets, 32 and then 8 at a time:
// 4.5x the compiler's vectorisation, which keeps the 64-bit offsets in 64-bit lanes. Bit-equal
// (tested against tl.rand); the high offset word must be the same for the whole run (checked by
// the caller). Returns how many values it wrote; the caller does the rest.
__attribute__((target("avx2"))) int64_t philox_uniform_avx2(uint64_t seed, uint64_t first,
                                                             int64_t count, float* u) {
  const PhiloxKeys keys = philox_keys(seed);
  const __m256i high_word = _mm256_set1_epi32(static_cast<int>(first >> 32));
  int64_t k = 0;
  for (; k + 32 <= count; k += 32) philox_uniform_x8<4>(keys, first + k, high_word, u + k);
  for (; k + 8 <= count; k += 8) philox_uniform_x8<1>(keys, first + k, high_word, u + k);
  return k;
}

bool cpu_has_avx2() {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return has_avx2;
}

}  // namespace
#endif

void philox_uniform_chunk(uint64_t philox_seed, uint64_t first_offset, int64_t count, float* u) {
  int64_t done = 0;
#ifdef LOWRANK_AVX2_KERNELS
  const bool one_high_word = count > 0 && (first_offset >> 32) ==
                                              ((first_offset + count - 1) >> 32);
  if (cpu_has_avx2() && one_high_word) {
    done = philox_uniform_avx2(philox_seed, first_offset, count, u);
  }
#endif
  for (int64_t k = done; k < count; ++k) u[k] = philox_uniform(philox_seed, first_offset + k);
}

LOWRANK_CPU_CLONES void stochastic_round_chunk(const float* x, const float* u, int64_t count,
                                               GroupQuant p, uint8_t* codes) {
  for (int64_t k = 0; k < count; ++k) codes[k] = quantize_stochastic(x[k], u[k], p, kInt8MaxCode);
}

void dequantize_update_chunk(const uint8_t* codes, GroupQuant p, const AdamCoeffs& coeffs,
                             int64_t count, float* back_n, float& lo, float& hi) {
  const AdamCoeffs c = coeffs;  // a local copy: no aliasing with back_n
  int64_t done = 0;
#ifdef LOWRANK_AVX2_KERNELS
  if (cpu_has_avx2()) done = dequantize_update_avx2(codes, p, c, count, back_n, lo, hi);
#endif
  float low = lo, high = hi;
  for (int64_t k = done; k < count; ++k) {
    const float updated = apply_update(dequantize_code(codes[k], p), back_n[k], c);
    back_n[k] = updated;
    low = low < updated ? low : updated;
    high = high > updated ? high : updated;
  }
  lo = low;
  hi = high;
}

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales,
                               const at::Tensor& zeros, at::IntArrayRef shape,
                               int64_t group_size) {
  at::Tensor out = at::empty(shape, packed.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  // read-only inputs of any stride: dense copies when strided (basis-sized, once per call)
  const at::Tensor packed_c = packed.contiguous(), scales_c = scales.contiguous();
  const at::Tensor zeros_c = zeros.contiguous();
  const uint8_t* codes = packed_c.data_ptr<uint8_t>();
  const float* s = scales_c.data_ptr<float>();
  const float* z = zeros_c.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, num_groups(numel, group_size), 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const GroupQuant p{s[gi], z[gi]};
      const int64_t stop = std::min(numel, (gi + 1) * group_size);
      for (int64_t k = gi * group_size; k < stop; ++k) {
        dst[k] = dequantize_code(int4_code(codes, k), p);
      }
    }
  });
  return out;
}

namespace {

void check_quantize_input(const at::Tensor& x) {
  LOWRANK_CHECK_VALUE(is_float_dtype(x.scalar_type()),
                    "x: expected dtype float32, bfloat16 or float16, got ", x.scalar_type());
  LOWRANK_CHECK_VALUE(x.numel() >= 1, "x: expected at least one element");
  LOWRANK_CHECK_VALUE(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
}

at::Tensor philox_uniform_cpu(int64_t seed, const at::Tensor& offsets) {
  LOWRANK_CHECK_VALUE(seed >= 0, "seed: expected a value in [0, 2^63 - 1], got ", seed);
  LOWRANK_CHECK_VALUE(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
                    "offsets: expected dtype int64 or int32, got ", offsets.scalar_type());
  LOWRANK_CHECK_VALUE(offsets.device().is_cpu(), "offsets: expected a CPU tensor, got ",
                    offsets.device());
  const at::Tensor idx = offsets.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  // As tl.rand: an int32 offset is its 32 bits with a zero high word.
  if (idx.scalar_type() == at::kLong) {
    const int64_t* src = idx.data_ptr<int64_t>();
    at::parallel_for(0, idx.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) dst[i] = philox_uniform(key, static_cast<uint64_t>(src[i]));
    });
  } else {
    const int32_t* src = idx.data_ptr<int32_t>();
    at::parallel_for(0, idx.numel(), 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        dst[i] = philox_uniform(key, static_cast<uint64_t>(static_cast<uint32_t>(src[i])));
      }
    });
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& x,
                                                                 int64_t group_size) {
  check_quantize_input(x);
  check_group_size(group_size, "group_size", /*packed_int4=*/true);
  const at::Tensor src = x.contiguous();
  const int64_t numel = src.numel(), groups = num_groups(numel, group_size);
  const auto u8 = src.options().dtype(at::kByte), f32 = src.options().dtype(at::kFloat);
  at::Tensor packed = at::empty({(numel + 1) / 2}, u8);
  at::Tensor scales = at::empty({groups}, f32), zeros = at::empty({groups}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "quantize_int4",
                                  [&] {
    const scalar_t* xs = src.data_ptr<scalar_t>();
    uint8_t* out = packed.data_ptr<uint8_t>();
    at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t first = gi * group_size, len = std::min(group_size, numel - first);
        float lo, hi;
        group_min_max(xs + first, len, lo, hi);
        const GroupQuant p = group_quant_params(lo, hi, kInt4MaxCode);
        scales.data_ptr<float>()[gi] = p.scale;
        zeros.data_ptr<float>()[gi] = p.zero;
        // Groups have an even size, so each starts on a byte; an odd tail leaves a zero nibble.
        for (int64_t k = 0; k < len; k += 2) {
          const uint8_t low = quantize_nearest(static_cast<float>(xs[first + k]), p, kInt4MaxCode);
          const uint8_t high =
              k + 1 < len ? quantize_nearest(static_cast<float>(xs[first + k + 1]), p, kInt4MaxCode)
                          : uint8_t{0};
          out[(first + k) / 2] = pack_int4_pair(low, high);
        }
      }
    });
  });
  return {packed, scales, zeros};
}

int64_t checked_numel(at::IntArrayRef shape) {
  int64_t numel = 1;
  for (const int64_t d : shape) {
    LOWRANK_CHECK_VALUE(d >= 0, "shape: expected non-negative sizes, got ", shape);
    numel *= d;
  }
  LOWRANK_CHECK_VALUE(numel >= 1, "shape: expected at least one element, got ", shape);
  return numel;
}

at::Tensor dequantize_int4_entry(const at::Tensor& packed, const at::Tensor& scales,
                                 const at::Tensor& zeros, at::IntArrayRef shape,
                                 int64_t group_size) {
  check_uint8(packed, "packed", "two INT4 codes per byte");
  check_group_size(group_size, "group_size", /*packed_int4=*/true);
  const int64_t numel = checked_numel(shape);
  LOWRANK_CHECK_VALUE(packed.dim() == 1 && packed.size(0) == (numel + 1) / 2,
                    "packed: expected shape [", (numel + 1) / 2, "] (ceil(", numel,
                    " / 2) bytes for shape ", shape_str(shape), "), got ",
                    shape_str(packed.sizes()));
  LOWRANK_CHECK_VALUE(packed.device().is_cpu(), "packed: expected a CPU tensor, got ",
                    packed.device());
  check_group_params(scales, numel, group_size, packed.device(), "scales", "INT4 codes",
                     /*written=*/false);
  check_group_params(zeros, numel, group_size, packed.device(), "zeros", "INT4 codes",
                     /*written=*/false);
  return dequantize_int4_cpu(packed, scales, zeros, shape, group_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x,
                                                                 int64_t group_size,
                                                                 bool stochastic, int64_t seed) {
  check_quantize_input(x);
  check_group_size(group_size, "group_size", /*packed_int4=*/false);
  check_rounding_seed(seed);
  const at::Tensor src = x.contiguous();
  const int64_t numel = src.numel(), groups = num_groups(numel, group_size);
  at::Tensor codes = at::empty(src.sizes(), src.options().dtype(at::kByte));
  const auto f32 = src.options().dtype(at::kFloat);
  at::Tensor scales = at::empty({groups}, f32), zeros = at::empty({groups}, f32);
  const uint64_t philox_seed = rounding_philox_seed(seed, /*step=*/0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "quantize_int8",
                                  [&] {
    const scalar_t* xs = src.data_ptr<scalar_t>();
    uint8_t* out = codes.data_ptr<uint8_t>();
    at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t first = gi * group_size, len = std::min(group_size, numel - first);
        float lo, hi;
        group_min_max(xs + first, len, lo, hi);
        const GroupQuant p = group_quant_params(lo, hi, kInt8MaxCode);
        scales.data_ptr<float>()[gi] = p.scale;
        zeros.data_ptr<float>()[gi] = p.zero;
        if (stochastic) {
          stochastic_round_group(xs + first, len, p, philox_seed, first, out + first);
        } else {
          for (int64_t k = 0; k < len; ++k) {
            out[first + k] = quantize_nearest(static_cast<float>(xs[first + k]), p, kInt8MaxCode);
          }
        }
      }
    });
  });
  return {codes, scales, zeros};
}

at::Tensor dequantize_int8_cpu(const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& zeros, int64_t group_size) {
  check_uint8(codes, "codes", "INT8 codes");
  check_group_size(group_size, "group_size", /*packed_int4=*/false);
  LOWRANK_CHECK_VALUE(codes.numel() >= 1, "codes: expected at least one element");
  LOWRANK_CHECK_VALUE(codes.device().is_cpu(), "codes: expected a CPU tensor, got ",
                    codes.device());
  check_group_params(scales, codes.numel(), group_size, codes.device(), "scales", "INT8 codes",
                     /*written=*/false);
  check_group_params(zeros, codes.numel(), group_size, codes.device(), "zeros", "INT8 codes",
                     /*written=*/false);
  const at::Tensor src = codes.contiguous();
  const at::Tensor scales_c = scales.contiguous(), zeros_c = zeros.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kFloat));
  const int64_t numel = src.numel();
  const uint8_t* q = src.data_ptr<uint8_t>();
  const float* s = scales_c.data_ptr<float>();
  const float* z = zeros_c.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, num_groups(numel, group_size), 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const GroupQuant p{s[gi], z[gi]};
      const int64_t stop = std::min(numel, (gi + 1) * group_size);
      for (int64_t k = gi * group_size; k < stop; ++k) dst[k] = dequantize_code(q[k], p);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank, CPU, m) {
  m.impl("philox_uniform", &philox_uniform_cpu);
  m.impl("quantize_int4", &quantize_int4_cpu);
  m.impl("dequantize_int4", &dequantize_int4_entry);
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace lowrank
