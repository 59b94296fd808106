// Declarations of the kernel launchers. Each (direction, head dim, dtype,
// causal) combination is explicitly instantiated in its own translation unit
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
// runtime variants (bias, sliding window) and launches on `stream`.
template <typename Element, int kHeadDim, bool kIsCausal>
void run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

// Expects params.dq_accum (fp32, zeroed by the launcher if it needs it) and
// params.softmax_d to be allocated by the host code as documented in
// flash_bwd_host.cpp.
template <typename Element, int kHeadDim, bool kIsCausal>
void run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);
