// The sm80 (mma.sync) kernels' launchers: tile configurations per head dim
// (the largest that fits the shared-memory budget), kernel variants, grids.
// These kernels run on every GPU from sm80 on; on Hopper (sm90) the wgmma
// kernels in ../hopper take the head dims they have. The entry points
// (run_flash_fwd_sm80, run_flash_bwd_dkdv_sm80, run_flash_bwd_dq_sm80) are
// declared in ../flash_launch.h and instantiated under ../instantiations.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../cuda_check.h"
#include "../device_props.cuh"
#include "../flash_launch.h"
#include "../variants.h"
#include "flash_bwd_dq_kernel.cuh"
#include "flash_bwd_kernel.cuh"
#include "flash_fwd_kernel.cuh"

namespace flash {

template <typename Traits, bool kHasBias, int kFeatures>
void launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  auto kernel = &flash_fwd_kernel<Traits, kHasBias, kFeatures>;
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

template <typename Traits>
void launch_flash_fwd_variants(const FlashFwdParams& params, cudaStream_t stream) {
  dispatch_fwd_variant(params, [&](auto has_bias, auto features) {
    launch_flash_fwd<Traits, decltype(has_bias)::value, decltype(features)::value>(params, stream);
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

// dK/dV kernel tiles, largest first: the launcher takes the first that fits
// the shared-memory budget (device_props.cuh). Every warp owns 16 keys and,
// while the dK/dV accumulators of a whole head-dim row fit its registers
// (d <= 128), all of the head dim. d <= 64: 64-key blocks of 4 warps, three
// blocks per SM (more warps to hide the MMA/ldmatrix latency; measured 15%
// faster on H200 than one 8-warp block); 64 KB. d <= 128: 128-key blocks of 8
// warps, one per SM (the 128 accumulator registers leave no room for a
// second block): 156 KB at d = 128, 124 KB at 96; for 99 KB GPUs 64-key
// blocks of 4 warps with two Q/dO stages (89 KB at 96) or one (78 KB at
// 128). Above, 64-key blocks whose warps split the head dim in two and
// exchange P^T/dS^T in smem: two Q/dO stages (217 KB at d = 256, H100/H200),
// one (151 KB, A100), and 32 x 32 tiles of 4 warps for 99 KB GPUs (71 KB).
template <typename Element, int kHeadDim>
struct BwdConfigs {
  template <typename Launch>
  static void launch(int budget, Launch&& f) {
    if constexpr (kHeadDim <= 64) {
      launch_first_fitting<BwdTraits<Element, kHeadDim, 64, 64, 4, 2, 3>>("backward", kHeadDim, budget, f);
    } else if constexpr (kHeadDim <= 128) {
      launch_first_fitting<BwdTraits<Element, kHeadDim, 64, 128, 8, 2, 1>,
                           BwdTraits<Element, kHeadDim, 64, 64, 4, 2, 1>,
                           BwdTraits<Element, kHeadDim, 64, 64, 4, 1, 1>>("backward", kHeadDim, budget, f);
    } else {
      launch_first_fitting<BwdTraits<Element, kHeadDim, 64, 64, 8, 2, 1>,
                           BwdTraits<Element, kHeadDim, 64, 64, 8, 1, 1>,
                           BwdTraits<Element, kHeadDim, 32, 32, 4, 1, 1>>("backward", kHeadDim, budget, f);
    }
  }
};
// Deterministic dQ kernel: 64 query rows (4 warps), key blocks of 64 (32 above
// d = 128, where the dQ accumulator takes 128 registers); smaller blocks for
// 99 KB GPUs (102 KB at d = 128 and 132 KB at 256 otherwise).
template <typename Element, int kHeadDim>
struct BwdDqConfigs {
  template <typename Launch>
  static void launch(int budget, Launch&& f) {
    if constexpr (kHeadDim <= 128) {
      launch_first_fitting<BwdDqTraits<Element, kHeadDim, 64, 4>, BwdDqTraits<Element, kHeadDim, 32, 4>>(
          "deterministic dQ", kHeadDim, budget, f);
    } else {
      launch_first_fitting<BwdDqTraits<Element, kHeadDim, 32, 4>, BwdDqTraits<Element, kHeadDim, 32, 2>>(
          "deterministic dQ", kHeadDim, budget, f);
    }
  }
};

template <typename T>
void launch_dkdv(const FlashBwdParams& params, cudaStream_t stream) {
  const int64_t num_n_blocks = (params.seqlen_k + T::kBlockN - 1) / T::kBlockN;
  const int64_t grid = num_n_blocks * params.batch * params.nheads;
  FLASH_CHECK(grid < (int64_t(1) << 31), "flash_attn_ext: backward grid too large");
  dispatch_features(score_features(params), [&](auto features) {
    constexpr int kFeatures = decltype(features)::value;
    auto kernel = params.deterministic ? &flash_bwd_dkdv_kernel<T, false, kFeatures>
                                       : &flash_bwd_dkdv_kernel<T, true, kFeatures>;
    set_smem_limit(kernel, T::kSmemBytes);
    kernel<<<dim3(grid), dim3(T::kNThreads), T::kSmemBytes, stream>>>(params);
    FLASH_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace flash

template <typename Element, int kHeadDim>
void run_flash_fwd_sm80(const FlashFwdParams& params, cudaStream_t stream) {
  using Traits = typename flash::FwdConfig<Element, kHeadDim>::Traits;
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
      "forward", kHeadDim, flash::smem_budget(), [&](auto tag) {
        flash::launch_flash_fwd_variants<typename decltype(tag)::type>(params, stream);
      });
}

template <typename Element, int kHeadDim>
void run_flash_bwd_dkdv_sm80(const FlashBwdParams& params, cudaStream_t stream) {
  flash::BwdConfigs<Element, kHeadDim>::launch(
      flash::smem_budget(), [&](auto tag) { flash::launch_dkdv<typename decltype(tag)::type>(params, stream); });
}

template <typename Element, int kHeadDim>
void run_flash_bwd_dq_sm80(const FlashBwdParams& params, cudaStream_t stream) {
  const int budget = flash::smem_budget();
  flash::BwdDqConfigs<Element, kHeadDim>::launch(budget, [&](auto tag) {
    using TQ = typename decltype(tag)::type;
    const int64_t num_m_blocks = (params.seqlen_q + TQ::kBlockM - 1) / TQ::kBlockM;
    const int64_t grid = num_m_blocks * params.batch * params.nheads;
    flash::dispatch_features(flash::score_features(params), [&](auto features) {
      auto kernel = &flash::flash_bwd_dq_kernel<TQ, decltype(features)::value>;
      flash::set_smem_limit(kernel, TQ::kSmemBytes);
      kernel<<<dim3(grid), dim3(TQ::kNThreads), TQ::kSmemBytes, stream>>>(params);
      FLASH_CUDA_LAUNCH_CHECK();
    });
  });
}
