// Split-KV decode kernel for fwd_kvcache (../kvcache.h): few query rows
// against a long KV cache, contiguous or paged with any page size. Decoding
// reads every cached key and value once and does little arithmetic with
// them, so the kernel is built to keep the memory system busy:
//  * a thread block owns one (batch, kv head, row chunk, split): the 16
//    "rows" of a chunk are (query, query head) pairs of the kv head's GQA
//    group, query-major (row r = query * group + head in group), so every
//    query head of a kv head shares each K/V load; seqlen_q * group > 16
//    takes several chunks, each reading the keys again (correct for any
//    seqlen_q; fast when seqlen_q * group <= 16, the decoding case);
//  * the keys the chunk can see are cut into kBlockN-key tiles and the
//    tiles into num_splits contiguous parts, one per block, so that a batch
//    of one sequence still fills every SM;
//  * K and V tiles stream through a kStages-deep pipeline (several tiles in
//    flight per block), each row copied from where the cache keeps it, in
//    one of three ways (DecodeLoad):
//    - kCpAsync (every GPU): 16-byte cp.async copies by all threads; the
//      per-row element offsets of a tile are worked out one iteration before
//      its copies are issued (threads [0, kBlockN) one row each, the
//      block-table entry fetched before the compute of the iteration and
//      used after it, so its latency hides behind the compute) and kept in
//      shared memory;
//    - kBulk (sm90): one 1-D TMA bulk copy (cp.async.bulk, no tensor map)
//      per K or V row, issued by the thread that owns the row (thread r
//      copies K row r, thread kBlockN + r V row r), completing on the
//      stage's mbarrier; the copy engine, not the load/store unit, tracks
//      the bytes in flight. Rows outside the sequence are zeroed with
//      shared-memory stores instead (a masked key's value must be finite);
//    - kTma (sm90): TMA tensor-map boxes into 128-byte-swizzled panels
//      (hopper/tma.cuh's SW128 layout), issued by warp 0: one box of the
//      whole tile per 64-column panel and tensor for a contiguous cache,
//      one box per page segment of gcd(page_size, kBlockN) rows for a paged
//      one (lane i the tile's i-th). Per-row copies into padded rows (kBulk)
//      land on destinations that are not 128-byte aligned, which the copy
//      engine splits: ncu on an H200 measured 19% L2 hits (sectors fetched
//      twice) and 87% of DRAM bandwidth where cuDNN's kernel, with the same
//      grid and occupancy, has 1.5% and 94%. Rows outside the sequence are
//      loaded as the cache holds them (or zero-filled past its end) and
//      their V rows zeroed once the tile has landed. Calls the tensor maps
//      cannot describe (head dims not a multiple of 64, paged caches with
//      pages not a multiple of 8 rows or with left padding, misaligned
//      strides) run the kBulk load of the same shape;
//    optionally (kEvictFirst) with an L2 evict-first policy, since each
//    cached byte is read once, and (cp.async) a 256-byte L2 prefetch size;
//  * each warp owns 16 keys of every tile: S = Q K^T and O += P V on
//    mma.sync m16n8k16 (Q padded to 16 rows), fp32 accumulators, the score
//    rule (../score_rule.h: scale, softcap, ALiBi) and mask (../mask.h, per
//    sequence: seqlen_k = that sequence's keys) per score, and an online
//    softmax of its own (softmax.cuh);
//  * at the end the warps' partial results meet in shared memory and are
//    merged through their row maxima; with one split the block writes out
//    and softmax_lse (the sink joined), otherwise the split's normalised
//    partial and its lse (log2) go to fp32 scratch and
//    flash_decode_combine_kernel merges the splits through their lse.
// Index values are clamped into the tensors (clamp_sequence,
// cache_row_offset), so no value of cache_seqlens, leftpad, batch index or
// block id makes the kernel read outside k_cache / v_cache.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../kvcache.h"
#include "../mask.h"
#include "primitives.cuh"
#include "score_rule.cuh"
#include "softmax.cuh"
#include "hopper/sync.cuh"
#include "hopper/tma.cuh"

namespace flash {
namespace decode {

// ---- sm90 instructions of the kBulk load and of programmatic dependent
// launch. Compiled to nothing (or a trap, which the host never reaches: it
// picks kBulk only where sm_90a code runs) in every other pass. The same
// guard as hopper/sync.cuh's mbarrier wrappers (FLASH_SM90_ENABLED: the
// sm_90a pass), so that no pass has the bulk copies without their waits.
#ifdef FLASH_SM90_ENABLED
#define FLASH_DECODE_SM90 1
#endif

// An L2 policy that evicts these lines first (createpolicy, sm80+).
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// cp_async_16 (primitives.cuh) with an L2 cache policy and a 256-byte L2
// prefetch (the rest of the row's 256 bytes is requested by the neighbouring
// threads anyway).
__device__ __forceinline__ void cp_async_16_hint(uint32_t saddr, const void* gmem, bool pred, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(saddr),
               "l"(gmem), "r"(pred ? 16 : 0), "l"(policy));
}
// The mbarrier and proxy-fence wrappers are hopper/sync.cuh's (sm90::).
// `bytes` (a multiple of 16) from global to shared, completing on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                              uint64_t policy) {
#ifdef FLASH_DECODE_SM90
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
#else
  __trap();
#endif
}
// Programmatic dependent launch (the host sets the launch attribute where
// sm_90a code runs): wait for the grids this one depends on to complete
// and flush; let the next grid start launching. Both are no-ops in a grid
// launched without the attribute.
__device__ __forceinline__ void grid_dependency_wait() {
#ifdef FLASH_DECODE_SM90
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#ifdef FLASH_DECODE_SM90
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

enum class DecodeLoad : int { kCpAsync = 0, kBulk = 1, kTma = 2 };

// The K and V tensor maps of the kTma load (encoded per call by the
// launcher; zero and unused for the other loads).
struct DecodeMaps {
  CUtensorMap k, v;
};

// Rows of one TMA box of a paged cache: the largest power of two that
// divides both the page and the tile (boxes never straddle a page, and a
// tile is a whole number of boxes). kTma takes pages of a multiple of 8
// rows, so that every box lands on a 1024-byte boundary of its panel.
FLASH_HOST_DEVICE constexpr int tma_box_rows(int page_size, int block_n) {
  int rows = block_n;
  while (rows > 1 && page_size % rows != 0) rows /= 2;
  return rows;
}

// The L2 evict-first variant of sm90::tma_load_4d (hopper/tma.cuh).
__device__ __forceinline__ void tma_load_4d_hint(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                                 int c2, int c3, uint64_t policy) {
#ifdef FLASH_DECODE_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%3, "
      "%4, %5, %6}], [%2], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "l"(policy)
      : "memory");
#else
  __trap();
#endif
}

// kStages: tiles in the pipeline (kStages - 1 in flight while one is
// computed). kQInRegs: Q's A fragments stay in registers for the whole key
// loop (head dims up to 128); above, they are re-read from shared memory
// each tile, which leaves registers for the 256-wide O accumulator. kLoad,
// kEvictFirst: how tiles are copied (top of this file).
template <typename Element_, int kHeadDim_, int kNWarps_, int kStages_, DecodeLoad kLoad_ = DecodeLoad::kCpAsync,
          bool kEvictFirst_ = false>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kStages = kStages_;
  static constexpr DecodeLoad kLoad = kLoad_;
  static constexpr bool kBulk = kLoad_ == DecodeLoad::kBulk;
  static constexpr bool kTma = kLoad_ == DecodeLoad::kTma;
  static constexpr bool kBarriers = kBulk || kTma;  // tiles complete on mbarriers (else cp.async groups)
  static constexpr bool kEvictFirst = kEvictFirst_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kRows = 16;                 // one m-tile of (query, head) rows
  static constexpr int kBlockN = kNWarps * 16;     // keys per tile, 16 per warp
  static constexpr int kChunks = kHeadDim / 8;     // 16-byte chunks per row
  static constexpr int kKT = kHeadDim / 16;        // k-steps of S = Q K^T
  static constexpr int kDT = kHeadDim / 8;         // n-tiles of O
  static constexpr bool kQInRegs = kHeadDim <= 128;
  // Rows padded by 16 bytes: every 8-row ldmatrix phase is bank-conflict
  // free (Q always; K and V for cp.async and bulk). kTma: K and V tiles are
  // kHeadDim / 64 SW128 panels of kBlockN rows x 128 bytes, which the
  // swizzle makes conflict free.
  static constexpr int kPitchBytes = (kHeadDim + 8) * 2;
  static constexpr int kQBytes = kRows * kPitchBytes;
  static constexpr int kPanels = kHeadDim / 64;
  static constexpr int kPanelBytes = kBlockN * 128;
  // cp.async: int64 K and V row offsets per slot; bulk, tma: one mbarrier per stage.
  static constexpr int kOffsetBytes = kBarriers ? (kStages * 8 + 15) / 16 * 16 : kStages * kBlockN * 2 * 8;
  static constexpr int kTileBytes = kTma ? kPanels * kPanelBytes : kBlockN * kPitchBytes;
  // kTma: the pipeline starts on a 1024-byte boundary (the swizzle's atom),
  // which the dynamic shared memory's base does not promise.
  static constexpr int kAlignSlack = kTma ? 1024 : 0;
  static constexpr int kStageBytes = 2 * kTileBytes;  // K then V
  static constexpr int kPipeBytes = kStages * kStageBytes;
  // The warps' partial O (fp32) and row statistics, over the pipeline's
  // buffers once the key loop is done.
  static constexpr int kMergePitch = kHeadDim + 4;  // floats
  static constexpr int kMergeBytes = kNWarps * kRows * (kMergePitch + 2) * 4;
  static constexpr int kSmemBytes =
      kQBytes + kOffsetBytes + kAlignSlack + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes);
  static constexpr int kLoadIters = kBlockN * kChunks / kNThreads;  // 16-byte copies per thread per tile and tensor

  static_assert(sizeof(Element) == 2, "fp16 / bf16 only");
  static_assert(kHeadDim % 16 == 0 && kDT % 2 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockN * kChunks % kNThreads == 0, "whole copies per thread");
  static_assert(kNThreads >= kBlockN, "one thread per row works out the row offsets");
  static_assert(!kBulk || kNThreads == 2 * kBlockN, "bulk: one thread per K row and one per V row");
  static_assert(!kTma || (kHeadDim % 64 == 0 && kBlockN <= 256 && kBlockN / 8 <= 32),
                "tma: whole 64-column panels; one lane of warp 0 per box of at least 8 rows");
};

// The work of one thread block, from its flat index (split fastest).
struct DecodeBlock {
  int split, chunk, hk, b;
};
__device__ __forceinline__ DecodeBlock block_of(int index, int num_splits, int num_chunks, int nheads_k) {
  DecodeBlock w;
  w.split = index % num_splits;
  index /= num_splits;
  w.chunk = index % num_chunks;
  index /= num_chunks;
  w.hk = index % nheads_k;
  w.b = index / nheads_k;
  return w;
}

template <typename Traits, bool kMods>
__global__ void __launch_bounds__(Traits::kNThreads)
    flash_decode_kernel(const __grid_constant__ FlashKvcacheParams p, int num_chunks,
                        const __grid_constant__ DecodeMaps maps) {
  using Element = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  constexpr int kChunks = Traits::kChunks, kKT = Traits::kKT, kDT = Traits::kDT;
  constexpr int kPitchBytes = Traits::kPitchBytes, kNThreads = Traits::kNThreads;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ uint4 smem_buf[];
  char* const smem = reinterpret_cast<char*>(smem_buf);
  const uint32_t sQ = smem_u32(smem);
  int64_t* const s_off = reinterpret_cast<int64_t*>(smem + Traits::kQBytes);  // cp.async: [kStages][kBlockN][K, V]
  const uint32_t sBar = smem_u32(smem + Traits::kQBytes);                     // bulk, tma: [kStages] mbarriers
  char* const pipe_unaligned = smem + Traits::kQBytes + Traits::kOffsetBytes;
  char* const pipe = pipe_unaligned + (Traits::kTma ? (1024 - smem_u32(pipe_unaligned) % 1024) % 1024 : 0);
  const uint32_t sPipe = smem_u32(pipe);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const DecodeBlock w = block_of(blockIdx.x, p.num_splits, num_chunks, p.nheads_k);
  const int group = p.nheads / p.nheads_k;
  const int total_rows = p.seqlen_q * group;
  const int row0 = w.chunk * kRows;
  const int row_last = min(row0 + kRows, total_rows) - 1;

  // Launched as a dependent grid (programmatic dependent launch), this block
  // may start before the previous kernel on the stream has finished: wait
  // for it before reading anything, and let the combine kernel launch.
  grid_dependency_wait();
  launch_dependents();

  // Q: the chunk's rows (zero past the last row), padded to kHeadDim by the
  // host. Its own cp.async group, committed first (before the sequence's
  // lengths arrive).
  for (int idx = tid; idx < kRows * kChunks; idx += kNThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = row0 + r;
    const bool ok = row < total_rows;
    const int i = ok ? row / group : 0, h = ok ? w.hk * group + row % group : 0;
    const Element* src = static_cast<const Element*>(p.q) + w.b * p.q_batch_stride + i * p.q_row_stride +
                         h * p.q_head_stride + c * 8;
    cp_async_16(sQ + r * kPitchBytes + c * 16, src, ok);
  }
  cp_async_commit();

  // This sequence's keys, and the ones the chunk's rows can see:
  // [n_lo, n_hi) (key_begin and key_end grow with the query index).
  const KvSequence seq = clamp_sequence(p, w.b);
  const MaskGeometry geo(p, sequence_info(p, seq));
  const int n_lo = geo.key_begin(row0 / group);
  const int n_hi = geo.key_end(row_last / group);
  const int t_lo = n_lo / kBlockN;
  const int n_tiles = n_hi > n_lo ? (n_hi + kBlockN - 1) / kBlockN - t_lo : 0;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int tile_begin = t_lo + w.split * per_split;
  const int my_tiles = max(min(per_split, t_lo + n_tiles - tile_begin), 0);

  const Element* const k_base = static_cast<const Element*>(p.k) + w.hk * p.k_head_stride;
  const Element* const v_base = static_cast<const Element*>(p.v) + w.hk * p.v_head_stride;
  uint64_t policy = 0;
  if constexpr (Traits::kEvictFirst) policy = l2_evict_first();

  // The key row of a tile this thread works out: cp.async, row tid for
  // threads below kBlockN (all threads then copy from the offsets in shared
  // memory); bulk, row tid % kBlockN, of K below kBlockN and of V above.
  const int my_row = Traits::kBulk ? tid % kBlockN : tid;
  const bool row_owner = Traits::kBulk || tid < kBlockN;
  auto key_of = [&](int lt) { return (tile_begin + lt) * kBlockN + my_row; };
  // The block-table entry of the row is fetched first (fetch_block) and
  // used later, so that a fetch can be in flight during compute.
  auto fetch_block = [&](int lt) -> int {
    const int j = key_of(lt);
    if (p.block_table == nullptr || !row_owner || lt >= my_tiles || j < n_lo || j >= n_hi) return 0;
    const int pos = seq.leftpad + j;
    return p.block_table[w.b * p.block_table_batch_stride + pos / p.page_size];
  };
  // Cache (block) index and row within it of key j (n_lo <= j < n_hi).
  auto locate = [&](int j, int block, int64_t& blk, int64_t& row) {
    const int pos = seq.leftpad + j;
    blk = seq.cache_row;
    row = pos;
    if (p.block_table != nullptr) {
      blk = clamp_int(block, 0, p.cache_rows - 1);
      row = pos % p.page_size;
    }
  };
  // cp.async: row offsets of tile `lt` (local index) into shared memory.
  auto store_offsets = [&](int lt, int block) {
    if (!row_owner || lt >= my_tiles) return;
    const int j = key_of(lt);
    int64_t ko = -1, vo = -1;
    if (j >= n_lo && j < n_hi) {
      int64_t blk, row;
      locate(j, block, blk, row);
      ko = blk * p.k_batch_stride + row * p.k_row_stride;
      vo = blk * p.v_batch_stride + row * p.v_row_stride;
    }
    int64_t* slot = s_off + ((lt % kStages) * kBlockN + tid) * 2;
    slot[0] = ko;
    slot[1] = vo;
  };
  // cp.async: issues the copies of tile lt (if it exists) and commits a
  // group either way, so that the wait counts stay uniform.
  auto issue = [&](int lt) {
    if (lt < my_tiles) {
      const int stage = lt % kStages;
      const int64_t* off = s_off + stage * kBlockN * 2;
      const uint32_t sK = sPipe + stage * Traits::kStageBytes, sV = sK + Traits::kTileBytes;
#pragma unroll
      for (int i = 0; i < Traits::kLoadIters; ++i) {
        const int idx = tid + i * kNThreads;
        const int r = idx / kChunks, c = idx % kChunks;
        const int64_t ko = off[2 * r], vo = off[2 * r + 1];
        const bool ok = ko >= 0 && c * 8 < p.headdim;
        if constexpr (Traits::kEvictFirst) {
          cp_async_16_hint(sK + r * kPitchBytes + c * 16, ok ? k_base + ko + c * 8 : k_base, ok, policy);
          cp_async_16_hint(sV + r * kPitchBytes + c * 16, ok ? v_base + vo + c * 8 : v_base, ok, policy);
        } else {
          cp_async_16(sK + r * kPitchBytes + c * 16, ok ? k_base + ko + c * 8 : k_base, ok);
          cp_async_16(sV + r * kPitchBytes + c * 16, ok ? v_base + vo + c * 8 : v_base, ok);
        }
      }
    }
    cp_async_commit();
  };
  // bulk: this thread's row of tile lt (if the tile exists), as one copy of
  // headdim * 2 bytes onto the stage's mbarrier, or zeros for a key outside
  // the sequence; every row owner arrives once per tile.
  auto issue_bulk = [&](int lt, int block) {
    if (lt >= my_tiles) return;
    const int stage = lt % kStages;
    const uint32_t bar = sBar + stage * 8;
    const bool is_v = tid >= kBlockN;
    const int dst_off = stage * Traits::kStageBytes + (is_v ? Traits::kTileBytes : 0) + my_row * kPitchBytes;
    const int j = key_of(lt);
    if (j >= n_lo && j < n_hi) {
      int64_t blk, row;
      locate(j, block, blk, row);
      const Element* src = is_v ? v_base + blk * p.v_batch_stride + row * p.v_row_stride
                                : k_base + blk * p.k_batch_stride + row * p.k_row_stride;
      const uint32_t bytes = static_cast<uint32_t>(p.headdim) * 2;
      sm90::fence_proxy_async();  // after this thread's earlier zeroing of the row
      sm90::mbar_arrive_expect_tx(bar, bytes);
      bulk_copy_g2s(sPipe + dst_off, src, bytes, bar, policy);
    } else {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) *reinterpret_cast<uint4*>(pipe + dst_off + c * 16) = make_uint4(0, 0, 0, 0);
      sm90::mbar_arrive(bar);
    }
  };

  // tma: warp 0 issues tile lt's boxes onto the stage's mbarrier (lane 0
  // arrives once with the bytes of every box issued). Contiguous: lane 0,
  // one box of kBlockN rows per panel and tensor, at the sequence's cache
  // row (rows past the cache's end are zero-filled by the TMA unit). Paged:
  // lane i the tile's i-th box of box_rows rows, if it holds a key in
  // [n_lo, n_hi), from the block `block` (its block-table entry, fetched
  // ahead by fetch_box_block).
  const int box_rows = Traits::kTma && p.block_table != nullptr ? tma_box_rows(p.page_size, kBlockN) : kBlockN;
  auto box_key = [&](int lt) { return (tile_begin + lt) * kBlockN + lane * box_rows; };
  auto box_wanted = [&](int lt) {
    const int j = box_key(lt);
    return lt < my_tiles && lane * box_rows < kBlockN && j < n_hi && j + box_rows > n_lo;
  };
  auto fetch_box_block = [&](int lt) -> int {
    if (!Traits::kTma || p.block_table == nullptr || warp != 0 || !box_wanted(lt)) return 0;
    return p.block_table[w.b * p.block_table_batch_stride + box_key(lt) / p.page_size];
  };
  auto load_box = [&](uint32_t dst, const CUtensorMap* map, uint32_t bar, int col, int row, int block) {
    if constexpr (Traits::kEvictFirst) {
      tma_load_4d_hint(dst, map, bar, col, row, w.hk, block, policy);
    } else {
      sm90::tma_load_4d(dst, map, bar, col, row, w.hk, block);
    }
  };
  auto issue_tma = [&](int lt, int block) {
    if (warp != 0 || lt >= my_tiles) return;
    const int stage = lt % kStages;
    const uint32_t bar = sBar + stage * 8;
    const uint32_t sK = sPipe + stage * Traits::kStageBytes, sV = sK + Traits::kTileBytes;
    if (p.block_table == nullptr) {
      if (lane == 0) {
        const int row = seq.leftpad + (tile_begin + lt) * kBlockN;
        sm90::mbar_arrive_expect_tx(bar, Traits::kStageBytes);
#pragma unroll
        for (int pn = 0; pn < Traits::kPanels; ++pn) {
          load_box(sK + pn * Traits::kPanelBytes, &maps.k, bar, pn * 64, row, seq.cache_row);
          load_box(sV + pn * Traits::kPanelBytes, &maps.v, bar, pn * 64, row, seq.cache_row);
        }
      }
      return;
    }
    const bool wanted = box_wanted(lt);
    const uint32_t boxes = __popc(__ballot_sync(0xffffffffu, wanted));
    if (lane == 0) sm90::mbar_arrive_expect_tx(bar, boxes * box_rows * 128 * Traits::kPanels * 2);
    if (wanted) {
      const int blk = clamp_int(block, 0, p.cache_rows - 1);
      const int row = box_key(lt) % p.page_size;
      const uint32_t off = lane * box_rows * 128;
#pragma unroll
      for (int pn = 0; pn < Traits::kPanels; ++pn) {
        load_box(sK + pn * Traits::kPanelBytes + off, &maps.k, bar, pn * 64, row, blk);
        load_box(sV + pn * Traits::kPanelBytes + off, &maps.v, bar, pn * 64, row, blk);
      }
    }
  };

  int pending_block = 0;  // bulk, tma: the block-table entry of this thread's row (box) of the next tile to issue
  if constexpr (Traits::kTma) {
    if (tid == 0) {
      for (int st = 0; st < kStages; ++st) sm90::mbar_init(sBar + st * 8, 1);
      sm90::fence_mbar_init();
      sm90::tma_prefetch_map(&maps.k);
      sm90::tma_prefetch_map(&maps.v);
    }
    __syncthreads();
    for (int lt = 0; lt < kStages - 1; ++lt) issue_tma(lt, fetch_box_block(lt));
    pending_block = fetch_box_block(kStages - 1);
  } else if constexpr (Traits::kBulk) {
    if (tid == 0) {
      for (int st = 0; st < kStages; ++st) sm90::mbar_init(sBar + st * 8, kNThreads);
      sm90::fence_mbar_init();
    }
    if (p.headdim < kHeadDim) {
      // Bulk copies write headdim columns: the padding columns (which meet
      // Q's zero padding) are zeroed once here.
      for (int idx = tid; idx < Traits::kPipeBytes / 16; idx += kNThreads)
        reinterpret_cast<uint4*>(pipe)[idx] = make_uint4(0, 0, 0, 0);
      sm90::fence_proxy_async();
    }
    __syncthreads();
    for (int lt = 0; lt < kStages - 1; ++lt) issue_bulk(lt, fetch_block(lt));
    pending_block = fetch_block(kStages - 1);
  } else {
    for (int lt = 0; lt < kStages; ++lt) store_offsets(lt, fetch_block(lt));
    __syncthreads();
    for (int lt = 0; lt < kStages - 1; ++lt) issue(lt);
  }

  // Per-lane ldmatrix byte offsets (fragment layouts: softmax.cuh): A (Q)
  // row lane % 16, column half lane / 16; B (K) key lane % 8 + 8 (lane / 16),
  // column half (lane / 8) % 2; B (V, transposed) key lane % 16, column half
  // lane / 16. Each warp reads its own 16 keys of a tile.
  // kTma reads the same fragments from SW128 panels: element column c of
  // row r at panel c / 64, byte r * 128 + ((c / 8 % 8) ^ (r % 8)) * 16; the
  // lane's rows have r % 8 == lane % 8, so the swizzle is an XOR of the
  // column-chunk constant with a per-lane value (k_swz, v_swz).
  const uint32_t sQ_lane = sQ + (lane & 15) * kPitchBytes + (lane >> 4) * 16;
  const int k_row = warp * 16 + (lane & 7) + ((lane >> 4) << 3), v_row = warp * 16 + (lane & 15);
  const uint32_t k_lane = Traits::kTma ? k_row * 128 : k_row * kPitchBytes + ((lane >> 3) & 1) * 16;
  const uint32_t v_lane =
      Traits::kTileBytes + (Traits::kTma ? v_row * 128 : v_row * kPitchBytes + (lane >> 4) * 16);
  const uint32_t k_swz = ((lane >> 3) & 1) ^ (lane & 7), v_swz = (lane >> 4) ^ (lane & 7);
  // Byte offsets in a stage of the K fragment of k-step kk and the V^T
  // fragment of column pair dj (even).
  auto k_frag = [&](int kk) -> uint32_t {
    if constexpr (Traits::kTma) return k_lane + (kk / 4) * Traits::kPanelBytes + (((2 * kk) % 8 ^ k_swz) << 4);
    return k_lane + kk * 32;
  };
  auto v_frag = [&](int dj) -> uint32_t {
    if constexpr (Traits::kTma) return v_lane + (dj / 8) * Traits::kPanelBytes + ((dj % 8 ^ v_swz) << 4);
    return v_lane + dj * 16;
  };

  // This lane's two rows (g, g + 8): their query index, head and score rule.
  int query[2], head[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = min(row0 + g + hr * 8, total_rows - 1);  // padding rows borrow the last real one
    query[hr] = row / group;
    head[hr] = w.hk * group + row % group;
  }
  using Rule = CudaScoreRule<Element, false, kMods ? kAllFeatures : kNoFeatures>;
  const Rule rule0(p, geo, w.b, head[0]), rule1(p, geo, w.b, head[1]);
  const KeyRange keys[2] = {geo.keys(query[0]), geo.keys(query[1])};
  const float exp_scale = rule0.exp_scale();

  float acc_o[1][kDT][4];
#pragma unroll
  for (int dj = 0; dj < kDT; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][dj][e] = 0.f;
  OnlineSoftmax<1> softmax;
  softmax.init();

  uint32_t q_frag[Traits::kQInRegs ? kKT : 1][4];
  if constexpr (Traits::kBarriers) {
    cp_async_wait<0>();  // Q's group, the only cp.async one
    __syncthreads();
  } else if constexpr (Traits::kQInRegs) {
    cp_async_wait<kStages - 1>();  // Q's group (the tiles' may still fly)
    __syncthreads();
  }
  if constexpr (Traits::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) ldsm_x4(q_frag[kk], sQ_lane + kk * 32);
  }

  for (int lt = 0; lt < my_tiles; ++lt) {
    int next_block = 0;
    if constexpr (Traits::kTma) {
      sm90::mbar_wait(sBar + (lt % kStages) * 8, (lt / kStages) & 1);
      // A tile that reaches outside [n_lo, n_hi) (a sequence's first or last)
      // holds there whatever the cache does, or stale rows of an earlier
      // tile: zero those V rows, so that P = 0 never meets a non-finite
      // value; the fence orders the stores before the TMA's next write.
      const int key0 = (tile_begin + lt) * kBlockN;
      if (key0 < n_lo || key0 + kBlockN > n_hi) {
        char* const v_tile = pipe + (lt % kStages) * Traits::kStageBytes + Traits::kTileBytes;
        for (int idx = tid; idx < Traits::kPanels * kBlockN * 8; idx += kNThreads) {
          const int r = (idx / 8) % kBlockN;
          if (key0 + r < n_lo || key0 + r >= n_hi) reinterpret_cast<uint4*>(v_tile)[idx] = make_uint4(0, 0, 0, 0);
        }
        sm90::fence_proxy_async();
      }
      __syncthreads();  // tile lt is complete; every warp is done with stage (lt - 1)
      issue_tma(lt + kStages - 1, pending_block);
      pending_block = fetch_box_block(lt + kStages);
    } else if constexpr (Traits::kBulk) {
      sm90::mbar_wait(sBar + (lt % kStages) * 8, (lt / kStages) & 1);
      __syncthreads();  // tile lt has landed; every warp is done with stage (lt - 1)
      issue_bulk(lt + kStages - 1, pending_block);
      pending_block = fetch_block(lt + kStages);
    } else {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // tile lt has landed for every thread; stage (lt - 1) is free
      issue(lt + kStages - 1);
      next_block = fetch_block(lt + kStages);
    }

    const uint32_t stage = sPipe + (lt % kStages) * Traits::kStageBytes;
    float s[1][2][4];
#pragma unroll
    for (int nj = 0; nj < 2; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nj][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      uint32_t bk[4];
      ldsm_x4(bk, stage + k_frag(kk));
      const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
      if constexpr (Traits::kQInRegs) {
        mma_m16n8k16<Element>(s[0][0], q_frag[kk], b0);
        mma_m16n8k16<Element>(s[0][1], q_frag[kk], b1);
      } else {
        uint32_t a[4];
        ldsm_x4(a, sQ_lane + kk * 32);
        mma_m16n8k16<Element>(s[0][0], a, b0);
        mma_m16n8k16<Element>(s[0][1], a, b1);
      }
    }
    // The score rule, then the mask of each row (its own query's keys).
    const int col0 = (tile_begin + lt) * kBlockN + warp * 16;
#pragma unroll
    for (int nj = 0; nj < 2; ++nj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hr = e >> 1, col = col0 + nj * 8 + 2 * t + (e & 1);
        float x = hr == 0 ? rule0.prepared(s[0][nj][e], query[0], col, 0.f)
                          : rule1.prepared(s[0][nj][e], query[1], col, 0.f);
        s[0][nj][e] = keys[hr].contains(col) ? x : -INFINITY;
      }
    }
    softmax.template update<true>(s, acc_o, exp_scale);
    uint32_t pa[1][1][4];
    accum_to_a_frags<Element>(s, pa);
#pragma unroll
    for (int dj = 0; dj < kDT; dj += 2) {
      uint32_t bv[4];
      ldsm_x4_t(bv, stage + v_frag(dj));
      const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
      mma_m16n8k16<Element>(acc_o[0][dj], pa[0][0], b0);
      mma_m16n8k16<Element>(acc_o[0][dj + 1], pa[0][0], b1);
    }
    if constexpr (!Traits::kBarriers) store_offsets(lt + kStages, next_block);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline's buffers

  // The warps' partials into shared memory: O (unnormalised), row max
  // (log2 units) and row sum.
  float* const m_o = reinterpret_cast<float*>(pipe);
  float* const m_stats = m_o + Traits::kNWarps * kRows * Traits::kMergePitch;  // [warp][row][max, sum]
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + hr * 8;
    float* o_row = m_o + (warp * kRows + r) * Traits::kMergePitch;
#pragma unroll
    for (int dj = 0; dj < kDT; ++dj) {
      *reinterpret_cast<float2*>(o_row + dj * 8 + 2 * t) = make_float2(acc_o[0][dj][2 * hr], acc_o[0][dj][2 * hr + 1]);
    }
    const float sum = quad_sum(softmax.row_sum[0][hr]);
    if (t == 0) {
      m_stats[(warp * kRows + r) * 2] = softmax.row_max[0][hr];
      m_stats[(warp * kRows + r) * 2 + 1] = sum;
    }
  }
  __syncthreads();

  // Merge the warps and write: four columns per thread and step.
  const int rows_total = p.batch * p.nheads * p.seqlen_q;
  for (int idx = tid; idx < kRows * (kHeadDim / 4); idx += kNThreads) {
    const int r = idx / (kHeadDim / 4), c4 = idx % (kHeadDim / 4);
    const int row = row0 + r;
    if (row >= total_rows) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int wi = 0; wi < Traits::kNWarps; ++wi) mx = fmaxf(mx, m_stats[(wi * kRows + r) * 2]);
    float sum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mx != -INFINITY) {
#pragma unroll
      for (int wi = 0; wi < Traits::kNWarps; ++wi) {
        const float f = exp2_fast(m_stats[(wi * kRows + r) * 2] - mx);
        sum = fmaf(f, m_stats[(wi * kRows + r) * 2 + 1], sum);
        const float4 ow = *reinterpret_cast<const float4*>(m_o + (wi * kRows + r) * Traits::kMergePitch + c4 * 4);
        o.x = fmaf(f, ow.x, o.x), o.y = fmaf(f, ow.y, o.y), o.z = fmaf(f, ow.z, o.z), o.w = fmaf(f, ow.w, o.w);
      }
    }
    const bool empty = !(sum > 0.f);
    const float lse_log2 = empty ? -INFINITY : mx + __log2f(sum);
    const int i = row / group, h = w.hk * group + row % group;
    const int64_t flat = (static_cast<int64_t>(w.b) * p.nheads + h) * p.seqlen_q + i;
    if (p.num_splits == 1) {
      // Join the sink (a logit with no value): lse includes it and out
      // shrinks by exp(lse_keys - lse).
      const float sink = sink_log2(p, h);
      float total = lse_log2;
      if (sink != -INFINITY) {
        const float m2 = fmaxf(lse_log2, sink);
        total = m2 + __log2f(exp2_fast(lse_log2 - m2) + exp2_fast(sink - m2));
      }
      const float scale = empty ? 0.f : exp2_fast(lse_log2 - total) / sum;
      Element* out = static_cast<Element*>(p.out) + w.b * p.o_batch_stride + i * p.o_row_stride +
                     h * p.o_head_stride + c4 * 4;
      const uint32_t lo = pack2<Element>(o.x * scale, o.y * scale), hi = pack2<Element>(o.z * scale, o.w * scale);
      *reinterpret_cast<uint2*>(out) = make_uint2(lo, hi);
      if (c4 == 0) p.softmax_lse[flat] = total == -INFINITY ? INFINITY : total * float(M_LN2);
    } else {
      const float inv = empty ? 0.f : 1.f / sum;
      float* acc = p.out_accum + (static_cast<int64_t>(w.split) * rows_total + flat) * kHeadDim + c4 * 4;
      *reinterpret_cast<float4*>(acc) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      if (c4 == 0) p.lse_accum[static_cast<int64_t>(w.split) * rows_total + flat] = lse_log2;
    }
  }
}

// Merges the splits' partials: one block of kCombineThreads per output row
// (b, h, i). The row's lse (log2) over the splits and the sink, then out =
// sum over splits of exp2(lse_split - lse) * partial; rows with neither keys
// nor sink get out 0, lse +inf. The warps take the splits in turn (warp w
// splits w, w + 4, ...; lane c the 16-byte columns c, c + 32, ...), eight
// loads in flight per lane, and meet in shared memory: a row's partials are
// read in a few memory latencies, however many splits there are. The sum's
// order is fixed by the split count alone (deterministic).
constexpr int kCombineWarps = 4;
constexpr int kCombineThreads = kCombineWarps * 32;

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kCombineThreads, 8)
    flash_decode_combine_kernel(const __grid_constant__ FlashKvcacheParams p) {
  constexpr int kCols = kHeadDim / 4;           // float4 columns of a row
  constexpr int kPerLane = (kCols + 31) / 32;   // of them per lane
  __shared__ float4 s_part[kCombineWarps - 1][kPerLane][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rows_total = p.batch * p.nheads * p.seqlen_q;
  const int flat = blockIdx.x;  // rows_total < 2**31 (the host checks)
  const int i = flat % p.seqlen_q;
  const int bh = flat / p.seqlen_q;
  const int h = bh % p.nheads, b = bh / p.nheads;
  const int ns = p.num_splits;
  grid_dependency_wait();  // the decode kernel's partials (programmatic dependent launch)

  // Every warp works out the row's lse itself (one load per lane and split
  // group, then shuffles).
  const float* lse_part = p.lse_accum + flat;
  const float sink = sink_log2(p, h);
  float mx = sink;
  for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, lse_part[static_cast<int64_t>(s) * rows_total]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float total = -INFINITY;
  if (mx != -INFINITY) {
    float sum = lane == 0 ? exp2_fast(sink - mx) : 0.f;
    for (int s = lane; s < ns; s += 32) sum += exp2_fast(lse_part[static_cast<int64_t>(s) * rows_total] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    total = mx + __log2f(sum);
  }

  float4 o[kPerLane];
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) o[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (total != -INFINITY) {
    for (int s0 = 0; s0 < ns; s0 += 32) {
      // Lane l holds the weight of split s0 + l; this warp takes every
      // kCombineWarps-th of the group's splits.
      const int sl = s0 + lane;
      const float wl = sl < ns ? exp2_fast(lse_part[static_cast<int64_t>(sl) * rows_total] - total) : 0.f;
      const int n = min(32, ns - s0);
#pragma unroll 8
      for (int j = warp; j < n; j += kCombineWarps) {
        const float f = __shfl_sync(0xffffffffu, wl, j);
        const float* src = p.out_accum + (static_cast<int64_t>(s0 + j) * rows_total + flat) * kHeadDim;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int col = lane + 32 * c;
          if (col < kCols) {
            const float4 v = *reinterpret_cast<const float4*>(src + col * 4);
            o[c].x = fmaf(f, v.x, o[c].x), o[c].y = fmaf(f, v.y, o[c].y);
            o[c].z = fmaf(f, v.z, o[c].z), o[c].w = fmaf(f, v.w, o[c].w);
          }
        }
      }
    }
  }
  if (warp > 0) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) s_part[warp - 1][c][lane] = o[c];
  }
  __syncthreads();
  if (warp > 0) return;
  Element* out = static_cast<Element*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int col = lane + 32 * c;
    if (col >= kCols) continue;
#pragma unroll
    for (int wi = 0; wi < kCombineWarps - 1; ++wi) {
      const float4 v = s_part[wi][c][lane];
      o[c].x += v.x, o[c].y += v.y, o[c].z += v.z, o[c].w += v.w;
    }
    *reinterpret_cast<uint2*>(out + col * 4) =
        make_uint2(pack2<Element>(o[c].x, o[c].y), pack2<Element>(o[c].z, o[c].w));
  }
  if (lane == 0) p.softmax_lse[flat] = total == -INFINITY ? INFINITY : total * float(M_LN2);
}

}  // namespace decode
}  // namespace flash
