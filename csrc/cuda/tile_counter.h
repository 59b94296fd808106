// The per-call tile counter of the persistent Hopper kernels: one int32,
// zero before the launch, from which each block of a persistent grid takes
// the next work tile (flash_params.h, tile_counter). A fresh one per call
// (a 4-byte allocation and its memset, both queued on the call's stream and
// captured by CUDA graphs), so that calls on concurrent streams never share
// one; none where no persistent kernel can run, or where its switch is off.
#pragma once

#include <optional>

#include "../tensor.h"
#include "flash_launch.h"

namespace flash_attn_ext {

// A zeroed counter on `like`'s device when `wanted` and the Hopper kernels
// run here, with *counter pointing at it; else nothing (and *counter null).
inline std::optional<Tensor> make_tile_counter(const Tensor& like, bool wanted, int** counter) {
  *counter = nullptr;
  if (!wanted || !flash::sm90::kBuilt || !flash::sm90::enabled()) return std::nullopt;
  Tensor t = zeros_on(like, {1}, ScalarType::Int);
  *counter = static_cast<int*>(t.data_ptr());
  return t;
}

}  // namespace flash_attn_ext
