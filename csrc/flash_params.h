// The one parameter struct that crosses from the op implementations (csrc/cpu,
// csrc/cuda) into the kernels. Everything a kernel needs about a call lives
// here, so adding a feature means adding a field, not a kernel argument.
//
// Layout convention (flash-attn 2.x): q is (batch, seqlen_q, nheads, headdim),
// k and v are (batch, seqlen_k, nheads_k, headdim). Strides are in elements
// and the last dimension is always contiguous (stride 1).
#pragma once

#include <cstdint>

#include "host_device.h"

// Additive bias values below -kBiasFloor act as -kBiasFloor (-inf stays
// -inf, and a NaN stays NaN: its row's output is NaN), in every kernel, CPU and CUDA,
// forward and backward: floored_bias in score_rule.h. Masks are often
// built from torch.finfo(dtype).min (-3.4e38), which the CUDA kernels'
// log2-domain scores (bias * log2(e)) would overflow to -inf, turning "every
// key equally unlikely" (PyTorch's math path: the uniform average) into "no
// key at all" (output 0). -1e38 * log2(e) plus any finite score stays
// finite. Outputs and gradients are unchanged; only softmax_lse of a row
// whose keys all carry such a bias reads -1e38 + log(keys).
constexpr float kBiasFloor = 1e38f;

// A descale table of the FP8 forward: fp32 (batch, nheads_k) with any
// strides (0 for one value broadcast, as flash_attn_ext/fp8.py passes a
// per-tensor scale); a null pointer reads as 1.
struct DescaleTable {
  const float* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
  FLASH_HOST_DEVICE float at(int b, int hk) const { return ptr == nullptr ? 1.f : ptr[b * batch_stride + hk * head_stride]; }
};

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
  // (batch, nheads, seqlen_q): what fp32 softmax_lse cannot hold of the
  // row's log-sum-exp, written by the forward and read by the backward, which
  // recomputes P = exp((s - lse) - residual) (CPU, natural log) or
  // P = exp2((s_log2 - lse_log2(lse)) - residual) (CUDA, log2 domain, see
  // lse_log2 in cuda/softmax.cuh). It is ~1e-7 * |lse| and matters when |lse|
  // is large: a row whose keys all carry a bias of -1e9 has lse = -1e9 +
  // log(seqlen_k), which rounds to -1e9 in fp32; without the residual its
  // probabilities would come back as 1 instead of 1 / seqlen_k. 0 for rows
  // that see no key. Null (read as 0) unless there is a bias or the inputs
  // are fp64 (needs_lse_residual in checks.h): without a bias a row's scores
  // reach |lse| > 2^8, where the residual starts to matter, only beyond the
  // precision of the fp32 score accumulators themselves, and the backward's
  // peak memory stays out + dq + dk + dv + lse + the fp32 dq accumulator.
  float* lse_residual = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;

  // softmax_lse (and lse_residual, softmax_d, dsoftmax_lse): (batch, nheads,
  // seqlen_q) dense, (nheads, total_q) varlen; see SeqInfo::lse_offset.
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  // Variable-length batches (seq_info.h says how kernels read them): int32
  // (batch + 1,) cumulative lengths, sequence b owning rows [cu[b], cu[b + 1])
  // of q (total_q rows) or of k and v (total_k rows); null for dense calls.
  // seqused_k (batch,), dense or varlen: sequence b uses only its first
  // seqused_k[b] keys.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  const int* seqused_k = nullptr;
  int total_q = 0, total_k = 0;

  // The Hopper warp-specialized forward's query-block counter (int32, zero
  // before the launch): with it the kernel runs a persistent grid, one
  // block per SM taking query blocks from it in order; null: one block per
  // query block (flash_fwd_sm90_ws_kernel.cuh).
  int* tile_counter = nullptr;
  // Variable-length calls on the Hopper kernels: the blocks that hold rows,
  // listed on the device before the kernel runs (cuda/tile_list.cuh): entry
  // 0 their count, then each one's tile index, the longest sequences first,
  // so that the grid never walks the blocks past a shorter sequence's end
  // (most of them in a batch of mixed lengths) and ends on light tiles. The
  // persistent forward's counter walks its query blocks; the warp-
  // specialized backward has a block per entry of its key blocks' list.
  // Room for tile_list_capacity entries after the count; null: the kernel
  // walks every (batch, head, block) of the largest sequence.
  int* tile_list = nullptr;
  int64_t tile_list_capacity = 0;
  // The least rows of a listed block, which the host sizes the lists by
  // (cuda/tile_counter.h; the launchers assert their tiles' sizes).
  static constexpr int kListedQueryBlockMinRows = 64, kListedKeyBlockMinRows = 128;

  int batch = 0;
  // Per sequence when dense; the largest lengths (max_seqlen_q / _k) varlen.
  int seqlen_q = 0, seqlen_k = 0;
  int nheads = 0, nheads_k = 0;  // nheads % nheads_k == 0 (MQA/GQA).
  int headdim = 0;               // The real head dim (kernels may pad it).

  // Multiplies q.k before the softmax. A double, so that fp64 inputs (CPU)
  // are scaled exactly; the CUDA kernels use softmax_scale_f / _log2.
  double softmax_scale = 0.0;
  float softmax_scale_f = 0.f;     // softmax_scale rounded to fp32.
  float softmax_scale_log2 = 0.f;  // softmax_scale * log2(e), for exp2.

  // Masking. Query row i sees key column j when
  //   j <= i + (seqlen_k - seqlen_q) + window_right   (if window_right >= 0)
  //   j >= i + (seqlen_k - seqlen_q) - window_left    (if window_left  >= 0)
  // i.e. bottom-right aligned as in flash-attn >= 2.1. Causal is
  // window_right == 0; is_causal is kept so kernels can specialise on it.
  bool is_causal = false;
  int window_left = -1, window_right = -1;

  // Score features, applied by the score rule after the scale and before
  // the bias and the mask; each is off at its default.
  // softcap > 0: a score s becomes softcap * tanh(s / softcap) (Gemma 2).
  float softcap = 0.f;
  // ALiBi (BLOOM, MPT; flash-attn's convention): score(i, j) gets
  // -slope * |i + seqlen_k - seqlen_q - j|, with fp32 slopes per (batch,
  // head) at alibi_slopes[b * alibi_batch_stride + h] (stride 0 when the
  // slopes are (nheads,)). The slopes receive no gradient.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  // Attention sinks (gpt-oss's s_aux): a fp32 logit per head that joins
  // every row's softmax denominator with no value: out rows shrink by
  // exp(lse_keys - lse), and softmax_lse includes the sink. Only the forward
  // kernels read it: the backward recomputes P from that lse, which already
  // holds the sink, and the sinks' gradient -sum_i P_sink_i * D_i is a
  // reduction the autograd formula does (flash_attn_ext/_ops.py) over the
  // backward's D (softmax_d, returned by bwd with return_softmax_d).
  const float* sinks = nullptr;
  // Dropout on the probabilities (dropout.h): with dropout_p > 0 every
  // kernel keeps a score with probability 1 - dropout_p, drawn from
  // rng_state = [seed, offset] (two int64 in the op's device memory, read by
  // the kernels at run time: CUDA-graph safe), and scales kept ones by
  // 1 / (1 - dropout_p). softmax_lse is that of the undropped softmax.
  // A double, so that fp64 inputs (CPU) are scaled exactly.
  double dropout_p = 0.0;
  const int64_t* rng_state = nullptr;

  // FP8 (float8_e4m3fn) inputs: the fwd_fp8 op only (csrc/cuda/flash_fwd_fp8_host.cpp);
  // every other op leaves these at their defaults. The real value of an
  // element of (batch b, kv head hk) is its e4m3 value times the table's
  // (b, hk) entry (query head h reads kv head h / (nheads / nheads_k)'s):
  // q_descale * k_descale joins the softmax scale, v_descale multiplies
  // the output. out is bf16.
  DescaleTable q_descale, k_descale, v_descale;
  // V transposed (the 8-bit wgmma reads both operands K-major, so P V needs
  // keys along the rows), written by the op's own transpose kernel
  // (cuda/flash_fwd_fp8_transpose.cu) from v: v_t (batch, nheads_k, headdim,
  // vt_cols) bytes, dense, or (1, nheads_k, headdim, vt_cols) varlen with
  // sequence b's keys from column fp8_vt_start(b, k_start); within every
  // 32-key group the keys in the order the kernel's P fragments need
  // (hopper/wgmma.cuh, pack_a_frags_e4m3); each sequence's columns past its
  // (used) keys zero up to the next multiple of 128, so that no key block
  // reads another sequence's values. p.v points at v_t.
  int64_t vt_batch_stride = 0, vt_head_stride = 0, vt_dim_stride = 0, vt_cols = 0;
};

// Where sequence b's keys start in a varlen v_t: its start in k rounded up
// to 16 columns (aligned 16-byte stores), plus 144 columns per earlier
// sequence, so that the 128-column multiple a sequence is padded to never
// reaches the next one (start_{b+1} - start_b >= len_b - 15 + 144 >
// round_up(len_b, 128)). 0 for dense calls (batch is a tensor dim there).
FLASH_HOST_DEVICE inline int64_t fp8_vt_start(const FlashFwdParams& p, int b, int64_t k_start) {
  return p.cu_seqlens_k != nullptr ? (k_start + 15) / 16 * 16 + int64_t(144) * b : 0;
}
// Columns of a varlen v_t: past the last sequence's padded end.
inline int64_t fp8_vt_varlen_cols(int64_t total_k, int64_t batch) {
  return (total_k + 144 * (batch + 1) + 127) / 128 * 128;
}

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
