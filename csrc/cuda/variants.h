// Which compiled variant of a forward kernel a call needs: with or without
// the additive bias, with or without the score modifications (kMods:
// softcap, ALiBi, dropout; score_rule.h). Shared by the sm80 and Hopper
// launchers; masks and sinks are run-time and need no variant.
#pragma once

#include <type_traits>

#include "../flash_params.h"
#include "../score_rule.h"

namespace flash {

// Calls fn(has_bias, has_mods) with the variant a call needs as
// std::integral_constant<bool, ...> values: four instantiations per tiling.
template <typename Fn>
void dispatch_fwd_variant(const FlashFwdParams& params, Fn&& fn) {
  auto with_mods = [&](auto has_bias) {
    if (has_score_mods(params)) {
      fn(has_bias, std::true_type{});
    } else {
      fn(has_bias, std::false_type{});
    }
  };
  if (params.bias != nullptr) {
    with_mods(std::true_type{});
  } else {
    with_mods(std::false_type{});
  }
}

}  // namespace flash
