// The host functions behind the ops (dense and varlen), one pair per dispatch key. Their
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
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_##suffix(                                              \
      const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,                 \
      const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,         \
      const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,           \
      int64_t window_right, bool deterministic, bool bias_requires_grad, double softcap,                         \
      const std::optional<Tensor>& alibi_slopes, double dropout_p, const std::optional<Tensor>& rng_state,     \
      bool return_softmax_d);                                                                                     \
  /* The keep-mask of dropout (dropout.h), bool (batch, nheads, seqlen_q, seqlen_k), CPU. */                    \
  Tensor dropout_mask_##suffix(const Tensor& rng_state, int64_t batch, int64_t nheads, int64_t seqlen_q,        \
                               int64_t seqlen_k, double dropout_p);

#define FLASH_ATTN_EXT_DECLARE_VARLEN_IMPL(suffix)                                                               \
  std::tuple<Tensor, Tensor, Tensor> varlen_fwd_##suffix(                                                        \
      const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, \
      const std::optional<Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, \
      bool causal, int64_t window_left, int64_t window_right, bool deterministic, double softcap,               \
      const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks, double dropout_p,           \
      const std::optional<Tensor>& rng_state);                                                                   \
  std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_bwd_##suffix(                                                \
      const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,                 \
      const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,         \
      const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const std::optional<Tensor>& seqused_k,           \
      int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,       \
      int64_t window_right, bool deterministic, double softcap, const std::optional<Tensor>& alibi_slopes,      \
      double dropout_p, const std::optional<Tensor>& rng_state, bool return_softmax_d);

FLASH_ATTN_EXT_DECLARE_IMPL(cpu)
FLASH_ATTN_EXT_DECLARE_IMPL(cuda)
FLASH_ATTN_EXT_DECLARE_VARLEN_IMPL(cpu)
FLASH_ATTN_EXT_DECLARE_VARLEN_IMPL(cuda)

#undef FLASH_ATTN_EXT_DECLARE_IMPL
#undef FLASH_ATTN_EXT_DECLARE_VARLEN_IMPL

// fwd_fp8 (CUDA only, cuda/flash_fwd_fp8_host.cpp): the native FP8 forward
// on Hopper; see its schema in ops.cpp.
std::tuple<Tensor, Tensor> fwd_fp8_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_descale,
                                        const Tensor& k_descale, const Tensor& v_descale,
                                        const std::optional<Tensor>& cu_seqlens_q,
                                        const std::optional<Tensor>& cu_seqlens_k,
                                        const std::optional<Tensor>& seqused_k, int64_t max_seqlen_q,
                                        int64_t max_seqlen_k, double softmax_scale, bool causal,
                                        int64_t window_left, int64_t window_right);

// fwd_kvcache (inference over a KV cache, csrc/kvcache.h): cpu/kvcache_cpu.cpp
// and cuda/flash_decode_host.cpp.
#define FLASH_ATTN_EXT_DECLARE_KVCACHE(suffix)                                                          \
  std::tuple<Tensor, Tensor> fwd_kvcache_##suffix(                                                      \
      const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,       \
      const std::optional<Tensor>& cache_batch_idx, const std::optional<Tensor>& cache_leftpad,         \
      const std::optional<Tensor>& block_table, double softmax_scale, bool causal, int64_t window_left, \
      int64_t window_right, double softcap, const std::optional<Tensor>& alibi_slopes,                  \
      const std::optional<Tensor>& sinks, int64_t num_splits);

FLASH_ATTN_EXT_DECLARE_KVCACHE(cpu)
FLASH_ATTN_EXT_DECLARE_KVCACHE(cuda)

#undef FLASH_ATTN_EXT_DECLARE_KVCACHE

}  // namespace flash_attn_ext
