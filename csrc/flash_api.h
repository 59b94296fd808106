// The host functions behind the two ops, one pair per dispatch key. Their
// signatures mirror the schemas in ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace flash_attn_ext {

#define FLASH_ATTN_EXT_DECLARE_IMPL(suffix)                                                                       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_##suffix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, \
                                                  const std::optional<at::Tensor>& attn_bias,                    \
                                                  double softmax_scale, bool causal, int64_t window_left,        \
                                                  int64_t window_right, bool deterministic);                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_##suffix(                                       \
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                     \
      const at::Tensor& out, const at::Tensor& softmax_lse, const at::Tensor& lse_residual,                      \
      const std::optional<at::Tensor>& dsoftmax_lse,                                                             \
      const std::optional<at::Tensor>& attn_bias,                                                                \
      double softmax_scale, bool causal, int64_t window_left, int64_t window_right, bool deterministic,          \
      bool bias_requires_grad);

FLASH_ATTN_EXT_DECLARE_IMPL(cpu)
FLASH_ATTN_EXT_DECLARE_IMPL(cuda)

#undef FLASH_ATTN_EXT_DECLARE_IMPL

}  // namespace flash_attn_ext
