// When the Hopper (wgmma) kernels run instead of the mma.sync ones: the build
// has sm_90a code (setup.py defines FLASH_ATTN_EXT_SM90 when TORCH_CUDA_ARCH_LIST
// has 9.0a), the head dim has a Hopper kernel, and the device is compute
// capability 9.0 (H100 / H200; sm_90a code runs nowhere else). The launchers
// also check that the kernel fits the shared-memory budget
// (device_props.cuh), which only a lowered FLASH_ATTN_EXT_SMEM_BUDGET_KB makes
// it not.
//
// Which Hopper forward runs (FLASH_ATTN_EXT_SM90_FWD, developer-only): the
// warp-specialized kernel (flash_fwd_sm90_ws_kernel.cuh: TMA producer,
// mbarrier ring, setmaxnreg, ping-pong; the default), which falls back to
// the classic kernel (flash_fwd_sm90_kernel.cuh, cp.async double buffer) for
// the calls it cannot take (launch_ws.cuh: tensors TMA cannot describe), or the classic
// kernel for every call. The warp-specialized forward measured 1.23x the
// classic one (geometric mean over bf16 hd 64/128/256, seqlen 1k/4k/16k,
// causal and not; 1.37x at hd 128, 16k; H200, torch 2.11). The backward
// likewise (FLASH_ATTN_EXT_SM90_BWD): flash_bwd_sm90_ws_kernel.cuh where
// launch_bwd_ws.cuh allows (head dims 64, 128 and 256, dense calls, and
// variable-length ones at 64 and 128), else flash_bwd_sm90_kernel.cuh.
#pragma once

#include <cstdlib>
#include <cstring>

#include "../device_props.cuh"

namespace flash {
namespace sm90 {

#ifdef FLASH_ATTN_EXT_SM90
inline constexpr bool kBuilt = true;
#else
inline constexpr bool kBuilt = false;
#endif

template <int kHeadDim>
inline constexpr bool kHasFwd = kBuilt && (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);
template <int kHeadDim>
inline constexpr bool kHasBwd = kBuilt && (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);

inline bool device_is_sm90() {
  const DeviceProps& props = current_device_props();
  return props.cc_major == 9 && props.cc_minor == 0;
}

// FLASH_ATTN_EXT_DISABLE_SM90=1 (read on every call) runs the mma.sync
// kernels on Hopper too: how the tests cover, on an H100, the code that
// Ampere and Ada GPUs run.
inline bool enabled() {
  const char* off = std::getenv("FLASH_ATTN_EXT_DISABLE_SM90");
  if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
  return device_is_sm90();
}

// Which Hopper kernel runs, forward (FLASH_ATTN_EXT_SM90_FWD) and backward
// (FLASH_ATTN_EXT_SM90_BWD): ws (or unset), classic or ws_strict. Read on
// every call, like FLASH_ATTN_EXT_DISABLE_SM90 (a getenv, against a launch
// of microseconds), so that a test or a benchmark switches kernels within
// one process.
enum class KernelChoice {
  kClassic,   // the classic kernel for every call
  kWs,        // warp-specialized where it can, classic elsewhere (the default)
  kWsStrict,  // warp-specialized or an error naming why not (tests, benchmarks)
};

inline KernelChoice kernel_choice(const char* variable) {
  const char* env = std::getenv(variable);
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "ws") == 0) return KernelChoice::kWs;
  if (std::strcmp(env, "classic") == 0) return KernelChoice::kClassic;
  if (std::strcmp(env, "ws_strict") == 0) return KernelChoice::kWsStrict;
  flash_attn_ext::fail("flash_attn_ext: ", variable, " must be classic, ws or ws_strict, got '", env, "'");
}
inline KernelChoice fwd_kernel_choice() { return kernel_choice("FLASH_ATTN_EXT_SM90_FWD"); }

// The warp-specialized forward's key blocks for dense calls without a bias
// or score features at head dim 256 (FLASH_ATTN_EXT_SM90_FWD_TILES,
// developer-only, read on every call): wide or unset / auto (launch_ws.cuh's
// 80-key blocks, the default), or narrow (the 64-key blocks every other
// call at that head dim runs; for comparing the two in one process).
enum class FwdTiles { kAuto, kWide, kNarrow };
inline FwdTiles fwd_tiles_choice() {
  const char* env = std::getenv("FLASH_ATTN_EXT_SM90_FWD_TILES");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return FwdTiles::kAuto;
  if (std::strcmp(env, "wide") == 0) return FwdTiles::kWide;
  if (std::strcmp(env, "narrow") == 0) return FwdTiles::kNarrow;
  flash_attn_ext::fail("flash_attn_ext: FLASH_ATTN_EXT_SM90_FWD_TILES must be auto, wide or narrow, got '", env,
                       "'");
}
inline KernelChoice bwd_kernel_choice() { return kernel_choice("FLASH_ATTN_EXT_SM90_BWD"); }

// How the warp-specialized backward's grid covers a variable-length call's
// key blocks (FLASH_ATTN_EXT_SM90_BWD_ORDER, developer-only, read on every
// call): list or unset (one block per entry of the list of the key blocks
// that hold rows, cuda/tile_list.cuh: the longest sequences first), or grid
// (every key block of the largest sequence's grid, each (batch, head)'s in
// turn: the order before; for comparing the two in one process).
inline bool bwd_varlen_list() {
  const char* env = std::getenv("FLASH_ATTN_EXT_SM90_BWD_ORDER");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "list") == 0) return true;
  if (std::strcmp(env, "grid") == 0) return false;
  flash_attn_ext::fail("flash_attn_ext: FLASH_ATTN_EXT_SM90_BWD_ORDER must be list or grid, got '", env, "'");
}

// Dense causal calls on the warp-specialized kernels: groups of (batch,
// head)s about a wave of the grid wide, block-major within a group
// (cuda/tile_list.cuh, group_block_major), or each (batch, head)'s blocks in
// turn. FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS (developer-only, read on every
// call, for comparing the two in one process): unset for the default (the
// backward, and the 16-bit forward at head dim 128, in groups), 1 for groups in
// every kernel, 0 for none. Measured in one process (H200, bf16, causal,
// B x S = 16k, H x D = 2048, perf-notes step 10): the backward 1.00-1.02x
// at head dim 64 and 1.02-1.06x at 128; the forward 1.02-1.03x at 128 but
// 0.97-1.00x at 64, which keeps each head in turn.
enum class CausalGroups { kDefault, kOn, kOff };
inline CausalGroups causal_groups() {
  const char* env = std::getenv("FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS");
  if (env == nullptr || env[0] == '\0') return CausalGroups::kDefault;
  if (std::strcmp(env, "1") == 0) return CausalGroups::kOn;
  if (std::strcmp(env, "0") == 0) return CausalGroups::kOff;
  flash_attn_ext::fail("flash_attn_ext: FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS must be 0 or 1 (or unset), got '", env,
                       "'");
}
// The group width for a dense call of `num_blocks` blocks a (batch, head)
// on a grid of `slots` blocks at once: 0 (each head in turn) unless causal
// without a left window and groups are on (by default where
// `groups_by_default`).
inline int causal_group_width(const FlashFwdParams& p, int64_t num_blocks, int64_t slots, bool groups_by_default) {
  if (p.window_right < 0 || p.window_left >= 0 || num_blocks <= 1) return 0;
  const CausalGroups choice = causal_groups();
  if (choice == CausalGroups::kOff || (choice == CausalGroups::kDefault && !groups_by_default)) return 0;
  const int64_t width = slots / num_blocks;
  return width >= 2 ? static_cast<int>(width) : 0;
}

// The head dims of the warp-specialized backward (launch_bwd_ws.cuh), and
// those of its variable-length calls (at 256 its 64-key blocks are below
// the room make_varlen_key_tile_list plans for, and its dO has one stage,
// which the kernel's zeroing of a sequence's partial last query block does
// not take: those calls run the classic kernel).
constexpr bool bwd_ws_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }
constexpr bool bwd_ws_varlen_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

// Whether the warp-specialized forward runs a persistent grid (one block
// per SM taking query blocks from a counter; FLASH_ATTN_EXT_SM90_FWD_PERSISTENT,
// developer-only, read on every call: 1 or unset, or 0 for one block per
// query block, for comparing the two in one process).
inline bool fwd_persistent() {
  const char* env = std::getenv("FLASH_ATTN_EXT_SM90_FWD_PERSISTENT");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  flash_attn_ext::fail("flash_attn_ext: FLASH_ATTN_EXT_SM90_FWD_PERSISTENT must be 0 or 1, got '", env, "'");
}
// The head dims whose warp-specialized forward has a persistent grid
// (WsFwdTraits::kPersistent): 64 and 128; 256 keeps one block per query
// block, and the other head dims run the sm80 kernels.
constexpr bool fwd_persistent_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }
// Whether a forward at (padded) `head_dim` needs a tile counter: its
// warp-specialized kernel is persistent, not switched off, and neither is
// the persistent grid.
inline bool fwd_wants_tile_counter(int head_dim) {
  return fwd_persistent_head_dim(head_dim) && fwd_kernel_choice() != KernelChoice::kClassic && fwd_persistent();
}

}  // namespace sm90
}  // namespace flash
