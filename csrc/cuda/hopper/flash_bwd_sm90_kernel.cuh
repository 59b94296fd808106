// FlashAttention backward on Hopper warpgroup MMAs (sm_90a), head dims 64,
// 128 and 256. Same algorithm and grid as sm80/flash_bwd_kernel.cuh -- one thread block per
// (key block, head, batch) keeps K_j, V_j in shared memory and dK_j, dV_j in
// registers and walks the query blocks i that can see key block j:
//     S^T  = K_j Q_i^T          P^T  = exp(scale * S^T + bias - lse)
//     dP^T = V_j dO_i^T         dS^T = P^T ∘ (dP^T - D_i)
//     dV_j += P^T dO_i          dK_j += dS^T Q_i          dQ_i += dS K_j
// -- but every product is a wgmma reading its shared-memory operands in
// place (hopper/wgmma.cuh), where the mma.sync kernel had every warp re-read
// Q_i and dO_i through ldmatrix for each of its four products, which made it
// shared-memory-bandwidth bound.
//
// Work split over two warpgroups (wgmma's M = 64 rows each):
//  * head dim <= 128: each warpgroup owns 64 of 128 keys, all of the head
//    dim. P^T and dS^T stay in registers as the A operand of the dV / dK
//    products; dS^T also goes to shared memory for dQ = dS K_j.
//  * head dim 256 (kPInSmem): the dK / dV accumulators of a 64-key row take
//    256 registers, so the warpgroups split the head dim of dK / dV instead
//    (64 keys, 128 columns each). Each computes S^T / dP^T for half of the
//    queries and both halves of P^T / dS^T meet in shared memory, from where
//    the dV / dK products read them.
// dQ_i is split into one piece per warpgroup (query rows when kBlockM = 128,
// head-dim halves otherwise) and added into the fp32 dq_accum with vector
// atomics. Q_i / dO_i (with their LSE / D) are double-buffered with cp.async:
// block i + 1 loads while i computes.
//
// kFeatures (softcap, ALiBi, dropout): compile-time variants, as in the
// mma.sync kernel: with softcap, P^T comes with the rule's factor per score,
// which stays in registers until dS^T (after dbias, which takes the gradient
// before it).
#pragma once

#include "../../flash_params.h"
#include "../../mask.h"
#include "../flash_bwd_common.cuh"
#include "../score_rule.cuh"
#include "../softmax.cuh"
#include "wgmma.cuh"

namespace flash {
namespace sm90 {

template <typename Element_, int kHeadDim_, int kBlockM_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_;
  static constexpr bool kPInSmem = kHeadDim > 128;
  static constexpr int kBlockN = kPInSmem ? 64 : 128;
  static constexpr int kNThreads = 256;  // two warpgroups
  static_assert((kBlockM == 128 && kHeadDim == 64) || (kBlockM == 64 && (kHeadDim == 128 || kHeadDim == 256)),
                "supported tiles: (kBlockM, kHeadDim) = (128, 64), (64, 128) or (64, 256)");
  // Per warpgroup: S^T / dP^T are 64 keys x kSN queries, dK / dV 64 keys x
  // kDkvN head-dim columns, the dQ piece kDqM x kDqN.
  static constexpr int kSN = kPInSmem ? kBlockM / 2 : kBlockM;
  static constexpr int kDkvN = kPInSmem ? kHeadDim / 2 : kHeadDim;
  static constexpr bool kDqSplitRows = kBlockM == 128;
  static constexpr int kDqN = kDqSplitRows ? kHeadDim : kHeadDim / 2;

  // Tiles in SW128 panels (wgmma.cuh); every offset is a multiple of 1024.
  static constexpr int kTileN = kBlockN * kHeadDim * 2;   // K_j or V_j
  static constexpr int kTileM = kBlockM * kHeadDim * 2;   // one stage of Q_i or dO_i
  static constexpr int kTileDs = kBlockN * kBlockM * 2;   // dS^T (keys x queries), and P^T
  static constexpr int kKOff = 0;
  static constexpr int kVOff = kKOff + kTileN;
  static constexpr int kQOff = kVOff + kTileN;            // 2 stages
  static constexpr int kDoOff = kQOff + 2 * kTileM;       // 2 stages
  static constexpr int kDsOff = kDoOff + 2 * kTileM;
  static constexpr int kPOff = kDsOff + kTileDs;          // kPInSmem only
  static constexpr int kLseOff = kPOff + (kPInSmem ? kTileDs : 0);  // 2 stages of kBlockM floats
  static constexpr int kDeltaOff = kLseOff + 2 * kBlockM * 4;
  static constexpr int kResidualOff = kDeltaOff + 2 * kBlockM * 4;
  // + 1024: the dynamic shared memory base is realigned to the swizzle atom.
  static constexpr int kSmemBytes = kResidualOff + 2 * kBlockM * 4 + 1024;
};

// Packed A fragments (k-slices of 16 columns) of a 16 x kN strip into an
// SW128 tile with `rows` rows at (row0, col0): row0 a multiple of 8, col0 of
// 16, the tile on a swizzle atom (1024 bytes). Element (row, col) of a panel
// sits at row * 128 + ((chunk ^ row % 8) << 4) + (col % 8) * 2; a lane's rows
// are g and g + 8 (mod 8 both g) and its columns 2t mod 8, so every address
// is one lane base (row * 128 + g * 16 + 4t, whose bits 4-6 hold g) XOR the
// chunk (a constant) times 16: one LOP3 a store, where the swizzle written
// out per store took several, which ptxas hoisted out of the backward's loop
// and spilled (docs/perf-notes.md step 12).
template <int kSlices>
__device__ __forceinline__ void store_packed_sw128(char* smem, int rows, int row0, int col0,
                                                   const uint32_t (&a)[kSlices][4], int lane) {
  const int g = lane / 4, t = lane % 4;
  const int base = (row0 + g) * kLineBytes + (g << 4) + 4 * t;
#pragma unroll
  for (int s = 0; s < kSlices; ++s) {
    const int col = col0 + 16 * s;  // the slice's first column
    const int panel = (col / kPanelCols) * rows * kLineBytes, chunk = (col % kPanelCols) / 8;  // chunk is even
    char* lo = smem + panel + (base ^ (chunk << 4));        // columns col + 2t, col + 2t + 1
    char* hi = smem + panel + (base ^ ((chunk + 1) << 4));  // and 8 further
    *reinterpret_cast<uint32_t*>(lo) = a[s][0];
    *reinterpret_cast<uint32_t*>(lo + 8 * kLineBytes) = a[s][1];
    *reinterpret_cast<uint32_t*>(hi) = a[s][2];
    *reinterpret_cast<uint32_t*>(hi + 8 * kLineBytes) = a[s][3];
  }
}

template <typename Element>
__device__ __forceinline__ Element* dbias_of(const FlashBwdParams& p, int b, int h) {
  return p.dbias ? static_cast<Element*>(p.dbias) + (int64_t(b) * p.nheads + h) * p.seqlen_q * p.seqlen_k : nullptr;
}

// S^T -> P^T in place by the score rule and the saved lse (and residual);
// softcap's factor per score to `softcap_factors` (kSoftcap only). The
// warpgroup's 64 keys start at wg_key0. kLseInLog2: lse_cols holds
// lse_log2(lse) already (the warp-specialized producer converts each row
// once, where every consumer step converted its columns: 16 FMULs a step
// at 64 query columns); else the saved lse as cp.async copied it.
template <typename Element, int kSN, bool kLseInLog2 = false, typename Rule>
__device__ __forceinline__ void probs_t(float (&acc_s)[kSN / 8][4], SoftcapFactors<Element, kSN / 8>& softcap_factors,
                                        const Rule& rule, const MaskGeometry& geo, int q0, int wg_key0, int key_row0,
                                        const float* lse_cols, const float* residual_cols, int lane) {
  const int g = lane / 4, t = lane % 4;
  auto to_log2 = [](float lse) { return kLseInLog2 ? lse : lse_log2(lse); };
  const bool need_mask = !geo.tile_fully_visible(q0, kSN, wg_key0, 64);
  // ALiBi's distances of this thread's scores (dead without ALiBi).
  const KeyRowsDistance dist(rule, q0, key_row0, lane);
  // Tiles without a bias: P from the saved lse (no residual without a bias:
  // prob_unbiased_visible), read once per pair of columns; `shown(j, e)`
  // says whether the mask shows score (j, e).
  auto unbiased_probs = [&](auto shown) {
#pragma unroll
    for (int j = 0; j < kSN / 8; ++j) {
      const float2 l = *reinterpret_cast<const float2*>(lse_cols + 8 * j + 2 * t);
      const float lse_c[2] = {to_log2(l.x), to_log2(l.y)};
      float dsoftcap[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = rule.prob_unbiased_visible(acc_s[j][e], dist.at(j, e), lse_c[e % 2], dsoftcap[e]);
        acc_s[j][e] = shown(j, e) ? prob : 0.f;
      }
      if constexpr (Rule::kSoftcap) softcap_factors.set(j, dsoftcap);
    }
  };
  if (rule.fast_tile(need_mask)) {
    unbiased_probs([](int, int) { return true; });
  } else if (rule.fast_tile(false)) {
    // A tile on the mask's edge, without a bias: the interior's P, then 0
    // where the mask hides the score, by the rows that see each of the
    // thread's two keys (a compare pair and a select a score, where prob()
    // works the window out per score).
    int lo[2], hi[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) geo.rows_seeing(key_row0 + g + 8 * h, &lo[h], &hi[h]);
    unbiased_probs([&](int j, int e) {
      const int row = q0 + 8 * j + 2 * t + (e % 2);
      return row >= lo[e / 2] && row < hi[e / 2];
    });
  } else {
#pragma unroll
    for (int j = 0; j < kSN / 8; ++j) {
      float dsoftcap[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_row0 + g + 8 * (e / 2);
        const int c = 8 * j + 2 * t + (e % 2);
        acc_s[j][e] = rule.prob(acc_s[j][e], q0 + c, key, dist.at(j, e), to_log2(lse_cols[c]), residual_cols[c],
                                need_mask, dsoftcap[e]);
      }
      if constexpr (Rule::kSoftcap) softcap_factors.set(j, dsoftcap);
    }
  }
}

// The A operand of dV += P^T dO: P^T, or with dropout the dropped P^T
// (kept P, dropped 0; the epilogue applies 1 / (1 - p)).
template <typename Element, int kSN, typename Rule>
__device__ __forceinline__ void pack_p_operand(uint32_t (&p_frag)[kSN / 16][4], const float (&acc_s)[kSN / 8][4],
                                               const Rule& rule, uint64_t keep_bits) {
  if constexpr (Rule::kDropout) {
    float p_dv[kSN / 8][4];
    rule.dv_operand(p_dv, acc_s, keep_bits);
    pack_a_frags<Element>(p_frag, p_dv);
  } else {
    pack_a_frags<Element>(p_frag, acc_s);
  }
}

// dP^T -> dS^T in place; dbias (when not null) takes the gradient before
// softcap's factor.
template <typename Element, int kSN, typename Rule>
__device__ __forceinline__ void dscores_t(float (&acc_dp)[kSN / 8][4], const float (&acc_s)[kSN / 8][4],
                                          const SoftcapFactors<Element, kSN / 8>& softcap_factors, const Rule& rule,
                                          const FlashBwdParams& p, Element* dbias, const float* delta_cols,
                                          uint64_t keep_bits, int q0, int key_row0, int lane) {
  const int g = lane / 4, t = lane % 4;
  rule.logit_grads_t(acc_dp, acc_s, delta_cols, lane, keep_bits);
  if (dbias != nullptr) {
#pragma unroll
    for (int j = 0; j < kSN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_row0 + g + 8 * (e / 2), row = q0 + 8 * j + 2 * t + (e % 2);
        if (row < p.seqlen_q && key < p.seqlen_k) dbias[int64_t(row) * p.seqlen_k + key] = from_float<Element>(acc_dp[j][e]);
      }
    }
  }
  if constexpr (Rule::kSoftcap) {
#pragma unroll
    for (int j = 0; j < kSN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[j][e] = rule.finish_ds(acc_dp[j][e], softcap_factors.get(j, e));
    }
  }
}

template <typename T, bool kDq, int kFeatures>
__global__ void __launch_bounds__(T::kNThreads, 1) flash_bwd_sm90_kernel(const FlashBwdParams p) {
#ifdef FLASH_SM90_ENABLED
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  constexpr int kSN = T::kSN, kDkvN = T::kDkvN, kDqN = T::kDqN;
  constexpr int kLine = kLineBytes;
  extern __shared__ char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t s_base = smem_u32(smem);

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
  const int wg = warp / 4, warp_in_wg = warp % 4;

  const int n0 = n_block * kBlockN;
  if (n0 >= seqlen_k) return;  // past the end of a shorter sequence (varlen)
  const MaskGeometry geo(p, blk.seq);
  const int m_begin = geo.m_block_begin(n0, kBlockM);
  const int m_end = geo.m_block_end(n0, kBlockN, kBlockM);

  load_tile_sw128<kBlockN, kHeadDim, T::kNThreads>(smem + T::kKOff, k, p.k_row_stride, n0, seqlen_k, tid);
  load_tile_sw128<kBlockN, kHeadDim, T::kNThreads>(smem + T::kVOff, v, p.v_row_stride, n0, seqlen_k, tid);
  auto load_q_stage = [&](int m_block, int stage) {
    const int m0 = m_block * kBlockM;
    load_tile_sw128<kBlockM, kHeadDim, T::kNThreads>(smem + T::kQOff + stage * T::kTileM, q, p.q_row_stride, m0,
                                                     seqlen_q, tid);
    load_tile_sw128<kBlockM, kHeadDim, T::kNThreads>(smem + T::kDoOff + stage * T::kTileM, dout, p.do_row_stride,
                                                     m0, seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(smem + T::kLseOff) + stage * kBlockM, lse, m0,
                                    seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(smem + T::kDeltaOff) + stage * kBlockM, delta, m0,
                                    seqlen_q, tid);
    load_vec<kBlockM, T::kNThreads>(reinterpret_cast<float*>(smem + T::kResidualOff) + stage * kBlockM, residual, m0,
                                    residual_rows, tid);
  };
  if (m_begin < m_end) load_q_stage(m_begin, 0);
  cp_async_commit();

  // This warpgroup's part: keys [wg_key0, wg_key0 + 64) x queries
  // [q_col0, q_col0 + kSN) of S^T, head-dim columns [dkv_col0, + kDkvN) of
  // dK / dV, and its dQ piece. This thread's accumulator rows are key_row0 + g (+ 8).
  const int wg_key0 = T::kPInSmem ? 0 : 64 * wg;
  const int q_col0 = T::kPInSmem ? kSN * wg : 0;
  const int dkv_col0 = T::kPInSmem ? kDkvN * wg : 0;
  const int key_row0 = wg_key0 + 16 * warp_in_wg;
  const int dq_row0 = (T::kDqSplitRows ? 64 * wg : 0) + 16 * warp_in_wg;
  const int dq_col0 = T::kDqSplitRows ? 0 : kDqN * wg;

  float acc_dk[kDkvN / 8][4] = {};
  float acc_dv[kDkvN / 8][4] = {};

  using Rule = BwdScoreRule<Element, kFeatures>;
  const Rule rule(p, geo, b, h);
  Element* dbias = dbias_of<Element>(p, b, h);
  // Descriptor strides (bytes): 8-row groups are one swizzle atom apart; the
  // next 64 columns (MN-major operands) are the next panel.
  constexpr uint32_t kSbo = 8 * kLine;
  constexpr uint32_t kPanelN = kBlockN * kLine, kPanelM = kBlockM * kLine;

  for (int m_block = m_begin; m_block < m_end; ++m_block) {
    const int stage = (m_block - m_begin) % 2;
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // stage landed for all threads; the previous iteration is done with the other one and sDs
    if (m_block + 1 < m_end) load_q_stage(m_block + 1, stage ^ 1);
    cp_async_commit();
    const uint32_t sQ = s_base + T::kQOff + stage * T::kTileM;
    const uint32_t sDo = s_base + T::kDoOff + stage * T::kTileM;
    const uint32_t sK = s_base + T::kKOff, sV = s_base + T::kVOff;
    const uint32_t sDs = s_base + T::kDsOff, sP = s_base + T::kPOff;
    const float* sLse = reinterpret_cast<const float*>(smem + T::kLseOff) + stage * kBlockM;
    const float* sDelta = reinterpret_cast<const float*>(smem + T::kDeltaOff) + stage * kBlockM;
    const float* sResidual = reinterpret_cast<const float*>(smem + T::kResidualOff) + stage * kBlockM;
    const int m0 = m_block * kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's keys x queries:
    // both operands K-major (the head dim runs along the rows).
    float acc_s[kSN / 8][4], acc_dp[kSN / 8][4];
    wgmma_fence();
    wgmma_abt_kmajor<Element, kSN, kHeadDim>(acc_s, sK + wg_key0 * kLine, kPanelN, sQ + q_col0 * kLine, kPanelM);
    wgmma_commit();
    wgmma_abt_kmajor<Element, kSN, kHeadDim>(acc_dp, sV + wg_key0 * kLine, kPanelN, sDo + q_col0 * kLine, kPanelM);
    wgmma_commit();
    // Dropout: the keep bits of this thread's scores, drawn under the two products.
    uint64_t keep_bits = 0;
    if constexpr (Rule::kDropout) {
      if (rule.has_dropout()) keep_bits = rule.template dropout_keep_bits_t<kSN>(n0 + key_row0, m0 + q_col0, lane);
    }

    // P^T from the score rule and the saved statistics while dP^T is still running.
    wgmma_wait<1>();
    fence_regs(acc_s);
    SoftcapFactors<Element, kSN / 8> softcap_factors;
    probs_t<Element, kSN>(acc_s, softcap_factors, rule, geo, m0 + q_col0, n0 + wg_key0, n0 + key_row0,
                          sLse + q_col0, sResidual + q_col0, lane);
    uint32_t p_frag[kSN / 16][4];
    pack_p_operand<Element, kSN>(p_frag, acc_s, rule, keep_bits);

    wgmma_wait<0>();
    fence_regs(acc_dp);
    dscores_t<Element, kSN>(acc_dp, acc_s, softcap_factors, rule, p, dbias, sDelta + q_col0, keep_bits, m0 + q_col0,
                            n0 + key_row0, lane);
    uint32_t ds_frag[kSN / 16][4];
    pack_a_frags<Element>(ds_frag, acc_dp);

    // dV += P^T dO, dK += dS^T Q (B MN-major: the query rows are the
    // reduction dim), then dS^T to shared memory for dQ.
    if constexpr (!T::kPInSmem) {
      // A from registers, N = the whole head dim.
      wgmma_fence();
      wgmma_rs_b_mn<Element, kDkvN>(acc_dv, p_frag, sDo, kPanelM);
      wgmma_rs_b_mn<Element, kDkvN>(acc_dk, ds_frag, sQ, kPanelM);
      wgmma_commit();
      if constexpr (kDq) store_packed_sw128(smem + T::kDsOff, kBlockN, key_row0, q_col0, ds_frag, lane);
    } else {
      // Both warpgroups' halves of P^T / dS^T meet in shared memory; A is
      // read from there K-major, B is this warpgroup's head-dim half.
      store_packed_sw128(smem + T::kPOff, kBlockN, key_row0, q_col0, p_frag, lane);
      store_packed_sw128(smem + T::kDsOff, kBlockN, key_row0, q_col0, ds_frag, lane);
      fence_proxy_async();
      __syncthreads();
      const uint32_t col_off = (dkv_col0 / 64) * kPanelM;
      wgmma_fence();
      wgmma_ss_a_kmajor_b_mn<Element, kDkvN, kBlockM / 16>(acc_dv, sP, sDo + col_off, kPanelM);
      wgmma_ss_a_kmajor_b_mn<Element, kDkvN, kBlockM / 16>(acc_dk, sDs, sQ + col_off, kPanelM);
      wgmma_commit();
    }

    if constexpr (kDq) {
      // dQ piece = dS K: A = dS^T read MN-major, B = K MN-major, reduction
      // over the kBlockN keys.
      if constexpr (!T::kPInSmem) {
        fence_proxy_async();
        __syncthreads();
      }
      const uint32_t a_base = sDs + (T::kDqSplitRows ? wg * kPanelN : 0);
      const uint32_t b_base = sK + (dq_col0 / 64) * kPanelN;
      float acc_dq[kDqN / 8][4];
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < kBlockN / 16; ++s) {
        wgmma_ss<Element, kDqN, 1, 1>(acc_dq, make_desc(a_base + s * 16 * kLine, kPanelN, kSbo),
                                      make_desc(b_base + s * 16 * kLine, kPanelN, kSbo), s > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc_dq);
      fence_regs(acc_dv);
      fence_regs(acc_dk);
      fence_regs(p_frag);
      fence_regs(ds_frag);

      add_dq_strip<kHeadDim, kDqN>(p, blk.seq, b, h, m0 + dq_row0, dq_col0, acc_dq, lane);
    } else {
      wgmma_wait<0>();
      fence_regs(acc_dv);
      fence_regs(acc_dk);
      fence_regs(p_frag);
      fence_regs(ds_frag);
    }
  }

  store_dkdv_strip<Element, kDkvN>(p, blk.seq, b, h, n0 + key_row0, dkv_col0, acc_dk, acc_dv,
                                   rule.dv_scale(), lane);
#endif  // FLASH_SM90_ENABLED
}

}  // namespace sm90
}  // namespace flash
