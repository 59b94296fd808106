// The per-call tile counter of the persistent Hopper kernels: one int32,
// zero before the launch, from which each block of a persistent grid takes
// the next work tile (flash_params.h, tile_counter). A fresh one per call
// (a 4-byte allocation and its memset, both queued on the call's stream and
// captured by CUDA graphs), so that calls on concurrent streams never share
// one; none where no persistent kernel can run, or where its switch is off.
// Variable-length calls on that grid, and on the warp-specialized
// backward, also get the list of their blocks that hold rows (tile_list),
// sized from the call's shapes alone.
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

// Room for `blocks_of_side`'s list (flash_params.h, tile_list): sequence b
// holds ceil(len_b / min_rows) blocks or fewer, so they number at most
// total / min_rows + batch a head, and never more than the grid of the
// largest sequence. The launcher fills it on the call's stream (a size known
// on the host: CUDA graphs capture it), and clamps the count to this room
// should overlapping cu_seqlens claim more rows than the tensors hold.
inline Tensor make_tile_list_room(const Tensor& like, FlashFwdParams& p, int64_t total, int64_t max_rows,
                                  int64_t min_rows) {
  const int64_t grid_tiles = (max_rows + min_rows - 1) / min_rows * p.batch * p.nheads;
  const int64_t capacity = std::min<int64_t>((total / min_rows + p.batch) * p.nheads, grid_tiles);
  Tensor t = empty_on(like, {capacity + 1}, ScalarType::Int);
  p.tile_list = static_cast<int*>(t.data_ptr());
  p.tile_list_capacity = capacity;
  return t;
}

// The forward's list of query blocks, when the call has a tile counter (the
// persistent grid walks the list), cu_seqlens_q, and a largest sequence of
// more than one query block; else nothing (p.tile_list null).
inline std::optional<Tensor> make_varlen_tile_list(const Tensor& like, FlashFwdParams& p) {
  p.tile_list = nullptr;
  p.tile_list_capacity = 0;
  constexpr int64_t kMinRows = FlashFwdParams::kListedQueryBlockMinRows;
  if (p.tile_counter == nullptr || p.cu_seqlens_q == nullptr || p.seqlen_q <= kMinRows) return std::nullopt;
  return make_tile_list_room(like, p, p.total_q, p.seqlen_q, kMinRows);
}

// The backward's list of key blocks, when the warp-specialized Hopper
// backward may take the call at the (padded) head dim, it has cu_seqlens_k,
// and FLASH_ATTN_EXT_SM90_BWD_ORDER is not grid; else nothing (p.tile_list
// null: the kernel's grid covers every key block of the largest sequence).
inline std::optional<Tensor> make_varlen_key_tile_list(const Tensor& like, FlashFwdParams& p, int head_dim) {
  p.tile_list = nullptr;
  p.tile_list_capacity = 0;
  if (!flash::sm90::kBuilt || !flash::sm90::enabled() || p.cu_seqlens_k == nullptr) return std::nullopt;
  if (!flash::sm90::bwd_ws_varlen_head_dim(head_dim) ||
      flash::sm90::bwd_kernel_choice() == flash::sm90::KernelChoice::kClassic || !flash::sm90::bwd_varlen_list()) {
    return std::nullopt;
  }
  return make_tile_list_room(like, p, p.total_k, p.seqlen_k, FlashFwdParams::kListedKeyBlockMinRows);
}

}  // namespace flash_attn_ext
