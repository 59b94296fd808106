// flash_attn_ext::fwd_cuda: validation, layout preparation (head-dim padding,
// 16-byte alignment), output allocation, empty-size handling and dispatch to
// the forward kernels on the current CUDA stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../flash_api.h"
#include "../format.h"
#include "dispatch.h"
#include "flash_launch.h"

namespace flash_attn_ext {
namespace {

// The kernels read q/k/v with 16-byte cp.async: the base pointer and every
// batch / row / head stride must be a multiple of 8 elements. Pads the head
// dim to `padded` with zeros (zeros leave q.k unchanged, and the padded
// columns of out are sliced off).
at::Tensor prepare_qkv(const at::Tensor& t, int64_t padded) {
  at::Tensor x = t;
  const int64_t d = x.size(3);
  if (d != padded) x = at::constant_pad_nd(x, {0, padded - d}, 0);
  bool aligned = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3 && aligned; ++i) aligned = x.size(i) <= 1 || x.stride(i) % 8 == 0;
  if (!aligned) x = x.clone(at::MemoryFormat::Contiguous);
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const std::optional<at::Tensor>& attn_bias, double softmax_scale,
                                            bool causal, int64_t window_left, int64_t window_right,
                                            bool deterministic) {
  (void)deterministic;  // The forward pass is deterministic either way.
  check_fwd_inputs(q_in, k_in, v_in, attn_bias, softmax_scale);
  TORCH_CHECK(q_in.is_cuda(), "flash_attn_ext: fwd_cuda expects CUDA tensors, got ", q_in.device());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "flash_attn_ext: the CUDA kernels support float16 and ",
              "bfloat16 only, got ", dtype, " (the CPU implementation also takes float32 and float64)");
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), nheads = q_in.size(2), head_dim = q_in.size(3);
  const int64_t seqlen_k = k_in.size(1);
  const auto opts = q_in.options();

  // Empty problems: nothing to launch.
  const auto lse_opts = opts.dtype(at::kFloat);
  const std::vector<int64_t> lse_shape = {batch, nheads, seqlen_q};
  // lse_residual: shaped like softmax_lse where needed (checks.h), else (0,).
  auto residual_like = [&](c10::IntArrayRef shape) {
    return needs_lse_residual(q_in, attn_bias) ? at::zeros(shape, lse_opts) : at::empty({0}, lse_opts);
  };
  if (batch == 0 || seqlen_q == 0 || nheads == 0) {
    return {at::empty({batch, seqlen_q, nheads, head_dim}, opts), at::empty({batch, nheads, seqlen_q}, lse_opts),
            residual_like(lse_shape)};
  }
  if (seqlen_k == 0) {
    // No key at all: every row's softmax is empty.
    return {at::zeros({batch, seqlen_q, nheads, head_dim}, opts),
            at::full({batch, nheads, seqlen_q}, std::numeric_limits<float>::infinity(), lse_opts),
            residual_like(lse_shape)};
  }

  const int padded = padded_head_dim(static_cast<int>(head_dim));
  at::Tensor q = prepare_qkv(q_in, padded);
  const at::Tensor k = prepare_qkv(k_in, padded);
  const at::Tensor v = prepare_qkv(v_in, padded);

  // The kernels fold the scale into exp2 and assume it is positive: a
  // negative scale is moved onto q (negation is exact), a zero scale becomes
  // a tiny positive one (every finite score then maps to the same value, as
  // with a zero scale, and masked entries stay -inf instead of NaN).
  if (softmax_scale < 0) {
    q = prepare_qkv(q.neg(), padded);
    softmax_scale = -softmax_scale;
  } else if (softmax_scale == 0) {
    softmax_scale = 1e-30;
  }

  at::Tensor out = at::empty({batch, seqlen_q, nheads, padded}, opts);
  at::Tensor softmax_lse = at::empty({batch, nheads, seqlen_q}, lse_opts);
  at::Tensor lse_residual = residual_like(lse_shape);

  FlashFwdParams params;
  set_fwd_params(params, q, k, v, attn_bias, out, softmax_lse, lse_residual, softmax_scale, causal, window_left,
                 window_right);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_dtype(dtype, [&](auto element) {
    using Element = decltype(element);
    dispatch_head_dim(padded, [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      dispatch_bool(params.is_causal, [&](auto is_causal) {
        constexpr bool kIsCausal = decltype(is_causal)::value;
        run_flash_fwd<Element, kHeadDim, kIsCausal>(params, stream);
      });
    });
  });

  if (padded != head_dim) out = out.narrow(3, 0, head_dim).contiguous();
  return {out, softmax_lse, lse_residual};
}

}  // namespace flash_attn_ext
