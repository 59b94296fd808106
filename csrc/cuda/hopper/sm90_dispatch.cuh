// When the Hopper (wgmma) kernels run instead of the mma.sync ones: the build
// has sm_90a code (setup.py defines FLASH_ATTN_EXT_SM90 when TORCH_CUDA_ARCH_LIST
// has 9.0a), the head dim has a Hopper kernel, and the device is compute
// capability 9.0 (H100 / H200; sm_90a code runs nowhere else).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace flash {
namespace sm90 {

#ifdef FLASH_ATTN_EXT_SM90
inline constexpr bool kBuilt = true;
#else
inline constexpr bool kBuilt = false;
#endif

template <int kHeadDim>
inline constexpr bool kHasFwd = kBuilt && (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);
template <int kHeadDim>
inline constexpr bool kHasBwd = kBuilt && (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);

// Cached per device: asked on every launch.
inline bool device_is_sm90() {
  static int cache[64] = {0};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cache[device] = (major == 9 && minor == 0) ? 1 : 2;
  }
  return cache[device] == 1;
}

// FLASH_ATTN_EXT_DISABLE_SM90=1 (read on every call) runs the mma.sync
// kernels on Hopper too: how the tests cover, on an H100, the code that
// Ampere and Ada GPUs run.
inline bool enabled() {
  const char* off = std::getenv("FLASH_ATTN_EXT_DISABLE_SM90");
  if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
  return device_is_sm90();
}

}  // namespace sm90
}  // namespace flash
