// Input validation and FlashParams filling shared by every dispatch key, so
// CPU and CUDA reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include "flash_params.h"

namespace flash_attn_ext {

// Checks q, k, v (and the optional bias) and returns nothing; throws a
// c10::Error (a Python RuntimeError/ValueError) naming the problem.
void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& attn_bias);

// Additionally checks dout, out, softmax_lse and dsoftmax_lse against q, and
// that a bias gradient is only asked for when there is a bias.
void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& softmax_lse,
                      const std::optional<at::Tensor>& dsoftmax_lse, const std::optional<at::Tensor>& attn_bias,
                      bool bias_requires_grad);

// Fills shapes, strides, pointers and the mask description. `out` and
// `softmax_lse` must already be allocated.
void set_fwd_params(FlashFwdParams& params, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const std::optional<at::Tensor>& attn_bias,
                    const at::Tensor& out, const at::Tensor& softmax_lse, double softmax_scale,
                    bool causal, int64_t window_left, int64_t window_right);

void set_bwd_params(FlashBwdParams& params, const at::Tensor& dout, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dsoftmax_lse,
                    const std::optional<at::Tensor>& attn_bias, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                    const std::optional<at::Tensor>& dbias, double softmax_scale, bool causal,
                    int64_t window_left, int64_t window_right, bool deterministic);

}  // namespace flash_attn_ext
