// flash_attn_ext::fwd_cuda: validation, layout preparation (head-dim padding,
// 16-byte alignment), output allocation, empty-size handling and dispatch to
// the forward kernels on the current CUDA stream.
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../checks.h"
#include "../flash_api.h"
#include "../format.h"
#include "cuda_context.h"
#include "dispatch.h"
#include "flash_launch.h"
#include "tile_counter.h"

namespace flash_attn_ext {
namespace {

// The kernels read q/k/v with 16-byte cp.async: the base pointer and every
// batch / row / head stride must be a multiple of 8 elements. Pads the head
// dim to `padded` with zeros (zeros leave q.k unchanged, and the padded
// columns of out are sliced off).
Tensor prepare_qkv(const Tensor& t, int64_t padded) {
  Tensor x = resize_last_dim(t, padded);
  bool aligned = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3 && aligned; ++i) aligned = x.size(i) <= 1 || x.stride(i) % 8 == 0;
  if (!aligned) x = contiguous_copy(x);
  return x;
}

// The forward of a dense call, or of a varlen call given as its batch-1
// views (checks.h, VarlenLayout); rows of a varlen q outside every sequence
// get out 0 and lse +inf.
std::tuple<Tensor, Tensor, Tensor> fwd_cuda_impl(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                 const std::optional<Tensor>& attn_bias, double softmax_scale,
                                                 bool causal, int64_t window_left, int64_t window_right,
                                                 const ScoreFeatures& features, const VarlenLayout* varlen) {
  const std::optional<Tensor>& sinks = features.sinks;
  check_fwd_inputs(q_in, k_in, v_in, attn_bias, softmax_scale, features, varlen);
  if (v_in.size(3) != q_in.size(3)) {
    return fwd_on_one_head_dim(q_in, k_in, v_in, [&](const Tensor& q1, const Tensor& k1, const Tensor& v1) {
      return fwd_cuda_impl(q1, k1, v1, attn_bias, softmax_scale, causal, window_left, window_right, features, varlen);
    });
  }
  FLASH_CHECK(q_in.is_cuda(), "flash_attn_ext: fwd_cuda expects CUDA tensors, got ", device_name(q_in));
  const ScalarType dtype = q_in.scalar_type();
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
              "flash_attn_ext: the CUDA kernels support float16 and bfloat16 only, got ", dtype_name(dtype),
              " (the CPU implementation also takes float32 and float64)");
  const CudaContext cuda(q_in);

  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), nheads = q_in.size(2), head_dim = q_in.size(3);
  const int64_t seqlen_k = k_in.size(1);

  // lse_residual: shaped like softmax_lse where needed (checks.h), else (0,).
  const std::array<int64_t, 3> lse_shape{batch, nheads, seqlen_q};
  auto residual = [&] {
    return needs_lse_residual(q_in, attn_bias) ? zeros_on(q_in, lse_shape, ScalarType::Float)
                                               : empty_on(q_in, {0}, ScalarType::Float);
  };
  // Empty problems: nothing to launch.
  if (batch == 0 || seqlen_q == 0 || nheads == 0) {
    return {empty_on(q_in, q_in.sizes(), dtype), empty_on(q_in, lse_shape, ScalarType::Float), residual()};
  }
  if (seqlen_k == 0) {
    // No key at all: every row's softmax is empty (but for its sink).
    return {zeros_on(q_in, q_in.sizes(), dtype), lse_without_keys(q_in, sinks), residual()};
  }

  const int padded = padded_head_dim(static_cast<int>(head_dim));
  Tensor q = prepare_qkv(q_in, padded);
  const Tensor k = prepare_qkv(k_in, padded);
  const Tensor v = prepare_qkv(v_in, padded);

  // The kernels fold the scale into exp2 and assume it is positive: a
  // negative scale is moved onto q (negation is exact), a zero scale becomes
  // a tiny positive one (every finite score then maps to the same value, as
  // with a zero scale, and masked entries stay -inf instead of NaN).
  if (softmax_scale < 0) {
    q = prepare_qkv(neg(q), padded);
    softmax_scale = -softmax_scale;
  } else if (softmax_scale == 0) {
    softmax_scale = 1e-30;
  }

  const std::array<int64_t, 4> out_shape{batch, seqlen_q, nheads, padded};
  Tensor out = varlen ? zeros_on(q_in, out_shape, dtype) : empty_on(q_in, out_shape, dtype);
  Tensor softmax_lse = varlen ? full_on(q_in, lse_shape, ScalarType::Float, std::numeric_limits<double>::infinity())
                              : empty_on(q_in, lse_shape, ScalarType::Float);
  Tensor lse_residual = residual();

  FlashFwdParams params;
  set_fwd_params(params, q, k, v, attn_bias, out, softmax_lse, lse_residual, softmax_scale, causal, window_left,
                 window_right, features, varlen);
  if (params.batch == 0 || params.seqlen_q == 0) return {resize_last_dim(out, head_dim), softmax_lse, lse_residual};
  // The Hopper warp-specialized forward's query-block counter (its
  // persistent grid; launch_ws.cuh).
  const std::optional<Tensor> tile_counter =
      make_tile_counter(q_in, flash::sm90::fwd_wants_tile_counter(padded), &params.tile_counter);
  const std::optional<Tensor> tile_list = make_varlen_tile_list(q_in, params);

  const cudaStream_t stream = cuda.stream();
  dispatch_dtype(dtype, [&](auto element) {
    using Element = decltype(element);
    dispatch_head_dim(padded, [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      run_flash_fwd<Element, kHeadDim>(params, stream);
    });
  });

  out = resize_last_dim(out, head_dim);
  return {out, softmax_lse, lse_residual};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal,
                                            int64_t window_left, int64_t window_right,
                                            bool /*deterministic: the forward is deterministic either way*/,
                                            double softcap, const std::optional<Tensor>& alibi_slopes,
                                            const std::optional<Tensor>& sinks, double dropout_p,
                                            const std::optional<Tensor>& rng_state) {
  return fwd_cuda_impl(q, k, v, attn_bias, softmax_scale, causal, window_left, window_right,
                       ScoreFeatures{softcap, alibi_slopes, sinks, dropout_p, rng_state}, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                   const std::optional<Tensor>& seqused_k, int64_t max_seqlen_q,
                                                   int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                   int64_t window_left, int64_t window_right,
                                                   bool /*deterministic: the forward is deterministic either way*/,
                                                   double softcap, const std::optional<Tensor>& alibi_slopes,
                                                   const std::optional<Tensor>& sinks, double dropout_p,
                                                   const std::optional<Tensor>& rng_state) {
  const VarlenLayout layout{cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k};
  check_varlen_inputs(q, k, v, layout);
  auto [out, lse, residual] = fwd_cuda_impl(as_one_sequence(q), as_one_sequence(k), as_one_sequence(v), std::nullopt,
                                            softmax_scale, causal, window_left, window_right,
                                            ScoreFeatures{softcap, alibi_slopes, sinks, dropout_p, rng_state}, &layout);
  return {drop_batch_dim(out), drop_batch_dim(lse), drop_batch_dim(residual)};
}

}  // namespace flash_attn_ext
