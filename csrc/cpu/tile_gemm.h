// Matrix products on the small dense tiles of the CPU kernels. A BLAS call
// per tile costs a dispatcher round trip and, inside parallel_for, nested
// thread pools that spin against each other; these loops run on the calling
// thread only.
//
// The micro-kernel keeps a block of MR = 6 rows x 2 vectors of C in registers
// (12 accumulators, + 2 for the row of B + 1 broadcast = 15 of the 16 AVX2
// registers). Each step of the K loop loads one row of B (2 vectors) and does
// 12 independent FMAs: enough to cover the FMA latency on both pipes (Zen 3
// needs 8 in flight, Intel cores 8-10). The 4 x 2 block used before ran at
// ~85 GFLOP/s on a tile of 64x128x64 vs ~95 for 6 x 2, and writing C back
// element by element (as it did) cost another third.
//
// There is no alpha/beta: C is either overwritten or accumulated into. With
// a scalar alpha, GCC hoisted its broadcast out of the row loop and kept it
// in a 16th vector register, which spilled one row of B to the stack inside
// the K loop (a store and six reloads per step). Callers fold scale factors
// into an operand or into the final store instead.
//
// Built with AVX-512 (kVectorBytes = 64) the same 6 x 2 block uses 15 of the
// 32 vector registers, with panels of 32 floats; on a Zen 5 EPYC core it ran
// at ~220 GFLOP/s on the forward's 64x128x64 tiles vs ~113 with AVX2.
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu_tile.h"

namespace flash_attn_ext::cpu {
namespace gemm_detail {

constexpr int kMR = 6;

// C[0:MR, 0:NV*VL] (+)= op(A)[0:MR, :] * B[:, 0:NV*VL].
template <int MR, int NV, bool kTransA, bool kAccumulate, typename T>
inline __attribute__((always_inline)) void micro_tile(int K, const T* A, int lda, const T* B, int ldb, T* C,
                                                      int ldc) {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  constexpr int VL = kVectorBytes / sizeof(T);
  vec acc[MR][NV] = {};
  for (int p = 0; p < K; ++p) {
    const T* b_row = B + static_cast<int64_t>(p) * ldb;
    vec b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], b_row + v * VL, sizeof(vec));
    for (int r = 0; r < MR; ++r) {
      // Transposed A is stored K x M: the MR values of a step are adjacent.
      const T a = kTransA ? A[static_cast<int64_t>(p) * lda + r] : A[static_cast<int64_t>(r) * lda + p];
      for (int v = 0; v < NV; ++v) acc[r][v] += b[v] * a;
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      T* c = C + static_cast<int64_t>(r) * ldc + v * VL;
      vec x = acc[r][v];
      if (kAccumulate) {  // otherwise C is never read (it may be uninitialised)
        vec old;
        std::memcpy(&old, c, sizeof(vec));
        x += old;
      }
      std::memcpy(c, &x, sizeof(vec));
    }
  }
}

// One panel of NV vectors of columns over all M rows: full 6-row blocks, then
// one block of the remaining 1..5 rows (a template per count, so every block
// keeps its accumulators in registers).
template <int NV, bool kTransA, bool kAccumulate, typename T>
void column_panel(int M, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc) {
  auto a_rows = [&](int i0) { return kTransA ? A + i0 : A + static_cast<int64_t>(i0) * lda; };
  int i0 = 0;
  for (; i0 + kMR <= M; i0 += kMR) {
    micro_tile<kMR, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, C + static_cast<int64_t>(i0) * ldc, ldc);
  }
  T* c = C + static_cast<int64_t>(i0) * ldc;
  switch (M - i0) {
    case 5: micro_tile<5, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, c, ldc); break;
    case 4: micro_tile<4, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, c, ldc); break;
    case 3: micro_tile<3, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, c, ldc); break;
    case 2: micro_tile<2, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, c, ldc); break;
    case 1: micro_tile<1, NV, kTransA, kAccumulate>(K, a_rows(i0), lda, B, ldb, c, ldc); break;
    default: break;
  }
}

}  // namespace gemm_detail

// Columns of B are read in panels of kPanelWidth (2 vectors, the micro-tile's
// width). Panel j (columns [j W, j W + W)) starts at B + j * panel_stride and
// has row stride ldb. A row-major B is the case panel_stride = W; a packed B
// (see pack_* in cpu_tile.h) has ldb = W, each panel a contiguous K x W block:
// then the K rows a micro-tile streams are adjacent lines instead of lines
// one B row apart, which on a tile of 64 x 128 x 64 with row strides of 512
// bytes gained 7-15% (the strided lines fall into few L1 sets and evict each
// other and the A rows).
template <typename T>
constexpr int kPanelWidth = 2 * kVectorBytes / static_cast<int>(sizeof(T));

// C (M x N, row stride ldc) = op(A) * B, or C += op(A) * B with kAccumulate,
// where B is K x N in panels as above and op(A) is A (M x K, row stride lda)
// or, with kTransA, the transpose of A stored as K x M (row stride lda).
// Without kAccumulate C is never read. Full panels go through the 6 x 2
// vector micro-tiles, a remaining half panel through 6 x 1, and the last
// columns narrower than a vector (head dims or key counts that are not
// multiples of 8) through a scalar loop.
template <bool kTransA, bool kAccumulate, typename T>
void tile_gemm_panels(int M, int N, int K, const T* A, int lda, const T* B, int ldb, int64_t panel_stride, T* C,
                      int ldc) {
  constexpr int VL = kVectorBytes / sizeof(T), W = kPanelWidth<T>;
  int j0 = 0;
  for (; j0 + W <= N; j0 += W) {
    gemm_detail::column_panel<2, kTransA, kAccumulate>(M, K, A, lda, B + (j0 / W) * panel_stride, ldb, C + j0, ldc);
  }
  const T* b_edge = B + (j0 / W) * panel_stride;  // the partial last panel, from its first column
  int e = 0;
  if (j0 + VL <= N) {
    gemm_detail::column_panel<1, kTransA, kAccumulate>(M, K, A, lda, b_edge, ldb, C + j0, ldc);
    e = VL;
  }
  for (int i = 0; i < M && j0 + e < N; ++i) {
    for (int j = e; j < N - j0; ++j) {
      T sum = 0;
      for (int p = 0; p < K; ++p) {
        const T a = kTransA ? A[static_cast<int64_t>(p) * lda + i] : A[static_cast<int64_t>(i) * lda + p];
        sum += a * b_edge[static_cast<int64_t>(p) * ldb + j];
      }
      T* c = C + static_cast<int64_t>(i) * ldc + j0 + j;
      *c = kAccumulate ? *c + sum : sum;
    }
  }
}

// B row-major (K x N, row stride ldb).
template <bool kTransA, bool kAccumulate, typename T>
void tile_gemm(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc) {
  tile_gemm_panels<kTransA, kAccumulate>(M, N, K, A, lda, B, ldb, kPanelWidth<T>, C, ldc);
}

// B packed: panels of K x kPanelWidth contiguous values, panel_stride apart.
template <bool kTransA, bool kAccumulate, typename T>
void tile_gemm_packed(int M, int N, int K, const T* A, int lda, const T* B, int64_t panel_stride, T* C, int ldc) {
  tile_gemm_panels<kTransA, kAccumulate>(M, N, K, A, lda, B, kPanelWidth<T>, panel_stride, C, ldc);
}

// Packs `rows` rows of one head (rows x D, row stride row_stride) as the B
// operand "these rows" (K = rows, N = D): panel j holds columns [j W, j W + W)
// as rows x W values at dst + j * panel_stride (panel_stride >= rows * W).
// Columns past D are zero. Values are multiplied by `mul`.
template <typename scalar_t>
void pack_rows(const scalar_t* src, int64_t row_stride, int rows, int D, acc_t<scalar_t>* dst, int64_t panel_stride,
               acc_t<scalar_t> mul = 1) {
  using acc = acc_t<scalar_t>;
  constexpr int W = kPanelWidth<acc>;
  for (int j = 0; j * W < D; ++j) {
    const int width = std::min(W, D - j * W);
    acc* panel = dst + j * panel_stride;
    for (int r = 0; r < rows; ++r) {
      const scalar_t* s = src + r * row_stride + j * W;
      acc* d = panel + static_cast<int64_t>(r) * W;
      for (int w = 0; w < width; ++w) d[w] = to_acc(s[w]) * mul;
      for (int w = width; w < W; ++w) d[w] = 0;
    }
  }
}

// Packs the transpose of `rows` rows of one head as the B operand (K = D,
// N = rows), e.g. K^T for S = Q K^T: panel j holds rows [j W, j W + W) as
// D x W values (one key per lane) at dst + j * D * W. Rows past `rows`, up
// to the next multiple of W, are zero.
template <typename scalar_t>
void pack_rows_transposed(const scalar_t* src, int64_t row_stride, int rows, int D, acc_t<scalar_t>* dst) {
  using acc = acc_t<scalar_t>;
  constexpr int W = kPanelWidth<acc>;
  for (int j = 0; j * W < rows; ++j) {
    acc* panel = dst + static_cast<int64_t>(j) * D * W;
    for (int w = 0; w < W; ++w) {
      const int r = j * W + w;
      if (r < rows) {
        const scalar_t* s = src + r * row_stride;
        for (int d = 0; d < D; ++d) panel[d * W + w] = to_acc(s[d]);
      } else {
        for (int d = 0; d < D; ++d) panel[d * W + w] = 0;
      }
    }
  }
}

}  // namespace flash_attn_ext::cpu
