// Online-softmax helpers that work directly on mma.sync m16n8k16 accumulator
// fragments, shared by the forward and (where they apply) backward kernels.
// The scores they take have been through the score rule (score_rule.cuh).
//
// Fragment layout (PTX ISA, "mma.m16n8k16 ... .f32"): a warp's 16x8 fp32
// accumulator tile is held as float[4] per lane; with g = lane / 4 and
// t = lane % 4, c[0], c[1] are (row g, cols 2t, 2t+1) and c[2], c[3] are
// (row g + 8, cols 2t, 2t+1). The helpers below take arrays
//   float s[kMT][kNT][4]
// i.e. kMT 16-row slices ("m-tiles") by kNT 8-column tiles ("n-tiles"); the
// row of element (mi, nj, e) is row0 + mi*16 + (e / 2)*8 + g and its column is
// col0 + nj*8 + 2t + (e % 2). Each row's values are spread over the 4 lanes of
// one quad, so row reductions are per-thread partials plus quad_max/quad_sum.
//
// Scores live in the log2 domain: exp(x * scale) = exp2(x * scale_log2), and
// the scale is folded into the one FFMA in front of each ex2.approx (the
// score rule's exp_scale()).
#pragma once

#include <cmath>
#include <type_traits>

#include "../flash_params.h"
#include "../score_rule.h"
#include "primitives.cuh"

namespace flash {

// softmax_lse in the log2 domain, as the backward uses it. __fmul_rn keeps
// the compiler from fusing the product into a neighbouring add: the forward
// computes the residual against exactly this rounded value.
__device__ __forceinline__ float lse_log2(float lse) { return __fmul_rn(lse, kLog2e); }

// Running row max / row sum of the online softmax for kMT m-tiles (two rows,
// g and g + 8, per m-tile and lane). row_max is in the scaled log2 domain
// (max_j s_ij * scale_log2) and identical over a quad; row_sum is this lane's
// partial sum (its 2 columns per n-tile), reduced over the quad in finalize().
template <int kMT>
struct OnlineSoftmax {
  float row_max[kMT][2];
  float row_sum[kMT][2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        row_max[mi][hr] = -INFINITY;
        row_sum[mi][hr] = 0.f;
      }
    }
  }

  // Folds a new tile of scores into the running statistics: s (unscaled, or
  // already scaled with scale_log2 == 1) becomes P = exp2(s*scale_log2 - max)
  // in place, acc_o (kMT x kDT n-tiles) and the running sums are rescaled by
  // exp2(old_max - new_max). scale_log2 must be > 0 (masked entries are -inf).
  // kCheckRescale: skip the acc_o multiply when no row's max moved anywhere in
  // the warp (common once the max has settled).
  template <bool kCheckRescale, int kNT, int kDT>
  __device__ __forceinline__ void update(float (&s)[kMT][kNT][4], float (&acc_o)[kMT][kDT][4], float scale_log2) {
    float factor[kMT][2];
    update_stats(s, factor, scale_log2);
    bool rescale_o = true;
    if constexpr (kCheckRescale) rescale_o = !all_factors_one(factor);
    if (rescale_o) rescale(acc_o, factor);
  }

  // update() without touching acc_o: the statistics and P, plus the factors
  // acc_o must still be multiplied by (rescale), for kernels whose acc_o is
  // being written by an asynchronous MMA at this point.
  // kMaxSlack > 0: a row's max moves only when the tile's maximum exceeds
  // the held one by more than kMaxSlack (log2 units); otherwise the row
  // keeps its max and its factor is 1, so that a kernel can skip rescaling O
  // when no row in the warp moved (all_factors_one). P = exp2(s - max) is
  // then at most 2^kMaxSlack, which fp32 sums and 16-bit P hold without loss
  // (the same relative rounding), and lse = max + log2(sum) is unchanged.
  // kPShift > 0 (the FP8 forward): the row's reference point is its max
  // minus kPShift, so P = exp2(s - max + kPShift) lies in [0, 2^kPShift]
  // and, rounded to e4m3 for P V, keeps its 3 mantissa bits down to
  // 2^-kPShift times smaller values before e4m3's subnormals (2^-6) and
  // underflow (2^-9) set in. The sums carry the same factor, so out =
  // (P V) / sum and lse = reference + log2(sum) are unchanged.
  template <int kMaxSlack = 0, int kNT, int kPShift = 0>
  __device__ __forceinline__ void update_stats(float (&s)[kMT][kNT][4], float (&factor)[kMT][2], float scale_log2,
                                               std::integral_constant<int, kPShift> = {}) {
    float m_use[kMT][2];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = s[mi][0][hr * 2];
#pragma unroll
        for (int nj = 0; nj < kNT; ++nj) {
          mx = fmaxf(mx, fmaxf(s[mi][nj][hr * 2], s[mi][nj][hr * 2 + 1]));
        }
        mx = quad_max(mx);
        const float m_old = row_max[mi][hr];
        float m_new;
        if constexpr (kPShift == 0) {
          m_new = fmaxf(m_old, mx * scale_log2);
        } else {
          m_new = fmaxf(m_old, fmaf(mx, scale_log2, -float(kPShift)));  // -inf stays -inf
        }
        if constexpr (kMaxSlack > 0) {
          // Also false for m_old = -inf (an infinite step) and for NaN.
          if (m_new - m_old <= float(kMaxSlack)) m_new = m_old;
        }
        row_max[mi][hr] = m_new;
        // A row that has seen only masked keys keeps max -inf; use 0 as its
        // base so that exp2(-inf - base) = 0 instead of NaN.
        m_use[mi][hr] = m_new == -INFINITY ? 0.f : m_new;
        factor[mi][hr] = exp2_fast(m_old - m_use[mi][hr]);
        row_sum[mi][hr] *= factor[mi][hr];
      }
    }
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float neg_m = -m_use[mi][hr];
        float rs = 0.f;
#pragma unroll
        for (int nj = 0; nj < kNT; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2_fast(fmaf(s[mi][nj][hr * 2 + e], scale_log2, neg_m));
            s[mi][nj][hr * 2 + e] = p;
            rs += p;
          }
        }
        row_sum[mi][hr] += rs;
      }
    }
  }

  // Whether no row of the warp moved its max (every factor 1): O needs no
  // rescale. Warp-uniform (a vote); every lane must call it.
  __device__ __forceinline__ static bool all_factors_one(const float (&factor)[kMT][2]) {
    bool moved = false;
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) moved |= (factor[mi][0] != 1.f) | (factor[mi][1] != 1.f);
    return !__any_sync(0xffffffffu, moved);
  }

  template <int kDT>
  __device__ __forceinline__ static void rescale(float (&acc_o)[kMT][kDT][4], const float (&factor)[kMT][2]) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int dj = 0; dj < kDT; ++dj) {
        acc_o[mi][dj][0] *= factor[mi][0];
        acc_o[mi][dj][1] *= factor[mi][0];
        acc_o[mi][dj][2] *= factor[mi][1];
        acc_o[mi][dj][3] *= factor[mi][1];
      }
    }
  }

  // The head's attention sink, after the last tile and before finalize():
  // one more key with no value. sink_log2 is the sink times log2(e)
  // (sink_log2() below), -inf for none, which changes nothing. Like a key
  // block it raises the max, rescales the sums and acc_o (which the keys
  // alone accumulated) to it, and adds its term, exp2(sink - max), to one
  // lane's partial sum of the quad (`first_in_quad`). A row that saw no key
  // then has sum 1 at max = the sink: finalize() gives it out 0 (acc_o
  // rescaled by exp2(-inf)) and lse = the sink. Kept out of finalize() so
  // that calls without a sink run the epilogue as before; the branch on the
  // sink is uniform (one sink per head).
  template <int kDT>
  __device__ __forceinline__ void add_sink(float sink_log2, float (&acc_o)[kMT][kDT][4], bool first_in_quad) {
    if (sink_log2 == -INFINITY) return;
    float factor[kMT][2];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float m_new = fmaxf(row_max[mi][hr], sink_log2);
        factor[mi][hr] = exp2_fast(row_max[mi][hr] - m_new);
        row_sum[mi][hr] = fmaf(row_sum[mi][hr], factor[mi][hr], first_in_quad ? exp2_fast(sink_log2 - m_new) : 0.f);
        row_max[mi][hr] = m_new;
      }
    }
    rescale(acc_o, factor);
  }

  // After the last tile: inv_sum[mi][hr] multiplies the output rows (0 where
  // a row saw no key), lse[mi][hr] is the natural-log logsumexp of the
  // scaled scores (+inf where a row saw no key) and residual[mi][hr] what its
  // fp32 rounding lost, in the log2 domain: lse_log2(lse) + residual =
  // max + log2(sum) to within an ulp of the residual (0 for empty rows).
  __device__ __forceinline__ void finalize(float (&inv_sum)[kMT][2], float (&lse)[kMT][2],
                                           float (&residual)[kMT][2]) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float sum = quad_sum(row_sum[mi][hr]);
        const bool empty = !(sum > 0.f);
        const float log2_sum = __log2f(sum);
        inv_sum[mi][hr] = empty ? 0.f : 1.f / sum;
        lse[mi][hr] = empty ? INFINITY : (row_max[mi][hr] + log2_sum) * float(M_LN2);
        residual[mi][hr] = empty ? 0.f : __fadd_rn(__fsub_rn(row_max[mi][hr], lse_log2(lse[mi][hr])), log2_sum);
      }
    }
  }
};

// The attention sink of head h in the units of the online softmax's
// statistics (log2), or -inf where the call has none: add_sink's argument.
// A sink of -inf is no sink.
__device__ __forceinline__ float sink_log2(const FlashFwdParams& p, int h) {
  return p.sinks != nullptr ? p.sinks[h] * kLog2e : -INFINITY;
}

// softmax_lse of a row that saw no key: the sink where the head has one
// (its only term), else +inf.
__device__ __forceinline__ float empty_row_lse(const FlashFwdParams& p, int h) {
  return p.sinks != nullptr && p.sinks[h] != -INFINITY ? p.sinks[h] : INFINITY;
}

// The forwards' block of kBlockM query rows from row0 that sees no key:
// out = 0, lse = empty_row_lse, residual 0, for its rows below seqlen_q
// (out and the lse pointers at this (batch, head)'s first row; kNThreads
// threads; 16-byte stores of a head dim that is a multiple of 8).
template <int kBlockM, int kHeadDim, int kNThreads, typename Element>
__device__ __forceinline__ void write_empty_block(const FlashFwdParams& p, int h, Element* out, float* lse_out,
                                                  float* residual_out, int row0, int seqlen_q, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = tid; idx < kBlockM * kChunks; idx += kNThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    if (row0 + r >= 0 && row0 + r < seqlen_q) {  // row0 < 0: WsFwdTraits::kAlignEnd
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * p.o_row_stride + c * 8) = make_uint4(0, 0, 0, 0);
    }
  }
  const float empty_lse = empty_row_lse(p, h);
  for (int r = tid; r < kBlockM; r += kNThreads) {
    if (row0 + r >= 0 && row0 + r < seqlen_q) {
      lse_out[row0 + r] = empty_lse;
      if (residual_out) residual_out[row0 + r] = 0.f;
    }
  }
}

// Converts fp32 accumulators (kMT x kNT n-tiles of 8 columns) to bf16/fp16
// A-operand fragments of m16n8k16 (kMT x kNT/2 k-steps of 16), without going
// through shared memory: a k-step's A fragment is two adjacent n-tiles.
template <typename Element, int kMT, int kNT>
__device__ __forceinline__ void accum_to_a_frags(const float (&s)[kMT][kNT][4], uint32_t (&a)[kMT][kNT / 2][4]) {
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      a[mi][kk][0] = pack2<Element>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      a[mi][kk][1] = pack2<Element>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      a[mi][kk][2] = pack2<Element>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      a[mi][kk][3] = pack2<Element>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
  }
}

}  // namespace flash
