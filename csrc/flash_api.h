// The host functions behind the two ops, one pair per dispatch key. Their
// signatures mirror the schemas in ops.cpp; they are registered boxed
// (TORCH_BOX) through the stable ABI.
#pragma once

#include <optional>
#include <tuple>

#include "tensor.h"

namespace flash_attn_ext {

#define FLASH_ATTN_EXT_DECLARE_IMPL(suffix)                                                                     \
  std::tuple<Tensor, Tensor, Tensor> fwd_##suffix(const Tensor& q, const Tensor& k, const Tensor& v,             \
                                                  const std::optional<Tensor>& attn_bias, double softmax_scale, \
                                                  bool causal, int64_t window_left, int64_t window_right,       \
                                                  bool deterministic, double softcap,                           \
                                                  const std::optional<Tensor>& alibi_slopes,                    \
                                                  const std::optional<Tensor>& sinks, double dropout_p,         \
                                                  const std::optional<Tensor>& rng_state);                      \
  std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_##suffix(                                                      \
      const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,                 \
      const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,         \
      const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,           \
      int64_t window_right, bool deterministic, bool bias_requires_grad, double softcap,                         \
      const std::optional<Tensor>& alibi_slopes, double dropout_p, const std::optional<Tensor>& rng_state);  \
  /* The keep-mask of dropout (dropout.h), bool (batch, nheads, seqlen_q, seqlen_k), CPU. */                    \
  Tensor dropout_mask_##suffix(const Tensor& rng_state, int64_t batch, int64_t nheads, int64_t seqlen_q,        \
                               int64_t seqlen_k, double dropout_p);

FLASH_ATTN_EXT_DECLARE_IMPL(cpu)
FLASH_ATTN_EXT_DECLARE_IMPL(cuda)

#undef FLASH_ATTN_EXT_DECLARE_IMPL

}  // namespace flash_attn_ext
