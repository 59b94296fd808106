// The warp-specialized Hopper forward's launcher (flash_fwd_sm90_ws_kernel.cuh):
// its tiles per head dim, what it cannot take, the tensor maps, and the
// entry point run_flash_fwd_sm90_ws (declared in ../flash_launch.h,
// instantiated under ../instantiations/*_sm90ws.cu), which returns false,
// launching nothing, whenever the classic Hopper kernel must run instead.
// Selected by FLASH_ATTN_EXT_SM90_FWD (sm90_dispatch.cuh); the default
// since the H200 measured it at 1.23x the classic kernel. Dense and
// variable-length calls alike (kVarlen: cu_seqlens or seqused_k); the
// classic kernel runs when TMA cannot describe a tensor (encode_bshd_map)
// or the tiles exceed the shared-memory budget. FP8 (Element =
// __nv_fp8_e4m3, units *_e4m3_sm90ws.cu, called by the fwd_fp8 op only):
// the same kernel and launcher with the plain score rule; it has no
// fallback in C++ (flash_attn_ext/fp8.py decided that it can run), so
// whatever stops it raises, naming why.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "../device_props.cuh"
#include "../flash_launch.h"
#include "../score_rule.cuh"
#include "../tile_list.cuh"
#include "../variants.h"
#include "flash_fwd_sm90_ws_kernel.cuh"
#include "sm90_dispatch.cuh"
#include "tma.cuh"

namespace flash {

// Tiles: 128 query rows (two consumer warpgroups) everywhere. Head dim 64
// and 128: 128-key blocks, as the classic kernel; K and V stages as shared
// memory allows one block per SM (the 384 threads at 168 registers fill the
// register file anyway): 4 at 64 (144 KB), 2 at 128 (160 KB; 3 would need
// 225 KB, under the 227 KB limit but leaving nothing for a later O staging
// buffer). 256: 64-key blocks, 2 stages (192 KB), no ping-pong (traits);
// plain calls there take 80-key blocks (Sm90WsFwdTraitsHd256Plain).
template <typename Element, int kHeadDim>
using Sm90WsFwdTraitsFor =
    sm90::WsFwdTraits<Element, kHeadDim, (kHeadDim <= 128 ? 128 : 64), (kHeadDim == 64 ? 4 : 2), 2>;

// Head dim 64, without a bias or score features, dense or variable-length:
// three consumer warpgroups (192-row tiles, 160 registers each), which the
// register file allows only there (at 160 the feature and bias variants
// spill 100-650 bytes; ptxas 13.0: dense 56, varlen 68). Measured
// against two (H200, bf16, B x S = 16k, H x D = 2048, interleaved medians):
// non-causal 1.17x / 1.18x / 1.24x at seqlen 1k / 4k / 16k, causal 0.98x /
// 1.08x / 1.15x; 465-503 TFLOP/s from 4k on, cuDNN 437-479 (since the
// end-aligned blocks, 1.07-1.27x from 512 to 4k, causal and not,
// h200_2026-12-04_session15_fwd_hd64_tiles.log). Variable-length (16k
// tokens in 28 sequences of 128-4k, H 32, forwards in CUDA graphs): 443 /
// 331 TFLOP/s non-causal / causal against 382 / 314 through the 128-row
// tiles (h200_2026-12-04_session15_varlen_hd64{,_192rows}.log); which
// variable-length calls take them: sm90_fwd_takes_hd64_plain_tiles.
template <typename Element>
using Sm90WsFwdTraitsHd64Plain = sm90::WsFwdTraits<Element, 64, 128, 4, 3>;

// Head dim 256, dense, without a bias or score features: 80-key blocks
// (FlashAttention-3's) instead of 64. A key block costs a consumer fixed
// work whatever its width (the row max's shuffles, O's rescale: 128 FMULs a
// thread at this head dim, the wgmma waits, the stage hand-over), so wider
// blocks spend more of the step on the products. S (40 registers), P (20)
// and O (128) still fit the 240 without spilling; 2 stages take 225 KB of
// the 227. Measured against 64 (H200, bf16, B x S = 16k, H x D = 2048, one
// process): non-causal 1.02-1.04x at 1k-16k, causal 1.02-1.07x (16k causal
// 608 -> 648 TFLOP/s, cuDNN 590). The variants with a bias or score
// features keep 64: their score rule needs the registers. Tried at head dim
// 128 in the same run, 176-key blocks (FlashAttention-3's non-causal
// choice) lost at 1k-4k (0.94x at 1k, 0.98x at 4k) and tied from 8k, so
// 128 keeps its 128-key blocks.
template <typename Element>
using Sm90WsFwdTraitsHd256Plain = sm90::WsFwdTraits<Element, 256, 80, 2, 2>;

// FP8, head dims 128 and 256: 128-key blocks (V^T lines of 128 keys, one
// SW128 panel) and two consumer warpgroups at both, since e4m3 tiles are
// half the bytes: the S accumulator (64 registers), O (64 / 128) and P (16)
// fit the 240 registers even at 256. Stages: 3 at 128 (144 KB with the
// 32 KB output staging tile), 2 at 256 (224 KB of the 227 KB).
template <int kHeadDim>
using Sm90WsFwdTraitsE4m3 = sm90::WsFwdTraits<__nv_fp8_e4m3, kHeadDim, 128, (kHeadDim == 128 ? 3 : 2), 2>;

namespace sm90 {

// Whether a call needs the kernel's per-sequence offsets and lengths
// (kVarlen): cu_seqlens on either side, or seqused_k.
inline bool ws_fwd_varlen(const FlashFwdParams& p) {
  return p.cu_seqlens_q != nullptr || p.cu_seqlens_k != nullptr || p.seqused_k != nullptr;
}

// The tensor maps of q, k and v for tiles of T; null on success, else why
// not. A variable-length side (cu_seqlens set) is one batch entry of all
// its rows (total_q / total_k), which the kernel addresses at the
// sequence's first row.
// FP8's V^T (batch, nheads_k, headdim, vt_cols) is described as such a
// tensor with headdim as its rows and the keys as its columns: boxes of 128
// keys x headdim rows, one per stage.
template <typename T>
const char* encode_ws_maps(WsFwdParams& ws, const FlashFwdParams& p) {
  using Element = typename T::Element;
  const bool varlen_q = p.cu_seqlens_q != nullptr, varlen_k = p.cu_seqlens_k != nullptr;
  const int64_t batch_q = varlen_q ? 1 : p.batch, rows_q = varlen_q ? p.total_q : p.seqlen_q;
  const int64_t batch_k = varlen_k ? 1 : p.batch, rows_k = varlen_k ? p.total_k : p.seqlen_k;
  const char* why = encode_bshd_map_for<Element>(&ws.tma_q, p.q, batch_q, rows_q, p.nheads, T::kHeadDim,
                                                 p.q_batch_stride, p.q_row_stride, p.q_head_stride, T::kBlockM);
  if (why == nullptr) {
    why = encode_bshd_map_for<Element>(&ws.tma_k, p.k, batch_k, rows_k, p.nheads_k, T::kHeadDim, p.k_batch_stride,
                                       p.k_row_stride, p.k_head_stride, T::kBlockN);
  }
  if (why == nullptr) {
    if constexpr (T::kFp8) {
      why = encode_bshd_map_for<Element>(&ws.tma_v, p.v, varlen_k ? 1 : p.batch, T::kHeadDim, p.nheads_k,
                                         p.vt_cols, p.vt_batch_stride, p.vt_dim_stride, p.vt_head_stride,
                                         T::kHeadDim);
    } else {
      why = encode_bshd_map_for<Element>(&ws.tma_v, p.v, batch_k, rows_k, p.nheads_k, T::kHeadDim, p.v_batch_stride,
                                         p.v_row_stride, p.v_head_stride, T::kBlockN);
    }
  }
  return why;
}

}  // namespace sm90

// Whether a head dim 64 call without a bias or score features takes
// Sm90WsFwdTraitsHd64Plain's 192-row tiles: dense calls always; variable-
// length ones (and dense ones over seqused_k) where their sequences average
// 384 query rows or more. A sequence wastes up to 191 rows of its last
// 192-row block against 127 of a 128-row one, and the 192-row tiles are
// 1.07-1.27x faster per row computed (512-4k, session 15): below about three
// 128-row blocks a sequence the padding can outweigh that (all sequences of
// 256 rows: 384 rows computed against 256), above it the tiles win (the
// bench's mix of 128-4k, 585 rows on average: 1.16x). The host sees only the
// total and the largest length, so the rule takes the average.
template <typename Element>
bool sm90_fwd_takes_hd64_plain_tiles(const FlashFwdParams& params) {
  if (has_score_mods(params) || params.bias != nullptr) return false;
  if (Sm90WsFwdTraitsHd64Plain<Element>::kSmemBytes > smem_budget()) return false;
  if (!sm90::ws_fwd_varlen(params)) return true;
  const int64_t rows = params.cu_seqlens_q != nullptr ? int64_t(params.total_q)
                                                     : int64_t(params.batch) * params.seqlen_q;
  return rows >= 384 * int64_t(params.batch);
}

// Whether a head dim 256 call takes Sm90WsFwdTraitsHd256Plain's blocks:
// plain and dense, shared memory for them, and FLASH_ATTN_EXT_SM90_FWD_TILES
// not narrow.
template <typename Element>
bool sm90_fwd_takes_hd256_plain_tiles(const FlashFwdParams& params) {
  if (sm90::fwd_tiles_choice() == sm90::FwdTiles::kNarrow) return false;
  if (has_score_mods(params) || params.bias != nullptr || sm90::ws_fwd_varlen(params)) return false;
  return Sm90WsFwdTraitsHd256Plain<Element>::kSmemBytes <= smem_budget();
}

template <typename T, typename Rule, bool kVarlen>
void launch_flash_fwd_sm90_ws(sm90::WsFwdParams& params, cudaStream_t stream) {
  auto kernel = &sm90::flash_fwd_sm90_ws_kernel<T, Rule, kVarlen>;
  set_smem_limit(kernel, T::kSmemBytes);
  const int64_t num_m_blocks = (params.fwd.seqlen_q + T::kBlockM - 1) / T::kBlockM;
  const int64_t tiles = num_m_blocks * params.fwd.batch * params.fwd.nheads;
  FLASH_CHECK(tiles < (int64_t(1) << 31), "flash_attn_ext: forward grid too large");
  // With a tile counter, a persistent grid: one block per SM (the kernel's
  // shared memory and registers allow no second one), each taking query
  // blocks until none is left.
  const bool persistent = T::kPersistent && params.fwd.tile_counter != nullptr;
  const int64_t grid = persistent ? std::min<int64_t>(tiles, current_device_props().num_sms) : tiles;
  if constexpr (kVarlen && T::kPersistent) {
    // The query blocks that hold rows, listed before the kernel walks them
    // (flash_params.h, tile_list).
    if (persistent && params.fwd.tile_list != nullptr) {
      static_assert(T::kBlockM >= 64, "make_varlen_tile_list sizes the list for blocks of 64 rows or more");
      varlen_tile_list_kernel<T::kBlockM, TileListSide::kQueryBlocks><<<1, kTileListThreads, 0, stream>>>(params.fwd);
      FLASH_CUDA_LAUNCH_CHECK();
    }
  }
  // Causal dense calls in groups of (batch, head)s a wave wide, block-major
  // within a group (sm90_dispatch.cuh's causal_group_width; by default at
  // head dim 128, 16-bit, only: the measured ones).
  params.group_width = kVarlen ? 0
                               : sm90::causal_group_width(params.fwd, num_m_blocks, current_device_props().num_sms,
                                                          T::kHeadDim == 128 && !T::kFp8);
  kernel<<<dim3(grid), T::kNThreads, T::kSmemBytes, stream>>>(params);
  FLASH_CUDA_LAUNCH_CHECK();
}

// run_flash_fwd_sm90_ws with the tiles of T; kPlainOnly: T only has the
// variant without bias and score features (the caller checked), dense, and
// with kPlainVarlen variable-length too.
template <typename T, bool kPlainOnly = false, bool kPlainVarlen = false>
bool run_flash_fwd_sm90_ws_tiles(const FlashFwdParams& params, cudaStream_t stream) {
  using Element = typename T::Element;
  const sm90::KernelChoice choice = sm90::fwd_kernel_choice();
  if (choice == sm90::KernelChoice::kClassic) return false;
  const char* why = nullptr;
  if (!sm90::enabled()) {
    why = "not a compute capability 9.0 device, or FLASH_ATTN_EXT_DISABLE_SM90 is set";
  } else if (T::kSmemBytes > smem_budget()) {
    why = "its shared memory exceeds the budget (FLASH_ATTN_EXT_SMEM_BUDGET_KB)";
  }
  sm90::WsFwdParams ws;
  if (why == nullptr) why = sm90::encode_ws_maps<T>(ws, params);
  if (why != nullptr) {
    FLASH_CHECK(choice != sm90::KernelChoice::kWsStrict,
                "flash_attn_ext: FLASH_ATTN_EXT_SM90_FWD=ws_strict, but the warp-specialized forward cannot take "
                "this call: ", why);
    return false;
  }
  ws.fwd = params;
  // Variable-length calls (kVarlen) have no bias (the varlen and kv-cache
  // ops take none), which spares the biased variants a varlen instance.
  auto launch = [&](auto has_bias, auto features) {
    using Rule = CudaScoreRule<Element, decltype(has_bias)::value, decltype(features)::value>;
    if constexpr (Rule::kHasBias) {
      FLASH_CHECK(!sm90::ws_fwd_varlen(params), "flash_attn_ext: a bias with variable-length sequences");
      launch_flash_fwd_sm90_ws<T, Rule, false>(ws, stream);
    } else if (sm90::ws_fwd_varlen(params)) {
      launch_flash_fwd_sm90_ws<T, Rule, true>(ws, stream);
    } else {
      launch_flash_fwd_sm90_ws<T, Rule, false>(ws, stream);
    }
  };
  if constexpr (kPlainOnly) {
    FLASH_CHECK(!has_score_mods(params) && params.bias == nullptr && (kPlainVarlen || !sm90::ws_fwd_varlen(params)),
                "flash_attn_ext: internal: a call with features or varlen sent to a plain-only tiling");
    using Plain = CudaScoreRule<Element, false, kNoFeatures>;
    if constexpr (kPlainVarlen) {
      if (sm90::ws_fwd_varlen(params)) {
        launch_flash_fwd_sm90_ws<T, Plain, true>(ws, stream);
        return true;
      }
    }
    launch_flash_fwd_sm90_ws<T, Plain, false>(ws, stream);
  } else {
    dispatch_fwd_variant(params, launch);
  }
  return true;
}

}  // namespace flash

namespace flash {

// The FP8 forward: always this kernel (ws_strict's behaviour, whatever
// FLASH_ATTN_EXT_SM90_FWD says, since the 16-bit kernels cannot read e4m3),
// the plain score rule, dense or variable-length.
template <int kHeadDim>
void run_flash_fwd_sm90_ws_e4m3(const FlashFwdParams& params, cudaStream_t stream) {
  using T = Sm90WsFwdTraitsE4m3<kHeadDim>;
  const char* why = nullptr;
  if (!sm90::enabled()) {
    why = "not a compute capability 9.0 device, or FLASH_ATTN_EXT_DISABLE_SM90 is set";
  } else if (T::kSmemBytes > smem_budget()) {
    why = "its shared memory exceeds the budget (FLASH_ATTN_EXT_SMEM_BUDGET_KB)";
  } else if (has_score_mods(params) || params.bias != nullptr || params.sinks != nullptr) {
    why = "the call has a bias, a score feature (softcap, ALiBi, dropout) or sinks";
  }
  sm90::WsFwdParams ws;
  if (why == nullptr) why = sm90::encode_ws_maps<T>(ws, params);
  FLASH_CHECK(why == nullptr, "flash_attn_ext: the FP8 forward cannot take this call: ", why);
  ws.fwd = params;
  using Rule = CudaScoreRule<__nv_bfloat16, false, kNoFeatures>;
  if (sm90::ws_fwd_varlen(params)) {
    launch_flash_fwd_sm90_ws<T, Rule, true>(ws, stream);
  } else {
    launch_flash_fwd_sm90_ws<T, Rule, false>(ws, stream);
  }
}


}  // namespace flash

template <typename Element, int kHeadDim>
bool run_flash_fwd_sm90_ws(const FlashFwdParams& params, cudaStream_t stream) {
  if constexpr (flash::sm90::kIsFp8<Element>) {
    static_assert(kHeadDim == 128 || kHeadDim == 256, "the FP8 forward has head dims 128 and 256");
    flash::run_flash_fwd_sm90_ws_e4m3<kHeadDim>(params, stream);
    return true;
  } else {
    if constexpr (kHeadDim == 64) {
      // The two-warpgroup tiles (144 KB) still run under a budget below these (152 KB).
      if (flash::sm90_fwd_takes_hd64_plain_tiles<Element>(params)) {
        return flash::run_flash_fwd_sm90_ws_tiles<flash::Sm90WsFwdTraitsHd64Plain<Element>, true, true>(params,
                                                                                                       stream);
      }
    }
    if constexpr (kHeadDim == 256) {
      if (flash::sm90_fwd_takes_hd256_plain_tiles<Element>(params)) {
        return flash::run_flash_fwd_sm90_ws_tiles<flash::Sm90WsFwdTraitsHd256Plain<Element>, true>(params, stream);
      }
    }
    return flash::run_flash_fwd_sm90_ws_tiles<flash::Sm90WsFwdTraitsFor<Element, kHeadDim>>(params, stream);
  }
}
