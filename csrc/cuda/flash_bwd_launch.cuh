// The backward's launch sequence per head dim and dtype: tile choice, kernel
// variants (kMods for calls with softcap, ALiBi or dropout, score_rule.cuh;
// bias and masks are run-time) and the two phases the host
// (flash_bwd_host.cpp) calls explicitly, so that the fp32 scratch is freed
// before dq is allocated (flash_launch.h):
//   run_flash_bwd:            preprocess (D, zeroed dq_accum), the dK/dV
//                             kernel, and deterministic: the dQ kernel
//   run_flash_bwd_convert_dq: postprocess dq = scale * dq_accum
#pragma once

#include "cuda_check.h"
#include "device_props.cuh"
#include "flash_bwd_dq_kernel.cuh"
#include "flash_bwd_kernel.cuh"
#include "flash_bwd_pre_post.cuh"
#include "flash_launch.h"
#include "hopper/flash_bwd_sm90_kernel.cuh"
#include "hopper/sm90_dispatch.cuh"

namespace flash {

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

template <typename Kernel>
inline void set_smem_limit(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename T>
void launch_dkdv(const FlashBwdParams& params, cudaStream_t stream) {
  const int64_t num_n_blocks = (params.seqlen_k + T::kBlockN - 1) / T::kBlockN;
  const int64_t grid = num_n_blocks * params.batch * params.nheads;
  FLASH_CHECK(grid < (int64_t(1) << 31), "flash_attn_ext: backward grid too large");
  auto kernel = has_score_mods(params)
                    ? (params.deterministic ? &flash_bwd_dkdv_kernel<T, false, true> : &flash_bwd_dkdv_kernel<T, true, true>)
                    : (params.deterministic ? &flash_bwd_dkdv_kernel<T, false, false>
                                            : &flash_bwd_dkdv_kernel<T, true, false>);
  set_smem_limit(kernel, T::kSmemBytes);
  kernel<<<dim3(grid), dim3(T::kNThreads), T::kSmemBytes, stream>>>(params);
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
  auto kernel = has_score_mods(params) ? (params.deterministic ? &sm90::flash_bwd_sm90_kernel<T, false, true>
                                                               : &sm90::flash_bwd_sm90_kernel<T, true, true>)
                                       : (params.deterministic ? &sm90::flash_bwd_sm90_kernel<T, false, false>
                                                               : &sm90::flash_bwd_sm90_kernel<T, true, false>);
  set_smem_limit(kernel, T::kSmemBytes);
  kernel<<<dim3(grid), dim3(T::kNThreads), T::kSmemBytes, stream>>>(params);
  FLASH_CUDA_LAUNCH_CHECK();
}

// The row-wise kernels (preprocess, postprocess, the dq_accum memset) walk
// every query row of the call and need no sequence boundaries: a varlen
// call's rows are one sequence of total_q rows to them, laid out as its
// softmax_lse (nheads, total_q) and dq_accum (total_q, nheads, D) are.
inline FlashBwdParams all_rows(const FlashBwdParams& params) {
  FlashBwdParams rows = params;
  if (params.cu_seqlens_q != nullptr) {
    rows.batch = 1;
    rows.seqlen_q = params.total_q;
    rows.cu_seqlens_q = nullptr;
  }
  return rows;
}

}  // namespace flash

// Phase 1 (flash_launch.h). Causal and windowed masks are handled at run
// time through MaskGeometry (per tile: fully visible tiles skip the element
// mask).
template <typename Element, int kHeadDim>
void run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream) {
  FLASH_CHECK(params.softmax_d != nullptr && (params.deterministic ? params.dq != nullptr : params.dq_accum != nullptr),
              "flash_attn_ext: the backward's first phase needs softmax_d and ", params.deterministic ? "dq" : "dq_accum");
  const FlashBwdParams row_params = flash::all_rows(params);
  {
    const int64_t rows = int64_t(row_params.batch) * row_params.seqlen_q * params.nheads;
    if (!params.deterministic) {
      FLASH_CUDA_CHECK(cudaMemsetAsync(params.dq_accum, 0, rows * kHeadDim * sizeof(float), stream));
    }
    constexpr int kPreThreads = 256;
    const int64_t pre_blocks = (rows * 8 + kPreThreads - 1) / kPreThreads;
    flash::flash_bwd_preprocess_kernel<Element, kHeadDim><<<dim3(pre_blocks), kPreThreads, 0, stream>>>(row_params);
    FLASH_CUDA_LAUNCH_CHECK();

    // Hopper: the wgmma kernel. Elsewhere the mma.sync kernel, with the
    // largest tiles that fit the shared-memory budget.
    const int budget = flash::smem_budget();
    bool launched = false;
    if constexpr (flash::sm90::kHasBwd<kHeadDim>) {
      using T90 = flash::Sm90BwdTraitsFor<Element, kHeadDim>;
      if (flash::sm90::enabled() && T90::kSmemBytes <= budget) {
        flash::launch_dkdv_sm90<T90>(params, stream);
        launched = true;
      }
    }
    if (!launched) {
      flash::BwdConfigs<Element, kHeadDim>::launch(
          budget, [&](auto tag) { flash::launch_dkdv<typename decltype(tag)::type>(params, stream); });
    }

    if (params.deterministic) {
      flash::BwdDqConfigs<Element, kHeadDim>::launch(budget, [&](auto tag) {
        using TQ = typename decltype(tag)::type;
        const int64_t num_m_blocks = (params.seqlen_q + TQ::kBlockM - 1) / TQ::kBlockM;
        const int64_t grid = num_m_blocks * params.batch * params.nheads;
        auto kernel = flash::has_score_mods(params) ? &flash::flash_bwd_dq_kernel<TQ, true>
                                                    : &flash::flash_bwd_dq_kernel<TQ, false>;
        flash::set_smem_limit(kernel, TQ::kSmemBytes);
        kernel<<<dim3(grid), dim3(TQ::kNThreads), TQ::kSmemBytes, stream>>>(params);
        FLASH_CUDA_LAUNCH_CHECK();
      });
    }
  }
}

// Phase 2 (flash_launch.h): dq = softmax_scale * dq_accum.
template <typename Element, int kHeadDim>
void run_flash_bwd_convert_dq(const FlashBwdParams& params, cudaStream_t stream) {
  FLASH_CHECK(params.dq != nullptr && params.dq_accum != nullptr && !params.deterministic,
              "flash_attn_ext: the backward's second phase needs dq and dq_accum (non-deterministic backward only)");
  const FlashBwdParams row_params = flash::all_rows(params);
  {
    const int64_t chunks = int64_t(row_params.batch) * row_params.seqlen_q * params.nheads * (kHeadDim / 8);
    constexpr int kThreads = 256;
    flash::flash_bwd_postprocess_kernel<Element, kHeadDim>
        <<<dim3((chunks + kThreads - 1) / kThreads), kThreads, 0, stream>>>(row_params);
    FLASH_CUDA_LAUNCH_CHECK();
  }
}
