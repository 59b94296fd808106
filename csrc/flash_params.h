// The one parameter struct that crosses from the op implementations (csrc/cpu,
// csrc/cuda) into the kernels. Everything a kernel needs about a call lives
// here, so adding a feature means adding a field, not a kernel argument.
//
// Layout convention (flash-attn 2.x): q is (batch, seqlen_q, nheads, headdim),
// k and v are (batch, seqlen_k, nheads_k, headdim). Strides are in elements
// and the last dimension is always contiguous (stride 1).
#pragma once

#include <cstdint>

struct FlashFwdParams {
  // Inputs.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Optional additive bias on the scores, already expanded (broadcast dims
  // have stride 0) to (batch, nheads, seqlen_q, seqlen_k), same dtype as q.
  const void* bias = nullptr;

  // Outputs.
  void* out = nullptr;
  float* softmax_lse = nullptr;  // (batch, nheads, seqlen_q), natural log.

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;

  int batch = 0;
  int seqlen_q = 0, seqlen_k = 0;
  int nheads = 0, nheads_k = 0;  // nheads % nheads_k == 0 (MQA/GQA).
  int headdim = 0;               // The real head dim (kernels may pad it).

  float softmax_scale = 0.f;       // Multiplies q.k before the softmax.
  float softmax_scale_log2 = 0.f;  // softmax_scale * log2(e), for exp2.

  // Masking. Query row i sees key column j when
  //   j <= i + (seqlen_k - seqlen_q) + window_right   (if window_right >= 0)
  //   j >= i + (seqlen_k - seqlen_q) - window_left    (if window_left  >= 0)
  // i.e. bottom-right aligned as in flash-attn >= 2.1. Causal is
  // window_right == 0; is_causal is kept so kernels can specialise on it.
  bool is_causal = false;
  int window_left = -1, window_right = -1;
};

struct FlashBwdParams : FlashFwdParams {
  const void* dout = nullptr;
  // Gradient flowing into softmax_lse, (batch, nheads, seqlen_q) fp32
  // contiguous, or null. It enters as D_i = rowsum(dO * O)_i - dsoftmax_lse_i.
  const float* dsoftmax_lse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Gradient of the bias, (batch, nheads, seqlen_q, seqlen_k) contiguous in
  // the dtype of q; null unless the bias requires a gradient.
  void* dbias = nullptr;

  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // Scratch owned by the implementation (CUDA: fp32 dQ accumulator and
  // D = rowsum(dO * O)); unused on CPU.
  float* dq_accum = nullptr;
  float* softmax_d = nullptr;

  bool deterministic = false;
};
