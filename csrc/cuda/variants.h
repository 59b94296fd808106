// Which compiled variant of a kernel a call needs: with or without the
// additive bias (forwards), and which score features (score_rule.h:
// softcap, ALiBi, dropout). Shared by the sm80 and Hopper launchers; masks
// and sinks are run-time and need no variant.
//
// The features compiled: none, each one alone (which then needs no run-time
// test, and keeps the instructions and registers of the others out of the
// kernel), and all three together for calls that combine them (each tested
// at run time). A variant per combination would double the kernels again
// for combinations few models use; with a bias, the forward has only the
// plain and the all-features variants. Per tiling that is 7 forward and 5
// backward instantiations (4 and 2 with a single kMods variant, whose
// ALiBi calls ran +23% forward / +94% backward over the plain kernel,
// against +2-5% for what ALiBi itself computes; H200, hd 128, 8k).
#pragma once

#include <type_traits>

#include "../flash_params.h"
#include "../score_rule.h"

namespace flash {

template <int kFeatures>
using FeatureSet = std::integral_constant<int, kFeatures>;

// Calls fn(FeatureSet<F>{}) with the compiled variant that serves a call
// whose features are `features`: itself where it is compiled, else all.
template <typename Fn>
void dispatch_features(int features, Fn&& fn) {
  switch (features) {
    case kNoFeatures: return fn(FeatureSet<kNoFeatures>{});
    case kSoftcapFeature: return fn(FeatureSet<kSoftcapFeature>{});
    case kAlibiFeature: return fn(FeatureSet<kAlibiFeature>{});
    case kDropoutFeature: return fn(FeatureSet<kDropoutFeature>{});
    default: return fn(FeatureSet<kAllFeatures>{});
  }
}

// The forward's variants: calls fn(has_bias, features) with
// std::integral_constant values.
template <typename Fn>
void dispatch_fwd_variant(const FlashFwdParams& params, Fn&& fn) {
  const int features = score_features(params);
  if (params.bias == nullptr) {
    dispatch_features(features, [&](auto f) { fn(std::false_type{}, f); });
  } else if (features == kNoFeatures) {
    fn(std::true_type{}, FeatureSet<kNoFeatures>{});
  } else {
    fn(std::true_type{}, FeatureSet<kAllFeatures>{});
  }
}

}  // namespace flash
