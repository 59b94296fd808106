// The warp-specialized Hopper backward's launcher
// (flash_bwd_sm90_ws_kernel.cuh): its tiles, the calls it cannot take, the
// tensor maps. run_flash_bwd_dkdv_sm90_ws returns false, launching nothing,
// when another backward must run instead: FLASH_ATTN_EXT_SM90_BWD = classic,
// not a Hopper device (or FLASH_ATTN_EXT_DISABLE_SM90), a head dim other
// than 64, 128 and 256 (variable-length calls: 64 and 128), tensors TMA
// cannot describe, or a shared-memory budget the tiles exceed.
// With ws_strict each of those raises an error naming the reason instead.
// Dense and variable-length calls alike (kVarlen: cu_seqlens or seqused_k,
// as the warp-specialized forward's launcher decides).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "../device_props.cuh"
#include "../tile_list.cuh"
#include "../variants.h"
#include "flash_bwd_sm90_ws_kernel.cuh"
#include "sm90_dispatch.cuh"
#include "tma.cuh"

namespace flash {

// Stages of Q / dO: 3 at head dim 64 (131 KB), 2 at 128 (195 KB: a third
// would need 228 KB, over the 227 KB a block may have, next to the
// double-buffered dS^T and the dQ staging pieces), 2 of Q and 1 of dO at
// 256 (226.6 KB with 64-key blocks, double-buffered P^T and dS^T and the
// dQ staging slabs of 64 columns; WsBwdTraits::kDoStages).
template <typename Element, int kHeadDim>
using Sm90WsBwdTraitsFor = sm90::WsBwdTraits<Element, kHeadDim, (kHeadDim == 64 ? 3 : 2)>;

namespace sm90 {

// Whether a call needs the kernel's per-sequence offsets and lengths
// (kVarlen): cu_seqlens on either side, or seqused_k.
inline bool ws_bwd_varlen(const FlashBwdParams& p) {
  return p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr || p.seqused_k != nullptr;
}

// The tensor maps of q, dout, k, v and dq_accum for tiles of T; null on
// success, else why the warp-specialized backward cannot take the call. A
// variable-length side (cu_seqlens set) is one batch entry of all its rows
// (total_q / total_k), which the kernel addresses at the sequence's first
// row.
template <typename T>
const char* encode_ws_bwd_maps(WsBwdParams& ws, const FlashBwdParams& p) {
  constexpr bool kBf16 = std::is_same_v<typename T::Element, __nv_bfloat16>;
  const bool varlen_q = p.cu_seqlens_q != nullptr, varlen_k = p.cu_seqlens_k != nullptr;
  const int64_t batch_q = varlen_q ? 1 : p.batch, rows_q = varlen_q ? p.total_q : p.seqlen_q;
  const int64_t batch_k = varlen_k ? 1 : p.batch, rows_k = varlen_k ? p.total_k : p.seqlen_k;
  const char* why = encode_bshd_map(&ws.tma_q, p.q, kBf16, batch_q, rows_q, p.nheads, T::kHeadDim,
                                    p.q_batch_stride, p.q_row_stride, p.q_head_stride, T::kBlockM);
  if (why == nullptr) {
    why = encode_bshd_map(&ws.tma_do, p.dout, kBf16, batch_q, rows_q, p.nheads, T::kHeadDim, p.do_batch_stride,
                          p.do_row_stride, p.do_head_stride, T::kBlockM);
  }
  if (why == nullptr) {
    why = encode_bshd_map(&ws.tma_k, p.k, kBf16, batch_k, rows_k, p.nheads_k, T::kHeadDim, p.k_batch_stride,
                          p.k_row_stride, p.k_head_stride, T::kBlockN);
  }
  if (why == nullptr) {
    why = encode_bshd_map(&ws.tma_v, p.v, kBf16, batch_k, rows_k, p.nheads_k, T::kHeadDim, p.v_batch_stride,
                          p.v_row_stride, p.v_head_stride, T::kBlockN);
  }
  if (why == nullptr && p.dq_accum != nullptr) {
    // dq_accum: (query rows, nheads, head dim) fp32, contiguous (bwd_cuda):
    // (batch, seqlen_q) rows dense, total_q varlen (the rows of q, as
    // flash_bwd_launch.cuh's all_rows walks them); boxes of one warp's 16
    // rows, which the TMA unit clips at the last row.
    const int64_t row = int64_t(p.nheads) * T::kHeadDim;
    why = encode_bshd_map_f32(&ws.tma_dq, p.dq_accum, batch_q, rows_q, p.nheads, T::kHeadDim, row * rows_q, row,
                              T::kHeadDim, 16);
  }
  return why;
}

}  // namespace sm90

// The grid: one block per key block of the largest sequence, in
// BwdBlock's order (each (batch, head)'s key blocks in turn, so that
// neighbours share Q and dO in L2), or for causal dense calls in groups of
// (batch, head)s a wave wide, block-major within a group
// (sm90_dispatch.cuh's causal_group_width): every head of the last group
// starts its first key block, which meets every query, before any starts
// its second. Variable-length calls with
// cu_seqlens_k instead run one block per entry of the list of their key
// blocks that hold rows (cuda/tile_list.cuh, written by a one-block kernel
// first on the stream; FLASH_ATTN_EXT_SM90_BWD_ORDER): over the largest
// sequence's grid most blocks of a batch of mixed lengths lay past their
// sequence's end, and a long causal sequence late in the batch started its
// heaviest blocks last.
template <typename T>
void launch_flash_bwd_sm90_ws(sm90::WsBwdParams& ws, cudaStream_t stream) {
  const FlashBwdParams& p = ws.bwd;
  const int64_t num_n_blocks = (p.seqlen_k + T::kBlockN - 1) / T::kBlockN;
  const bool listed = sm90::ws_bwd_varlen(p) && p.tile_list != nullptr;
  const int64_t grid = listed ? p.tile_list_capacity : num_n_blocks * p.batch * p.nheads;
  FLASH_CHECK(num_n_blocks * p.batch * p.nheads < (int64_t(1) << 31), "flash_attn_ext: backward grid too large");
  // Variable-length calls have no bias (the varlen ops take none): the
  // kernel would index it, and dbias, densely.
  FLASH_CHECK(!sm90::ws_bwd_varlen(p) || (p.bias == nullptr && p.dbias == nullptr),
              "flash_attn_ext: a bias with variable-length sequences");
  ws.group_width =
      sm90::ws_bwd_varlen(p) ? 0 : sm90::causal_group_width(p, num_n_blocks, current_device_props().num_sms, true);
  if constexpr (sm90::bwd_ws_varlen_head_dim(T::kHeadDim)) {
    if (listed) {
      static_assert(T::kBlockN >= FlashFwdParams::kListedKeyBlockMinRows, "make_varlen_key_tile_list's room");
      if (grid == 0) return;
      varlen_tile_list_kernel<T::kBlockN, TileListSide::kKeyBlocks><<<1, kTileListThreads, 0, stream>>>(p);
      FLASH_CUDA_LAUNCH_CHECK();
    }
  }
  auto launch = [&](auto varlen, auto features) {
    constexpr bool kVarlen = decltype(varlen)::value;
    constexpr int kFeatures = decltype(features)::value;
    auto kernel = p.dq_accum != nullptr ? &sm90::flash_bwd_sm90_ws_kernel<T, true, kFeatures, kVarlen>
                                        : &sm90::flash_bwd_sm90_ws_kernel<T, false, kFeatures, kVarlen>;
    set_smem_limit(kernel, T::kSmemBytes);
    kernel<<<dim3(grid), dim3(T::kNThreads), T::kSmemBytes, stream>>>(ws);
    FLASH_CUDA_LAUNCH_CHECK();
  };
  dispatch_features(score_features(p), [&](auto features) {
    if constexpr (sm90::bwd_ws_varlen_head_dim(T::kHeadDim)) {
      if (sm90::ws_bwd_varlen(p)) {
        launch(std::true_type{}, features);
        return;
      }
    }
    launch(std::false_type{}, features);
  });
}

}  // namespace flash

template <typename Element, int kHeadDim>
bool run_flash_bwd_dkdv_sm90_ws(const FlashBwdParams& params, cudaStream_t stream) {
  const flash::sm90::KernelChoice choice = flash::sm90::bwd_kernel_choice();
  if (choice == flash::sm90::KernelChoice::kClassic) return false;
  const char* why = nullptr;
  bool launched = false;
  if (!flash::sm90::enabled()) {
    why = "not a compute capability 9.0 device, or FLASH_ATTN_EXT_DISABLE_SM90 is set";
  } else if constexpr (flash::sm90::bwd_ws_head_dim(kHeadDim)) {
    using T = flash::Sm90WsBwdTraitsFor<Element, kHeadDim>;
    flash::sm90::WsBwdParams ws;
    if (T::kSmemBytes > flash::smem_budget()) {
      why = "its shared memory exceeds the budget (FLASH_ATTN_EXT_SMEM_BUDGET_KB)";
    } else if (!flash::sm90::bwd_ws_varlen_head_dim(kHeadDim) && flash::sm90::ws_bwd_varlen(params)) {
      why = "its variable-length calls have head dims 64 and 128 only";
    } else {
      why = flash::sm90::encode_ws_bwd_maps<T>(ws, params);
    }
    if (why == nullptr) {
      ws.bwd = params;
      flash::launch_flash_bwd_sm90_ws<T>(ws, stream);
      launched = true;
    }
  } else {
    why = "it has head dims 64, 128 and 256 only";
  }
  FLASH_CHECK(launched || choice != flash::sm90::KernelChoice::kWsStrict,
              "flash_attn_ext: FLASH_ATTN_EXT_SM90_BWD=ws_strict, but the warp-specialized backward cannot take this "
              "call: ", why, " (the call's head dim, padded to a compiled size: ", std::to_string(kHeadDim), ")");
  return launched;
}
