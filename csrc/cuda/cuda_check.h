// CUDA runtime errors as FLASH_CHECK errors (error.h): the call, and
// cudaGetErrorString's words, in a Python RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include "../error.h"

#define FLASH_CUDA_CHECK(call)                                                                  \
  do {                                                                                          \
    const cudaError_t flash_cuda_status = (call);                                              \
    FLASH_CHECK(flash_cuda_status == cudaSuccess, "flash_attn_ext: CUDA error: ",              \
                cudaGetErrorString(flash_cuda_status), " (from ", #call, ")");                  \
  } while (0)

// After a <<<...>>> launch: a bad configuration shows up here, not later.
#define FLASH_CUDA_LAUNCH_CHECK() FLASH_CUDA_CHECK(cudaGetLastError())
