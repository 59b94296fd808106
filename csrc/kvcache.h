// The inference op fwd_kvcache (ops.cpp): attention of a few query tokens
// over a KV cache, contiguous or paged, as flash-attn's
// flash_attn_with_kvcache computes it after its append (the append itself,
// and rotary embedding, are tensor operations in flash_attn_ext/kvcache.py).
// This header holds what the CPU (cpu/kvcache_cpu.cpp) and CUDA
// (cuda/flash_decode_host.cpp) implementations share: the parameter struct,
// the shape checks with their messages, and the filling of the struct. It is
// a header, not a .cpp, because setup.py links only checks.cpp into both
// libraries and this op is kept out of the files other work changes.
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

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "flash_params.h"
#include "seq_info.h"
#include "format.h"
#include "host_device.h"
#include "tensor.h"

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

namespace flash_attn_ext {
namespace kvcache {

constexpr int64_t kMaxSeqlen = (int64_t{1} << 30) - 1;

inline void check_index_tensor(const std::optional<Tensor>& t, const char* name, const Tensor& q, int64_t batch) {
  if (!t.has_value()) return;
  FLASH_CHECK(t->scalar_type() == ScalarType::Int, "flash_attn_ext: ", name, " must be int32, got ",
              dtype_name(t->scalar_type()));
  FLASH_CHECK(same_device(*t, q), "flash_attn_ext: ", name, " must be on the device of q (", device_name(q), "), got ",
              device_name(*t));
  FLASH_CHECK(t->dim() == 1 && t->size(0) == batch, "flash_attn_ext: ", name, " must be (batch,) = (", num(batch),
              ",), got ", shape(t->sizes()));
}

// fp32 per-head values (ALiBi slopes, sink logits), as fwd takes them.
inline void check_per_head(const Tensor& t, const char* name, const Tensor& q, bool per_batch) {
  const int64_t batch = q.size(0), nheads = q.size(2);
  FLASH_CHECK(t.scalar_type() == ScalarType::Float, "flash_attn_ext: ", name, " must be float32, got ",
              dtype_name(t.scalar_type()));
  FLASH_CHECK(same_device(t, q), "flash_attn_ext: ", name, " must be on the device of q (", device_name(q), "), got ",
              device_name(t));
  const bool shape_ok = (t.dim() == 1 && t.size(0) == nheads) ||
                        (per_batch && t.dim() == 2 && t.size(0) == batch && t.size(1) == nheads);
  FLASH_CHECK(shape_ok, "flash_attn_ext: ", name, " must be (nheads,) = (", num(nheads), ",)",
              per_batch ? " or (batch, nheads) = (" + num(batch) + ", " + num(nheads) + ")" : std::string(), ", got ",
              shape(t.sizes()));
  FLASH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "flash_attn_ext: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", num(t.stride(-1)));
}

inline void check_last_dim(const Tensor& t, const char* name) {
  FLASH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "flash_attn_ext: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", num(t.stride(-1)));
}

// Everything about fwd_kvcache's arguments that shapes, dtypes and devices
// tell; raises a RuntimeError naming the argument.
inline void check_inputs(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                         const std::optional<Tensor>& cache_batch_idx, const std::optional<Tensor>& cache_leftpad,
                         const std::optional<Tensor>& block_table, double softmax_scale, double softcap,
                         const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks,
                         int64_t num_splits) {
  FLASH_CHECK(q.dim() == 4, "flash_attn_ext: q must be 4-D (batch, seqlen_q, nheads, headdim), got ", num(q.dim()),
              "-D");
  FLASH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "flash_attn_ext: k_cache and v_cache must be 4-D (batch_cache, seqlen_cache, nheads_k, headdim), or "
              "(num_blocks, page_size, nheads_k, headdim) with a block_table; got ",
              num(k_cache.dim()), "-D and ", num(v_cache.dim()), "-D");
  const auto dtype = q.scalar_type();
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16 || dtype == ScalarType::Float ||
                  dtype == ScalarType::Double,
              "flash_attn_ext: unsupported dtype ", dtype_name(dtype),
              "; expected float16, bfloat16, float32 or float64");
  FLASH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "flash_attn_ext: q, k_cache and v_cache must have the same dtype, got ", dtype_name(dtype), ", ",
              dtype_name(k_cache.scalar_type()), " and ", dtype_name(v_cache.scalar_type()));
  FLASH_CHECK(same_device(k_cache, q) && same_device(v_cache, q),
              "flash_attn_ext: q, k_cache and v_cache must be on the same device, got ", device_name(q), ", ",
              device_name(k_cache), " and ", device_name(v_cache));
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), headdim = q.size(3);
  const int64_t nheads_k = k_cache.size(2);
  FLASH_CHECK(headdim >= 1 && headdim <= 256, "flash_attn_ext: head dim must be between 1 and 256, got ",
              num(headdim));
  FLASH_CHECK(nheads >= 1, "flash_attn_ext: nheads must be at least 1, got ", num(nheads));
  FLASH_CHECK(same_shape(k_cache.sizes(), v_cache.sizes()), "flash_attn_ext: k_cache and v_cache must have one shape, got ",
              shape(k_cache.sizes()), " and ", shape(v_cache.sizes()));
  FLASH_CHECK(k_cache.size(3) == headdim, "flash_attn_ext: q and k_cache must have the same head dim, got ",
              num(headdim), " and ", num(k_cache.size(3)));
  FLASH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, "flash_attn_ext: nheads (", num(nheads),
              ") must be divisible by the cache's nheads_k (", num(nheads_k), ")");
  FLASH_CHECK(seqlen_q <= kMaxSeqlen, "flash_attn_ext: seqlen_q = ", num(seqlen_q),
              " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  FLASH_CHECK(batch * nheads <= std::numeric_limits<int>::max(), "flash_attn_ext: batch * nheads = ", num(batch),
              " * ", num(nheads), " exceeds 2**31 - 1");
  check_last_dim(q, "q");
  check_last_dim(k_cache, "k_cache");
  check_last_dim(v_cache, "v_cache");

  FLASH_CHECK(cache_seqlens.scalar_type() == ScalarType::Int, "flash_attn_ext: cache_seqlens must be int32, got ",
              dtype_name(cache_seqlens.scalar_type()));
  check_index_tensor(cache_seqlens, "cache_seqlens", q, batch);
  check_index_tensor(cache_batch_idx, "cache_batch_idx", q, batch);
  check_index_tensor(cache_leftpad, "cache_leftpad", q, batch);
  if (block_table.has_value()) {
    const Tensor& bt = *block_table;
    FLASH_CHECK(bt.scalar_type() == ScalarType::Int, "flash_attn_ext: block_table must be int32, got ",
                dtype_name(bt.scalar_type()));
    FLASH_CHECK(same_device(bt, q), "flash_attn_ext: block_table must be on the device of q (", device_name(q),
                "), got ", device_name(bt));
    FLASH_CHECK(bt.dim() == 2 && bt.size(0) == batch,
                "flash_attn_ext: block_table must be (batch, max_blocks_per_seq) with batch = ", num(batch), ", got ",
                shape(bt.sizes()));
    FLASH_CHECK(bt.numel() == 0 || bt.size(1) <= 1 || bt.stride(1) == 1,
                "flash_attn_ext: block_table must have a contiguous last dimension (stride 1)");
    FLASH_CHECK(!cache_batch_idx.has_value(),
                "flash_attn_ext: cache_batch_idx cannot be combined with a block_table (the block table already "
                "says where each sequence's keys are)");
    FLASH_CHECK(k_cache.size(1) >= 1, "flash_attn_ext: a paged k_cache needs a page size >= 1, got shape ",
                shape(k_cache.sizes()));
    FLASH_CHECK(bt.size(1) == 0 || k_cache.size(0) >= 1, "flash_attn_ext: a paged k_cache needs at least one block");
    FLASH_CHECK(bt.size(1) * k_cache.size(1) <= kMaxSeqlen, "flash_attn_ext: max_blocks_per_seq * page_size = ",
                num(bt.size(1)), " * ", num(k_cache.size(1)), " exceeds the supported maximum of ",
                num(kMaxSeqlen), " keys per sequence");
  } else {
    FLASH_CHECK(cache_batch_idx.has_value() || k_cache.size(0) >= batch, "flash_attn_ext: k_cache has ",
                num(k_cache.size(0)), " batch rows, fewer than q's batch of ", num(batch),
                " (pass cache_batch_idx to pick rows)");
    FLASH_CHECK(!cache_batch_idx.has_value() || batch == 0 || k_cache.size(0) >= 1,
                "flash_attn_ext: cache_batch_idx needs a k_cache with at least one batch row");
    FLASH_CHECK(k_cache.size(1) <= kMaxSeqlen, "flash_attn_ext: seqlen_cache = ", num(k_cache.size(1)),
                " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  }
  FLASH_CHECK(k_cache.size(0) <= std::numeric_limits<int>::max(), "flash_attn_ext: k_cache.size(0) = ",
              num(k_cache.size(0)), " exceeds 2**31 - 1");

  FLASH_CHECK(std::isfinite(softmax_scale), "flash_attn_ext: softmax_scale must be finite, got ", num(softmax_scale));
  FLASH_CHECK(dtype == ScalarType::Double || std::abs(softmax_scale) <= std::numeric_limits<float>::max(),
              "flash_attn_ext: softmax_scale = ", num(softmax_scale), " overflows float32, the precision ",
              dtype_name(dtype), " inputs are computed in");
  FLASH_CHECK(std::isfinite(softcap) && softcap >= 0 && softcap <= std::numeric_limits<float>::max(),
              "flash_attn_ext: softcap must be a finite number >= 0 (0 = off), got ", num(softcap));
  if (alibi_slopes.has_value()) check_per_head(*alibi_slopes, "alibi_slopes", q, /*per_batch=*/true);
  if (sinks.has_value()) check_per_head(*sinks, "sinks", q, /*per_batch=*/false);
  FLASH_CHECK(num_splits >= 0 && num_splits <= 1024, "flash_attn_ext: num_splits must be between 0 (automatic) and ",
              "1024, got ", num(num_splits));
}

// A window side as the kernels take it: -1 (unbounded) or a width up to
// 2**30, so that the mask's sums (row + L - seqlen_q +- side) stay in int.
inline int window_side(int64_t side) {
  if (side < 0) return -1;
  return static_cast<int>(side < kMaxSeqlen ? side : kMaxSeqlen);
}

// Fills everything but out, softmax_lse and the split scratch. q, k_cache and
// v_cache are the tensors the kernels read (the CUDA host may pass padded
// or aligned copies of them).
inline void set_params(FlashKvcacheParams& p, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& cache_seqlens, const std::optional<Tensor>& cache_batch_idx,
                       const std::optional<Tensor>& cache_leftpad, const std::optional<Tensor>& block_table,
                       double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
                       const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks) {
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k_cache.stride(0), p.k_row_stride = k_cache.stride(1), p.k_head_stride = k_cache.stride(2);
  p.v_batch_stride = v_cache.stride(0), p.v_row_stride = v_cache.stride(1), p.v_head_stride = v_cache.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.nheads = static_cast<int>(q.size(2));
  p.nheads_k = static_cast<int>(k_cache.size(2));
  p.headdim = static_cast<int>(q.size(3));
  p.softmax_scale = softmax_scale;
  p.softmax_scale_f = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.window_left = window_side(window_left);
  p.window_right = causal ? 0 : window_side(window_right);
  p.is_causal = p.window_left < 0 && p.window_right == 0;
  p.softcap = static_cast<float>(softcap);
  if (alibi_slopes.has_value()) {
    p.alibi_slopes = static_cast<const float*>(alibi_slopes->data_ptr());
    p.alibi_batch_stride = alibi_slopes->dim() == 2 ? alibi_slopes->stride(0) : 0;
  }
  if (sinks.has_value()) p.sinks = static_cast<const float*>(sinks->data_ptr());
  p.cache_seqlens = static_cast<const int*>(cache_seqlens.data_ptr());
  p.cache_batch_idx = cache_batch_idx.has_value() ? static_cast<const int*>(cache_batch_idx->data_ptr()) : nullptr;
  p.cache_leftpad = cache_leftpad.has_value() ? static_cast<const int*>(cache_leftpad->data_ptr()) : nullptr;
  p.cache_rows = static_cast<int>(k_cache.size(0));
  if (block_table.has_value()) {
    p.block_table = static_cast<const int*>(block_table->data_ptr());
    p.block_table_batch_stride = block_table->stride(0);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.max_blocks = static_cast<int>(block_table->size(1));
    p.capacity = p.max_blocks * p.page_size;
  } else {
    p.capacity = static_cast<int>(k_cache.size(1));
  }
  p.seqlen_k = p.capacity;  // the longest a sequence can be; kernels use each one's own
}

}  // namespace kvcache
}  // namespace flash_attn_ext
