// The op schemas, defined once. Implementations are registered per dispatch
// key in cpu/flash_api_cpu.cpp and cuda/flash_api_cuda.cpp; fake (meta) and
// autograd registrations live in flash_attn_ext/_ops.py. Registration goes
// through PyTorch's stable ABI (tensor.h).
#include "python_module.h"
#include "tensor.h"

// `import flash_attn_ext._C` loads the schemas and the CPU kernels.
FLASH_ATTN_EXT_EMPTY_PYTHON_MODULE(_C)

STABLE_TORCH_LIBRARY(flash_attn_ext, m) {
  // q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
  // attn_bias: additive, expanded to (batch, nheads, seqlen_q, seqlen_k), dtype of q.
  // window_left/right < 0 mean unbounded; causal implies window_right = 0.
  // deterministic is not used by the forward computation: it is recorded for
  // the autograd formula (flash_attn_ext/_ops.py), which passes it to bwd.
  // Returns out (like q), softmax_lse (batch, nheads, seqlen_q) in fp32 and
  // lse_residual (same shape): the part of the log-sum-exp that fp32
  // softmax_lse cannot hold, for bwd (see FlashFwdParams::lse_residual).
  // Rows that see no key get out = 0, softmax_lse = +inf, lse_residual = 0.
  // Bias values below -1e38 act as -1e38 (see checks.h, kBiasFloor).
  // softcap, alibi_slopes, sinks: the score features (csrc/flash_params.h):
  // softcap >= 0 (0 = off); alibi_slopes fp32 (nheads,) or (batch, nheads);
  // sinks fp32 (nheads,), whose logits join softmax_lse.
  // dropout_p in [0, 1) with rng_state, int64 (2,) = [seed, offset] on q's
  // device (csrc/dropout.h), read by the kernels; bwd takes the same pair.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_bias, float softmax_scale, bool causal, "
      "int window_left, int window_right, bool deterministic, float softcap=0., Tensor? alibi_slopes=None, "
      "Tensor? sinks=None, float dropout_p=0., Tensor? rng_state=None) "
      "-> (Tensor out, Tensor softmax_lse, Tensor lse_residual)");
  // Recomputes the probabilities from q, k, softmax_lse and lse_residual (both
  // as fwd returned them). dsoftmax_lse, the
  // gradient flowing into softmax_lse (None when unused), enters through
  // D = rowsum(dout * out) - dsoftmax_lse. dbias is
  // (batch, nheads, seqlen_q, seqlen_k) in the dtype of q when
  // bias_requires_grad, else an empty tensor. softmax_d, with
  // return_softmax_d, is that D, shaped like softmax_lse, fp32 (fp64 for fp64
  // inputs), for every row (a call without keys, whose out is 0: -dsoftmax_lse),
  // else an empty tensor: the sinks' gradient, -sum_i exp(sink - lse_i) D_i, is
  // formed from it (flash_attn_ext/_ops.py, sinks_grad).
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, Tensor lse_residual, "
      "Tensor? dsoftmax_lse, "
      "Tensor? attn_bias, "
      "float softmax_scale, bool causal, int window_left, int window_right, bool deterministic, "
      "bool bias_requires_grad, float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., "
      "Tensor? rng_state=None, bool return_softmax_d=False) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias, Tensor softmax_d)");
  // Variable-length batches (flash-attn's varlen layout, csrc/seq_info.h):
  // q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim);
  // sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and
  // [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (int32, batch + 1)
  // and uses only its first seqused_k[b] keys where seqused_k (int32,
  // (batch,)) is given; max_seqlen_q / _k bound the lengths. Masks align
  // bottom-right per sequence. Returns out (like q), softmax_lse
  // (nheads, total_q) and lse_residual ((nheads, total_q) for fp64 inputs,
  // else empty); rows of q outside every sequence get out 0, lse +inf.
  // No attn_bias; everything else (the score features, dropout, softmax_d:
  // (nheads, total_q), rows outside every sequence included) as fwd / bwd.
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, "
      "bool deterministic, float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None, float dropout_p=0., "
      "Tensor? rng_state=None) -> (Tensor out, Tensor softmax_lse, Tensor lse_residual)");
  m.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, Tensor lse_residual, "
      "Tensor? dsoftmax_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, bool deterministic, "
      "float softcap=0., Tensor? alibi_slopes=None, float dropout_p=0., Tensor? rng_state=None, "
      "bool return_softmax_d=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor softmax_d)");
  // Inference: attention of q (batch, seqlen_q, nheads, headdim) over a KV
  // cache, contiguous (batch_cache, seqlen_cache, nheads_k, headdim) or paged
  // (num_blocks, page_size, nheads_k, headdim) with block_table int32
  // (batch, max_blocks_per_seq). cache_seqlens int32 (batch,): keys valid in
  // each sequence's cache (after any append, left padding included);
  // cache_batch_idx int32 (batch,): the cache row of each sequence
  // (contiguous only); cache_leftpad int32 (batch,): its first key. Masks are
  // bottom-right aligned per sequence on its cache_seqlens - leftpad keys.
  // num_splits: 0 = chosen from the shapes and the GPU, else how many parts
  // the keys are split into (CUDA; the CPU ignores it). Forward only (the
  // Python wrapper, flash_attn_ext.flash_attn_with_kvcache, does the append
  // and rotary embedding). Returns out (like q) and softmax_lse (batch,
  // nheads, seqlen_q) fp32, the sinks included. See csrc/kvcache.h.
  m.def(
      "fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cache_batch_idx, "
      "Tensor? cache_leftpad, Tensor? block_table, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None, int num_splits=0) "
      "-> (Tensor out, Tensor softmax_lse)");
  // The native FP8 forward (CUDA, Hopper; flash_attn_ext/fp8.py decides
  // which calls take it, and sends the others to the dequantizing path).
  // Forward only, no autograd. q, k, v float8_e4m3fn as fwd's (batch,
  // seqlen, heads, headdim), or varlen_fwd's (total, heads, headdim) with
  // cu_seqlens_q/_k (and seqused_k, max_seqlen_q/_k; ignored when dense);
  // head dims 128 and 256, one for q, k and v; 16-byte aligned data and
  // strides. q_descale, k_descale, v_descale: fp32 (batch, nheads_k), any
  // strides (expand a single value): real values are e4m3 values times these
  // (query head h uses kv head h / (nheads / nheads_k)'s); they must be
  // finite and not negative. softmax_scale > 0. Returns out bf16 (q's shape) and
  // softmax_lse fp32 ((batch, nheads, seqlen_q), or (nheads, total_q)), as
  // fwd / varlen_fwd.
  m.def(
      "fwd_fp8(Tensor q, Tensor k, Tensor v, Tensor q_descale, Tensor k_descale, Tensor v_descale, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal, int window_left, int window_right) -> (Tensor out, Tensor softmax_lse)");
  // The keep-mask fwd/bwd apply for dropout_p and rng_state (int64 (2,),
  // CPU), bool (batch, nheads, seqlen_q, seqlen_k), True = kept: the same
  // function of (seed, offset, batch, head, row, col) as every kernel's.
  // For tests and return_attn_probs on small problems.
  m.def("dropout_mask(Tensor rng_state, int batch, int nheads, int seqlen_q, int seqlen_k, float dropout_p) -> Tensor");
}
