// bwd_cuda: the CUDA implementation of flash_attn_ext::bwd.
//
// Memory plan (peak extra memory of forward + backward must stay within 1.5x
// the size of out + dq + dk + dv + lse): the scratch is allocated in the order
// softmax_d (fp32 B*H*Sq), dq_accum (fp32 B*Sq*H*D, only on the atomic path),
// dk, dv; run_flash_bwd phase 1 runs preprocess + the dK/dV kernel; then
// softmax_d is freed *before* dq is allocated and phase 2 converts dq_accum
// into dq. With return_softmax_d (asked for by the sinks' gradient only)
// softmax_d is an output and lives through phase 2: one more lse-sized fp32
// tensor at the peak. Nothing else large is allocated unless it must be:
// expanded dk/dv only for GQA/MQA (summed over each head group afterwards),
// padded copies only when the head dim is not a compiled size or an input is
// not 16-byte aligned for cp.async.
#include <array>
#include <cstdint>

#include "../checks.h"
#include "../flash_api.h"
#include "cuda_context.h"
#include "dispatch.h"
#include "flash_launch.h"
#include "tile_counter.h"

namespace flash_attn_ext {
namespace {

// The kernels read 16-byte chunks: the head dim must be a compiled size and
// the base pointer and the batch/row/head strides 16-byte aligned.
Tensor pad_or_align(const Tensor& t, int64_t padded_dim) {
  if (t.size(-1) != padded_dim) return resize_last_dim(t, padded_dim);  // a fresh, aligned tensor
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) aligned = aligned && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  if (aligned) return t;
  return contiguous_copy(t);  // fresh allocations are 16-byte aligned
}

// Calls fn.template operator()<Element, kHeadDim>() for the call's dtype and
// padded head dim.
template <typename Fn>
void dispatch_bwd(ScalarType dtype, int padded_dim, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto elem) {
    using Element = decltype(elem);
    dispatch_head_dim(padded_dim, [&](auto hdim) { fn.template operator()<Element, decltype(hdim)::value>(); });
  });
}

// The two phases of the backward (flash_launch.h).
struct Phase1 {
  const FlashBwdParams& params;
  cudaStream_t stream;
  template <typename Element, int kHeadDim>
  void operator()() const {
    run_flash_bwd<Element, kHeadDim>(params, stream);
  }
};
struct Phase2 {
  const FlashBwdParams& params;
  cudaStream_t stream;
  template <typename Element, int kHeadDim>
  void operator()() const {
    run_flash_bwd_convert_dq<Element, kHeadDim>(params, stream);
  }
};

// softmax_d (with return_softmax_d) of a call whose kernels do not run: no
// keys (or no sequence with both queries and keys), so out is 0 and
// D = rowsum(dout * out) - dlse = -dlse. Empty without return_softmax_d.
Tensor softmax_d_without_kernels(const Tensor& q, const Tensor& softmax_lse, const std::optional<Tensor>& dsoftmax_lse,
                                 bool return_softmax_d) {
  const ScalarType acc_dtype = q.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  if (!return_softmax_d) return empty_on(q, {0}, acc_dtype);
  Tensor d = empty_on(q, softmax_lse.sizes(), acc_dtype);
  if (!dsoftmax_lse.has_value()) return torch::stable::zero_(d);
  return torch::stable::copy_(d, neg(*dsoftmax_lse));
}

// The backward of a dense call, or of a varlen call given as its batch-1
// views (checks.h, VarlenLayout).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda_impl(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool deterministic, bool bias_requires_grad, const ScoreFeatures& features,
    const VarlenLayout* varlen, bool return_softmax_d) {
  check_bwd_inputs(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale,
                   bias_requires_grad, features, varlen);
  if (v.size(3) != q.size(3)) {
    return bwd_on_one_head_dim(dout, q, k, v, out, [&](const Tensor& dout1, const Tensor& q1, const Tensor& k1,
                                                       const Tensor& v1, const Tensor& out1) {
      return bwd_cuda_impl(dout1, q1, k1, v1, out1, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale,
                           causal, window_left, window_right, deterministic, bias_requires_grad, features, varlen,
                           return_softmax_d);
    });
  }
  FLASH_CHECK(q.is_cuda(), "flash_attn_ext: bwd_cuda expects CUDA tensors, got ", device_name(q));
  const CudaContext cuda(q);

  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t seqlen_k = k.size(1), nheads_k = k.size(2);
  const ScalarType dtype = q.scalar_type();
  const std::array<int64_t, 4> dbias_shape{batch, nheads, seqlen_q, seqlen_k};

  // Nothing to attend to (or nobody attending): all gradients are zero.
  if (batch == 0 || seqlen_q == 0 || seqlen_k == 0 || nheads == 0) {
    return {zeros_on(q, q.sizes(), dtype), zeros_on(q, k.sizes(), dtype), zeros_on(q, v.sizes(), dtype),
            bias_requires_grad ? zeros_on(q, dbias_shape, dtype) : empty_on(q, {0}, dtype),
            softmax_d_without_kernels(q, softmax_lse, dsoftmax_lse, return_softmax_d)};
  }
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
              "flash_attn_ext: the CUDA backward supports float16 and bfloat16 only, got ", dtype_name(dtype));

  const int padded = padded_head_dim(static_cast<int>(head_dim));
  const Tensor q_p = pad_or_align(q, padded), k_p = pad_or_align(k, padded), v_p = pad_or_align(v, padded);
  const Tensor out_p = pad_or_align(out, padded), dout_p = pad_or_align(dout, padded);

  // Scratch and outputs, in the order of the memory plan above.
  const std::array<int64_t, 3> rows_shape{batch, nheads, seqlen_q};
  const std::array<int64_t, 4> q_shape{batch, seqlen_q, nheads, padded};
  const bool expand_kv = nheads != nheads_k;  // dk/dv per query head, summed per group below
  const std::array<int64_t, 4> kv_shape{batch, seqlen_k, expand_kv ? nheads : nheads_k, padded};
  std::optional<Tensor> softmax_d = empty_on(q, rows_shape, ScalarType::Float);
  std::optional<Tensor> dq_accum;
  if (!deterministic) dq_accum = empty_on(q, q_shape, ScalarType::Float);
  // A varlen call's kernels write only the rows of its sequences' keys (and,
  // deterministic, queries); rows outside every sequence, and keys past a
  // sequence's seqused_k, get zero gradients.
  auto make = [&](const auto& shape) { return varlen ? zeros_on(q, shape, dtype) : empty_on(q, shape, dtype); };
  Tensor dk = make(kv_shape);
  Tensor dv = make(kv_shape);
  std::optional<Tensor> dq;
  if (deterministic) dq = make(q_shape);
  std::optional<Tensor> dbias;
  // Zero-filled: tiles the mask skips whole are never written.
  if (bias_requires_grad) dbias = zeros_on(q, dbias_shape, dtype);

  FlashBwdParams params;
  set_bwd_params(params, dout_p, q_p, k_p, v_p, out_p, softmax_lse, lse_residual, dsoftmax_lse, attn_bias,
                 deterministic ? *dq : dk /* dq is set below */, dk, dv, dbias, softmax_scale, causal, window_left,
                 window_right, deterministic, features, varlen);
  if (params.batch == 0 || params.seqlen_q == 0 || params.seqlen_k == 0) {  // varlen: no sequence has both
    return {zeros_on(q, q.sizes(), dtype), zeros_on(q, k.sizes(), dtype), zeros_on(q, v.sizes(), dtype),
            empty_on(q, {0}, dtype), softmax_d_without_kernels(q, softmax_lse, dsoftmax_lse, return_softmax_d)};
  }
  if (!deterministic) {
    params.dq = nullptr;
    params.dq_accum = static_cast<float*>(dq_accum->data_ptr());
  }
  params.softmax_d = static_cast<float*>(softmax_d->data_ptr());
  // Variable-length calls on the Hopper backward: the list of key blocks
  // that hold rows (tile_counter.h), a few KB.
  const std::optional<Tensor> key_tile_list = make_varlen_key_tile_list(q, params, padded);

  dispatch_bwd(dtype, padded, Phase1{params, cuda.stream()});  // deterministic: all of it

  // Phase 1 is done with D: the output, when asked for.
  const Tensor d_out = return_softmax_d ? *softmax_d : empty_on(q, {0}, ScalarType::Float);
  if (!deterministic) {
    softmax_d.reset();  // give its memory back before dq exists (unless it is d_out)
    params.softmax_d = nullptr;
    dq = empty_on(q, q_shape, dtype);
    params.dq = dq->data_ptr();
    params.dq_batch_stride = varlen ? 0 : dq->stride(0);
    params.dq_row_stride = dq->stride(1), params.dq_head_stride = dq->stride(2);
    dispatch_bwd(dtype, padded, Phase2{params, cuda.stream()});  // dq = scale * dq_accum
    dq_accum.reset();
  }

  if (expand_kv) {
    const std::array<int64_t, 5> grouped{batch, seqlen_k, nheads_k, nheads / nheads_k, padded};
    const std::array<int64_t, 1> group_dim{3};
    dk = torch::stable::sum(torch::stable::view(dk, grouped), group_dim);
    dv = torch::stable::sum(torch::stable::view(dv, grouped), group_dim);
  }
  return {resize_last_dim(*dq, head_dim), resize_last_dim(dk, head_dim), resize_last_dim(dv, head_dim),
          dbias.has_value() ? *dbias : empty_on(q, {0}, dtype), d_out};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool deterministic, bool bias_requires_grad, double softcap,
    const std::optional<Tensor>& alibi_slopes, double dropout_p, const std::optional<Tensor>& rng_state,
    bool return_softmax_d) {
  return bwd_cuda_impl(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale, causal,
                       window_left, window_right, deterministic, bias_requires_grad,
                       ScoreFeatures{softcap, alibi_slopes, std::nullopt, dropout_p, rng_state}, nullptr,
                       return_softmax_d);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const std::optional<Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool deterministic, double softcap, const std::optional<Tensor>& alibi_slopes,
    double dropout_p, const std::optional<Tensor>& rng_state, bool return_softmax_d) {
  const VarlenLayout layout{cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k};
  check_varlen_inputs(q, k, v, layout);
  const VarlenViews views(dout, out, softmax_lse, lse_residual, dsoftmax_lse);
  auto [dq, dk, dv, dbias, softmax_d] =
      bwd_cuda_impl(views.dout, as_one_sequence(q), as_one_sequence(k), as_one_sequence(v), views.out, views.lse,
                    views.lse_residual, views.dlse, std::nullopt, softmax_scale, causal, window_left, window_right,
                    deterministic, /*bias_requires_grad=*/false,
                    ScoreFeatures{softcap, alibi_slopes, std::nullopt, dropout_p, rng_state}, &layout,
                    return_softmax_d);
  return {drop_batch_dim(dq), drop_batch_dim(dk), drop_batch_dim(dv), drop_batch_dim(softmax_d)};
}

}  // namespace flash_attn_ext
