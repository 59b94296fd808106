// Input validation and FlashParams filling shared by every dispatch key, so
// CPU and CUDA reject exactly the same inputs with the same messages.
#pragma once

#include <algorithm>
#include <optional>
#include <tuple>

#include "flash_params.h"
#include "kvcache.h"
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

// A variable-length batch (flash-attn's varlen layout; csrc/seq_info.h):
// q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim),
// sequence b owning rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and
// [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (int32, batch + 1), and
// using only its first seqused_k[b] keys where seqused_k (int32, batch) is
// given. max_seqlen_q / _k bound the lengths. The host functions run such a
// call as a dense one over views of batch 1 (1, total, heads, headdim),
// whose FlashParams then describe the sequences (set_fwd_params).
struct VarlenLayout {
  const Tensor& cu_seqlens_q;
  const Tensor& cu_seqlens_k;
  const std::optional<Tensor>& seqused_k;
  int64_t max_seqlen_q, max_seqlen_k;
  int64_t batch() const { return cu_seqlens_q.size(0) - 1; }
};

// Checks the varlen tensors q, k, v (3-D) and the layout: dtypes, shapes
// and devices always; the values of cu_seqlens_* and seqused_k (monotone,
// within total_q / total_k, lengths at most max_seqlen_*) when they are on
// the CPU, where reading them costs no synchronisation. Whatever the values,
// the kernels stay inside the tensors (seq_info.h clamps).
void check_varlen_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const VarlenLayout& layout);

// The (1, rows, heads, dim) view of a varlen (rows, heads, dim) tensor,
// and back.
Tensor as_one_sequence(const Tensor& t);
Tensor drop_batch_dim(const Tensor& t);

// The backward's other tensors of a varlen call as batch-1 views: dout and
// out (total_q, nheads, headdim), softmax_lse, lse_residual (unless empty)
// and dsoftmax_lse (nheads, total_q). Checks their ranks first, naming the
// tensor; check_bwd_inputs then checks the views.
struct VarlenViews {
  Tensor dout, out, lse, lse_residual;
  std::optional<Tensor> dlse;
  VarlenViews(const Tensor& dout, const Tensor& out, const Tensor& softmax_lse, const Tensor& lse_residual,
              const std::optional<Tensor>& dsoftmax_lse);
};

// A value head dim different from the query/key head dim (DeepSeek's MLA
// prefill: 192 / 128) runs on the kernels of one head dim: the narrower of
// q/k and v is zero-padded to the wider (zero columns add nothing to q.k,
// and give zero output columns), and the results are cut back to each
// tensor's own head dim. The scale is the caller's (1 / sqrt(q's head dim)
// by default), untouched by the padding. Each host function calls these
// first when the head dims differ, with itself as `fn`.
template <typename Fn>
std::tuple<Tensor, Tensor, Tensor> fwd_on_one_head_dim(const Tensor& q, const Tensor& k, const Tensor& v, Fn&& fn) {
  const int64_t common = std::max(q.size(-1), v.size(-1));
  auto [out, lse, residual] = fn(resize_last_dim(q, common), resize_last_dim(k, common), resize_last_dim(v, common));
  return {resize_last_dim(out, v.size(-1)), lse, residual};
}

template <typename Fn>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_on_one_head_dim(const Tensor& dout, const Tensor& q,
                                                                       const Tensor& k, const Tensor& v,
                                                                       const Tensor& out, Fn&& fn) {
  const int64_t common = std::max(q.size(-1), v.size(-1));
  auto [dq, dk, dv, dbias, softmax_d] = fn(resize_last_dim(dout, common), resize_last_dim(q, common),
                                           resize_last_dim(k, common), resize_last_dim(v, common),
                                           resize_last_dim(out, common));
  return {resize_last_dim(dq, q.size(-1)), resize_last_dim(dk, k.size(-1)), resize_last_dim(dv, v.size(-1)), dbias,
          softmax_d};
}

// fwd_kvcache (csrc/kvcache.h): everything about its arguments that shapes,
// dtypes and devices tell, raising a RuntimeError that names the argument;
// and the filling of its parameter struct (all but out, softmax_lse and the
// split scratch) from the tensors the kernels read.
void check_kvcache_inputs(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                          const std::optional<Tensor>& cache_batch_idx, const std::optional<Tensor>& cache_leftpad,
                          const std::optional<Tensor>& block_table, double softmax_scale, double softcap,
                          const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks,
                          int64_t num_splits);
void set_kvcache_params(FlashKvcacheParams& p, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& cache_seqlens, const std::optional<Tensor>& cache_batch_idx,
                        const std::optional<Tensor>& cache_leftpad, const std::optional<Tensor>& block_table,
                        double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
                        const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks);

// softmax_lse (batch, nheads, seqlen_q) of a call without keys (seqlen_k =
// 0), where every row's softmax has only the head's sink: the sink, or +inf
// without sinks (a sink of -inf is none: +inf too), as the kernels write it
// for rows that see no key.
Tensor lse_without_keys(const Tensor& q, const std::optional<Tensor>& sinks);

// Checks q, k, v, the optional bias, the scale and the score features;
// throws a std::runtime_error (a Python RuntimeError) naming the problem.
// With `varlen`, q, k and v are the (1, total, heads, dim) views of a
// varlen call (as_one_sequence) and the per-batch features have one entry
// per sequence.
void check_fwd_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                      const std::optional<Tensor>& attn_bias, double softmax_scale,
                      const ScoreFeatures& features, const VarlenLayout* varlen = nullptr);

// Additionally checks dout, out, softmax_lse, lse_residual and dsoftmax_lse
// against q, and that a bias gradient is only asked for when there is a bias.
void check_bwd_inputs(const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                      const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
                      const std::optional<Tensor>& attn_bias, double softmax_scale, bool bias_requires_grad,
                      const ScoreFeatures& features, const VarlenLayout* varlen = nullptr);

// Fills shapes, strides, pointers and the mask description. `out`,
// `softmax_lse` and `lse_residual` must already be allocated. With
// `varlen`, the tensors are the batch-1 views and the params get the
// sequences (batch = number of sequences, seqlen_* = max_seqlen_*).
void set_fwd_params(FlashFwdParams& params, const Tensor& q, const Tensor& k,
                    const Tensor& v, const std::optional<Tensor>& attn_bias,
                    const Tensor& out, const Tensor& softmax_lse, const Tensor& lse_residual,
                    double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                    const ScoreFeatures& features, const VarlenLayout* varlen = nullptr);

void set_bwd_params(FlashBwdParams& params, const Tensor& dout, const Tensor& q,
                    const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& softmax_lse, const Tensor& lse_residual,
                    const std::optional<Tensor>& dsoftmax_lse,
                    const std::optional<Tensor>& attn_bias, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                    const std::optional<Tensor>& dbias, double softmax_scale, bool causal,
                    int64_t window_left, int64_t window_right, bool deterministic,
                    const ScoreFeatures& features, const VarlenLayout* varlen = nullptr);

}  // namespace flash_attn_ext
