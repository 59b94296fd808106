// run_flash_fwd: tile sizes per head dim, kernel variants (additive bias;
// softcap and ALiBi, kMods; sliding windows and sinks go through the same
// kernel, whose MaskGeometry and epilogue take them at run time), grid,
// shared-memory attribute and a checked launch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda_check.h"
#include "device_props.cuh"
#include "flash_fwd_kernel.cuh"
#include "flash_launch.h"
#include "hopper/flash_fwd_sm90_kernel.cuh"
#include "hopper/sm90_dispatch.cuh"

namespace flash {

template <typename Traits, bool kHasBias, bool kMods>
void launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  auto kernel = &flash_fwd_kernel<Traits, kHasBias, kMods>;
  constexpr int kSmem = Traits::kSmemBytes;
  if constexpr (kSmem > 48 * 1024) {
    FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  }
  const int num_m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  // (batch, head) pairs go over grid.y, spilling into grid.z; the kernel
  // loops over whatever the grid does not cover (batch * heads > 65535^2).
  const int64_t bh = static_cast<int64_t>(params.batch) * params.nheads;
  const unsigned gy = static_cast<unsigned>(std::min<int64_t>(bh, 65535));
  const unsigned gz = static_cast<unsigned>(std::min<int64_t>((bh + gy - 1) / gy, 65535));
  const dim3 grid(num_m_blocks, gy, gz);
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
  FLASH_CUDA_LAUNCH_CHECK();
}

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

template <typename Traits>
void launch_flash_fwd_variants(const FlashFwdParams& params, cudaStream_t stream) {
  dispatch_fwd_variant(params, [&](auto has_bias, auto has_mods) {
    launch_flash_fwd<Traits, decltype(has_bias)::value, decltype(has_mods)::value>(params, stream);
  });
}

// Tile configuration per head dim, tuned on an H200 against PyTorch SDPA's
// FLASH_ATTENTION backend (bf16, B*S = 16k tokens, H*D = 2048, S = 2k..16k,
// causal and not; scratch/fwd/check_fwd.py): 128-row query tiles; 4 warps x
// 32 rows up to head dim 128 (two m-tiles per warp share every K/V fragment
// read from shared memory), 8 warps x 16 rows above, where the fp32 output
// accumulators alone take 96-128 registers. Rescaling O unconditionally was
// never slower than skipping it by warp vote, and up to 8% faster. Pipeline B (barrier before P V, so that P V
// and the next Q K^T form one instruction stream) wins with Q re-read from
// shared memory at 4 warps (hd 96/128: +2-3%), pipeline A everywhere else.
// Measured (ratio to SDPA FLASH): hd64 1.02-1.08, hd128 0.99-1.04, hd256
// 0.91-0.92 (causal 2k: 0.85). Tried and slower: hd64 128x128 with Q in
// shared memory, 8 warps x 16 rows or 3 blocks/SM; hd128 Q in registers with
// N = 32, 8 warps x 16 rows; hd256 64x32 x 4 warps (2 blocks/SM).
//                        Element  hdim  M    N   warps Q-in-regs minblocks check-rescale barrier-before-PV
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename Element>
struct FwdConfig<Element, 32> {
  using Traits = FwdTraits<Element, 32, 128, 64, 4, true, 2, false, false>;
};
template <typename Element>
struct FwdConfig<Element, 64> {
  using Traits = FwdTraits<Element, 64, 128, 64, 4, true, 2, false, false>;
};
template <typename Element>
struct FwdConfig<Element, 96> {
  using Traits = FwdTraits<Element, 96, 128, 64, 4, false, 2, false, true>;
};
template <typename Element>
struct FwdConfig<Element, 128> {
  using Traits = FwdTraits<Element, 128, 128, 64, 4, false, 2, false, true>;
};
template <typename Element>
struct FwdConfig<Element, 192> {
  using Traits = FwdTraits<Element, 192, 128, 64, 8, true, 1, false, false>;
};
template <typename Element>
struct FwdConfig<Element, 256> {
  using Traits = FwdTraits<Element, 256, 128, 64, 8, false, 1, false, false>;
};

// For GPUs with less shared memory per block than the main configuration
// needs (sm86 / sm89 / sm120: 99 KB; head dims 128 and up): 64 x 32 tiles,
// 4 warps x 16 rows (99 KB at head dim 256).
template <typename Element, int kHeadDim>
using FwdSmallSmemTraits = FwdTraits<Element, kHeadDim, 64, 32, 4, false, 2>;

// Hopper (hopper/flash_fwd_sm90_kernel.cuh). Head dim 64: one warpgroup (64
// query rows) per block and two blocks per SM, 128-key blocks: the blocks
// drift apart and overlap each other's softmax and MMAs, +13-26% over two
// warpgroups in one block (H100). 128: two warpgroups (128 rows), 128-key
// blocks (one warpgroup per block measured -5% to +10%). 256: two
// warpgroups, 64-key blocks (O alone takes 128 registers there; one block of
// 64 rows with its K/V would not fit twice in shared memory).
template <typename Element, int kHeadDim>
using Sm90FwdTraitsFor = std::conditional_t<(kHeadDim == 64), sm90::FwdTraits<Element, 64, 128, 1>,
                                            sm90::FwdTraits<Element, kHeadDim, (kHeadDim <= 128 ? 128 : 64), 2>>;

template <typename T, bool kHasBias, bool kMods>
void launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  auto kernel = &sm90::flash_fwd_sm90_kernel<T, kHasBias, kMods>;
  FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const int64_t num_m_blocks = (params.seqlen_q + T::kBlockM - 1) / T::kBlockM;
  const int64_t grid = num_m_blocks * params.batch * params.nheads;
  FLASH_CHECK(grid < (int64_t(1) << 31), "flash_attn_ext: forward grid too large");
  kernel<<<dim3(grid), T::kNThreads, T::kSmemBytes, stream>>>(params);
  FLASH_CUDA_LAUNCH_CHECK();
}

}  // namespace flash

template <typename Element, int kHeadDim>
void run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  // Masking (causal, sliding window, ragged ends) is described at run time
  // by MaskGeometry.
  using Traits = typename flash::FwdConfig<Element, kHeadDim>::Traits;
  const int budget = flash::smem_budget();
  if constexpr (flash::sm90::kHasFwd<kHeadDim>) {
    using T90 = flash::Sm90FwdTraitsFor<Element, kHeadDim>;
    if (flash::sm90::enabled() && T90::kSmemBytes <= budget) {
      return flash::dispatch_fwd_variant(params, [&](auto has_bias, auto has_mods) {
        flash::launch_flash_fwd_sm90<T90, decltype(has_bias)::value, decltype(has_mods)::value>(params, stream);
      });
    }
  }
#ifdef FLASH_FWD_TUNE
  // Development builds only (nvcc -DFLASH_FWD_TUNE, e.g. NVCC_APPEND_FLAGS):
  // FLASH_FWD_CFG=1 runs the runner-up tiling, for A/B timing in one process.
  if (const char* env = std::getenv("FLASH_FWD_CFG")) {
    if (std::atoi(env) == 1) {
      if constexpr (kHeadDim == 64) {
        return flash::launch_flash_fwd_variants<flash::FwdTraits<Element, 64, 128, 64, 4, true, 2, true, false>>(params, stream);
      }
      if constexpr (kHeadDim == 128) {
        return flash::launch_flash_fwd_variants<flash::FwdTraits<Element, 128, 128, 64, 4, false, 2, false, false>>(params, stream);
      }
      if constexpr (kHeadDim == 256) {
        return flash::launch_flash_fwd_variants<flash::FwdTraits<Element, 256, 128, 64, 8, false, 1, true, false>>(params, stream);
      }
    }
  }
#endif
  flash::launch_first_fitting<Traits, flash::FwdSmallSmemTraits<Element, kHeadDim>>(
      "forward", kHeadDim, budget, [&](auto tag) {
        flash::launch_flash_fwd_variants<typename decltype(tag)::type>(params, stream);
      });
}
