// The decode launchers as the host code sees them (no kernel code), one
// explicit instantiation per (dtype, head dim) in flash_decode_{fp16,bf16}.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../kvcache.h"

// How many key splits run_flash_decode will use for these parameters:
// requested_splits (at most one per key tile) when > 0, else the heuristic
// from the shapes and the GPU (flash_decode_launch.cuh). Also sets
// params.decode_config (the kernel configuration, flash_decode_launch.cuh).
// The host sizes the scratch from the result and sets params.num_splits.
template <typename Element, int kHeadDim>
int plan_flash_decode(FlashKvcacheParams& params, int requested_splits);

// Launches the decode kernel (and, with params.num_splits > 1, the combine
// kernel, reading params.out_accum / lse_accum) on `stream`. params.headdim
// <= kHeadDim; q is padded to kHeadDim and out is kHeadDim wide.
template <typename Element, int kHeadDim>
void run_flash_decode(const FlashKvcacheParams& params, cudaStream_t stream);
