// The score rule: how the raw score s = q.k of query row `row` and key `col`
// becomes the logit that the softmax exponentiates. Written once here and
// called by every kernel: CUDA sm80 and sm90, forward and backward (through
// the fragment helpers in cuda/score_rule.cuh), and the CPU (cpu_tile.h).
// The steps, in this order:
//   1. scale    s * softmax_scale
//   2. softcap  softcap * tanh(s / softcap), when params.softcap > 0
//   3. ALiBi    - slope_h * |row + seqlen_k - seqlen_q - col|, when
//               params.alibi_slopes is set
//   4. bias     + the additive bias at (row, col), floored (floored_bias)
//   5. mask     -inf where MaskGeometry (mask.h) hides the key
// and the backward's twin, score_grad: the gradient with respect to the raw
// score, where the derivative of a step goes (softcap's 1 - tanh^2) and
// backward dropout's scaling. A feature is one compile-time switch here; a
// kernel built without it carries no instruction for it.
//
// Units. Kernels keep scores in the units their exponential wants:
//  * log2 (CUDA): the logit times log2(e), since the SFU computes exp2. Step
//    1 multiplies by softmax_scale_log2 = scale * log2(e), natural-unit terms
//    (the bias) are multiplied by log2(e), and steps 1 and 4 are one FFMA.
//    With nothing but the scale before the mask, kernels keep the raw score
//    and the FFMA in front of each exp2 applies the scale (exp_scale()),
//    which saves an instruction per score; masking the raw score to -inf
//    then relies on softmax_scale > 0. ALiBi alone keeps that deferred
//    scale (kDefersScale): its term is linear, so the kernels keep the logit
//    divided by the scale, s - (slope / softmax_scale) * |distance|, one
//    FFMA per score on top of the plain rule's instructions.
//  * natural, prescaled (CPU): natural log, and the raw scores arrive with
//    step 1 done, because the CPU kernels load Q times the scale.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "dropout.h"
#include "flash_params.h"
#include "host_device.h"
#include "mask.h"

namespace flash {

constexpr float kLog2e = 1.4426950408889634f;

// Step 4's bias value, times `unit` (log2(e) in log2 units, 1 in natural
// ones): below -kBiasFloor it counts as -kBiasFloor (flash_params.h), so that
// finite masks built from finfo.min stay finite in the log2 domain; -inf
// stays -inf (a hidden key). A NaN stays NaN, so that its row's output is
// NaN, as in PyTorch's math path (written as b < floor, which is false for
// a NaN; fmaxf's b > floor form would turn it into a silently masked key).
template <typename T>
FLASH_HOST_DEVICE T floored_bias(T b, T unit) {
  const T floor = -static_cast<T>(kBiasFloor);
  return b == -std::numeric_limits<T>::infinity() ? b : (b < floor ? floor : b) * unit;
}

enum class ScoreUnits {
  kLog2,              // CUDA: logit * log2(e), raw scores unscaled
  kNaturalPrescaled,  // CPU: logit, raw scores already scaled
};

// tanh for softcap: the SFU's tanh.approx on the GPU (max relative error
// about 2^-11, below bf16's rounding of the inputs), the library's elsewhere.
template <typename T>
FLASH_HOST_DEVICE T fast_tanh(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
#endif
  return std::tanh(x);
}

// The score features a kernel variant compiles in, as a bit set: softcap
// (step 2), ALiBi (step 3) and dropout (dropout.h). Each is a compile-time
// switch, so that a kernel built for one carries no instruction or register
// for the others: one kMods variant with all three, tested at run time, cost
// a plain ALiBi call +94% in the backward (H200, hd 128, 8k), from the
// registers of softcap's factors and the dropout draws it kept.
enum ScoreFeature : int {
  kNoFeatures = 0,
  kSoftcapFeature = 1,
  kAlibiFeature = 2,
  kDropoutFeature = 4,
  kAllFeatures = kSoftcapFeature | kAlibiFeature | kDropoutFeature,
};

// The features a call uses. Every launcher (CPU and CUDA) picks its variant
// with it: the CUDA ones compile a variant per single feature and kAllFeatures
// for calls that combine them (cuda/variants.h), the CPU only kAllFeatures.
// Attention sinks need none: the forward's epilogue takes them at run time
// and the backward does not see them.
inline int score_features(const FlashFwdParams& p) {
  return (p.softcap > 0 ? kSoftcapFeature : 0) | (p.alibi_slopes != nullptr ? kAlibiFeature : 0) |
         (p.dropout_p > 0 ? kDropoutFeature : 0);
}
inline bool has_score_mods(const FlashFwdParams& p) { return score_features(p) != kNoFeatures; }

// T: the score type (float; double for fp64 on the CPU). Element: the bias
// dtype. kHasBias: step 4 is compiled in; the bias pointer is then the
// (batch, head) slice of FlashFwdParams::bias, which must be set.
// kFeatures: the ScoreFeature bits compiled in. A variant with one feature
// serves only calls that use exactly it, so its feature needs no run-time
// test; in a variant with several, each runs when the call asks for it
// (params.softcap > 0, params.alibi_slopes set, params.dropout_p > 0),
// tested once per (batch, head) and uniformly across a kernel's threads.
template <typename T, typename Element, ScoreUnits kUnits, bool kHasBias_, int kFeatures_ = kNoFeatures>
struct ScoreRule {
  static constexpr bool kHasBias = kHasBias_;
  static constexpr int kFeatures = kFeatures_;
  static constexpr bool kSoftcap = (kFeatures & kSoftcapFeature) != 0;
  static constexpr bool kAlibi = (kFeatures & kAlibiFeature) != 0;
  // The rule then carries the call's Dropout, whose `on` the kernels test.
  static constexpr bool kDropout = (kFeatures & kDropoutFeature) != 0;
  // Steps 2 or 3: the logit needs more than the scale and the bias.
  static constexpr bool kShapesLogit = kSoftcap || kAlibi;
  static constexpr bool kOneFeature = kFeatures == kSoftcapFeature || kFeatures == kAlibiFeature ||
                                      kFeatures == kDropoutFeature;

  // Only step 1 comes before the mask (dropout comes after the softmax).
  static constexpr bool kScaleOnly = !kHasBias && !kShapesLogit;
  // In log2 units the kernels then defer the scale to their exp2 FFMA (see
  // the units above), also past ALiBi, whose term they keep divided by the
  // scale: what they keep before the mask (prepared()) times exp_scale() is
  // the logit. Softcap, which needs the scaled score, and the bias, which
  // the scale's FFMA adds for free, keep the scale where it is.
  static constexpr bool kDefersScale = kUnits == ScoreUnits::kLog2 && !kHasBias && !kSoftcap;
  // prepared() is the raw score itself: nothing to compute before the mask.
  static constexpr bool kKeepsRawScore = kDefersScale && !kAlibi;
  // Softcap alone, in log2 units: the forward keeps tanh(s * softcap_in) and
  // its exp2 FFMA multiplies by softcap_out (exp_scale()), one FMUL less per
  // score (the backward, which also needs tanh's derivative, computes the
  // logit). softcap_out > 0, so masking to -inf holds as with the scale.
  static constexpr bool kDefersSoftcapOut =
      kUnits == ScoreUnits::kLog2 && !kHasBias && kFeatures == kSoftcapFeature;

  // The rule reads the call's parameters and the kernel's own MaskGeometry
  // where it uses them, as the kernels did before it existed: on the GPU a
  // parameter read at its use is a constant-bank operand, where a copy would
  // take a register across the main loop. Only the bias pointer is worked
  // out once, per (batch, head).
  const FlashFwdParams& params;
  const MaskGeometry& geo;
  const Element* bias_matrix;  // this (batch, head)'s bias; null without kHasBias
  // Steps 2 and 3 for this (batch, head), in the rule's units (kSoftcap,
  // kAlibi):
  // softcap is softcap_out * tanh(s * softcap_in) of the raw score s (log2:
  // softmax_scale / softcap in, softcap * log2(e) out; prescaled: 1 /
  // softcap in, softcap out); ALiBi subtracts alibi_slope * |distance| in
  // the units of prepared() (the slope times log2(e) in log2 units, the
  // slope / softmax_scale with kDefersScale; 0 without ALiBi).
  bool has_softcap = false;
  T softcap_in = T(0), softcap_out = T(0), alibi_slope = T(0);
  // This (batch, head)'s dropout (kDropout only; off otherwise).
  Dropout dropout;

  FLASH_HOST_DEVICE ScoreRule(const FlashFwdParams& p, const MaskGeometry& geometry, int64_t batch, int64_t head)
      : params(p),
        geo(geometry),
        bias_matrix(kHasBias ? static_cast<const Element*>(p.bias) + batch * p.bias_batch_stride +
                                   head * p.bias_head_stride
                             : nullptr) {
    const T unit = kUnits == ScoreUnits::kLog2 ? T(kLog2e) : T(1);
    if constexpr (kSoftcap) {
      has_softcap = p.softcap > 0;
      if (has_softcap) {
        const T scale_in = kUnits == ScoreUnits::kLog2 ? static_cast<T>(p.softmax_scale_f) : T(1);
        softcap_in = scale_in / static_cast<T>(p.softcap);
        softcap_out = static_cast<T>(p.softcap) * unit;
      }
    }
    if constexpr (kAlibi) {
      if (p.alibi_slopes != nullptr) {
        const T slope = static_cast<T>(p.alibi_slopes[batch * p.alibi_batch_stride + head]);
        alibi_slope = kDefersScale ? slope / static_cast<T>(p.softmax_scale_f) : slope * unit;
      }
    }
    if constexpr (kDropout) dropout = Dropout(p, batch, head);
  }

  // Step 1's factor: softmax_scale_log2 in log2 units, 1 in prescaled units.
  FLASH_HOST_DEVICE T scale() const {
    if constexpr (kUnits == ScoreUnits::kLog2) {
      return params.softmax_scale_log2;
    } else {
      return T(1);
    }
  }

  FLASH_HOST_DEVICE T exp_scale() const {
    if constexpr (kDefersScale) {
      return scale();
    } else if constexpr (kDefersSoftcapOut) {
      return softcap_out;
    } else {
      return T(1);
    }
  }

  // ALiBi's distance of (row, col), row + seqlen_k - seqlen_q - col, as the
  // score type: the steps below take it so. Exact while it stays below 2^24
  // in magnitude (float), as the integer's conversion was. Kernels that walk
  // a fragment work it out once for a reference score and add each score's
  // offset from it, a compile-time integer, as a float (cuda/score_rule.cuh):
  // the same exact value in one FADD (the sums stay integers below 2^24).
  FLASH_HOST_DEVICE T distance(int row, int col) const { return static_cast<T>(row + geo.offset() - col); }

  // Whether (row, col) is a score of the call: partial tiles at the ends of
  // the sequences carry scores that are not.
  FLASH_HOST_DEVICE bool exists(int row, int col) const { return row < geo.seqlen_q && col < geo.seqlen_k; }

  // The bias of a score that exists, at `offset` (bias_offset) in the
  // (batch, head) matrix.
  FLASH_HOST_DEVICE int64_t bias_offset(int row, int col) const {
    return row * params.bias_row_stride + col * params.bias_col_stride;
  }
  FLASH_HOST_DEVICE T stored_bias(int64_t offset) const { return static_cast<T>(bias_matrix[offset]); }
  // The bias at (row, col); 0 where the score does not exist.
  FLASH_HOST_DEVICE T bias_at(int row, int col) const {
    return exists(row, col) ? stored_bias(bias_offset(row, col)) : T(0);
  }

  // Whether step 2 runs: compiled in, and asked for by the call (known at
  // compile time in a one-feature variant).
  FLASH_HOST_DEVICE bool softcap_on() const {
    if constexpr (!kSoftcap) {
      return false;
    } else if constexpr (kOneFeature) {
      return true;
    } else {
      return has_softcap;
    }
  }

  // Whether dropout runs: compiled in, and asked for by the call (known at
  // compile time in a one-feature variant). The run-time flag must not be
  // what a one-feature kernel tests: ptxas, short of registers, re-derived
  // it from params.dropout_p with an fp64 compare at every score (the Hopper
  // backward at hd 128: 32 DSETP per thread and query block).
  FLASH_HOST_DEVICE bool dropout_on() const {
    if constexpr (!kDropout) {
      return false;
    } else if constexpr (kOneFeature) {
      return true;
    } else {
      return dropout.on;
    }
  }

  // What the CUDA forwards multiply the output by after dividing by the row
  // sum: dropout's 1 / (1 - p) where dropout runs (they drop P without
  // scaling it, one FMUL per score fewer: O is linear in it), else 1.
  FLASH_HOST_DEVICE float dropout_out_scale() const { return dropout_on() ? dropout.scale : 1.f; }

  // Steps 1-4: the logit of the raw score s at (row, col), in the rule's
  // units; `bias` is the bias there as stored (bias_at, Row::bias or
  // Row::bias_run read it; unused without kHasBias). The _at forms take the
  // score's ALiBi distance (distance()) in place of (row, col), which only
  // ALiBi uses. Steps 2 and 3 (kShapesLogit) go between the scale and the
  // bias; in log2 units the scale is then no longer fused with the bias, and
  // softcap needs the scaled score in natural units (scale / softcap before
  // the tanh, softcap * log2(e) after).
  FLASH_HOST_DEVICE T logit(T s, int row, int col, T bias) const { return logit_at(s, distance(row, col), bias); }
  FLASH_HOST_DEVICE T logit_at(T s, [[maybe_unused]] T distance, T bias) const {
    if constexpr (kShapesLogit) {
      T unused;
      return logit_at(s, distance, bias, unused);
    } else if constexpr (kUnits == ScoreUnits::kLog2) {
      if constexpr (kHasBias) {
        return fmaf(s, scale(), floored_bias(bias, kLog2e));
      } else {
        return s * scale();
      }
    } else {
      if constexpr (kHasBias) {
        return s + floored_bias(bias, T(1));
      } else {
        return s;
      }
    }
  }

  // logit() that also gives d logit / d (scaled raw score) of step 2, the
  // factor the backward twin needs: 1 - tanh^2 with softcap, else 1.
  FLASH_HOST_DEVICE T logit(T s, int row, int col, T bias, T& dsoftcap) const {
    return logit_at(s, distance(row, col), bias, dsoftcap);
  }
  FLASH_HOST_DEVICE T logit_at(T s, [[maybe_unused]] T distance, T bias, T& dsoftcap) const {
    if constexpr (!kShapesLogit) {
      dsoftcap = T(1);
      return logit_at(s, distance, bias);
    } else if constexpr (kDefersScale) {
      dsoftcap = T(1);
      return prepared_at(s, distance, bias) * scale();
    } else {
      T x;
      if (softcap_on()) {
        const T t = fast_tanh(s * softcap_in);
        dsoftcap = T(1) - t * t;
        x = softcap_out * t;
      } else {
        dsoftcap = T(1);
        x = s * scale();
      }
      if constexpr (kAlibi) x -= alibi_term(distance);
      if constexpr (kHasBias) x += floored_bias(bias, kUnits == ScoreUnits::kLog2 ? T(kLog2e) : T(1));
      return x;
    }
  }

  // What a kernel keeps in place of the raw score before the mask: the
  // logit, or with kDefersScale the logit divided by the scale (the raw
  // score itself without ALiBi), with kDefersSoftcapOut the tanh, which the
  // FFMA in front of the exponential multiplies by exp_scale().
  FLASH_HOST_DEVICE T prepared(T s, int row, int col, T bias) const {
    return prepared_at(s, distance(row, col), bias);
  }
  FLASH_HOST_DEVICE T prepared_at(T s, [[maybe_unused]] T distance, [[maybe_unused]] T bias) const {
    if constexpr (kKeepsRawScore) {
      return s;
    } else if constexpr (kDefersScale) {
      return s - alibi_term(distance);
    } else if constexpr (kDefersSoftcapOut) {
      return fast_tanh(s * softcap_in);
    } else {
      return logit_at(s, distance, bias);
    }
  }

  // Step 3's term, alibi_slope * |distance|. In a difference x - term the
  // CUDA compiler makes it one FFMA with the |.| modifier on the distance.
  FLASH_HOST_DEVICE T alibi_term(T distance) const { return alibi_slope * std::abs(distance); }

  // Step 5: whether the mask shows the score at (row, col), which must exist
  // to be shown. The backward, which exponentiates against the saved row
  // statistics (placeholders on rows that do not exist), zeroes P where it
  // is false; the forward masks whole rows at once (Row::masked).
  FLASH_HOST_DEVICE bool visible(int row, int col) const { return exists(row, col) && geo.keys(row).contains(col); }

  // The rule for one query row, for kernels that walk their scores row by
  // row (the forward's fragments, the CPU's rows): the row's visible keys
  // are worked out once, when the row is.
  class Row {
   public:
    FLASH_HOST_DEVICE Row(const ScoreRule& rule, int row)
        : rule_(rule),
          keys_(rule.geo.keys(row)),
          exists_(row < rule.geo.seqlen_q),
          bias_row_(rule.bias_offset(row, 0)) {}

    // bias_at(row, col) with the row's part worked out.
    FLASH_HOST_DEVICE T bias(int col) const {
      return exists_ && col < rule_.geo.seqlen_k
                 ? rule_.stored_bias(bias_row_ + col * rule_.params.bias_col_stride)
                 : T(0);
    }
    // The bias of keys col0, col0 + 1, ... of a row that exists, as stored
    // (run[c] is key col0 + c's; kHasBias only), for loops over a run of keys
    // that all exist (the CPU's): no test, and an index the compiler sees
    // step by a constant stride, which keeps such loops vectorised.
    struct BiasRun {
      const Element* first;
      int64_t stride;
      FLASH_HOST_DEVICE T operator[](int c) const { return static_cast<T>(first[c * stride]); }
    };
    FLASH_HOST_DEVICE BiasRun bias_run(int col0) const {
      const int64_t stride = rule_.params.bias_col_stride;
      return BiasRun{rule_.bias_matrix + bias_row_ + col0 * stride, stride};
    }

    // The rule's prepared_at for key `col` at ALiBi distance `distance`.
    FLASH_HOST_DEVICE T prepared_at(T s, int col, T distance) const {
      return rule_.prepared_at(s, distance, kHasBias ? bias(col) : T(0));
    }
    // Step 5 in the forward: -inf where the mask hides the key (the softmax
    // then gives 0). Keys past seqlen_k are outside every row's keys; a row
    // past seqlen_q, padding a tile, keeps its scores, since nothing of it is
    // stored.
    FLASH_HOST_DEVICE T masked(T x, int col) const {
      return keys_.contains(col) ? x : -std::numeric_limits<T>::infinity();
    }

   private:
    const ScoreRule& rule_;
    KeyRange keys_;
    bool exists_;       // the row is one of the call's (not tile padding)
    int64_t bias_row_;  // bias_offset(row, 0)
  };
  FLASH_HOST_DEVICE Row row(int r) const { return Row(*this, r); }

  // The backward twin of steps 1-4: dS, the gradient of the loss with
  // respect to the raw score without the scale (the kernels apply it once to
  // dQ and dK), from P, dP = dO V^T and the row's D = rowsum(dO * O) - dlse.
  // The bias and ALiBi add constants and the mask only zeroes P, so without
  // softcap it is the softmax's P * (dP - D), which is also the gradient of
  // the logit and so of the bias (dbias). The slots:
  //   kDropout: dP of a kept entry times 1 / (1 - p), 0 for a dropped one
  //             (and the dropped P in dV += P^T dO);
  //   softcap: the result times 1 - tanh^2 of step 2's tanh (`dsoftcap`,
  //            from logit()), which the caller keeps from recomputing P.
  FLASH_HOST_DEVICE static T score_grad(T prob, T dprob, T row_d) { return prob * (dprob - row_d); }
  FLASH_HOST_DEVICE static T score_grad(T prob, T dprob, T row_d, T dsoftcap) {
    return through_softcap(score_grad(prob, dprob, row_d), dsoftcap);
  }
  // The gradient of the logit (score_grad without `dsoftcap`) carried back
  // through step 2 to the raw score. Kernels that also write dbias need the
  // two apart: the bias joins after the cap, so its gradient is the logit's.
  FLASH_HOST_DEVICE static T through_softcap(T logit_grad, T dsoftcap) { return logit_grad * dsoftcap; }
  // The twin with dropout (kDropout's slot). The backward kernels carry a
  // kept score's P as x = P / (1 - p) (what dV's product takes) and a
  // dropped one's as x = -P (the sign marks the drop; Dropout::mark), so
  // that dS = P ∘ (dP ∘ keep / (1 - p) - D) reads x * (dP - (1 - p) D) where
  // kept and x * D where dropped. `keep_prob` is 1 - p.
  FLASH_HOST_DEVICE static T score_grad_dropout(T x, T dprob, T row_d, T keep_prob) {
    return x * (x > T(0) ? dprob - keep_prob * row_d : row_d);
  }
};

// The rule of a call whose bias is known only at run time, for kernels
// compiled once for calls with and without one (the CUDA backward, the
// CPU): both forms, and visit(fn) calls fn with the one that applies.
template <typename T, typename Element, ScoreUnits kUnits, int kFeatures = kNoFeatures>
struct ScoreRuleAnyBias {
  using unbiased_type = ScoreRule<T, Element, kUnits, false, kFeatures>;
  ScoreRule<T, Element, kUnits, false, kFeatures> unbiased;
  ScoreRule<T, Element, kUnits, true, kFeatures> biased;
  bool has_bias;

  FLASH_HOST_DEVICE ScoreRuleAnyBias(const FlashFwdParams& p, const MaskGeometry& geometry, int64_t batch,
                                     int64_t head)
      : unbiased(p, geometry, batch, head), biased(p, geometry, batch, head), has_bias(p.bias != nullptr) {
    // Unused without a bias. Its pointer would already be null (null plus
    // zero strides), but the compiler cannot see that; saying so kept the
    // CUDA backward kernels' bias loads, and their registers, where they were.
    if (!has_bias) biased.bias_matrix = nullptr;
  }

  template <typename Fn>
  FLASH_HOST_DEVICE decltype(auto) visit(Fn&& fn) const {
    return has_bias ? fn(biased) : fn(unbiased);
  }
  // The twin is the same with or without the bias, which adds a constant.
  FLASH_HOST_DEVICE static T score_grad(T prob, T dprob, T row_d) {
    return ScoreRule<T, Element, kUnits, false>::score_grad(prob, dprob, row_d);
  }
  FLASH_HOST_DEVICE static T score_grad(T prob, T dprob, T row_d, T dsoftcap) {
    return ScoreRule<T, Element, kUnits, false>::score_grad(prob, dprob, row_d, dsoftcap);
  }
  FLASH_HOST_DEVICE static T through_softcap(T logit_grad, T dsoftcap) {
    return ScoreRule<T, Element, kUnits, false>::through_softcap(logit_grad, dsoftcap);
  }
};

}  // namespace flash
