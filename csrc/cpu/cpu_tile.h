// Building blocks shared by the CPU forward and backward: per-thread tile
// buffers, row loads with dtype conversion, the score tile (scale, bias,
// mask) and a vectorisable exp. Matrix products on tiles are in tile_gemm.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../cuda/mask.cuh"
#include "../flash_params.h"

// Width of the vectors the inner loops are written for: setup.py compiles
// the CPU code for the build machine's vector units (AVX2 + FMA on most x86).
#if defined(__AVX2__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

namespace flash_attn_ext::cpu {

// Accumulation type: fp64 inputs (gradcheck) accumulate in fp64, the rest in fp32.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr at::ScalarType acc_dtype() {
  return std::is_same_v<scalar_t, double> ? at::kDouble : at::kFloat;
}

// Tile sizes: a thread's Q, K, V and score tiles stay in L2.
constexpr int kBlockM = 64;
constexpr int kBlockN = 128;

// exp(x) for float without libm, written so compilers vectorise the loops
// that call it: 2^(x log2 e) split into an integer power of two (built in the
// exponent bits) and a degree-6 polynomial on [-0.5, 0.5] (relative error
// ~2e-7). exp(-inf) and anything below float's range give exactly 0, which
// masking relies on.
inline float exp_approx(float x) {
  const float t = std::fmax(std::fmin(x * 1.4426950408889634f, 127.f), -127.f);
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (t + magic) - magic;
  const float f = t - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

// Copies `rows` rows of one head (row stride in elements, D contiguous) into a
// dense rows x D buffer of the accumulation type.
template <typename scalar_t>
void load_rows(const scalar_t* src, int64_t row_stride, int rows, int D, acc_t<scalar_t>* dst) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    acc_t<scalar_t>* d = dst + static_cast<int64_t>(r) * D;
    for (int c = 0; c < D; ++c) d[c] = static_cast<acc_t<scalar_t>>(s[c]);
  }
}

// The same rows transposed: dst is D x rows with row stride ld (>= rows),
// so that q.k^T becomes a product with a row-major right-hand side.
template <typename scalar_t>
void load_rows_transposed(const scalar_t* src, int64_t row_stride, int rows, int D, acc_t<scalar_t>* dst, int ld) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * row_stride;
    for (int c = 0; c < D; ++c) dst[static_cast<int64_t>(c) * ld + r] = static_cast<acc_t<scalar_t>>(s[c]);
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

// Turns the raw products q.k of a tile (rows x cols, dense) into scores in
// place: s = scale * q.k + bias, and -inf where the mask hides the key.
// row0/col0 place the tile in the (seqlen_q, seqlen_k) matrix.
template <typename scalar_t>
void finish_scores(acc_t<scalar_t>* s, int rows, int cols, int row0, int col0, const FlashFwdParams& p,
                   const scalar_t* bias_bh) {
  using acc = acc_t<scalar_t>;
  const acc scale = static_cast<acc>(p.softmax_scale);
  const flash::MaskGeometry mask(p);
  const bool masked = !mask.tile_fully_visible(row0, rows, col0, cols);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  for (int r = 0; r < rows; ++r) {
    acc* row = s + static_cast<int64_t>(r) * cols;
    for (int c = 0; c < cols; ++c) row[c] *= scale;
    if (bias_bh != nullptr) {
      const scalar_t* b = bias_bh + (row0 + r) * p.bias_row_stride + col0 * p.bias_col_stride;
      for (int c = 0; c < cols; ++c) row[c] += static_cast<acc>(b[c * p.bias_col_stride]);
    }
    if (masked) {
      const int begin = mask.key_begin(row0 + r) - col0, end = mask.key_end(row0 + r) - col0;
      for (int c = 0; c < cols; ++c) {
        if (c < begin || c >= end) row[c] = neg_inf;
      }
    }
  }
}

// Pointer to the (batch, head) slice of the expanded bias, or null.
template <typename scalar_t>
const scalar_t* bias_slice(const FlashFwdParams& p, int64_t b, int64_t h) {
  if (p.bias == nullptr) return nullptr;
  return static_cast<const scalar_t*>(p.bias) + b * p.bias_batch_stride + h * p.bias_head_stride;
}

}  // namespace flash_attn_ext::cpu
