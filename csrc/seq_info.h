// Where one sequence of a call lives: the one description of a batch element
// that every kernel (CPU and CUDA, forward and backward) derives its offsets
// and lengths from, so that dense batches, variable-length batches
// (cu_seqlens, flash-attn's varlen layout) and batches whose sequences use
// only part of their keys (seqused_k) differ here and nowhere else.
//
// A dense call has batch strides, and every sequence has seqlen_q queries
// and seqlen_k keys. A varlen call has batch strides of 0: sequence b's
// query rows are [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q's rows (and so
// of out's and of the row vectors softmax_lse, softmax_d, dq_accum), its
// keys likewise through cu_seqlens_k, and params.seqlen_q / seqlen_k are the
// largest lengths (max_seqlen_q / _k), which size the grids. Masks are
// aligned per sequence (bottom-right, with that sequence's own lengths).
//
// The lengths come from device memory and cannot be checked without a
// synchronisation, so they are clamped here to what the tensors hold: a
// sequence never reads or writes outside q, k, v or the outputs, whatever
// the cumulative lengths say (the Python layer checks the values on CPU
// tensors, and on CUDA behind FLASH_ATTN_EXT_DEBUG_CHECKS).
#pragma once

#include <cstdint>

#include "flash_params.h"
#include "host_device.h"

namespace flash {

struct SeqInfo {
  int64_t q_start = 0, k_start = 0;  // the sequence's first row in the varlen layout; 0 when dense
  int seqlen_q = 0, seqlen_k = 0;    // its lengths (seqused_k applied)

  SeqInfo() = default;
  FLASH_HOST_DEVICE SeqInfo(const FlashFwdParams& p, int b) : seqlen_q(p.seqlen_q), seqlen_k(p.seqlen_k) {
    if (p.cu_seqlens_q != nullptr) span(p.cu_seqlens_q, b, p.total_q, q_start, seqlen_q);
    if (p.cu_seqlens_k != nullptr) span(p.cu_seqlens_k, b, p.total_k, k_start, seqlen_k);
    if (p.seqused_k != nullptr) {
      const int used = p.seqused_k[b];
      seqlen_k = used < 0 ? 0 : (used < seqlen_k ? used : seqlen_k);
    }
  }

  // A sequence known by its lengths alone (the decode kernels', whose keys
  // live in a KV cache that csrc/kvcache.h addresses).
  FLASH_HOST_DEVICE static SeqInfo of_lengths(int seqlen_q, int seqlen_k) {
    SeqInfo s;
    s.seqlen_q = seqlen_q;
    s.seqlen_k = seqlen_k;
    return s;
  }

  // Element offset of row 0 of this sequence, head `head`, in a tensor with
  // the given strides (q, k, v, out and their gradients).
  FLASH_HOST_DEVICE int64_t q_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                                     int head) const {
    return b * batch_stride + q_start * row_stride + head * head_stride;
  }
  FLASH_HOST_DEVICE int64_t k_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride, int b,
                                     int head) const {
    return b * batch_stride + k_start * row_stride + head * head_stride;
  }
  // Index of row 0 of this sequence, head `head`, in softmax_lse and the
  // vectors laid out like it (lse_residual, softmax_d, dsoftmax_lse):
  // (batch, nheads, seqlen_q) dense, (nheads, total_q) varlen.
  FLASH_HOST_DEVICE int64_t lse_offset(const FlashFwdParams& p, int b, int head) const {
    return b * p.lse_batch_stride + head * p.lse_head_stride + q_start;
  }
  // Row 0 of this sequence among all query rows, (batch * seqlen_q) dense or
  // total_q varlen: the row index of the backward's fp32 dq accumulator,
  // laid out (rows, nheads, head dim).
  FLASH_HOST_DEVICE int64_t q_row(const FlashFwdParams& p, int b) const {
    return p.cu_seqlens_q != nullptr ? q_start : int64_t(b) * p.seqlen_q;
  }

 private:
  // [start, start + len) = [cu[b], cu[b + 1]) clamped into [0, total), and
  // len to at most `len` on entry (the call's maximum).
  FLASH_HOST_DEVICE static void span(const int* cu, int b, int total, int64_t& start, int& len) {
    int first = cu[b], last = cu[b + 1];
    first = first < 0 ? 0 : (first > total ? total : first);
    last = last < first ? first : (last > total ? total : last);
    start = first;
    if (last - first < len) len = last - first;
  }
};

}  // namespace flash
