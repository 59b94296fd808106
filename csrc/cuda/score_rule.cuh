// The score rule (../score_rule.h) as the CUDA kernels apply it: in log2
// units, on mma.sync / wgmma accumulator fragments. The forward kernels
// (sm80 and sm90) call apply_score_rule on their S fragments before the
// online softmax. What a score means lives in the rule; only the walking
// over fragments is here.
#pragma once

#include "../score_rule.h"
#include "primitives.cuh"

namespace flash {

template <typename Element, bool kHasBias>
using CudaScoreRule = ScoreRule<float, Element, ScoreUnits::kLog2, kHasBias>;

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

}  // namespace flash
