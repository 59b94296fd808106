// The per-call tile counter of the persistent Hopper kernels: one int32,
// zero before the launch, from which each block of a persistent grid takes
// the next work tile (flash_params.h, tile_counter). A fresh one per call
// (a 4-byte allocation and its memset, both queued on the call's stream and
// captured by CUDA graphs), so that calls on concurrent streams never share
// one; none where no persistent kernel can run, or where its switch is off.
// Variable-length calls on that grid also get the list of their query
// blocks that hold rows (tile_list), sized from the call's shapes alone.
#pragma once

#include <algorithm>
#include <cstdint>
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

// Room for a variable-length call's tile list (flash_params.h, tile_list)
// when the call has a tile counter, cu_seqlens_q, and a largest sequence of
// more than one query block, with p.tile_list pointing at it; else nothing.
// Sequence b holds ceil(len_b / kBlockM) blocks; with kBlockM >= 64 (every
// persistent tiling's) they number at most total_q / 64 + batch a head,
// and never more than the grid of the largest sequence. The launcher fills
// it on the call's stream (a size known on the host: CUDA graphs capture
// it), and clamps the count to this room should overlapping cu_seqlens
// claim more rows than q holds.
inline std::optional<Tensor> make_varlen_tile_list(const Tensor& like, FlashFwdParams& p) {
  p.tile_list = nullptr;
  p.tile_list_capacity = 0;
  constexpr int64_t kMinBlockM = 64;
  if (p.tile_counter == nullptr || p.cu_seqlens_q == nullptr || p.seqlen_q <= kMinBlockM) return std::nullopt;
  const int64_t grid_tiles = (int64_t(p.seqlen_q) + kMinBlockM - 1) / kMinBlockM * p.batch * p.nheads;
  const int64_t capacity = std::min<int64_t>((int64_t(p.total_q) / kMinBlockM + p.batch) * p.nheads, grid_tiles);
  Tensor t = empty_on(like, {capacity + 1}, ScalarType::Int);
  p.tile_list = static_cast<int*>(t.data_ptr());
  p.tile_list_capacity = capacity;
  return t;
}

}  // namespace flash_attn_ext
