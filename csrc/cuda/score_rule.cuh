// The score rule (../score_rule.h) as the CUDA kernels apply it: in log2
// units, on mma.sync / wgmma accumulator fragments. The forward kernels
// (sm80 and sm90) call apply_score_rule on their S fragments before the
// online softmax; the three backward kernels call BwdScoreRule::prob per
// score and the rule's score_grad for dS. What a score means lives in the
// rule; only the walking over fragments and the exp2 are here.
//
// The score features (softcap, ALiBi, dropout: kFeatures, a ScoreFeature bit
// set) are compile-time variants of every kernel, next to the forward's
// kHasBias: the launchers pick the variant of a call's features
// (variants.h), so that a kernel carries no instruction or register for a
// feature the call does not use.
#pragma once

#include "../score_rule.h"
#include "primitives.cuh"

namespace flash {

template <typename Element, bool kHasBias, int kFeatures = kNoFeatures>
using CudaScoreRule = ScoreRule<float, Element, ScoreUnits::kLog2, kHasBias, kFeatures>;


// ALiBi's distances (ScoreRule::distance()) of a thread's scores in one
// m-tile of accumulator fragments with queries as rows (layout:
// softmax.cuh; the forwards, the dQ kernel): score e of n-tile nj sits at
// row row0 + 8 (e / 2) + g and column col0 + 8 nj + 2 t + e % 2, with `row0`
// the m-tile's first row and `col0` the first column. The distance is
// converted once, for the thread's first score; a score's is that plus its
// offset from it, a compile-time integer: one FADD with an immediate, shared
// by the scores at the same distance (the row 8 further at the column 8
// further), where the integer distance cost an IADD, an IABS and a
// conversion on the slow I2F pipe (ALiBi +14% in the Hopper forward, H200
// hd 128 8k). Exact while distances stay below 2^24. Dead without ALiBi:
// the kernels keep their own integer coordinates for the mask and the bias.
struct QueryRowsDistance {
  float first;  // the thread's score (0, 0)
  template <typename Rule>
  __device__ __forceinline__ QueryRowsDistance(const Rule& rule, int row0, int col0, int lane)
      : first(rule.distance(row0 + (lane >> 2), col0 + 2 * (lane & 3))) {}
  __device__ __forceinline__ float at(int nj, int e) const {
    return first + static_cast<float>(8 * (e / 2) - 8 * nj - e % 2);
  }
};

// The same with keys as rows (the dK/dV backwards, S^T): score e of n-tile
// j of acc[kN / 8][4] sits at key key0 + g + 8 (e / 2) and query q0 + 8 j +
// 2 t + e % 2.
struct KeyRowsDistance {
  float first;  // the thread's score (0, 0)
  template <typename Rule>
  __device__ __forceinline__ KeyRowsDistance(const Rule& rule, int q0, int key0, int lane)
      : first(rule.distance(q0 + 2 * (lane & 3), key0 + (lane >> 2))) {}
  __device__ __forceinline__ float at(int j, int e) const {
    return first + static_cast<float>(8 * j + e % 2 - 8 * (e / 2));
  }
};

// Calls fn(score, row, col, distance) for every element of one warp's
// accumulator fragments s[kMT][kNT][4] (layout: softmax.cuh), with `row` the
// rule's Row of the element's query row, `col` its key and `distance` its
// ALiBi distance; `row0` is the first row of the warp's first m-tile and
// `col0` the first column of the tile. The distances: QueryRowsDistance's
// per m-tile where the rule defers the scale (ALiBi alone: one FFMA per
// score and an FADD per distinct distance). Shared over all m-tiles instead,
// they kept more registers live and the sm80 forward at hd 128 (two m-tiles
// a warp, 255 registers) spilled 48 bytes more. Rules that keep the scale
// (ALiBi with softcap or a bias, the all-features variants) convert each
// score's integer distance as before: with the float forms the Hopper
// forwards' bias + all-features variants spilled in their main loops.
template <typename Rule, int kMT, int kNT, typename Fn>
__device__ __forceinline__ void for_each_score(float (&s)[kMT][kNT][4], const Rule& rule, int row0, int col0, int lane,
                                               Fn&& fn) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
    [[maybe_unused]] const QueryRowsDistance distance(rule, row0 + mi * 16, col0, lane);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const typename Rule::Row row = rule.row(row0 + mi * 16 + hr * 8 + g);
#pragma unroll
      for (int nj = 0; nj < kNT; ++nj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + nj * 8 + 2 * t + e;
          const float d = Rule::kDefersScale ? distance.at(nj, hr * 2 + e)
                                             : rule.distance(row0 + mi * 16 + hr * 8 + g, col);
          fn(s[mi][nj][hr * 2 + e], row, col, d);
        }
      }
    }
  }
}

// The forward's scores of one key tile, in place: the rule's prepared score
// (the softmax's exp2 FFMA then multiplies by rule.exp_scale(); nothing to do
// for a rule that keeps the raw score), then -inf
// where the mask hides the key. The mask runs only when the tile of
// kTileRows x kTileCols scores at (tile_row0, col0), the extent that all
// threads taking the branch together cover (a block's or a warpgroup's), is
// not fully visible; `row0` is this warp's first row.
template <int kTileRows, int kTileCols, typename Rule, int kMT, int kNT>
__device__ __forceinline__ void apply_score_rule(float (&s)[kMT][kNT][4], const Rule& rule, int tile_row0, int row0,
                                                 int col0, int lane) {
  using Row = typename Rule::Row;
  if constexpr (!Rule::kKeepsRawScore) {
    for_each_score(s, rule, row0, col0, lane,
                   [&](float& x, const Row& row, int col, float d) { x = row.prepared_at(x, col, d); });
  }
  if (!rule.geo.tile_fully_visible(tile_row0, kTileRows, col0, kTileCols)) {
    // The volatile asm keeps this a uniform branch: without it the compiler
    // may turn the mask into selects executed on every tile. After a first
    // loop, `lane` also goes through it, so that the mask loop works out its
    // coordinates afresh: reusing the first loop's would keep them all live
    // from one loop to the other (spills in the Hopper forward with a bias).
    int mask_lane = lane;
    if constexpr (!Rule::kKeepsRawScore) {
      asm volatile("" : "+r"(mask_lane));
    } else {
      asm volatile("");
    }
    for_each_score(s, rule, row0, col0, mask_lane,
                   [&](float& x, const Row& row, int col, float) { x = row.masked(x, col); });
  }
}

// Dropout (../dropout.h) on accumulator fragments. One Philox draw covers
// the eight scores a thread holds of a 16 x 16 tile; these walk the draws
// of a thread's fragment and call fn with each score's index and whether it
// is kept. Queries as rows (the forwards, the deterministic dQ kernel):
// s[kMT][kNT][4] with the warp's first row `row0` and the tile's first
// column `col0` (multiples of 16); fn(mi, nj, e, kept).
template <int kMT, int kNT, typename Fn>
__device__ __forceinline__ void for_each_dropout_keep(const Dropout& dropout, int row0, int col0, int lane, Fn&& fn) {
  static_assert(kNT % 2 == 0, "whole 16-column tiles");
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      uint32_t w[4];
      dropout.draw(((static_cast<uint32_t>(col0 >> 4) + kk) << 2) | t,
                   ((static_cast<uint32_t>(row0 >> 4) + mi) << 3) | g, w);
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int jk = 0; jk < 2; ++jk)
#pragma unroll
          for (int e = 0; e < 2; ++e) fn(mi, 2 * kk + jk, 2 * hr + e, dropout.kept(w[2 * hr + jk], e != 0));
    }
  }
}

// Keys as rows (the dK/dV backwards, S^T): acc[kN / 8][4] holds keys
// key_row0 + g (+ 8) and queries q_col0 + 8 j + 2 t (+ 1), both firsts
// multiples of 16. A thread's scores of a 16 x 16 tile come from two draws
// (its two query columns x = 0, 1), of which it uses one half each (the
// halves of its key parity); the lane with the other key parity (lane ^ 4)
// uses the other halves. So each of the two lanes draws one column (the one
// equal to its key parity) and hands the halves it does not use to the
// other over a shuffle: one Philox call per thread and tile, as in the
// forward, instead of two (every lane of the warp must call this).
// fn(j, jk, mine, kept) for the score of n-tile j and key half jk (keys g or
// g + 8) in this lane's own query column (mine: fragment element
// 2 jk + parity) or in the other one (2 jk + (parity ^ 1)). The arguments
// are compile-time constants once unrolled, the lane's parity is not: the
// caller maps mine to an element (dropout_keep_bits_t, once per fragment).
template <int kN, typename Fn>
__device__ __forceinline__ void for_each_dropout_keep_t(const Dropout& dropout, int key_row0, int q_col0, int lane,
                                                        Fn&& fn) {
  static_assert(kN % 16 == 0, "whole 16-query tiles");
  const int g = lane >> 2, t = lane & 3;
  const uint32_t key_group = (static_cast<uint32_t>(key_row0 >> 4) << 2) | static_cast<uint32_t>(g >> 1);
  const int parity = g & 1;  // this lane's key parity, and the query column it draws
  // This lane's half of a word, moved to the top (where Dropout::kept
  // compares an odd column: the low half then cannot change the outcome).
  const uint32_t mine_shift = parity ? 0u : 16u;
  // The other parity's halves of words w0 (jk = 0) and w1 (jk = 1), low and
  // high half of one word: bytes 0-1 of both words, or bytes 2-3.
  const uint32_t give_bytes = parity ? 0x5410u : 0x7632u;
#pragma unroll
  for (int jj = 0; jj < kN / 16; ++jj) {
    uint32_t w[4];
    dropout.draw(key_group, ((static_cast<uint32_t>(q_col0 >> 4) + jj) << 3) | static_cast<uint32_t>(2 * t + parity),
                 w);
    uint32_t got[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) got[i] = __shfl_xor_sync(0xFFFFFFFFu, __byte_perm(w[2 * i], w[2 * i + 1], give_bytes), 4);
    // What came back: this parity's halves of the partner's draw, jk = 0 in
    // the low half of got[jq], jk = 1 in the high half.
#pragma unroll
    for (int jq = 0; jq < 2; ++jq) {
#pragma unroll
      for (int jk = 0; jk < 2; ++jk) {
        fn(2 * jj + jq, jk, true, (w[2 * jq + jk] << mine_shift) < dropout.threshold_hi);
        fn(2 * jj + jq, jk, false, (jk ? got[jq] : got[jq] << 16) < dropout.threshold_hi);
      }
    }
  }
}

// The forward's dropout, after the online softmax has taken the tile's
// probabilities into its row sums (softmax_lse does not see dropout): a
// dropped P becomes 0 before O += P V, a kept one stays P, and the epilogue
// multiplies O by 1 / (1 - p) (ScoreRule::dropout_out_scale). A no-op unless
// the rule has kDropout and the call asks for dropout (a uniform branch).
template <typename Rule, int kMT, int kNT>
__device__ __forceinline__ void apply_dropout(float (&s)[kMT][kNT][4], const Rule& rule, int row0, int col0, int lane) {
  if constexpr (Rule::kDropout) {
    if (rule.dropout_on()) {
      for_each_dropout_keep<kMT, kNT>(rule.dropout, row0, col0, lane, [&](int mi, int nj, int e, bool kept) {
        if (!kept) s[mi][nj][e] = 0.f;
      });
    }
  }
}

// The backward's P for the raw score s at (row, col) and ALiBi distance
// `distance`, whose bias is `bias`,
// from the saved row statistics, before the mask: exp2((logit - lse_log2) -
// residual). Subtracting the two parts one after the other keeps a row whose
// logits all sit near a huge value (a -1e9 bias) at P = 1 / keys instead of
// 1; with a deferred scale the first subtraction is the FFMA that scales
// the prepared score, as the forward's exp2 did.
// Rows that saw no key (lse = +inf) get P = 0.
// `dsoftcap` receives softcap's derivative factor of the score (logit()'s;
// 1 without softcap), for dS; rules without softcap may leave it alone.
template <typename Rule>
__device__ __forceinline__ float unmasked_prob(const Rule& rule, float s, float distance, float bias,
                                               float lse_log2_row, float residual, float& dsoftcap) {
  if constexpr (Rule::kDefersScale) {
    return exp2_fast(fmaf(rule.prepared_at(s, distance, bias), rule.exp_scale(), -lse_log2_row) - residual);
  } else if constexpr (Rule::kShapesLogit) {
    return exp2_fast((rule.logit_at(s, distance, bias, dsoftcap) - lse_log2_row) - residual);
  } else {
    return exp2_fast((rule.logit_at(s, distance, bias) - lse_log2_row) - residual);
  }
}

// Softcap's factors (1 - tanh^2) of a thread's S fragment, kRows x 4
// scores, held from P until dS. In bf16 kernels as fp16 pairs: 2^-11
// relative, below the rounding of dS to bf16 for the dK / dQ products
// (2^-8), in half the registers (the Hopper backward at hd 128 spilled 220
// bytes with them in fp32); fp32 in fp16 kernels, whose dS keeps 2^-11.
template <typename Element, int kRows>
struct SoftcapFactors {
  static constexpr bool kPacked = std::is_same_v<Element, __nv_bfloat16>;
  std::conditional_t<kPacked, __half2[kRows][2], float[kRows][4]> v;

  // Row j's four factors, stored as soon as they are computed, so that they
  // are never all live in fp32.
  __device__ __forceinline__ void set(int j, const float (&f)[4]) {
    if constexpr (kPacked) {
      v[j][0] = __floats2half2_rn(f[0], f[1]);
      v[j][1] = __floats2half2_rn(f[2], f[3]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[j][e] = f[e];
    }
  }
  __device__ __forceinline__ float get(int j, int e) const {
    if constexpr (kPacked) {
      return e % 2 == 0 ? __low2float(v[j][e / 2]) : __high2float(v[j][e / 2]);
    } else {
      return v[j][e];
    }
  }
};

// The backward kernels take the bias at run time (one instantiation serves
// calls with and without it) and the score features at compile time. With
// softcap, prob() also gives each score's softcap factor, which the kernel
// keeps in registers (one float per score of its S fragment, as flash-attn 2
// keeps dtanh) until ds() turns dP into dS; without it the factor is never
// written or read, so the kernels' arrays for it vanish.
template <typename Element, int kFeatures = kNoFeatures>
struct BwdScoreRule : ScoreRuleAnyBias<float, Element, ScoreUnits::kLog2, kFeatures> {
  using Base = ScoreRuleAnyBias<float, Element, ScoreUnits::kLog2, kFeatures>;
  using Base::Base;
  using Unbiased = typename Base::unbiased_type;
  static constexpr bool kSoftcap = Unbiased::kSoftcap, kDropout = Unbiased::kDropout;
  static constexpr bool kShapesLogit = Unbiased::kShapesLogit;

  // ALiBi's distance of (row, col), for QueryRowsDistance / KeyRowsDistance.
  __device__ __forceinline__ float distance(int row, int col) const { return this->unbiased.distance(row, col); }

  // P of the raw score s at (row, col), whose ALiBi distance is `distance`
  // (QueryRowsDistance / KeyRowsDistance; unused without ALiBi). `need_mask`:
  // the tile is not fully visible, so P is 0 where the mask hides the score
  // or it does not exist. The bias is read only when the call has one.
  __device__ __forceinline__ float prob(float s, int row, int col, float distance, float lse_log2_row, float residual,
                                        bool need_mask, float& dsoftcap) const {
    const float bias = this->has_bias ? this->biased.bias_at(row, col) : 0.f;
    const float prob = this->has_bias
                           ? unmasked_prob(this->biased, s, distance, bias, lse_log2_row, residual, dsoftcap)
                           : unmasked_prob(this->unbiased, s, distance, bias, lse_log2_row, residual, dsoftcap);
    return !need_mask || this->unbiased.visible(row, col) ? prob : 0.f;
  }
  // Interior tiles of calls without a bias: no mask test and no bias read,
  // and the kernels load the row statistics once per pair of columns. The
  // plain rule needs no coordinates there (one FFMA and the EX2 per
  // score); ALiBi alone adds one FFMA per score and an
  // FADD per distinct distance (its deferred scale, ../score_rule.h);
  // softcap's factor goes to `dsoftcap` as prob() gives it. No residual:
  // a call has one only with a bias or fp64 inputs (needs_lse_residual,
  // checks.cpp enforces it), and these kernels are 16-bit, so without a
  // bias it is 0 and subtracting it (an FADD a score, and its shared-memory
  // loads) changed nothing. Only for tiles where fast_tile() holds (or the
  // edge tiles of calls without a bias); prob() serves every tile.
  __device__ __forceinline__ float prob_unbiased_visible(float s, float distance, float lse_log2_row,
                                                         float& dsoftcap) const {
    return unmasked_prob(this->unbiased, s, distance, 0.f, lse_log2_row, 0.f, dsoftcap);
  }
  // Whether the tile at hand can take prob_unbiased_visible.
  __device__ __forceinline__ bool fast_tile(bool need_mask) const { return !need_mask && !this->has_bias; }

  // Dropout (kDropout only; ../dropout.h) of this (batch, head).
  __device__ __forceinline__ const Dropout& dropout() const { return this->unbiased.dropout; }
  __device__ __forceinline__ bool has_dropout() const { return this->unbiased.dropout_on(); }
  // Which scores of this thread's P^T fragment (keys as rows, kN / 8
  // n-tiles, see for_each_dropout_keep_t) dropout keeps: bit 4 j + e. One
  // register pair instead of a mark on every score, so that the kernels can
  // draw it where few registers are live (under the S^T / dP^T products)
  // and the Philox temporaries do not meet P^T, dP^T and softcap's factors.
  // Only when has_dropout().
  template <int kN>
  __device__ __forceinline__ uint64_t dropout_keep_bits_t(int key_row0, int q_col0, int lane) const {
    static_assert(kN / 8 * 4 <= 64, "a bit per score of the fragment");
    // Bit 4 j + 2 jk + (mine ? 0 : 1) first, each at a constant position
    // (a compare and a predicated OR per score), then, for a lane of odd key
    // parity, whose own column is the odd one, every pair of bits swapped.
    uint64_t bits = 0;
    for_each_dropout_keep_t<kN>(dropout(), key_row0, q_col0, lane, [&](int j, int jk, bool mine, bool kept) {
      if (kept) bits |= uint64_t(1) << (4 * j + 2 * jk + (mine ? 0 : 1));
    });
    constexpr uint64_t kEven = 0x5555555555555555ull;
    if ((lane >> 2) & 1) bits = ((bits & kEven) << 1) | ((bits >> 1) & kEven);
    // Opaque from here (the swap is not pushed into the uses): the Hopper
    // backward at hd 128 spilled 96 bytes with it, 124 without.
    asm volatile("" : "+l"(bits));
    return bits;
  }
  __device__ __forceinline__ static bool kept(uint64_t keep_bits, int j, int e) { return (keep_bits >> (4 * j + e)) & 1; }
  // The operand of dV += P^T dO: P, or with dropout P where kept and 0
  // where dropped. Dropout's 1 / (1 - p) is left to the epilogue (dv_scale():
  // dV is linear in it), one FMUL per score fewer in the loop.
  template <int kN>
  __device__ __forceinline__ void dv_operand(float (&dst)[kN][4], const float (&src)[kN][4], uint64_t keep_bits) const {
    const bool on = has_dropout();
#pragma unroll
    for (int j = 0; j < kN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[j][e] = !on || kept(keep_bits, j, e) ? src[j][e] : 0.f;
  }
  // What the epilogue multiplies dV by (dv_operand): 1 / (1 - p) with
  // dropout, else 1.
  __device__ __forceinline__ float dv_scale() const { return this->unbiased.dropout_out_scale(); }
  // dP^T fragments to the logit's gradient in place, with D of query column
  // c at delta_cols[c] (the fragment's first query column is 0 there):
  // logit_grad, with dropout of dP ∘ keep / (1 - p) (the loss sees P only
  // through the dropped P).
  template <int kN>
  __device__ __forceinline__ void logit_grads_t(float (&dp)[kN][4], const float (&prob)[kN][4],
                                                const float* delta_cols, int lane, uint64_t keep_bits = 0) const {
    const int t = lane & 3;
    if (has_dropout()) {
      const float scale = dropout().scale;
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float2 d = *reinterpret_cast<const float2*>(delta_cols + 8 * j + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // The select before the scale, which then fuses with logit_grad's
          // subtraction of D (an FFMA).
          const float dprob = (kept(keep_bits, j, e) ? dp[j][e] : 0.f) * scale;
          dp[j][e] = logit_grad(prob[j][e], dprob, e % 2 == 0 ? d.x : d.y);
        }
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const float2 d = *reinterpret_cast<const float2*>(delta_cols + 8 * j + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = logit_grad(prob[j][e], dp[j][e], e % 2 == 0 ? d.x : d.y);
    }
  }
  // ds() of a marked P (the deterministic dQ kernel, kDropout only):
  // correct with dropout off too, where the mark is P itself.
  __device__ __forceinline__ float ds_marked(float x, float dprob, float row_d, float dsoftcap) const {
    return finish_ds(Base::unbiased_type::score_grad_dropout(x, dprob, row_d, dropout().keep_prob), dsoftcap);
  }

  // dS of a score from its P, dP, the row's D and the factor prob() gave:
  // the rule's score_grad. `logit_grad` receives the gradient before
  // softcap's factor, which is the bias's (dbias); kernels that write dbias
  // read it there and then call finish_ds.
  __device__ __forceinline__ static float logit_grad(float prob, float dprob, float row_d) {
    return Base::score_grad(prob, dprob, row_d);
  }
  __device__ __forceinline__ static float finish_ds(float logit_grad, float dsoftcap) {
    if constexpr (kSoftcap) {
      return Base::through_softcap(logit_grad, dsoftcap);
    } else {
      return logit_grad;
    }
  }
  __device__ __forceinline__ static float ds(float prob, float dprob, float row_d, float dsoftcap) {
    if constexpr (kSoftcap) {
      return Base::score_grad(prob, dprob, row_d, dsoftcap);
    } else {
      return Base::score_grad(prob, dprob, row_d);
    }
  }
};

}  // namespace flash
