// bwd_cuda: the CUDA implementation of flash_attn_ext::bwd.
//
// Memory plan (peak extra memory of forward + backward must stay within 1.5x
// the size of out + dq + dk + dv + lse): the scratch is allocated in the order
// softmax_d (fp32 B*H*Sq), dq_accum (fp32 B*Sq*H*D, only on the atomic path),
// dk, dv; run_flash_bwd phase 1 runs preprocess + the dK/dV kernel; then
// softmax_d is freed *before* dq is allocated and phase 2 converts dq_accum
// into dq. Nothing else large is allocated unless it must be: expanded dk/dv
// only for GQA/MQA (summed over each head group afterwards), padded copies
// only when the head dim is not a compiled size or an input is not 16-byte
// aligned for cp.async.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../checks.h"
#include "../flash_api.h"
#include "dispatch.h"
#include "flash_launch.h"

namespace flash_attn_ext {
namespace {

// The kernels read 16-byte chunks: the head dim must be a compiled size and
// the base pointer and the batch/row/head strides 16-byte aligned.
at::Tensor pad_or_align(const at::Tensor& t, int64_t padded_dim) {
  if (t.size(-1) != padded_dim) {
    return at::constant_pad_nd(t, {0, padded_dim - t.size(-1)}, 0);
  }
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) aligned = aligned && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  if (aligned) return t;
  return t.clone(at::MemoryFormat::Contiguous);  // fresh allocations are 16-byte aligned
}

at::Tensor unpad(const at::Tensor& t, int64_t dim) {
  return t.size(-1) == dim ? t : t.narrow(-1, 0, dim).contiguous();
}

template <typename Fn>
void dispatch_bwd(at::ScalarType dtype, int padded_dim, bool causal, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto elem) {
    using Element = decltype(elem);
    dispatch_head_dim(padded_dim, [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      dispatch_bool(causal, [&](auto is_causal) { fn.template operator()<Element, kHeadDim, decltype(is_causal)::value>(); });
    });
  });
}

struct Launch {
  const FlashBwdParams& params;
  cudaStream_t stream;
  template <typename Element, int kHeadDim, bool kIsCausal>
  void operator()() const {
    run_flash_bwd<Element, kHeadDim, kIsCausal>(params, stream);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const at::Tensor& lse_residual, const std::optional<at::Tensor>& dsoftmax_lse,
    const std::optional<at::Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool deterministic, bool bias_requires_grad) {
  check_bwd_inputs(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale,
                   bias_requires_grad);
  TORCH_CHECK(q.is_cuda(), "flash_attn_ext: bwd_cuda expects CUDA tensors, got ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());

  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t seqlen_k = k.size(1), nheads_k = k.size(2);
  const auto opts = q.options();

  // Nothing to attend to (or nobody attending): all gradients are zero.
  if (batch == 0 || seqlen_q == 0 || seqlen_k == 0 || nheads == 0) {
    at::Tensor dbias = bias_requires_grad ? at::zeros({batch, nheads, seqlen_q, seqlen_k}, opts) : at::empty({0}, opts);
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous), dbias};
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "flash_attn_ext: the CUDA backward supports float16 and bfloat16 only, got ", q.scalar_type());

  const int padded = padded_head_dim(static_cast<int>(head_dim));
  const at::Tensor q_p = pad_or_align(q, padded), k_p = pad_or_align(k, padded), v_p = pad_or_align(v, padded);
  const at::Tensor out_p = pad_or_align(out, padded), dout_p = pad_or_align(dout, padded);

  // Scratch and outputs, in the order of the memory plan above.
  at::Tensor softmax_d = at::empty({batch, nheads, seqlen_q}, opts.dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::empty({batch, seqlen_q, nheads, padded}, opts.dtype(at::kFloat));
  const bool expand_kv = nheads != nheads_k;  // dk/dv per query head, summed per group below
  at::Tensor dk = at::empty({batch, seqlen_k, expand_kv ? nheads : nheads_k, padded}, opts);
  at::Tensor dv = at::empty({batch, seqlen_k, expand_kv ? nheads : nheads_k, padded}, opts);
  at::Tensor dq;
  if (deterministic) dq = at::empty({batch, seqlen_q, nheads, padded}, opts);
  std::optional<at::Tensor> dbias;
  // Zero-filled: tiles the mask skips whole are never written.
  if (bias_requires_grad) dbias = at::zeros({batch, nheads, seqlen_q, seqlen_k}, opts);

  FlashBwdParams params;
  set_bwd_params(params, dout_p, q_p, k_p, v_p, out_p, softmax_lse, lse_residual, dsoftmax_lse, attn_bias,
                 deterministic ? dq : dk /* dq is set below */, dk, dv, dbias, softmax_scale, causal, window_left,
                 window_right, deterministic);
  if (!deterministic) {
    params.dq = nullptr;
    params.dq_accum = dq_accum.data_ptr<float>();
  }
  params.softmax_d = softmax_d.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Launch launch{params, stream};
  dispatch_bwd(q.scalar_type(), padded, params.is_causal, launch);  // phase 1 (deterministic: all of it)

  if (!deterministic) {
    softmax_d.reset();  // give its memory back before dq exists
    params.softmax_d = nullptr;
    dq = at::empty({batch, seqlen_q, nheads, padded}, opts);
    params.dq = dq.data_ptr();
    params.dq_batch_stride = dq.stride(0), params.dq_row_stride = dq.stride(1), params.dq_head_stride = dq.stride(2);
    dispatch_bwd(q.scalar_type(), padded, params.is_causal, launch);  // phase 2: dq = scale * dq_accum
    dq_accum.reset();
  }

  if (expand_kv) {
    dk = dk.view({batch, seqlen_k, nheads_k, nheads / nheads_k, padded}).sum(3);
    dv = dv.view({batch, seqlen_k, nheads_k, nheads / nheads_k, padded}).sum(3);
  }
  return {unpad(dq, head_dim), unpad(dk, head_dim), unpad(dv, head_dim),
          dbias.has_value() ? *dbias : at::empty({0}, opts)};
}

}  // namespace flash_attn_ext
