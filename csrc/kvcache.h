// The inference op fwd_kvcache (ops.cpp): attention of a few query tokens
// over a KV cache, contiguous or paged, as flash-attn's
// flash_attn_with_kvcache computes it after its append (the append itself,
// and rotary embedding, are tensor operations in flash_attn_ext/kvcache.py).
// This header holds what the CPU (cpu/kvcache_cpu.cpp) and CUDA kernels
// (cuda/flash_decode_kernel.cuh) share: the parameter struct and where a
// sequence's keys are. Plain C++ with no torch header, so that kernel files
// can include it; the host side (the checks with their messages, the filling
// of the struct) is check_kvcache_inputs / set_kvcache_params in checks.h.
//
// Where sequence b's keys are. Its batch row in the cache is
//   bc = cache_batch_idx[b] (or b), its first key sits at cache position
//   lp = cache_leftpad[b] (or 0) and it has L = cache_seqlens[b] - lp keys:
//   key j (0 <= j < L) is at cache position lp + j, i.e.
//   contiguous:  k_cache[bc, lp + j]
//   paged:       k_cache[block_table[b, (lp + j) / page], (lp + j) % page]
// The mask and ALiBi see a sequence of L keys and seqlen_q queries, bottom-
// right aligned (query i sits at key i + L - seqlen_q), as in flash-attn.
//
// Values that only the device knows (cache_seqlens, cache_batch_idx,
// cache_leftpad, block ids) are clamped by the kernels into the tensors
// (clamp_sequence below): cache_seqlens to [0, capacity], leftpad to [0,
// cache_seqlens], batch indices to [0, batch_cache - 1], block ids to [0,
// num_blocks - 1]. An out-of-range value thus gives a wrong answer, never an
// access outside the tensors; the CPU implementation checks the values and
// raises, and on CUDA flash_attn_ext.kvcache checks them (with a device
// synchronisation) under FLASH_ATTN_EXT_DEBUG_CHECKS=1.
#pragma once

#include <cstdint>

#include "flash_params.h"
#include "host_device.h"
#include "seq_info.h"

struct FlashKvcacheParams : FlashFwdParams {
  // (batch,) int32 on the device of q: keys valid after the append, counted
  // from cache position 0 (so including the left padding).
  const int* cache_seqlens = nullptr;
  const int* cache_batch_idx = nullptr;  // (batch,) or null
  const int* cache_leftpad = nullptr;    // (batch,) or null
  // Paged: (batch, max_blocks) int32, row stride block_table_batch_stride;
  // k/v batch strides then step over blocks of page_size rows.
  const int* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int page_size = 0;     // paged only
  int max_blocks = 0;    // paged only: block_table.size(1)
  int cache_rows = 0;    // k_cache.size(0): batch rows (contiguous) or blocks (paged)
  int capacity = 0;      // keys one sequence can hold: seqlen_cache, or max_blocks * page_size

  // Split-KV (CUDA): each of num_splits partial results, unnormalised by the
  // other splits, goes to out_accum (num_splits, batch, nheads, seqlen_q,
  // headdim) and lse_accum (num_splits, batch, nheads, seqlen_q), fp32, and a
  // combine kernel merges them. num_splits == 1 writes out directly.
  int num_splits = 1;
  float* out_accum = nullptr;
  float* lse_accum = nullptr;
  // CUDA: the entry of the decode kernel's configuration table
  // (cuda/flash_decode_launch.cuh) that plan_flash_decode picked.
  int decode_config = 0;
};

namespace flash {

// One sequence's keys, worked out from the index tensors with every value
// clamped into the tensors (see the top of this file).
struct KvSequence {
  int cache_row;  // bc (contiguous); unused when paged
  int leftpad;    // lp
  int seqlen_k;   // L
};

FLASH_HOST_DEVICE inline int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

FLASH_HOST_DEVICE inline KvSequence clamp_sequence(const FlashKvcacheParams& p, int b) {
  const int end = clamp_int(p.cache_seqlens[b], 0, p.capacity);
  const int lp = p.cache_leftpad != nullptr ? clamp_int(p.cache_leftpad[b], 0, end) : 0;
  const int row = p.block_table == nullptr && p.cache_batch_idx != nullptr
                      ? clamp_int(p.cache_batch_idx[b], 0, p.cache_rows - 1)
                      : b;
  return KvSequence{row, lp, end - lp};
}

// Offset in elements of cache position `pos` (0 <= pos < capacity) of
// sequence b in a cache tensor with these batch (block) and row strides.
FLASH_HOST_DEVICE inline int64_t cache_row_offset(const FlashKvcacheParams& p, int b, const KvSequence& s, int pos,
                                                  int64_t batch_stride, int64_t row_stride) {
  if (p.block_table == nullptr) return s.cache_row * batch_stride + static_cast<int64_t>(pos) * row_stride;
  const int block = clamp_int(p.block_table[b * p.block_table_batch_stride + pos / p.page_size], 0, p.cache_rows - 1);
  return block * batch_stride + static_cast<int64_t>(pos % p.page_size) * row_stride;
}

// The sequence as MaskGeometry takes it (csrc/seq_info.h): seqlen_q
// queries over its L keys, bottom-right aligned.
FLASH_HOST_DEVICE inline SeqInfo sequence_info(const FlashKvcacheParams& p, const KvSequence& s) {
  return SeqInfo::of_lengths(p.seqlen_q, s.seqlen_k);
}

}  // namespace flash
