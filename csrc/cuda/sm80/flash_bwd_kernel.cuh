// FlashAttention-2 backward, main kernel: one thread block per (key block,
// head, batch). The block keeps its K_j, V_j tile in shared memory and its
// dK_j, dV_j accumulators in registers, and walks over the query blocks that
// can see key block j. Per query block i it recomputes the probabilities
// from the saved log-sum-exp and accumulates
//     dV_j += P^T dO_i          dK_j += dS^T Q_i          dQ_i += dS K_j
// with dS = P ∘ (dP − D_i), dP = dO_i V_j^T, D_i = rowsum(dO_i ∘ O_i).
//
// Orientation: every warp owns 16 keys and computes the transposed tiles
// S^T = K_j Q_i^T and dP^T = V_j dO_i^T, so the accumulator fragments of P^T
// and dS^T are directly the A operands of the dV and dK products (no shared
// memory round trip) when one warp covers the whole head dim (kWarpsD == 1).
// For head dims 192/256 the dK/dV accumulators do not fit one warp; the warps
// of a key group then split the head dim (and the query columns of S^T) and
// exchange P^T, dS^T through shared memory.
//
// dQ_i is reduced over key blocks of different thread blocks: with kDq it is
// accumulated in fp32 into params.dq_accum with atomics (fast path); the
// deterministic path leaves dQ to flash_bwd_dq_kernel.cuh.
//
// kFeatures (softcap, ALiBi, dropout; score_rule.h): compile-time variants.
// With softcap, recomputing P through the rule also gives each score's
// softcap factor, kept in registers next to P^T until dS^T is formed; dbias
// is written before that factor (the bias joins after the cap). Interior
// tiles without a bias take the rule's fast path (prob_unbiased_visible: no
// mask test; coordinates only where ALiBi needs them).
#pragma once

#include "../../flash_params.h"
#include "../../mask.h"
#include "../flash_bwd_common.cuh"
#include "../primitives.cuh"
#include "../score_rule.cuh"
#include "../softmax.cuh"

namespace flash {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_,
          int kMinBlocks_ = 1>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = kNWarps * 32, kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM the registers are budgeted for

  // dK/dV (and S^T/dP^T) warp grid: kWarpsN groups of 16 keys x kWarpsD head-dim splits.
  static constexpr int kWarpsN = kBlockN / 16;
  static constexpr int kWarpsD = kNWarps / kWarpsN;
  static constexpr int kMPerWarp = kBlockM / kWarpsD;   // query columns of S^T per warp
  static constexpr int kDPerWarp = kHeadDim / kWarpsD;  // head-dim columns of dK/dV per warp
  static constexpr bool kPInSmem = kWarpsD > 1;
  // dQ warp grid: kBlockM/16 row groups x the rest over the head dim.
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsD = kNWarps / kDqWarpsM;
  static constexpr int kDqDPerWarp = kHeadDim / kDqWarpsD;

  // Shared-memory rows are padded by 16 bytes so that the 8 rows one
  // ldmatrix phase reads fall in distinct banks.
  static constexpr int kLdD = kHeadDim + 8;
  static constexpr int kLdM = kBlockM + 8;
  static constexpr int kTileN = kBlockN * kLdD * 2, kTileM = kBlockM * kLdD * 2;
  static constexpr int kKOff = 0;
  static constexpr int kVOff = kKOff + kTileN;
  static constexpr int kQOff = kVOff + kTileN;
  static constexpr int kDoOff = kQOff + kStages * kTileM;
  static constexpr int kDsOff = kDoOff + kStages * kTileM;
  static constexpr int kPOff = kDsOff + kBlockN * kLdM * 2;
  static constexpr int kLseOff = kPOff + (kPInSmem ? kBlockN * kLdM * 2 : 0);
  static constexpr int kDeltaOff = kLseOff + kStages * kBlockM * 4;
  static constexpr int kResidualOff = kDeltaOff + kStages * kBlockM * 4;
  static constexpr int kSmemBytes = kResidualOff + kStages * kBlockM * 4;

  static_assert(kBlockN % 16 == 0 && kNWarps % kWarpsN == 0, "warps must tile the key block");
  static_assert(kMPerWarp % 16 == 0 && kDPerWarp % 16 == 0, "warp tiles must be multiples of 16");
  static_assert(kBlockM % 16 == 0 && kNWarps % kDqWarpsM == 0 && kDqDPerWarp % 16 == 0, "bad dQ warp grid");
  static_assert(kStages == 1 || kStages == 2, "one or two Q/dO stages");
};

template <typename T, bool kDq, int kFeatures>
__global__ void __launch_bounds__(T::kNThreads, T::kMinBlocks) flash_bwd_dkdv_kernel(const FlashBwdParams p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  constexpr int kLdD = T::kLdD, kLdM = T::kLdM;
  extern __shared__ __align__(16) char smem[];
  Element* sK = reinterpret_cast<Element*>(smem + T::kKOff);
  Element* sV = reinterpret_cast<Element*>(smem + T::kVOff);
  Element* sDs = reinterpret_cast<Element*>(smem + T::kDsOff);
  Element* sP = reinterpret_cast<Element*>(smem + T::kPOff);

  const BwdBlock<Element> blk(p, kBlockN, p.seqlen_k);  // one key block
  const int n_block = blk.block, b = blk.b, h = blk.h;
  const Element *q = blk.q, *dout = blk.dout, *k = blk.k, *v = blk.v;
  const float* lse = p.softmax_lse + blk.row_bh;
  // Null residual (no bias): load_vec over 0 rows fills the stage with zeros
  // (and reads nothing; lse stands in as a valid address).
  const float* residual = p.lse_residual ? p.lse_residual + blk.row_bh : lse;
  const int seqlen_q = blk.seq.seqlen_q, seqlen_k = blk.seq.seqlen_k;
  const int residual_rows = p.lse_residual ? seqlen_q : 0;
  const float* delta = p.softmax_d + blk.row_bh;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;  // MMA fragment row / column-pair of this lane

  const int n0 = n_block * kBlockN;
  if (n0 >= seqlen_k) return;  // past the end of a shorter sequence (varlen)
  const MaskGeometry geo(p, blk.seq);
  const int m_begin = geo.m_block_begin(n0, kBlockM);
  const int m_end = geo.m_block_end(n0, kBlockN, kBlockM);

  // Prologue: K_j, V_j (one group), then the first Q/dO stage.
  load_tile<kBlockN, kHeadDim, kLdD, T::kNThreads>(sK, k, p.k_row_stride, n0, seqlen_k, tid);
  load_tile<kBlockN, kHeadDim, kLdD, T::kNThreads>(sV, v, p.v_row_stride, n0, seqlen_k, tid);
  auto load_q_stage = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    char* base = smem;
    load_tile<kBlockM, kHeadDim, kLdD, T::kNThreads>(
        reinterpret_cast<Element*>(base + T::kQOff + stage * T::kTileM), q, p.q_row_stride, m0, seqlen_q, tid);
    load_tile<kBlockM, kHeadDim, kLdD, T::kNThreads>(
        reinterpret_cast<Element*>(base + T::kDoOff + stage * T::kTileM), dout, p.do_row_stride, m0, seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(base + T::kLseOff) + stage * kBlockM, lse, m0,
                                    seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(base + T::kDeltaOff) + stage * kBlockM, delta, m0,
                                    seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(base + T::kResidualOff) + stage * kBlockM, residual, m0,
                                    residual_rows, tid);
  };
  if (m_begin < m_end && T::kStages == 2) load_q_stage(m_begin, 0);
  cp_async_commit();

  // Warp roles.
  const int warp_n = warp % T::kWarpsN, warp_d = warp / T::kWarpsN;
  const int key_row0 = warp_n * 16;                 // this warp's keys within the block
  const int q_col0 = warp_d * T::kMPerWarp;         // its query columns of S^T
  const int d_col0 = warp_d * T::kDPerWarp;         // its head-dim columns of dK/dV
  const int dq_row0 = (warp % T::kDqWarpsM) * 16;   // its dQ rows
  const int dq_col0 = (warp / T::kDqWarpsM) * T::kDqDPerWarp;

  float acc_dk[T::kDPerWarp / 8][4] = {};
  float acc_dv[T::kDPerWarp / 8][4] = {};

  using Rule = BwdScoreRule<Element, kFeatures>;
  const Rule rule(p, geo, b, h);
  // dbias (batch, nheads, seqlen_q, seqlen_k): dense calls only.
  Element* dbias = p.dbias ? static_cast<Element*>(p.dbias) + (int64_t(b) * p.nheads + h) * p.seqlen_q * p.seqlen_k
                           : nullptr;
  for (int m_block = m_begin; m_block < m_end; ++m_block) {
    const int stage = T::kStages == 2 ? (m_block - m_begin) % 2 : 0;
    if constexpr (T::kStages == 2) {
      cp_async_wait<0>();
      __syncthreads();  // stage landed for all threads; everyone is done with the previous iteration
      if (m_block + 1 < m_end) load_q_stage(m_block + 1, stage ^ 1);
      cp_async_commit();
    } else {
      __syncthreads();  // everyone is done with the previous iteration's Q/dO
      load_q_stage(m_block, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
    }
    const Element* sQ = reinterpret_cast<const Element*>(smem + T::kQOff + stage * T::kTileM);
    const Element* sDo = reinterpret_cast<const Element*>(smem + T::kDoOff + stage * T::kTileM);
    const float* sLse = reinterpret_cast<const float*>(smem + T::kLseOff) + stage * kBlockM;
    const float* sDelta = reinterpret_cast<const float*>(smem + T::kDeltaOff) + stage * kBlockM;
    const float* sResidual = reinterpret_cast<const float*>(smem + T::kResidualOff) + stage * kBlockM;
    const int m0 = m_block * kBlockM;

    // S^T = K_j Q_i^T for this warp's 16 keys x kMPerWarp queries, then
    // P^T from the score rule and the saved statistics, 0 where masked.
    // Dropout: the keep bits of this thread's scores, drawn while only dK /
    // dV are live.
    uint64_t keep_bits = 0;
    if constexpr (Rule::kDropout) {
      if (rule.has_dropout()) {
        keep_bits = rule.template dropout_keep_bits_t<T::kMPerWarp>(n0 + key_row0, m0 + q_col0, lane);
      }
    }
    float acc_s[T::kMPerWarp / 8][4] = {};
    warp_gemm_abt<kHeadDim, T::kMPerWarp, kLdD, kLdD, Element>(acc_s, sK + key_row0 * kLdD, sQ + q_col0 * kLdD, lane);
    // Per-column (query) log2-domain LSE and residual, loaded once per tile
    // (two columns per lane and n8 tile).
    float lse_c[T::kMPerWarp / 8][2], res_c[T::kMPerWarp / 8][2];
#pragma unroll
    for (int j = 0; j < T::kMPerWarp / 8; ++j) {
      const float2 l = *reinterpret_cast<const float2*>(sLse + q_col0 + 8 * j + 2 * t);
      const float2 r = *reinterpret_cast<const float2*>(sResidual + q_col0 + 8 * j + 2 * t);
      lse_c[j][0] = lse_log2(l.x), lse_c[j][1] = lse_log2(l.y);
      res_c[j][0] = r.x, res_c[j][1] = r.y;
    }
    const bool need_mask = !geo.tile_fully_visible(m0, kBlockM, n0, kBlockN);
    // Softcap's factor per score of acc_s (kSoftcap; unused and gone otherwise).
    SoftcapFactors<Element, T::kMPerWarp / 8> softcap_factors;
    // ALiBi's distances of this thread's scores (dead without ALiBi).
    const KeyRowsDistance dist(rule, m0 + q_col0, n0 + key_row0, lane);
    if (rule.fast_tile(need_mask)) {
      // Interior tile without bias (the common case): FFMA, FADD and EX2 per
      // element for the plain rule.
#pragma unroll
      for (int j = 0; j < T::kMPerWarp / 8; ++j) {
        float dsoftcap[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc_s[j][e] = rule.prob_unbiased_visible(acc_s[j][e], dist.at(j, e), lse_c[j][e % 2], dsoftcap[e]);
        }
        if constexpr (Rule::kSoftcap) softcap_factors.set(j, dsoftcap);
      }
    } else {
#pragma unroll
      for (int j = 0; j < T::kMPerWarp / 8; ++j) {
        float dsoftcap[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + key_row0 + g + 8 * (e / 2);
          const int row = m0 + q_col0 + 8 * j + 2 * t + (e % 2);
          acc_s[j][e] =
              rule.prob(acc_s[j][e], row, key, dist.at(j, e), lse_c[j][e % 2], res_c[j][e % 2], need_mask, dsoftcap[e]);
        }
        if constexpr (Rule::kSoftcap) softcap_factors.set(j, dsoftcap);
      }
    }
    // dV_j += P^T dO_i straight from the accumulator fragments (they are the
    // A operand) while P^T is the only tile alive besides dK/dV. With
    // dropout, dV takes the dropped P^T (kept P, dropped 0; the epilogue
    // applies 1 / (1 - p)).
    if constexpr (Rule::kDropout) {
      float p_dv[T::kMPerWarp / 8][4];
      rule.dv_operand(p_dv, acc_s, keep_bits);
      if constexpr (!T::kPInSmem) {
        warp_gemm_regA_b<T::kMPerWarp, T::kDPerWarp, kLdD, Element>(acc_dv, p_dv, sDo + d_col0, lane);
      } else {
        store_frag_smem<T::kMPerWarp, kLdM, Element>(sP + key_row0 * kLdM + q_col0, p_dv, lane);
      }
    } else if constexpr (!T::kPInSmem) {
      warp_gemm_regA_b<T::kMPerWarp, T::kDPerWarp, kLdD, Element>(acc_dv, acc_s, sDo + d_col0, lane);
    } else {
      store_frag_smem<T::kMPerWarp, kLdM, Element>(sP + key_row0 * kLdM + q_col0, acc_s, lane);
    }

    // dP^T = V_j dO_i^T, dS^T = P^T ∘ (dP^T - D) (the rule's score_grad; also
    // dbias), then times softcap's factor.
    float acc_dp[T::kMPerWarp / 8][4] = {};
    warp_gemm_abt<kHeadDim, T::kMPerWarp, kLdD, kLdD, Element>(acc_dp, sV + key_row0 * kLdD, sDo + q_col0 * kLdD,
                                                               lane);
    rule.logit_grads_t(acc_dp, acc_s, sDelta + q_col0, lane, keep_bits);
    if (dbias != nullptr) {
#pragma unroll
      for (int j = 0; j < T::kMPerWarp / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + key_row0 + g + 8 * (e / 2), row = m0 + q_col0 + 8 * j + 2 * t + (e % 2);
          if (row < p.seqlen_q && key < p.seqlen_k) {
            dbias[int64_t(row) * p.seqlen_k + key] = from_float<Element>(acc_dp[j][e]);
          }
        }
      }
    }
    if constexpr (Rule::kSoftcap) {
#pragma unroll
      for (int j = 0; j < T::kMPerWarp / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[j][e] = rule.finish_ds(acc_dp[j][e], softcap_factors.get(j, e));
      }
    }

    if constexpr (!T::kPInSmem) {
      warp_gemm_regA_b<T::kMPerWarp, T::kDPerWarp, kLdD, Element>(acc_dk, acc_dp, sQ + d_col0, lane);
      if constexpr (kDq) {
        store_frag_smem<T::kMPerWarp, kLdM, Element>(sDs + key_row0 * kLdM + q_col0, acc_dp, lane);
        __syncthreads();
      }
    } else {
      // The head dim is split over warps: every warp needs all kBlockM query
      // columns of its keys' P^T / dS^T, so they go through shared memory.
      store_frag_smem<T::kMPerWarp, kLdM, Element>(sDs + key_row0 * kLdM + q_col0, acc_dp, lane);
      __syncthreads();
      warp_gemm_smemA_b<kBlockM, T::kDPerWarp, kLdM, kLdD, Element>(acc_dv, sP + key_row0 * kLdM, sDo + d_col0, lane);
      warp_gemm_smemA_b<kBlockM, T::kDPerWarp, kLdM, kLdD, Element>(acc_dk, sDs + key_row0 * kLdM, sQ + d_col0,
                                                                    lane);
    }

    if constexpr (kDq) {
      // dQ_i (kBlockM x D) += dS (kBlockM x kBlockN) K_j; dS is read transposed from sDs.
      float acc_dq[T::kDqDPerWarp / 8][4] = {};
      warp_gemm_smemAt_b<kBlockN, T::kDqDPerWarp, kLdM, kLdD, Element>(acc_dq, sDs + dq_row0, sK + dq_col0, lane);
      add_dq_strip<kHeadDim, T::kDqDPerWarp>(p, blk.seq, b, h, m0 + dq_row0, dq_col0, acc_dq, lane);
    }
  }

  store_dkdv_strip<Element, T::kDPerWarp>(p, blk.seq, b, h, n0 + key_row0, d_col0, acc_dk, acc_dv,
                                          rule.dv_scale(), lane);
}

}  // namespace flash
