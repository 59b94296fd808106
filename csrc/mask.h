// Which keys a query row may see: the geometry of the causal / sliding-window
// mask, shared by every kernel, CUDA forward and backward and the CPU
// implementation alike (plain C++, __host__ __device__ under nvcc).
// The rule is the one documented on FlashFwdParams: bottom-right aligned
// causal / sliding-window masks, so that with seqlen_q != seqlen_k the last
// query row always lines up with the last key. Kernels use it twice: per
// tile, to skip key or query blocks nobody sees and to know when a tile needs
// no per-element mask (tile_fully_visible), and per element, through the
// score rule's mask step (score_rule.h), which is the one place that asks
// whether a row's keys contain a column.
#pragma once

#include "flash_params.h"
#include "host_device.h"
#include "seq_info.h"

namespace flash {

// Keys [begin, end) of one query row.
struct KeyRange {
  int begin, end;
  FLASH_HOST_DEVICE bool contains(int col) const { return col >= begin && col < end; }
};

struct MaskGeometry {
  int seqlen_q, seqlen_k;
  int window_left, window_right;  // < 0: unbounded on that side.

  // The geometry of one sequence (seq_info.h): its own lengths, so that
  // varlen and seqused_k sequences are aligned bottom-right on their own.
  FLASH_HOST_DEVICE MaskGeometry(const FlashFwdParams& p, const SeqInfo& seq)
      : seqlen_q(seq.seqlen_q), seqlen_k(seq.seqlen_k), window_left(p.window_left), window_right(p.window_right) {}

  // Diagonal offset: query row i is aligned with key column i + offset.
  FLASH_HOST_DEVICE int offset() const { return seqlen_k - seqlen_q; }

  // Visible keys of row `row` are [key_begin(row), key_end(row)), a subset of
  // [0, seqlen_k).
  FLASH_HOST_DEVICE int key_begin(int row) const {
    if (window_left < 0) return 0;
    const int b = row + offset() - window_left;
    return b > 0 ? b : 0;
  }
  FLASH_HOST_DEVICE int key_end(int row) const {
    if (window_right < 0) return seqlen_k;
    const int e = row + offset() + window_right + 1;
    return e < seqlen_k ? (e > 0 ? e : 0) : seqlen_k;
  }
  // The keys row `row` sees (empty past key_end, so never a key past
  // seqlen_k). Rows past seqlen_q, which partial tiles carry, are answered as
  // if they existed; kernels that read statistics for them (the backward)
  // exclude them themselves.
  FLASH_HOST_DEVICE KeyRange keys(int row) const { return KeyRange{key_begin(row), key_end(row)}; }

  // Key blocks of size block_n that the query block [row0, row0 + block_m)
  // touches: [n_block_begin, n_block_end). Blocks outside are skipped whole.
  FLASH_HOST_DEVICE int n_block_begin(int row0, int block_n) const {
    return key_begin(row0) / block_n;
  }
  FLASH_HOST_DEVICE int n_block_end(int row0, int block_m, int block_n) const {
    int last_row = row0 + block_m - 1;
    if (last_row > seqlen_q - 1) last_row = seqlen_q - 1;
    const int e = key_end(last_row);
    return (e + block_n - 1) / block_n;
  }
  // Query blocks of size block_m that the key block [col0, col0 + block_n)
  // is seen by (used by the backward, which iterates over query blocks).
  FLASH_HOST_DEVICE int m_block_begin(int col0, int block_m) const {
    if (window_right < 0) return 0;
    // Smallest row with key_end(row) > col0: row + offset + window_right >= col0.
    const int r = col0 - offset() - window_right;
    return r > 0 ? r / block_m : 0;
  }
  FLASH_HOST_DEVICE int m_block_end(int col0, int block_n, int block_m) const {
    const int num_m_blocks = (seqlen_q + block_m - 1) / block_m;
    if (window_left < 0) return num_m_blocks;
    // Largest row with key_begin(row) <= last col: row + offset - window_left <= col0 + block_n - 1.
    const int r = col0 + block_n - 1 - offset() + window_left;
    if (r < 0) return 0;
    const int e = r / block_m + 1;
    return e < num_m_blocks ? e : num_m_blocks;
  }
  // The rows that see key `col` (0 <= col), as [*lo, *hi): the transpose of
  // keys(), for kernels that hold a few keys and many rows (the backward's
  // S^T fragments). Empty past seqlen_k; never past seqlen_q.
  FLASH_HOST_DEVICE void rows_seeing(int col, int* lo, int* hi) const {
    // row sees col iff col < key_end(row) and key_begin(row) <= col, i.e.
    // row >= col - offset - window_right and row <= col - offset + window_left.
    const int64_t base = int64_t(col) - offset();
    const int64_t first = window_right < 0 ? 0 : base - window_right;
    const int64_t end = col >= seqlen_k ? 0 : (window_left < 0 ? int64_t(seqlen_q) : base + window_left + 1);
    *lo = static_cast<int>(first < 0 ? 0 : (first > seqlen_q ? seqlen_q : first));
    *hi = static_cast<int>(end < 0 ? 0 : (end > seqlen_q ? seqlen_q : end));
  }
  // True when every (row, col) in the tile is visible, so the kernel can skip
  // per-element masking for it (the common case away from the diagonal).
  FLASH_HOST_DEVICE bool tile_fully_visible(int row0, int block_m, int col0, int block_n) const {
    const int row1 = row0 + block_m - 1, col1 = col0 + block_n - 1;
    if (row1 >= seqlen_q || col1 >= seqlen_k) return false;
    return key_begin(row1) <= col0 && key_end(row0) > col1;
  }
};

}  // namespace flash
