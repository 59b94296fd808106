// Warp-level building blocks of the backward kernels: tile loads into padded
// shared memory and the four operand shapes the backward multiplies with
// (A and B from smem, transposed or not, or A straight from the fragments of
// a previous product). Every product is one warp computing a 16-row strip of
// m16n8k16 MMAs with fp32 accumulators.
//
// Accumulator fragment of a 16x8 tile (per lane, g = lane/4, t = lane%4):
//   c[0], c[1] at (row g,     cols 2t, 2t+1)
//   c[2], c[3] at (row g + 8, cols 2t, 2t+1)
#pragma once

#include "../flash_params.h"
#include "../seq_info.h"
#include "primitives.cuh"

namespace flash {

// Rows [row0, row0 + kRows) of a (nrows x kCols) row-major matrix into smem
// with row stride kLd; rows past nrows are zero-filled (src-size 0: the
// source is not read, so it needs no clamping).
//
// The copy count per thread is a compile-time constant and, when the threads
// tile whole rows, every thread keeps one 16-byte column and steps down the
// rows by a pointer increment. (A loop `for (i = tid; i < N; i += kNThreads)`
// has a run-time trip count: nvcc emits a rolled loop with a remainder,
// signed divisions and a 64-bit multiply per chunk -- ~120 instructions per
// tile that sat in the backward's main loop for every Q/dO tile.)
template <int kRows, int kCols, int kLd, int kNThreads, typename Element>
__device__ __forceinline__ void load_tile(Element* smem, const Element* gmem, int64_t row_stride, int row0, int nrows,
                                          int tid) {
  constexpr int kChunksPerRow = kCols / 8;  // 16-byte chunks
  if constexpr (kNThreads % kChunksPerRow == 0 && kRows % (kNThreads / kChunksPerRow) == 0) {
    constexpr int kRowStep = kNThreads / kChunksPerRow;
    const int r = tid / kChunksPerRow, c = tid % kChunksPerRow;
    const Element* src = gmem + (row0 + r) * row_stride + c * 8;
    const int64_t step = kRowStep * row_stride;
    Element* dst = smem + r * kLd + c * 8;
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      cp_async_16(dst + i * kRowStep * kLd, src, row0 + r + i * kRowStep < nrows);
      src += step;
    }
  } else {
    // Head dims 96 / 192: rows of 12 / 24 chunks do not tile the threads.
    constexpr int kTotal = kRows * kChunksPerRow;
#pragma unroll
    for (int i = 0; i < (kTotal + kNThreads - 1) / kNThreads; ++i) {
      const int idx = tid + i * kNThreads;
      if (kTotal % kNThreads == 0 || idx < kTotal) {
        const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
        const bool pred = row0 + r < nrows;
        const Element* src = gmem + (pred ? (row0 + r) * row_stride + c * 8 : 0);
        cp_async_16(smem + r * kLd + c * 8, src, pred);
      }
    }
  }
}

// kN floats gmem[row0 .. row0 + kN) (zero past n) into smem; 4-byte copies
// because rows of LSE / D have no alignment guarantee. Compile-time trip
// count for the same reason as load_tile (kN <= kNThreads: one guarded copy).
template <int kN, int kNThreads>
__device__ __forceinline__ void load_vec(float* smem, const float* gmem, int row0, int n, int tid) {
#pragma unroll
  for (int it = 0; it < (kN + kNThreads - 1) / kNThreads; ++it) {
    const int i = tid + it * kNThreads;
    if (kN % kNThreads == 0 || i < kN) {
      const bool pred = row0 + i < n;
      const float* src = gmem + (pred ? row0 + i : 0);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem + i)), "l"(src),
                   "r"(pred ? 4 : 0));
    }
  }
}

// All four products walk the same schedule: k-slices s of 16, and per slice
// kN/16 B fragments (one ldmatrix.x4 = two n8 tiles each). The shared-memory
// loads are issued ahead of the MMAs that consume them -- A one slice ahead,
// B kBDepth loads ahead through a small register ring -- because the asm
// statements keep program order and a warp would otherwise wait out the
// ldmatrix latency before every MMA pair (only 8 warps share an SM here).
constexpr int kBDepth = 4;

// Operand sources. Each loads the x4 fragment for slice s (and B column pair np).
template <int kLd, typename Element>
struct SmemRowA {  // A (16 x kK) row-major in smem
  const Element* ptr;
  __device__ __forceinline__ SmemRowA(const Element* base, int lane)
      : ptr(base + (lane % 8 + 8 * ((lane / 8) % 2)) * kLd + 8 * (lane / 16)) {}
  __device__ __forceinline__ void load(uint32_t (&r)[4], int s) const { ldmatrix_x4(r, ptr + s * 16); }
};
template <int kLd, typename Element>
struct SmemColA {  // A stored transposed, At (kK x 16) row-major in smem
  const Element* ptr;
  __device__ __forceinline__ SmemColA(const Element* base, int lane)
      : ptr(base + (lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) {}
  __device__ __forceinline__ void load(uint32_t (&r)[4], int s) const { ldmatrix_x4_trans(r, ptr + s * 16 * kLd); }
};
template <int kLd, typename Element>
struct SmemNkB {  // B given as Bt (kN x kK) row-major in smem (e.g. K for Q K^T)
  const Element* ptr;
  __device__ __forceinline__ SmemNkB(const Element* base, int lane)
      : ptr(base + (lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) {}
  __device__ __forceinline__ void load(uint32_t (&r)[4], int s, int np) const {
    ldmatrix_x4(r, ptr + np * 16 * kLd + s * 16);
  }
};
template <int kLd, typename Element>
struct SmemKnB {  // B (kK x kN) row-major in smem (e.g. V for P V), read transposed
  const Element* ptr;
  __device__ __forceinline__ SmemKnB(const Element* base, int lane)
      : ptr(base + (lane % 8 + 8 * ((lane / 8) % 2)) * kLd + 8 * (lane / 16)) {}
  __device__ __forceinline__ void load(uint32_t (&r)[4], int s, int np) const {
    ldmatrix_x4_trans(r, ptr + s * 16 * kLd + np * 16);
  }
};

// acc (16 x kN) += A (16 x kK) * B (kK x kN); A from smem via ASrc, B via BSrc.
template <int kK, int kN, typename Element, typename ASrc, typename BSrc>
__device__ __forceinline__ void warp_gemm(float (&acc)[kN / 8][4], const ASrc& asrc, const BSrc& bsrc) {
  constexpr int kNp = kN / 16, kSteps = (kK / 16) * kNp;
  constexpr int kDepth = kSteps < kBDepth ? kSteps : kBDepth;
  uint32_t a[2][4], b[kDepth][4];
  asrc.load(a[0], 0);
#pragma unroll
  for (int i = 0; i < kDepth; ++i) bsrc.load(b[i], i / kNp, i % kNp);
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int s = i / kNp, np = i % kNp;
    if (np == 0 && s + 1 < kK / 16) asrc.load(a[(s + 1) % 2], s + 1);
    const uint32_t b0[2] = {b[i % kDepth][0], b[i % kDepth][1]}, b1[2] = {b[i % kDepth][2], b[i % kDepth][3]};
    if (i + kDepth < kSteps) bsrc.load(b[i % kDepth], (i + kDepth) / kNp, (i + kDepth) % kNp);
    mma_m16n8k16<Element>(acc[2 * np], a[s % 2], b0);
    mma_m16n8k16<Element>(acc[2 * np + 1], a[s % 2], b1);
  }
}

// Same with A (16 x kK) given as the fp32 accumulator fragments of an earlier
// product, rounded to Element here: fragments of n8 tiles 2s, 2s+1 are exactly
// the A fragment of k-slice s.
template <int kK, int kN, typename Element, typename BSrc>
__device__ __forceinline__ void warp_gemm_rega(float (&acc)[kN / 8][4], const float (&a_frag)[kK / 8][4],
                                               const BSrc& bsrc) {
  constexpr int kNp = kN / 16, kSteps = (kK / 16) * kNp;
  constexpr int kDepth = kSteps < kBDepth ? kSteps : kBDepth;
  uint32_t b[kDepth][4];
#pragma unroll
  for (int i = 0; i < kDepth; ++i) bsrc.load(b[i], i / kNp, i % kNp);
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int s = i / kNp, np = i % kNp;
    const uint32_t a[4] = {pack2<Element>(a_frag[2 * s][0], a_frag[2 * s][1]),
                           pack2<Element>(a_frag[2 * s][2], a_frag[2 * s][3]),
                           pack2<Element>(a_frag[2 * s + 1][0], a_frag[2 * s + 1][1]),
                           pack2<Element>(a_frag[2 * s + 1][2], a_frag[2 * s + 1][3])};
    const uint32_t b0[2] = {b[i % kDepth][0], b[i % kDepth][1]}, b1[2] = {b[i % kDepth][2], b[i % kDepth][3]};
    if (i + kDepth < kSteps) bsrc.load(b[i % kDepth], (i + kDepth) / kNp, (i + kDepth) % kNp);
    mma_m16n8k16<Element>(acc[2 * np], a, b0);
    mma_m16n8k16<Element>(acc[2 * np + 1], a, b1);
  }
}

// The shapes the kernels use, named by where the operands live.
// acc (16 x kN) += A (16 x kK, smem row-major) * Bt^T, Bt (kN x kK, smem row-major).
template <int kK, int kN, int kLdA, int kLdB, typename Element>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[kN / 8][4], const Element* a_smem, const Element* bt_smem,
                                              int lane) {
  warp_gemm<kK, kN, Element>(acc, SmemRowA<kLdA, Element>(a_smem, lane), SmemNkB<kLdB, Element>(bt_smem, lane));
}
// acc (16 x kN) += A (fragments) * B (kK x kN, smem row-major).
template <int kK, int kN, int kLdB, typename Element>
__device__ __forceinline__ void warp_gemm_regA_b(float (&acc)[kN / 8][4], const float (&a_frag)[kK / 8][4],
                                                 const Element* b_smem, int lane) {
  warp_gemm_rega<kK, kN, Element>(acc, a_frag, SmemKnB<kLdB, Element>(b_smem, lane));
}
// acc (16 x kN) += A (16 x kK, smem row-major) * B (kK x kN, smem row-major).
template <int kK, int kN, int kLdA, int kLdB, typename Element>
__device__ __forceinline__ void warp_gemm_smemA_b(float (&acc)[kN / 8][4], const Element* a_smem,
                                                  const Element* b_smem, int lane) {
  warp_gemm<kK, kN, Element>(acc, SmemRowA<kLdA, Element>(a_smem, lane), SmemKnB<kLdB, Element>(b_smem, lane));
}
// acc (16 x kN) += A * B with smem holding At (kK x 16, At[k][m] = A[m][k]).
template <int kK, int kN, int kLdA, int kLdB, typename Element>
__device__ __forceinline__ void warp_gemm_smemAt_b(float (&acc)[kN / 8][4], const Element* at_smem,
                                                   const Element* b_smem, int lane) {
  warp_gemm<kK, kN, Element>(acc, SmemColA<kLdA, Element>(at_smem, lane), SmemKnB<kLdB, Element>(b_smem, lane));
}

// Accumulator fragments of a 16 x kN tile -> smem (row stride kLd) as Element.
template <int kN, int kLd, typename Element>
__device__ __forceinline__ void store_frag_smem(Element* smem, const float (&c)[kN / 8][4], int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    *reinterpret_cast<uint32_t*>(smem + g * kLd + 8 * j + 2 * t) = pack2<Element>(c[j][0], c[j][1]);
    *reinterpret_cast<uint32_t*>(smem + (g + 8) * kLd + 8 * j + 2 * t) = pack2<Element>(c[j][2], c[j][3]);
  }
}

// dst[0] += x, dst[1] += y in global memory (dst 8-byte aligned). Hopper has
// a vector reduction; older GPUs issue two.
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// What every backward kernel derives from its block index: blockIdx.x (or
// the tile index a kernel derives from it: the Hopper backward's groups of
// heads and its list of a variable-length call's key blocks,
// launch_bwd_ws.cuh) enumerates (batch, head, block) with the block (of
// kBlock rows along the longest sequence's keys or queries) fastest, so
// neighbouring blocks read the same tiles from L2 and one flat index has no
// 65535 limit on batch * heads. Also the sequence (seq_info.h), the base
// pointers of its rows in the inputs, and the offset of this (sequence,
// head)'s LSE / D vectors.
// Blocks past the end of a shorter sequence (varlen) have nothing to do:
// `past_end` tells the kernel to return.
template <typename Element>
struct BwdBlock {
  int block, b, h, hk;
  SeqInfo seq;
  const Element *q, *dout, *k, *v;
  int64_t row_bh;  // lse_offset of (b, h)

  __device__ __forceinline__ BwdBlock(const FlashBwdParams& p, int block_rows, int max_rows)
      : BwdBlock(p, block_rows, max_rows, int(blockIdx.x)) {}
  __device__ __forceinline__ BwdBlock(const FlashBwdParams& p, int block_rows, int max_rows, int tile) {
    const int num_blocks = (max_rows + block_rows - 1) / block_rows;
    block = tile % num_blocks;
    const int bh = tile / num_blocks;
    h = bh % p.nheads, b = bh / p.nheads;
    hk = h / (p.nheads / p.nheads_k);
    seq = SeqInfo(p, b);
    q = static_cast<const Element*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h);
    dout = static_cast<const Element*>(p.dout) + seq.q_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, h);
    k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk);
    v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk);
    row_bh = seq.lse_offset(p, b, h);
  }
};

// dq_accum (fp32, (query rows of all sequences, H, kHeadDim)) += one
// warp's 16 x kN strip of accumulator fragments at the sequence's query rows
// row0.. and columns col0..; lane (g, t) adds rows g and g + 8, columns
// 8j + 2t, 8j + 2t + 1. Strips that end before the sequence does (all but the
// last) add without per-row checks, so the reductions issue back to back
// instead of each behind a branch.
template <int kHeadDim, int kN>
__device__ __forceinline__ void add_dq_strip(const FlashBwdParams& p, const SeqInfo& seq, int b, int h, int row0,
                                             int col0, const float (&acc)[kN / 8][4], int lane) {
  const int g = lane / 4, t = lane % 4;
  const int64_t row_stride = int64_t(p.nheads) * kHeadDim;
  const int row = row0 + g;
  float* dst = p.dq_accum + (seq.q_row(p, b) * p.nheads + h) * kHeadDim + row * row_stride + col0 + 2 * t;
  float* dst8 = dst + 8 * row_stride;
  if (row0 + 16 <= seq.seqlen_q) {
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      atomic_add2(dst + 8 * j, acc[j][0], acc[j][1]);
      atomic_add2(dst8 + 8 * j, acc[j][2], acc[j][3]);
    }
  } else {
    const bool in0 = row < seq.seqlen_q, in8 = row + 8 < seq.seqlen_q;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      if (in0) atomic_add2(dst + 8 * j, acc[j][0], acc[j][1]);
      if (in8) atomic_add2(dst8 + 8 * j, acc[j][2], acc[j][3]);
    }
  }
}

// Epilogue of the dK/dV kernels: one warp's 16 keys (key0..) x kN columns
// (col0..) of dK = scale * (dS^T Q) and dV = dv_scale * acc_dv (dropout's
// 1 / (1 - p), BwdScoreRule::dv_scale), in the input dtype.
template <typename Element, int kN>
__device__ __forceinline__ void store_dkdv_strip(const FlashBwdParams& p, const SeqInfo& seq, int b, int h, int key0,
                                                 int col0, const float (&acc_dk)[kN / 8][4],
                                                 const float (&acc_dv)[kN / 8][4], float dv_scale, int lane) {
  const int g = lane / 4, t = lane % 4;
  Element* dk = static_cast<Element*>(p.dk) + seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, h);
  Element* dv = static_cast<Element*>(p.dv) + seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, h);
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = key0 + g + 8 * half;
      if (key < seq.seqlen_k) {
        const int col = col0 + 8 * j + 2 * t;
        *reinterpret_cast<uint32_t*>(dk + key * p.dk_row_stride + col) =
            pack2<Element>(acc_dk[j][2 * half] * p.softmax_scale_f, acc_dk[j][2 * half + 1] * p.softmax_scale_f);
        *reinterpret_cast<uint32_t*>(dv + key * p.dv_row_stride + col) =
            pack2<Element>(acc_dv[j][2 * half] * dv_scale, acc_dv[j][2 * half + 1] * dv_scale);
      }
    }
  }
}

}  // namespace flash
