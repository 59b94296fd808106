// Matrix products on the small dense tiles of the CPU kernels. A BLAS call
// per tile costs a dispatcher round trip and, inside at::parallel_for, nested
// thread pools that spin against each other; these loops run on the calling
// thread only. A block of 4 rows x 2 vectors of C stays in registers while
// the K loop streams a row of B per step (with AVX2, two 8-wide FMAs per row
// and step).
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu_tile.h"

namespace flash_attn_ext::cpu {

// C (M x N, row stride ldc) = beta * C + alpha * op(A) * B, where B is K x N
// (row stride ldb) and op(A) is A (M x K, row stride lda) or, with kTransA,
// the transpose of A stored as K x M (row stride lda). beta == 0 never reads C.
template <bool kTransA, typename T>
void tile_gemm(int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
                                   T* C, int ldc) {
  // Two native vectors per row of the C block.
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  constexpr int VL = kVectorBytes / sizeof(T), MR = 4, NR = 2 * VL;
  auto a_at = [&](int i, int p) {
    return kTransA ? A[static_cast<int64_t>(p) * lda + i] : A[static_cast<int64_t>(i) * lda + p];
  };
  auto store = [&](int i, int j, T value) {
    T* c = C + static_cast<int64_t>(i) * ldc + j;
    *c = beta == T(0) ? alpha * value : beta * *c + alpha * value;  // beta == 0 never reads C
  };
  for (int i0 = 0; i0 < M; i0 += MR) {
    const int mr = std::min(MR, M - i0);
    for (int j0 = 0; j0 < N; j0 += NR) {
      const int nr = std::min(NR, N - j0);
      if (mr == MR && nr == NR) {  // full block: 8 vector accumulators in registers
        vec acc[MR][2] = {};
        for (int p = 0; p < K; ++p) {
          const T* b = B + static_cast<int64_t>(p) * ldb + j0;
          vec b0, b1;
          std::memcpy(&b0, b, sizeof(vec));
          std::memcpy(&b1, b + VL, sizeof(vec));
          for (int r = 0; r < MR; ++r) {
            const T a = a_at(i0 + r, p);
            acc[r][0] += b0 * a;
            acc[r][1] += b1 * a;
          }
        }
        for (int r = 0; r < MR; ++r) {
          for (int c = 0; c < VL; ++c) {
            store(i0 + r, j0 + c, acc[r][0][c]);
            store(i0 + r, j0 + VL + c, acc[r][1][c]);
          }
        }
      } else {  // ragged edge of the tile
        T acc[MR][NR] = {};
        for (int p = 0; p < K; ++p) {
          const T* b = B + static_cast<int64_t>(p) * ldb + j0;
          for (int r = 0; r < mr; ++r) {
            const T a = a_at(i0 + r, p);
            for (int c = 0; c < nr; ++c) acc[r][c] += a * b[c];
          }
        }
        for (int r = 0; r < mr; ++r) {
          for (int c = 0; c < nr; ++c) store(i0 + r, j0 + c, acc[r][c]);
        }
      }
    }
  }
}

}  // namespace flash_attn_ext::cpu
