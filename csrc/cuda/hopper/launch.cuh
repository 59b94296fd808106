// The Hopper (wgmma) kernels' launchers: traits per head dim, grids, and the
// entry points run_flash_fwd_sm90 / run_flash_bwd_dkdv_sm90 (declared in
// ../flash_launch.h, instantiated under ../instantiations for the head dims
// that have a Hopper kernel), which return false, launching nothing, where
// the sm80 kernels must run instead: not an sm90 device, the Hopper kernels
// switched off (FLASH_ATTN_EXT_DISABLE_SM90) or a shared-memory budget they
// do not fit (sm90_dispatch.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../cuda_check.h"
#include "../device_props.cuh"
#include "../flash_launch.h"
#include "../variants.h"
#include "flash_bwd_sm90_kernel.cuh"
#include "flash_fwd_sm90_kernel.cuh"
#include "launch_bwd_ws.cuh"
#include "sm90_dispatch.cuh"

namespace flash {

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

template <typename T, bool kHasBias, int kFeatures>
void launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  auto kernel = &sm90::flash_fwd_sm90_kernel<T, kHasBias, kFeatures>;
  FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const int64_t num_m_blocks = (params.seqlen_q + T::kBlockM - 1) / T::kBlockM;
  const int64_t grid = num_m_blocks * params.batch * params.nheads;
  FLASH_CHECK(grid < (int64_t(1) << 31), "flash_attn_ext: forward grid too large");
  kernel<<<dim3(grid), T::kNThreads, T::kSmemBytes, stream>>>(params);
  FLASH_CUDA_LAUNCH_CHECK();
}

// Hopper: the wgmma kernel (hopper/flash_bwd_sm90_kernel.cuh); see hopper/sm90_dispatch.cuh.
template <typename Element, int kHeadDim>
using Sm90BwdTraitsFor = sm90::BwdTraits<Element, kHeadDim, (kHeadDim == 64 ? 128 : 64)>;

template <typename T>
void launch_dkdv_sm90(const FlashBwdParams& params, cudaStream_t stream) {
  const int64_t num_n_blocks = (params.seqlen_k + T::kBlockN - 1) / T::kBlockN;
  const int64_t grid = num_n_blocks * params.batch * params.nheads;
  FLASH_CHECK(grid < (int64_t(1) << 31), "flash_attn_ext: backward grid too large");
  dispatch_features(score_features(params), [&](auto features) {
    constexpr int kFeatures = decltype(features)::value;
    auto kernel = params.deterministic ? &sm90::flash_bwd_sm90_kernel<T, false, kFeatures>
                                       : &sm90::flash_bwd_sm90_kernel<T, true, kFeatures>;
    set_smem_limit(kernel, T::kSmemBytes);
    kernel<<<dim3(grid), dim3(T::kNThreads), T::kSmemBytes, stream>>>(params);
    FLASH_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace flash

template <typename Element, int kHeadDim>
bool run_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  using T90 = flash::Sm90FwdTraitsFor<Element, kHeadDim>;
  if (!flash::sm90::enabled() || T90::kSmemBytes > flash::smem_budget()) return false;
  flash::dispatch_fwd_variant(params, [&](auto has_bias, auto features) {
    flash::launch_flash_fwd_sm90<T90, decltype(has_bias)::value, decltype(features)::value>(params, stream);
  });
  return true;
}

template <typename Element, int kHeadDim>
bool run_flash_bwd_dkdv_sm90(const FlashBwdParams& params, cudaStream_t stream) {
  using T90 = flash::Sm90BwdTraitsFor<Element, kHeadDim>;
  if (run_flash_bwd_dkdv_sm90_ws<Element, kHeadDim>(params, stream)) return true;
  if (!flash::sm90::enabled() || T90::kSmemBytes > flash::smem_budget()) return false;
  flash::launch_dkdv_sm90<T90>(params, stream);
  return true;
}
