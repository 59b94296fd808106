// The list of a variable-length call's blocks that hold rows
// (flash_params.h, tile_list), built on the device by one block before the
// attention kernel runs, so that the kernel's grid walks real blocks only
// (in a batch of mixed lengths most blocks of the largest sequence's grid
// lie past a shorter sequence's end) and, causal, takes the heaviest first.
// Arch-neutral: the Hopper forward lists its query blocks (the persistent
// grid's counter walks the list), the Hopper backward its key blocks (its
// grid has one block per entry of the list's room, the blocks past the count
// return at once).
//
// The order: the longest sequences first, by levels -- the sequences whose
// block count has its highest set bit at the level, from the top level
// down -- so that the grid ends on the short sequences' light blocks. In
// sequence order, a long causal sequence near the end of the batch left its
// heaviest blocks among the grid's last while the rest of the grid ran out
// of work. Within a level, by sequence, and then:
//  * query side (kQueryBlocks, the forward): by head, each head's last
//    (causal: heaviest) query block first, so that the tiles running at once
//    share a few (batch, head)s' K and V in L2 -- the forward reads all of a
//    head's keys for each query block, about 130 FLOP a byte from memory
//    without that sharing, under what the tensor cores need;
//  * key side (kKeyBlocks, the backward): by head, each head's first
//    (causal: heaviest, it meets every query) key block first, likewise for
//    the heads' Q and dO (every head's first key block before any head's
//    second measured 0.98-0.99x: perf-notes step 10).
//
// One block of kTileListThreads threads takes the sequences a chunk at a
// time: their block counts are scanned in shared memory, then all the
// threads write the chunk's entries together (a 128k-token sequence has 1024
// blocks a head, too many for one thread to write while the attention
// waits).
#pragma once

#include <cstdint>

#include "../flash_params.h"
#include "../seq_info.h"

namespace flash {

enum class TileListSide { kQueryBlocks, kKeyBlocks };

constexpr int kTileListThreads = 1024;

// Fills p.tile_list for blocks of kBlock rows of the given side: entry 0 the
// number of blocks that hold rows, then their tile indices, clamped to the
// list's room (p.tile_list_capacity). Tile indices enumerate (batch, head,
// block) of the largest sequence, the block fastest: the forward's Tile
// numbers its query blocks last first (index x is query block
// num_blocks - 1 - x), the backward's BwdBlock its key blocks in order.
template <int kBlock, TileListSide kSide>
__global__ void __launch_bounds__(kTileListThreads) varlen_tile_list_kernel(const FlashFwdParams p) {
  constexpr bool kQuery = kSide == TileListSide::kQueryBlocks;
  __shared__ int first[kTileListThreads + 1];  // the chunk's sequences' first block (of one head)
  __shared__ int warp_sums[kTileListThreads / 32];
  static_assert(kTileListThreads / 32 == 32, "one warp scans the warps' sums");
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int max_rows = kQuery ? p.seqlen_q : p.seqlen_k;
  const int num_blocks = (max_rows + kBlock - 1) / kBlock;
  const int64_t heads = p.nheads;
  auto blocks_of = [&](int b) {
    const SeqInfo seq(p, b);
    return min(((kQuery ? seq.seqlen_q : seq.seqlen_k) + kBlock - 1) / kBlock, num_blocks);
  };
  // The top level: the highest set bit of the largest block count.
  int most = 0;
  for (int b = tid; b < p.batch; b += kTileListThreads) most = max(most, blocks_of(b));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) most = max(most, __shfl_xor_sync(0xFFFFFFFFu, most, o));
  if (lane == 0) warp_sums[warp] = most;
  __syncthreads();
  most = warp_sums[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) most = max(most, __shfl_xor_sync(0xFFFFFFFFu, most, o));
  __syncthreads();  // every thread has its maximum before warp_sums is reused
  const int top = most > 0 ? 31 - __clz(most) : -1;
  int64_t done = 0;  // blocks (of one head) listed so far
  for (int level = top; level >= 0; --level) {
    for (int chunk = 0; chunk < p.batch; chunk += kTileListThreads) {
      const int b = chunk + tid;
      int blocks = b < p.batch ? blocks_of(b) : 0;
      if (blocks == 0 || 31 - __clz(blocks) != level) blocks = 0;  // another level's
      int sum = blocks;  // inclusive scan: the warp's, then the warps'
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, sum, o);
        if (lane >= o) sum += y;
      }
      if (lane == 31) warp_sums[warp] = sum;
      __syncthreads();
      if (warp == 0) {
        int w = warp_sums[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xFFFFFFFFu, w, o);
          if (lane >= o) w += y;
        }
        warp_sums[lane] = w;
      }
      __syncthreads();
      first[tid + 1] = sum + (warp > 0 ? warp_sums[warp - 1] : 0);
      if (tid == 0) first[0] = 0;
      __syncthreads();
      const int count = min(kTileListThreads, p.batch - chunk);
      const int64_t entries = int64_t(first[count]) * heads;
      for (int64_t e = tid; e < entries; e += kTileListThreads) {
        // The chunk's sequence s holding entry e: the last with first[s] *
        // heads <= e (among sequences that share a first block, the one with
        // blocks at this level).
        int lo = 0, hi = count - 1;
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (int64_t(first[mid]) * heads <= e) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        const int s = lo, own = first[s + 1] - first[s];
        const int64_t local = e - int64_t(first[s]) * heads;
        // i = 0: the sequence's heaviest block (query side: its last).
        const int64_t h = local / own, i = local % own;
        const int64_t block = kQuery ? num_blocks - own + i : i;
        const int64_t index = done * heads + e;
        if (index < p.tile_list_capacity) {
          p.tile_list[1 + index] = static_cast<int>((int64_t(chunk + s) * heads + h) * num_blocks + block);
        }
      }
      done += first[count];
      __syncthreads();  // every thread has read `first` before the next chunk writes it
    }
  }
  if (tid == 0) {
    const int64_t listed = done * heads;
    p.tile_list[0] = static_cast<int>(listed < p.tile_list_capacity ? listed : p.tile_list_capacity);
  }
}

// The tile at place v of a dense causal grid whose (batch, head)s go in
// groups of `group` (the last group may be smaller), each group's tiles
// block-major: every head's block 0 (its heaviest, in both kernels'
// numbering) before any head's block 1. Tile indices as above (head * blocks
// + block). A group is about a wave of the grid wide (the launchers), so
// the tiles running at once still share a few heads' operands in L2 (a
// block-major order over all heads did not: perf-notes step 10), while the
// last group's heaviest tiles start a group's work, not one head's, before
// the end.
__device__ __forceinline__ int group_block_major(int v, int num_blocks, int heads, int group) {
  const int first = v / (group * num_blocks) * group;  // the group's first (batch, head)
  const int width = min(group, heads - first);
  const int r = v - first * num_blocks;
  return (first + r % width) * num_blocks + r / width;
}

}  // namespace flash
