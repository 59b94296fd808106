// FLASH_HOST_DEVICE marks the functions that the CUDA kernels and the CPU
// implementation share (mask geometry, the score rule): __host__ __device__
// under nvcc, nothing in plain C++, so the same header compiles in both.
#pragma once

#if defined(__CUDACC__)
#define FLASH_HOST_DEVICE __host__ __device__
#else
#define FLASH_HOST_DEVICE
#endif
