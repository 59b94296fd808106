// Declarations of the kernel launchers. Each (direction, head dim, dtype)
// combination is explicitly instantiated in its own translation unit
// under instantiations/ (written by tools/generate_kernels.py), so the
// host-side code in this folder never sees kernel code and builds stay
// parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../flash_params.h"

// Element is __half or __nv_bfloat16. kHeadDim is the padded head dim the
// kernel is compiled for (params.headdim <= kHeadDim; the host pads inputs so
// that params.headdim == kHeadDim). The launcher picks tile sizes, handles the
// runtime variants (bias, causal and sliding-window masks, the score
// features) and launches on `stream`. Masks are described at run time
// (MaskGeometry), so causal and non-causal calls share one instantiation.
template <typename Element, int kHeadDim>
void run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

// The backward in its two phases (flash_bwd_host.cpp says how the memory is
// planned around them):
//  1. run_flash_bwd: D = rowsum(dO * O) - dlse into params.softmax_d, then
//     dK and dV, and dQ: accumulated in fp32 into params.dq_accum (zeroed
//     here), or, deterministic, written to params.dq by the dQ kernel.
//  2. run_flash_bwd_convert_dq (non-deterministic only): params.dq =
//     softmax_scale * params.dq_accum in the input dtype.
template <typename Element, int kHeadDim>
void run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void run_flash_bwd_convert_dq(const FlashBwdParams& params, cudaStream_t stream);
