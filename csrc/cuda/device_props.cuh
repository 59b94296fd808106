// What the launchers need to know about the current GPU, asked once per
// device and cached (the launchers ask on every call): its compute capability,
// how much shared memory one thread block may opt in to, and its SM count. Also the
// shared-memory budget the tile choice works with, and the helper that picks
// the first of a list of kernel configurations that fits it.
//
// FLASH_ATTN_EXT_SMEM_BUDGET_KB=N (read on every call) lowers the budget to
// N KiB, so that an H100/H200 chooses tiles, and kernel family, as a GPU with
// that much would: 99 for sm86 / sm89 / sm120 (RTX 30xx/40xx/50xx, L4, L40),
// 163 for A100 (sm80). It is how the tests run, on one Hopper GPU, the
// configurations other GPUs get.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "cuda_check.h"

namespace flash {

struct DeviceProps {
  int cc_major = 0, cc_minor = 0;
  int smem_optin = 0;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
  int num_sms = 0;     // cudaDevAttrMultiProcessorCount (the decode kernel's split heuristic)
};

inline const DeviceProps& current_device_props() {
  constexpr int kMaxDevices = 64;
  static DeviceProps cache[kMaxDevices];
  int device = 0;
  FLASH_CUDA_CHECK(cudaGetDevice(&device));
  FLASH_CHECK(device >= 0 && device < kMaxDevices, "flash_attn_ext: CUDA device index ", std::to_string(device),
              " is beyond the ", std::to_string(kMaxDevices), " devices this build caches properties for");
  DeviceProps& props = cache[device];
  if (props.smem_optin == 0) {
    DeviceProps fresh;
    FLASH_CUDA_CHECK(cudaDeviceGetAttribute(&fresh.cc_major, cudaDevAttrComputeCapabilityMajor, device));
    FLASH_CUDA_CHECK(cudaDeviceGetAttribute(&fresh.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
    FLASH_CUDA_CHECK(cudaDeviceGetAttribute(&fresh.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    FLASH_CUDA_CHECK(cudaDeviceGetAttribute(&fresh.num_sms, cudaDevAttrMultiProcessorCount, device));
    props = fresh;
  }
  return props;
}

// Bytes of shared memory a block may use: the device's opt-in maximum, or
// less under FLASH_ATTN_EXT_SMEM_BUDGET_KB.
inline int smem_budget() {
  const int device_max = current_device_props().smem_optin;
  const char* env = std::getenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB");
  if (env == nullptr || env[0] == '\0') return device_max;
  char* end = nullptr;
  const long kb = std::strtol(env, &end, 10);
  FLASH_CHECK(end != env && *end == '\0' && kb > 0 && kb < (1L << 20),
              "flash_attn_ext: FLASH_ATTN_EXT_SMEM_BUDGET_KB must be a positive whole number of KiB, got '", env, "'");
  return static_cast<int>(kb * 1024) < device_max ? static_cast<int>(kb * 1024) : device_max;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>{}) for the first T of Configs (largest first)
// whose T::kSmemBytes fits `budget`; otherwise raises an error naming the
// kernel, the smallest need and the budget.
template <typename... Configs, typename Launch>
void launch_first_fitting(const char* kernel_name, int head_dim, int budget, Launch&& launch) {
  bool launched = false;
  int smallest = 1 << 30;
  auto try_one = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (launched) return;
    if (T::kSmemBytes <= budget) {
      launch(tag);
      launched = true;
    } else if (T::kSmemBytes < smallest) {
      smallest = T::kSmemBytes;
    }
  };
  (try_one(TypeTag<Configs>{}), ...);
  FLASH_CHECK(launched, "flash_attn_ext: the ", kernel_name, " kernel for head dim ", std::to_string(head_dim),
              " needs at least ", std::to_string(smallest), " bytes of shared memory per block; this GPU allows ",
              std::to_string(budget), " (cudaDevAttrMaxSharedMemoryPerBlockOptin, or FLASH_ATTN_EXT_SMEM_BUDGET_KB)");
}

// Lets `kernel` use `bytes` of dynamic shared memory (above 48 KB a kernel
// must opt in).
template <typename Kernel>
inline void set_smem_limit(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

}  // namespace flash
