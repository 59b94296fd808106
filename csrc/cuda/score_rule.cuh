// The score rule (../score_rule.h) as the CUDA kernels apply it: in log2
// units, on mma.sync / wgmma accumulator fragments. The forward kernels
// (sm80 and sm90) call apply_score_rule on their S fragments before the
// online softmax; the three backward kernels call BwdScoreRule::prob per
// score and the rule's score_grad for dS. What a score means lives in the
// rule; only the walking over fragments and the exp2 are here.
//
// kMods (softcap, ALiBi) is a compile-time variant of every kernel, next to
// the forward's kHasBias: the launchers pick it for calls that use either
// (has_score_mods), so that the kernels of calls without them carry no
// instruction or register for them.
#pragma once

#include "../score_rule.h"
#include "primitives.cuh"

namespace flash {

template <typename Element, bool kHasBias, bool kMods = false>
using CudaScoreRule = ScoreRule<float, Element, ScoreUnits::kLog2, kHasBias, kMods>;


// Calls fn(score, row, col) for every element of one warp's accumulator
// fragments s[kMT][kNT][4] (layout: softmax.cuh), with `row` the rule's Row
// of the element's query row; `row0` is the first row of the warp's first
// m-tile and `col0` the first column of the tile.
template <typename Rule, int kMT, int kNT, typename Fn>
__device__ __forceinline__ void for_each_score(float (&s)[kMT][kNT][4], const Rule& rule, int row0, int col0, int lane,
                                               Fn&& fn) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const typename Rule::Row row = rule.row(row0 + mi * 16 + hr * 8 + g);
#pragma unroll
      for (int nj = 0; nj < kNT; ++nj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) fn(s[mi][nj][hr * 2 + e], row, col0 + nj * 8 + 2 * t + e);
      }
    }
  }
}

// The forward's scores of one key tile, in place: the rule's prepared score
// (the softmax's exp2 FFMA then multiplies by rule.exp_scale()), then -inf
// where the mask hides the key. The mask runs only when the tile of
// kTileRows x kTileCols scores at (tile_row0, col0), the extent that all
// threads taking the branch together cover (a block's or a warpgroup's), is
// not fully visible; `row0` is this warp's first row.
template <int kTileRows, int kTileCols, typename Rule, int kMT, int kNT>
__device__ __forceinline__ void apply_score_rule(float (&s)[kMT][kNT][4], const Rule& rule, int tile_row0, int row0,
                                                 int col0, int lane) {
  using Row = typename Rule::Row;
  if constexpr (!Rule::kDefersScale) {
    for_each_score(s, rule, row0, col0, lane, [&](float& x, const Row& row, int col) { x = row.prepared(x, col); });
  }
  if (!rule.geo.tile_fully_visible(tile_row0, kTileRows, col0, kTileCols)) {
    // The volatile asm keeps this a uniform branch: without it the compiler
    // may turn the mask into selects executed on every tile. After a first
    // loop, `lane` also goes through it, so that the mask loop works out its
    // coordinates afresh: reusing the first loop's would keep them all live
    // from one loop to the other (spills in the Hopper forward with a bias).
    int mask_lane = lane;
    if constexpr (!Rule::kDefersScale) {
      asm volatile("" : "+r"(mask_lane));
    } else {
      asm volatile("");
    }
    for_each_score(s, rule, row0, col0, mask_lane,
                   [&](float& x, const Row& row, int col) { x = row.masked(x, col); });
  }
}

// The backward's P for the raw score s of (row, col), whose bias is `bias`,
// from the saved row statistics, before the mask: exp2((logit - lse_log2) -
// residual). Subtracting the two parts one after the other keeps a row whose
// logits all sit near a huge value (a -1e9 bias) at P = 1 / keys instead of
// 1; with a deferred scale the first subtraction is the FFMA that scales.
// Rows that saw no key (lse = +inf) get P = 0.
// `dsoftcap` receives softcap's derivative factor of the score (logit()'s;
// 1 without softcap), for dS; rules without kMods leave it alone.
template <typename Rule>
__device__ __forceinline__ float unmasked_prob(const Rule& rule, float s, int row, int col, float bias,
                                               float lse_log2_row, float residual, float& dsoftcap) {
  if constexpr (Rule::kDefersScale) {
    return exp2_fast(fmaf(s, rule.exp_scale(), -lse_log2_row) - residual);
  } else if constexpr (Rule::kMods) {
    return exp2_fast((rule.logit(s, row, col, bias, dsoftcap) - lse_log2_row) - residual);
  } else {
    return exp2_fast((rule.logit(s, row, col, bias) - lse_log2_row) - residual);
  }
}

// The backward kernels take the bias at run time (one instantiation serves
// calls with and without it) and kMods at compile time. With kMods, prob()
// also gives each score's softcap factor, which the kernel keeps in
// registers (one float per score of its S fragment, as flash-attn 2 keeps
// dtanh) until ds() turns dP into dS; without kMods the factor is never
// written or read, so the kernels' arrays for it vanish.
template <typename Element, bool kMods = false>
struct BwdScoreRule : ScoreRuleAnyBias<float, Element, ScoreUnits::kLog2, kMods> {
  using Base = ScoreRuleAnyBias<float, Element, ScoreUnits::kLog2, kMods>;
  using Base::Base;

  // P of the raw score s at (row, col). `need_mask`: the tile is not fully
  // visible, so P is 0 where the mask hides the score or it does not exist.
  // The bias is read only when the call has one.
  __device__ __forceinline__ float prob(float s, int row, int col, float lse_log2_row, float residual, bool need_mask,
                                        float& dsoftcap) const {
    const float bias = this->has_bias ? this->biased.bias_at(row, col) : 0.f;
    const float prob = this->has_bias
                           ? unmasked_prob(this->biased, s, row, col, bias, lse_log2_row, residual, dsoftcap)
                           : unmasked_prob(this->unbiased, s, row, col, bias, lse_log2_row, residual, dsoftcap);
    return !need_mask || this->unbiased.visible(row, col) ? prob : 0.f;
  }
  // Interior tiles without a bias (the common case without kMods, whose
  // scores then need no coordinates): one FFMA, one FADD and the EX2 per
  // score. Only for tiles where fast_tile() holds: with kMods none does
  // (ALiBi needs the coordinates), and prob() serves every tile.
  __device__ __forceinline__ float prob_unbiased_visible(float s, float lse_log2_row, float residual) const {
    float unused;
    return unmasked_prob(this->unbiased, s, 0, 0, 0.f, lse_log2_row, residual, unused);
  }
  // Whether the tile at hand can take prob_unbiased_visible.
  __device__ __forceinline__ bool fast_tile(bool need_mask) const { return !kMods && !need_mask && !this->has_bias; }

  // dS of a score from its P, dP, the row's D and the factor prob() gave:
  // the rule's score_grad. `logit_grad` receives the gradient before
  // softcap's factor, which is the bias's (dbias); kernels that write dbias
  // read it there and then call finish_ds.
  __device__ __forceinline__ static float logit_grad(float prob, float dprob, float row_d) {
    return Base::score_grad(prob, dprob, row_d);
  }
  __device__ __forceinline__ static float finish_ds(float logit_grad, float dsoftcap) {
    if constexpr (kMods) {
      return Base::through_softcap(logit_grad, dsoftcap);
    } else {
      return logit_grad;
    }
  }
  __device__ __forceinline__ static float ds(float prob, float dprob, float row_d, float dsoftcap) {
    if constexpr (kMods) {
      return Base::score_grad(prob, dprob, row_d, dsoftcap);
    } else {
      return Base::score_grad(prob, dprob, row_d);
    }
  }
};

}  // namespace flash
