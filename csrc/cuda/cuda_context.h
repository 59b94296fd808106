// The CUDA state an op implementation runs under, from PyTorch's stable ABI:
// a guard making the inputs' device current, and that device's current
// stream (the one PyTorch queues work on), which every launch uses.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../tensor.h"

namespace flash_attn_ext {

class CudaContext {
 public:
  explicit CudaContext(const Tensor& on) : guard_(on.get_device_index()) {
    void* stream = nullptr;
    // Checked by hand: the stable headers' check macros differ between torch 2.11 and later.
    FLASH_CHECK(aoti_torch_get_current_cuda_stream(on.get_device_index(), &stream) == 0,
                "flash_attn_ext: could not get the current CUDA stream from PyTorch");
    stream_ = static_cast<cudaStream_t>(stream);
  }
  cudaStream_t stream() const { return stream_; }

 private:
  torch::stable::accelerator::DeviceGuard guard_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace flash_attn_ext
