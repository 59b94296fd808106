// When the Hopper (wgmma) kernels run instead of the mma.sync ones: the build
// has sm_90a code (setup.py defines FLASH_ATTN_EXT_SM90 when TORCH_CUDA_ARCH_LIST
// has 9.0a), the head dim has a Hopper kernel, and the device is compute
// capability 9.0 (H100 / H200; sm_90a code runs nowhere else). The launchers
// also check that the kernel fits the shared-memory budget
// (device_props.cuh), which only a lowered FLASH_ATTN_EXT_SMEM_BUDGET_KB makes
// it not.
#pragma once

#include <cstdlib>
#include <cstring>

#include "../device_props.cuh"

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

inline bool device_is_sm90() {
  const DeviceProps& props = current_device_props();
  return props.cc_major == 9 && props.cc_minor == 0;
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
