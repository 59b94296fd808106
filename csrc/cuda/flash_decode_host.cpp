// flash_attn_ext::fwd_kvcache_cuda: checks (shared with the CPU, ../kvcache.h),
// layout preparation, the split count and its fp32 scratch, and the
// dispatch to the decode launchers (flash_decode.h) on the current stream.
// Nothing here reads a tensor's values, so a call can be captured in a CUDA
// graph: the scratch is sized from the shapes and the split count alone.
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../checks.h"
#include "../flash_api.h"
#include "../format.h"
#include "../kvcache.h"
#include "cuda_context.h"
#include "dispatch.h"
#include "flash_decode.h"

namespace flash_attn_ext {
namespace {

// The kernel copies K, V and q rows in 16-byte pieces: base pointer, batch /
// row / head strides and the head dim must be multiples of 8 elements.
bool aligned_16(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.size(3) % 8 != 0) return false;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

// A cache the kernel cannot read in place (head dim not a multiple of 8,
// odd strides) is copied, zero-padded to `padded`: correct, but a copy of the
// whole cache per call; the common layouts never take this path.
Tensor readable_cache(const Tensor& t, int64_t padded) {
  if (aligned_16(t)) return t;
  Tensor x = resize_last_dim(t, t.size(3) % 8 == 0 ? t.size(3) : padded);
  return aligned_16(x) ? x : contiguous_copy(x);
}

}  // namespace

std::tuple<Tensor, Tensor> fwd_kvcache_cuda(const Tensor& q_in, const Tensor& k_cache_in, const Tensor& v_cache_in,
                                            const Tensor& cache_seqlens, const std::optional<Tensor>& cache_batch_idx,
                                            const std::optional<Tensor>& cache_leftpad,
                                            const std::optional<Tensor>& block_table, double softmax_scale,
                                            bool causal, int64_t window_left, int64_t window_right, double softcap,
                                            const std::optional<Tensor>& alibi_slopes,
                                            const std::optional<Tensor>& sinks, int64_t num_splits) {
  check_kvcache_inputs(q_in, k_cache_in, v_cache_in, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                        softmax_scale, softcap, alibi_slopes, sinks, num_splits);
  FLASH_CHECK(q_in.is_cuda(), "flash_attn_ext: fwd_kvcache_cuda expects CUDA tensors, got ", device_name(q_in));
  const ScalarType dtype = q_in.scalar_type();
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
              "flash_attn_ext: the CUDA kernels support float16 and bfloat16 only, got ", dtype_name(dtype),
              " (the CPU implementation also takes float32 and float64)");
  const CudaContext cuda(q_in);
  const int64_t batch = q_in.size(0), seqlen_q = q_in.size(1), nheads = q_in.size(2), head_dim = q_in.size(3);
  const std::array<int64_t, 3> lse_shape{batch, nheads, seqlen_q};
  if (batch == 0 || seqlen_q == 0) {
    return {empty_on(q_in, q_in.sizes(), dtype), empty_on(q_in, lse_shape, ScalarType::Float)};
  }
  FLASH_CHECK(batch * nheads * seqlen_q <= std::numeric_limits<int>::max(),
              "flash_attn_ext: batch * nheads * seqlen_q = ", num(batch * nheads * seqlen_q), " exceeds 2**31 - 1");

  const int padded = padded_head_dim(static_cast<int>(head_dim));
  Tensor q = resize_last_dim(q_in, padded);
  if (!aligned_16(q)) q = contiguous_copy(q);
  const Tensor k_cache = readable_cache(k_cache_in, padded);
  const Tensor v_cache = readable_cache(v_cache_in, padded);
  // The kernel folds the scale into exp2 and assumes it positive: a negative
  // scale moves onto q (exact), a zero one becomes a tiny positive one (as
  // in fwd_cuda).
  if (softmax_scale < 0) {
    q = contiguous_copy(neg(q));
    softmax_scale = -softmax_scale;
  } else if (softmax_scale == 0) {
    softmax_scale = 1e-30;
  }

  const std::array<int64_t, 4> out_shape{batch, seqlen_q, nheads, padded};
  Tensor out = empty_on(q_in, out_shape, dtype);
  Tensor softmax_lse = empty_on(q_in, lse_shape, ScalarType::Float);

  FlashKvcacheParams params;
  set_kvcache_params(params, q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks);
  params.headdim = static_cast<int>(k_cache.size(3));  // the columns of K/V that exist (<= padded)
  params.out = out.data_ptr();
  params.o_batch_stride = out.stride(0), params.o_row_stride = out.stride(1), params.o_head_stride = out.stride(2);
  params.softmax_lse = static_cast<float*>(softmax_lse.data_ptr());

  Tensor out_accum, lse_accum;
  const cudaStream_t stream = cuda.stream();
  dispatch_dtype(dtype, [&](auto element) {
    using Element = decltype(element);
    dispatch_head_dim(padded, [&](auto hdim) {
      constexpr int kHeadDim = decltype(hdim)::value;
      params.num_splits = plan_flash_decode<Element, kHeadDim>(params, static_cast<int>(num_splits));
      if (params.num_splits > 1) {
        const int64_t rows = batch * nheads * seqlen_q;
        const std::array<int64_t, 3> accum_shape{params.num_splits, rows, padded};
        const std::array<int64_t, 2> lse_accum_shape{params.num_splits, rows};
        out_accum = empty_on(q_in, accum_shape, ScalarType::Float);
        lse_accum = empty_on(q_in, lse_accum_shape, ScalarType::Float);
        params.out_accum = static_cast<float*>(out_accum.data_ptr());
        params.lse_accum = static_cast<float*>(lse_accum.data_ptr());
      }
      run_flash_decode<Element, kHeadDim>(params, stream);
    });
  });
  return {resize_last_dim(out, head_dim), softmax_lse};
}

}  // namespace flash_attn_ext
