// How the C++ code sees PyTorch: through its stable ABI only (the
// torch/csrc/stable and torch/headeronly headers, which reach libtorch
// through C functions whose signatures do not change between releases).
// Nothing here includes ATen or c10 headers, so one binary built against a
// newer torch loads under every torch from TORCH_TARGET_VERSION on (setup.py
// sets it to 2.11). This header gathers what the op implementations need:
// the Tensor type, names for dtypes and devices in messages,
// and the few tensor factories and ops they call.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "error.h"

namespace flash_attn_ext {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

// "torch.float16", as Python prints a dtype.
inline std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Bool: return "torch.bool";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    case ScalarType::Float8_e5m2: return "torch.float8_e5m2";
    default: return "dtype #" + std::to_string(static_cast<int>(t));
  }
}

// "cuda:0", "cpu", "meta", as Python prints a device.
inline std::string device_name(const Tensor& t) {
  using torch::headeronly::DeviceType;
  const auto device = t.device();
  std::string name;
  switch (device.type()) {
    case DeviceType::CPU: name = "cpu"; break;
    case DeviceType::CUDA: name = "cuda"; break;
    case DeviceType::Meta: name = "meta"; break;
    default: name = "device type #" + std::to_string(static_cast<int>(device.type()));
  }
  if (device.has_index() && device.type() != DeviceType::CPU) name += ":" + std::to_string(device.index());
  return name;
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

// Element-wise equality of two shapes (torch 2.11's IntHeaderOnlyArrayRef
// has no operator==).
inline bool same_shape(IntArrayRef a, IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// Factories on the device of `like`.
inline Tensor empty_on(const Tensor& like, IntArrayRef shape, ScalarType dtype) {
  return torch::stable::empty(shape, dtype, std::nullopt, like.device());
}
inline Tensor zeros_on(const Tensor& like, IntArrayRef shape, ScalarType dtype) {
  Tensor t = empty_on(like, shape, dtype);
  torch::stable::zero_(t);
  return t;
}
inline Tensor full_on(const Tensor& like, IntArrayRef shape, ScalarType dtype, double value) {
  return torch::stable::fill_(empty_on(like, shape, dtype), value);
}

// A contiguous copy (always a fresh allocation, hence 16-byte aligned).
inline Tensor contiguous_copy(const Tensor& t) { return torch::stable::clone(t); }

// -t.
inline Tensor neg(const Tensor& t) {
  std::array<StableIValue, 1> stack{torch::stable::detail::from(t)};
  // Checked by hand: the stable headers' own check macros differ between
  // torch 2.11 and later releases.
  FLASH_CHECK(torch_call_dispatcher("aten::neg", "", stack.data(), TORCH_ABI_VERSION) == 0,
              "flash_attn_ext: aten::neg failed inside PyTorch");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// t with its last dimension zero-padded (or, for size < t.size(-1), sliced
// and made contiguous) to `size`.
inline Tensor resize_last_dim(const Tensor& t, int64_t size) {
  const int64_t d = t.size(-1);
  if (size == d) return t;
  if (size > d) {
    const std::array<int64_t, 2> pad{0, size - d};
    return torch::stable::pad(t, pad);
  }
  Tensor view = t;  // stable::narrow takes a non-const reference
  return torch::stable::contiguous(torch::stable::narrow(view, view.dim() - 1, 0, size));
}

}  // namespace flash_attn_ext
