// The backward's row-wise kernels (flash_bwd_pre_post.cuh), the same on
// every architecture: the preprocess D = rowsum(dO * O) - dlse (which also
// zeroes the fp32 dq accumulator) before the dK/dV kernel, and the conversion
// dq = softmax_scale * dq_accum after it. flash_launch.h sequences them with
// each family's dK/dV and dQ kernels into the backward's two phases.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "flash_bwd_pre_post.cuh"
#include "flash_launch.h"

namespace flash {

// The row-wise kernels (preprocess, which zeroes dq_accum, and postprocess) walk
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

template <typename Element, int kHeadDim>
void run_flash_bwd_preprocess(const FlashBwdParams& params, cudaStream_t stream) {
  const FlashBwdParams row_params = flash::all_rows(params);
  const int64_t rows = int64_t(row_params.batch) * row_params.seqlen_q * params.nheads;
  // The kernel also zeroes dq_accum (the non-deterministic backward's).
  constexpr int kPreThreads = 256;
  const int64_t pre_blocks = (rows * 8 + kPreThreads - 1) / kPreThreads;
  flash::flash_bwd_preprocess_kernel<Element, kHeadDim><<<dim3(pre_blocks), kPreThreads, 0, stream>>>(row_params);
  FLASH_CUDA_LAUNCH_CHECK();
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
