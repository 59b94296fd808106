// Input validation and FlashParams filling shared by every dispatch key, so
// CPU and CUDA reject exactly the same inputs with the same messages.
#pragma once

#include <optional>

#include "flash_params.h"
#include "tensor.h"

namespace flash_attn_ext {

// Whether fwd returns a real lse_residual (batch, nheads, seqlen_q) or an
// empty one (see FlashFwdParams::lse_residual); the fake kernel in
// flash_attn_ext/_ops.py follows the same rule.
inline bool needs_lse_residual(const Tensor& q, const std::optional<Tensor>& attn_bias) {
  return attn_bias.has_value() || q.scalar_type() == ScalarType::Double;
}

// The optional score features of a call, as the host functions receive
// them (flash_params.h says what each does). sinks is forward-only.
// dropout_p > 0 needs rng_state, int64 (2,) = [seed, offset] on q's device.
struct ScoreFeatures {
  double softcap = 0.0;
  std::optional<Tensor> alibi_slopes;
  std::optional<Tensor> sinks;
  double dropout_p = 0.0;
  std::optional<Tensor> rng_state;
};

// softmax_lse (batch, nheads, seqlen_q) of a call without keys (seqlen_k =
// 0), where every row's softmax has only the head's sink: the sink, or +inf
// without sinks (a sink of -inf is none: +inf too), as the kernels write it
// for rows that see no key.
Tensor lse_without_keys(const Tensor& q, const std::optional<Tensor>& sinks);

// Checks q, k, v, the optional bias, the scale and the score features;
// throws a std::runtime_error (a Python RuntimeError) naming the problem.
void check_fwd_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                      const std::optional<Tensor>& attn_bias, double softmax_scale,
                      const ScoreFeatures& features);

// Additionally checks dout, out, softmax_lse, lse_residual and dsoftmax_lse
// against q, and that a bias gradient is only asked for when there is a bias.
void check_bwd_inputs(const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                      const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
                      const std::optional<Tensor>& attn_bias, double softmax_scale, bool bias_requires_grad,
                      const ScoreFeatures& features);

// Fills shapes, strides, pointers and the mask description. `out`,
// `softmax_lse` and `lse_residual` must already be allocated.
void set_fwd_params(FlashFwdParams& params, const Tensor& q, const Tensor& k,
                    const Tensor& v, const std::optional<Tensor>& attn_bias,
                    const Tensor& out, const Tensor& softmax_lse, const Tensor& lse_residual,
                    double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                    const ScoreFeatures& features);

void set_bwd_params(FlashBwdParams& params, const Tensor& dout, const Tensor& q,
                    const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& softmax_lse, const Tensor& lse_residual,
                    const std::optional<Tensor>& dsoftmax_lse,
                    const std::optional<Tensor>& attn_bias, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                    const std::optional<Tensor>& dbias, double softmax_scale, bool causal,
                    int64_t window_left, int64_t window_right, bool deterministic,
                    const ScoreFeatures& features);

}  // namespace flash_attn_ext
