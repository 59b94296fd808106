// Input validation and FlashParams filling shared by every dispatch key, so
// CPU and CUDA reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include "flash_params.h"

namespace flash_attn_ext {

// Whether fwd returns a real lse_residual (batch, nheads, seqlen_q) or an
// empty one (see FlashFwdParams::lse_residual); the fake kernel in
// flash_attn_ext/_ops.py follows the same rule.
inline bool needs_lse_residual(const at::Tensor& q, const std::optional<at::Tensor>& attn_bias) {
  return attn_bias.has_value() || q.scalar_type() == at::kDouble;
}

// Checks q, k, v, the optional bias and the scale, and returns nothing;
// throws a c10::Error (a Python RuntimeError/ValueError) naming the problem.
void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& attn_bias, double softmax_scale);

// Additionally checks dout, out, softmax_lse, lse_residual and dsoftmax_lse
// against q, and that a bias gradient is only asked for when there is a bias.
void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& softmax_lse,
                      const at::Tensor& lse_residual, const std::optional<at::Tensor>& dsoftmax_lse,
                      const std::optional<at::Tensor>& attn_bias, double softmax_scale, bool bias_requires_grad);

// Fills shapes, strides, pointers and the mask description. `out`,
// `softmax_lse` and `lse_residual` must already be allocated.
void set_fwd_params(FlashFwdParams& params, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const std::optional<at::Tensor>& attn_bias,
                    const at::Tensor& out, const at::Tensor& softmax_lse, const at::Tensor& lse_residual,
                    double softmax_scale,
                    bool causal, int64_t window_left, int64_t window_right);

void set_bwd_params(FlashBwdParams& params, const at::Tensor& dout, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& softmax_lse, const at::Tensor& lse_residual,
                    const std::optional<at::Tensor>& dsoftmax_lse,
                    const std::optional<at::Tensor>& attn_bias, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                    const std::optional<at::Tensor>& dbias, double softmax_scale, bool causal,
                    int64_t window_left, int64_t window_right, bool deterministic);

}  // namespace flash_attn_ext
