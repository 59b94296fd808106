// Building blocks shared by the CPU forward and backward: tile sizes, row
// loads and stores with dtype conversion, the score rule applied to a row of
// scores and the softmax row operations with a vectorised exp. Matrix
// products on tiles, and the packing of their right-hand operands, are in
// tile_gemm.h.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../flash_params.h"
#include "../score_rule.h"
#include "../tensor.h"

// Width of the vectors the inner loops are written for: setup.py compiles
// the CPU code for the build machine's vector units (AVX2 + FMA on most x86,
// plus AVX-512 where present: 64-byte vectors then, which on a Zen 5 EPYC,
// whose FMA units are 512 bits wide, doubled the tile products' throughput).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

namespace flash_attn_ext::cpu {

// Accumulation type: fp64 inputs (gradcheck) accumulate in fp64, the rest in fp32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls fn(scalar_t{}) for the element type of `dtype` (checks.cpp has
// already rejected the others).
template <typename Fn>
void dispatch_dtype(ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarType::Half: return fn(c10::Half{});
    case ScalarType::BFloat16: return fn(c10::BFloat16{});
    case ScalarType::Float: return fn(float{});
    case ScalarType::Double: return fn(double{});
    default: fail("flash_attn_ext: the CPU kernels do not take ", dtype_name(dtype));
  }
}

// Tile sizes: a thread's Q, K, V and score tiles stay in L2.
constexpr int kBlockM = 64;
constexpr int kBlockN = 128;

// exp(x) for float without libm, written so compilers vectorise the loops
// that call it: 2^(x log2 e) split into an integer power of two (built in the
// exponent bits) and a degree-6 polynomial on [-0.5, 0.5] (relative error
// ~2e-7). exp(-inf) and anything below float's range give exactly 0, which
// masking relies on. The clamp is written with comparisons, not std::fmin /
// std::fmax: without -ffast-math those are libm calls (NaN rules differ from
// the min/max instructions) and the calling loops would not vectorise. A NaN
// argument still gives NaN.
// 2^f for f in [-0.5, 0.5]: degree-6 polynomial, Horner form. T is float or
// a vector of floats (scalar operands broadcast).
template <typename T>
inline T exp2_poly(T f) {
  T p = f * 1.5403530393381606e-4f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  return p * f + 1.f;
}

inline float exp_approx(float x) {
  float t = x * 1.4426950408889634f;
  t = t > 127.f ? 127.f : t;
  t = t < -127.f ? -127.f : t;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (t + magic) - magic;
  const float f = t - n;
  const float p = exp2_poly(f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

// Row operations of the softmax, written on GCC vector types for float: left
// to the auto-vectoriser (even under `omp simd`) the exp loop came out scalar
// with branches once inlined into the kernels, and cost more than the matrix
// products. The double versions (gradcheck) stay plain loops.
namespace vec_detail {
typedef float vfloat __attribute__((vector_size(kVectorBytes)));
typedef int32_t vint __attribute__((vector_size(kVectorBytes)));
constexpr int kFloatLanes = kVectorBytes / sizeof(float);

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// exp_approx on a vector for x < 88 (the kernels only exponentiate scores
// minus their max or their log-sum-exp, so x <= 0 up to rounding), in fewer
// steps than the scalar version: no clamps, since below float's range the
// final select gives exactly 0 whatever garbage n became (-inf included); and
// n as an integer is read from the bits of t + 1.5 * 2^23, whose low mantissa
// bits hold it, instead of a float -> int conversion. A NaN gives NaN.
inline vfloat exp(vfloat x) {
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat t = x * 1.4426950408889634f;
  const vfloat y = t + magic;
  const vfloat f = t - (y - magic);
  const vfloat p = exp2_poly(f);
  vint y_bits;
  std::memcpy(&y_bits, &y, sizeof(y_bits));
  // y's bits are those of magic (0x4B400000) plus n: 2^n has bits (n + 127) << 23.
  const vint bits = (y_bits + (127 - 0x4B400000)) << 23;
  vfloat two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.f ? vfloat{} : p * two_n;
}
}  // namespace vec_detail

// max over row[0:n] (-inf for n == 0).
template <typename acc>
acc row_max(const acc* row, int n) {
  acc m = -std::numeric_limits<acc>::infinity();
  for (int c = 0; c < n; ++c) m = std::max(m, row[c]);
  return m;
}
inline float row_max(const float* row, int n) {
  using namespace vec_detail;
  constexpr int VL = kFloatLanes;
  vfloat m = vfloat{} - std::numeric_limits<float>::infinity();
  int c = 0;
  for (; c + VL <= n; c += VL) {
    const vfloat x = load(row + c);
    m = x > m ? x : m;
  }
  float r = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < VL; ++l) r = std::max(r, m[l]);
  for (; c < n; ++c) r = std::max(r, row[c]);
  return r;
}

// row[c] = exp(row[c] - ref) in place; returns the sum of the new values.
template <typename acc>
acc exp_row_sum(acc* row, int n, acc ref) {
  acc sum = 0;
  for (int c = 0; c < n; ++c) {
    row[c] = exp_approx(row[c] - ref);
    sum += row[c];
  }
  return sum;
}
inline float exp_row_sum(float* row, int n, float ref) {
  using namespace vec_detail;
  constexpr int VL = kFloatLanes;
  vfloat sum = {};
  int c = 0;
  for (; c + VL <= n; c += VL) {
    const vfloat e = vec_detail::exp(load(row + c) - ref);
    store(row + c, e);
    sum += e;
  }
  float r = 0;
  for (int l = 0; l < VL; ++l) r += sum[l];
  for (; c < n; ++c) {
    row[c] = exp_approx(row[c] - ref);
    r += row[c];
  }
  return r;
}

// row[c] = exp((row[c] - lse) - residual) in place: the backward's P from
// the saved log-sum-exp, in two parts (see FlashFwdParams::lse_residual) so
// that rows with a large |lse| keep their normalisation.
template <typename acc>
void exp_row(acc* row, int n, acc lse, acc residual) {
  for (int c = 0; c < n; ++c) row[c] = exp_approx((row[c] - lse) - residual);
}
inline void exp_row(float* row, int n, float lse, float residual) {
  using namespace vec_detail;
  constexpr int VL = kFloatLanes;
  int c = 0;
  for (; c + VL <= n; c += VL) store(row + c, vec_detail::exp((load(row + c) - lse) - residual));
  for (; c < n; ++c) row[c] = exp_approx((row[c] - lse) - residual);
}

// Element conversion to the accumulation type. bf16 -> float is the 16 bits
// moved to the top of the word; written out (rather than c10's operator
// float) so that the loops calling it vectorise to a widen + shift.
template <typename scalar_t>
inline acc_t<scalar_t> to_acc(scalar_t x) {
  return static_cast<acc_t<scalar_t>>(x);
}
template <>
inline float to_acc<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Copies `rows` rows of one head (row stride in elements, D contiguous) into a
// dense rows x D buffer of the accumulation type, times `mul` (the kernels
// load Q pre-multiplied by the softmax scale: the score product then needs
// no scaling pass).
template <typename scalar_t>
void load_rows(const scalar_t* src, int64_t row_stride, int rows, int D, acc_t<scalar_t>* dst,
               acc_t<scalar_t> mul = 1) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t<scalar_t>* d = dst + static_cast<int64_t>(r) * D;
#pragma omp simd
    for (int c = 0; c < D; ++c) d[c] = to_acc(s[c]) * mul;
  }
}

template <typename scalar_t>
void store_rows(const acc_t<scalar_t>* src, int rows, int D, scalar_t* dst, int64_t row_stride) {
  for (int r = 0; r < rows; ++r) {
    const acc_t<scalar_t>* s = src + static_cast<int64_t>(r) * D;
    scalar_t* d = dst + r * row_stride;
    for (int c = 0; c < D; ++c) d[c] = static_cast<scalar_t>(s[c]);
  }
}

// The score rule (../score_rule.h) in the CPU's units: natural log, scores
// arriving scaled (load_rows multiplies Q by the scale). One kernel serves
// calls with and without a bias; rule.visit picks the form per row. kMods:
// the kernel instantiation for calls with softcap, ALiBi or dropout
// (flash::has_score_mods), all three compiled in and tested at run time:
// the CPU keeps one variant, the CUDA kernels one per feature.
template <typename scalar_t, bool kMods>
using CpuScoreRule = flash::ScoreRuleAnyBias<acc_t<scalar_t>, scalar_t, flash::ScoreUnits::kNaturalPrescaled,
                                             kMods ? flash::kAllFeatures : flash::kNoFeatures>;

// Applies the score rule (one of CpuScoreRule's forms) to one row of a score
// tile in place: the row holds scale * q.k for keys [col0, col0 + cols) of
// query `row`. `masked` is false when the whole tile is visible (the common
// case: the mask step is skipped).
template <typename Rule, typename acc>
void apply_score_rule(const Rule& rule, acc* s, int cols, int row, int col0, bool masked) {
  const typename Rule::Row r = rule.row(row);
  if constexpr (!Rule::kScaleOnly) {
    const auto bias = r.bias_run(col0);
    for (int c = 0; c < cols; ++c) s[c] = rule.logit(s[c], row, col0 + c, Rule::kHasBias ? bias[c] : acc(0));
  }
  if (masked) {
    for (int c = 0; c < cols; ++c) s[c] = r.masked(s[c], col0 + c);
  }
}

// apply_score_rule that also writes, for the backward, softcap's derivative
// factor of each score (dsoftcap[c], score_rule.h); for rules with kMods.
template <typename Rule, typename acc>
void apply_score_rule(const Rule& rule, acc* s, acc* dsoftcap, int cols, int row, int col0, bool masked) {
  const typename Rule::Row r = rule.row(row);
  const auto bias = r.bias_run(col0);
  for (int c = 0; c < cols; ++c) s[c] = rule.logit(s[c], row, col0 + c, Rule::kHasBias ? bias[c] : acc(0), dsoftcap[c]);
  if (masked) {
    for (int c = 0; c < cols; ++c) s[c] = r.masked(s[c], col0 + c);
  }
}

// Dropout's factor of each key [col0, col0 + cols) of query `row`
// (../dropout.h, the same mask as the CUDA kernels'): `scale` (1 / (1 - p),
// in the accumulation type) where kept, 0 where dropped.
template <typename acc>
void dropout_factors(const flash::Dropout& dropout, acc* factor, int row, int col0, int cols, acc scale) {
  dropout.for_row(row, col0, col0 + cols, [&](int col, bool kept) { factor[col - col0] = kept ? scale : acc(0); });
}

// The forward's dropout on one row of probabilities, after the softmax has
// summed them: kept P / (1 - p), dropped 0. `factor` is scratch for a row.
template <typename acc>
void apply_dropout_row(const flash::Dropout& dropout, acc* row, acc* factor, int q, int col0, int cols, acc scale) {
  dropout_factors(dropout, factor, q, col0, cols, scale);
#pragma omp simd
  for (int c = 0; c < cols; ++c) row[c] *= factor[c];
}

}  // namespace flash_attn_ext::cpu
