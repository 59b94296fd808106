// Deterministic dQ: one thread block per (query block, head, batch) keeps
// Q_i, dO_i in shared memory and dQ_i in registers and walks over the key
// blocks that row block i can see, recomputing with the score rule
//     P = exp(logit(Q_i K_j^T) - lse),  dS = P ∘ (dO_i V_j^T - D_i),
//     dQ_i += dS K_j.
// No atomics: the sum over key blocks happens in a fixed order inside one
// block, so dq is bit-identical run after run. Costs two extra products
// (S and dP are computed again here) compared with the atomic path.
// kFeatures (softcap, ALiBi, dropout) are compile-time variants, as in the
// dK/dV kernel: with softcap, P comes with the rule's factor per score,
// which stays in registers until dS.
#pragma once

#include "../../flash_params.h"
#include "../../mask.h"
#include "../flash_bwd_common.cuh"
#include "../primitives.cuh"
#include "../score_rule.cuh"
#include "../softmax.cuh"

namespace flash {

template <typename Element_, int kHeadDim_, int kBlockN_, int kNWarps_>
struct BwdDqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kBlockM = 16 * kNWarps;  // one 16-row strip per warp
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kLdD = kHeadDim + 8;     // padded rows: conflict-free ldmatrix
  static constexpr int kTileM = kBlockM * kLdD * 2, kTileN = kBlockN * kLdD * 2;
  static constexpr int kQOff = 0;
  static constexpr int kDoOff = kQOff + kTileM;
  static constexpr int kKOff = kDoOff + kTileM;         // 2 stages
  static constexpr int kVOff = kKOff + 2 * kTileN;      // 2 stages
  static constexpr int kSmemBytes = kVOff + 2 * kTileN;
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles must be multiples of 16");
};

template <typename T, int kFeatures>
__global__ void __launch_bounds__(T::kNThreads, 1) flash_bwd_dq_kernel(const FlashBwdParams p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim, kLdD = T::kLdD;
  extern __shared__ __align__(16) char smem[];
  Element* sQ = reinterpret_cast<Element*>(smem + T::kQOff);
  Element* sDo = reinterpret_cast<Element*>(smem + T::kDoOff);

  const BwdBlock<Element> blk(p, kBlockM, p.seqlen_q);  // one query block
  const int m_block = blk.block, b = blk.b, h = blk.h;
  const Element *q = blk.q, *dout = blk.dout, *k = blk.k, *v = blk.v;
  const int64_t row_bh = blk.row_bh;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;

  const int m0 = m_block * kBlockM;
  const int seqlen_q = blk.seq.seqlen_q, seqlen_k = blk.seq.seqlen_k;
  if (m0 >= seqlen_q) return;  // past the end of a shorter sequence (varlen)
  const MaskGeometry geo(p, blk.seq);
  const int n_begin = geo.n_block_begin(m0, kBlockN);
  const int n_end = geo.n_block_end(m0, kBlockM, kBlockN);

  load_tile<kBlockM, kHeadDim, kLdD, T::kNThreads>(sQ, q, p.q_row_stride, m0, seqlen_q, tid);
  load_tile<kBlockM, kHeadDim, kLdD, T::kNThreads>(sDo, dout, p.do_row_stride, m0, seqlen_q, tid);
  auto load_kv_stage = [&](int n_block, int stage) {
    load_tile<kBlockN, kHeadDim, kLdD, T::kNThreads>(reinterpret_cast<Element*>(smem + T::kKOff + stage * T::kTileN),
                                                     k, p.k_row_stride, n_block * kBlockN, seqlen_k, tid);
    load_tile<kBlockN, kHeadDim, kLdD, T::kNThreads>(reinterpret_cast<Element*>(smem + T::kVOff + stage * T::kTileN),
                                                     v, p.v_row_stride, n_block * kBlockN, seqlen_k, tid);
  };
  if (n_begin < n_end) load_kv_stage(n_begin, 0);
  cp_async_commit();

  // This lane's two rows; rows past the end get lse = +inf, i.e. P = 0.
  const int row_lo = m0 + warp * 16 + g;
  float lse_l2[2], res[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_lo + 8 * half;
    lse_l2[half] = row < seqlen_q ? lse_log2(p.softmax_lse[row_bh + row]) : INFINITY;
    res[half] = row < seqlen_q && p.lse_residual ? p.lse_residual[row_bh + row] : 0.f;
    delta[half] = row < seqlen_q ? p.softmax_d[row_bh + row] : 0.f;
  }
  using Rule = BwdScoreRule<Element, kFeatures>;
  const Rule rule(p, geo, b, h);

  float acc_dq[kHeadDim / 8][4] = {};
  for (int n_block = n_begin; n_block < n_end; ++n_block) {
    const int stage = (n_block - n_begin) % 2;
    cp_async_wait<0>();
    __syncthreads();  // K/V stage (and Q/dO) landed; the other stage is free again
    if (n_block + 1 < n_end) load_kv_stage(n_block + 1, stage ^ 1);
    cp_async_commit();
    const Element* sK = reinterpret_cast<const Element*>(smem + T::kKOff + stage * T::kTileN);
    const Element* sV = reinterpret_cast<const Element*>(smem + T::kVOff + stage * T::kTileN);
    const int n0 = n_block * kBlockN;

    float acc_s[kBlockN / 8][4] = {};
    warp_gemm_abt<kHeadDim, kBlockN, kLdD, kLdD, Element>(acc_s, sQ + warp * 16 * kLdD, sK, lane);
    float acc_dp[kBlockN / 8][4] = {};
    warp_gemm_abt<kHeadDim, kBlockN, kLdD, kLdD, Element>(acc_dp, sDo + warp * 16 * kLdD, sV, lane);

    const bool need_mask = !geo.tile_fully_visible(m0, kBlockM, n0, kBlockN);
    // Dropout: which of this thread's scores are kept, one bit each (bit 4 j
    // + e), for the marked P that ds_marked takes.
    uint64_t kept_bits = ~uint64_t(0);
    if constexpr (Rule::kDropout) {
      static_assert(kBlockN <= 128, "a bit per score of the thread's fragment");
      if (rule.has_dropout()) {
        kept_bits = 0;
        for_each_dropout_keep<1, kBlockN / 8>(rule.dropout(), m0 + warp * 16, n0, lane,
                                              [&](int, int j, int e, bool kept) {
                                                kept_bits |= uint64_t(kept) << (4 * j + e);
                                              });
      }
    }
    // dS from P (through the mark with dropout) and softcap's factor.
    auto to_ds = [&](int j, int e, float prob, float dsoftcap) {
      if constexpr (Rule::kDropout) {
        const float marked = rule.dropout().mark(prob, (kept_bits >> (4 * j + e)) & 1);
        acc_dp[j][e] = rule.ds_marked(marked, acc_dp[j][e], delta[e / 2], dsoftcap);
      } else {
        acc_dp[j][e] = rule.ds(prob, acc_dp[j][e], delta[e / 2], dsoftcap);
      }
    };
    // ALiBi's distances of this thread's scores (dead without ALiBi).
    const QueryRowsDistance dist(rule, m0 + warp * 16, n0, lane);
    if (rule.fast_tile(need_mask)) {
      // Interior tile without bias: P and dS in four instructions per element
      // for the plain rule.
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dsoftcap = 1.f;
          const float prob = rule.prob_unbiased_visible(acc_s[j][e], dist.at(j, e), lse_l2[e / 2], dsoftcap);
          to_ds(j, e, prob, dsoftcap);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_lo + 8 * (e / 2);
          const int key = n0 + 8 * j + 2 * t + (e % 2);
          float dsoftcap = 1.f;  // softcap's factor (kSoftcap)
          const float prob =
              rule.prob(acc_s[j][e], row, key, dist.at(j, e), lse_l2[e / 2], res[e / 2], need_mask, dsoftcap);
          to_ds(j, e, prob, dsoftcap);
        }
      }
    }
    // dQ_i += dS K_j, dS straight from the accumulator fragments.
    warp_gemm_regA_b<kBlockN, kHeadDim, kLdD, Element>(acc_dq, acc_dp, sK, lane);
  }

  Element* dq = static_cast<Element*>(p.dq) + blk.seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h);
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_lo + 8 * half;
      if (row < seqlen_q) {
        *reinterpret_cast<uint32_t*>(dq + row * p.dq_row_stride + 8 * j + 2 * t) =
            pack2<Element>(acc_dq[j][2 * half] * p.softmax_scale_f, acc_dq[j][2 * half + 1] * p.softmax_scale_f);
      }
    }
  }
}

}  // namespace flash
