// The kernel launchers: each family's entry points, declared here and
// explicitly instantiated per (direction, head dim, dtype, architecture) in
// their own translation units under instantiations/ (written by
// tools/generate_kernels.py), so that the host code never sees kernel code
// and builds stay parallel; and run_flash_fwd / run_flash_bwd, which pick
// the family for a call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <string>

#include "../flash_params.h"
#include "hopper/sm90_dispatch.cuh"

// Element is __half or __nv_bfloat16 (__nv_fp8_e4m3 for run_flash_fwd_sm90_ws
// at head dims 128 and 256: the FP8 forward, flash_fwd_fp8_host.cpp). kHeadDim is the padded head dim the
// kernels are compiled for (params.headdim <= kHeadDim; the host pads inputs
// so that params.headdim == kHeadDim). Each launcher picks tile sizes,
// selects the compiled variant (bias; the score features: softcap, ALiBi,
// dropout; variants.h) and launches on `stream`; masks are run-time
// geometry (MaskGeometry), so causal and non-causal calls share every
// instantiation.

// sm80 (mma.sync) kernels, sm80/launch.cuh: every GPU from sm80 on.
template <typename Element, int kHeadDim>
void run_flash_fwd_sm80(const FlashFwdParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void run_flash_bwd_dkdv_sm80(const FlashBwdParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void run_flash_bwd_dq_sm80(const FlashBwdParams& params, cudaStream_t stream);  // deterministic dQ

// Hopper (wgmma) kernels, hopper/launch.cuh, for the head dims of
// sm90::kHasFwd / kHasBwd: false, with nothing launched, where the sm80
// kernels must run instead (not an sm90 device, switched off, or over the
// shared-memory budget).
template <typename Element, int kHeadDim>
bool run_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
bool run_flash_bwd_dkdv_sm90(const FlashBwdParams& params, cudaStream_t stream);
// The warp-specialized Hopper forward, hopper/launch_ws.cuh: false, with
// nothing launched, unless FLASH_ATTN_EXT_SM90_FWD selects it and it can
// take the call (same head dims as run_flash_fwd_sm90).
template <typename Element, int kHeadDim>
bool run_flash_fwd_sm90_ws(const FlashFwdParams& params, cudaStream_t stream);

// The FP8 forward's V transpose (flash_fwd_fp8_transpose.cu): params.v
// (e4m3, with params' k layout: dense or varlen, seqused_k) into `vt`, laid
// out as params.vt_* describe (flash_params.h, v_t).
void run_fp8_transpose_v(const FlashFwdParams& params, void* vt, cudaStream_t stream);

// The backward's row-wise kernels, the same everywhere (flash_bwd_launch.cuh):
// D = rowsum(dO * O) - dlse into params.softmax_d (and the zeroed fp32 dq
// accumulator), and dq = softmax_scale * dq_accum.
template <typename Element, int kHeadDim>
void run_flash_bwd_preprocess(const FlashBwdParams& params, cudaStream_t stream);
template <typename Element, int kHeadDim>
void run_flash_bwd_convert_dq(const FlashBwdParams& params, cudaStream_t stream);

// The forward: a Hopper kernel where one runs (the warp-specialized one
// when FLASH_ATTN_EXT_SM90_FWD selects it and it can take the call, else
// the classic one), else the sm80 one.
template <typename Element, int kHeadDim>
void run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  if constexpr (flash::sm90::kHasFwd<kHeadDim>) {
    if (run_flash_fwd_sm90_ws<Element, kHeadDim>(params, stream)) return;
    if (run_flash_fwd_sm90<Element, kHeadDim>(params, stream)) return;
  } else {
    FLASH_CHECK(flash::sm90::fwd_kernel_choice() != flash::sm90::KernelChoice::kWsStrict,
                "flash_attn_ext: FLASH_ATTN_EXT_SM90_FWD=ws_strict, but this build has no Hopper forward for the "
                "padded head dim ", std::to_string(kHeadDim));
  }
  run_flash_fwd_sm80<Element, kHeadDim>(params, stream);
}

// The backward in its two phases (flash_bwd_host.cpp plans the memory
// around them):
//  1. run_flash_bwd: D (preprocess), then dK and dV, and dQ: accumulated in
//     fp32 into params.dq_accum, or, deterministic, written to params.dq by
//     the dQ kernel;
//  2. run_flash_bwd_convert_dq (non-deterministic only): params.dq from
//     params.dq_accum.
template <typename Element, int kHeadDim>
void run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream) {
  FLASH_CHECK(params.softmax_d != nullptr && (params.deterministic ? params.dq != nullptr : params.dq_accum != nullptr),
              "flash_attn_ext: the backward's first phase needs softmax_d and ", params.deterministic ? "dq" : "dq_accum");
  run_flash_bwd_preprocess<Element, kHeadDim>(params, stream);
  bool launched = false;
  if constexpr (flash::sm90::kHasBwd<kHeadDim>) {
    launched = run_flash_bwd_dkdv_sm90<Element, kHeadDim>(params, stream);
  } else {
    FLASH_CHECK(flash::sm90::bwd_kernel_choice() != flash::sm90::KernelChoice::kWsStrict,
                "flash_attn_ext: FLASH_ATTN_EXT_SM90_BWD=ws_strict, but this build has no Hopper backward for the "
                "padded head dim ", std::to_string(kHeadDim));
  }
  if (!launched) run_flash_bwd_dkdv_sm80<Element, kHeadDim>(params, stream);
  if (params.deterministic) run_flash_bwd_dq_sm80<Element, kHeadDim>(params, stream);
}
