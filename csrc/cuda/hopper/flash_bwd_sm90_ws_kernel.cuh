// FlashAttention backward on Hopper, warp-specialized (sm_90a): the
// arithmetic of flash_bwd_sm90_kernel.cuh (one thread block per key block of
// 128 keys, 64 at head dim 256, S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T are the
// register A operands of dV += P^T dO and dK += dS^T Q, the score rule's
// elementwise step through probs_t / dscores_t), with the data movement
// taken off the warps that compute, as the warp-specialized forward does:
//
//   warpgroup 0, the producer: setmaxnreg.dec; its first warp loads K and V
//     once and then walks the 64-query blocks i that can see this key
//     block, filling a ring of kStages stages, each with Q_i and dO_i (TMA,
//     issued by lane 0) and the rows' LSE, D and bias residual (loaded and
//     stored by all 32 lanes, zero past the sequence, each lane arriving on
//     the stage's "full" mbarrier after its stores). It waits only for a
//     stage to be emptied by the consumers.
//   warpgroups 1 and 2, the consumers (setmaxnreg.inc), 64 keys each (at
//     head dim 256 128 head-dim columns each: kSplitDims, below). Per
//     query block: S^T and dP^T on the tensor cores; P^T from S^T (dP^T
//     still running); dV += P^T dO issued at once, so that it runs under the
//     computation of dS^T; dS^T to shared memory; dQ_i = dS_i K_j, then
//     dK += dS^T Q, so that dQ's store (below) runs under dK; the stage
//     released once dV and dK complete. No block-wide
//     barrier: the consumers meet once per query block, where dQ needs
//     both halves of dS^T (double-buffered, so that one can write the next
//     block's while the other still reads this one's). At head dim 128
//     each consumer computes half of dQ's columns; at 64 one consumer a
//     step computes all of them, the two taking turns
//     (WsBwdTraits::kDqAlternates).
//   dQ: each warp's rows of its consumer's dQ piece go from the
//     accumulators to shared memory (fp32, in TMA's 128-byte swizzle:
//     conflict-free 8-byte stores) and the warp's lane 0 adds them into the
//     fp32 dq_accum with a TMA reduction (cp.reduce.async.bulk.tensor ...
//     add), which the copy engine performs while the consumers go on. The
//     classic kernel's 16 vector atomics per thread per query block sat in
//     the consumers' instruction stream.
//
// Tried and dropped: leaving dQ_i's product running into step i + 1 and
// storing it under the next S^T / dP^T (ptxas serializes every wgmma when
// an accumulator is read across the loop's back edge, C7514); 128-query
// steps at head dim 64 (the classic kernel's: ptxas serialized every wgmma
// for want of registers, C7512, 0.87x the classic kernel).
//
// Variable-length calls (kVarlen: cu_seqlens, seqused_k) as in the
// warp-specialized forward: a varlen side is one tensor map over all its
// rows, and boxes start at the sequence's first row (SeqInfo). A box that
// runs past the sequence reads the next sequence's rows (or unused keys
// under seqused_k) where a dense call's box gets TMA's zero fill. The
// scores of those rows are masked, but every operand row meets zeros in
// some product (dV += P^T dO, dK += dS^T Q, dQ += dS K, dP^T = V dO^T), and
// 0 times a non-finite value is NaN: the rows are zeroed in shared memory
// before any wgmma reads them -- K and V's once per block by the consumers
// (zero_tile_tails), Q and dO's of the sequence's last, partial query block
// by the producer, which loads that block on a barrier of its own, zeroes
// the rows and only then arrives on the stage's "full" barrier (it is the
// last load of the block, so the producer has nothing else to run ahead
// with). dQ rows past the sequence are then exact zeros, and are also
// cleared before the TMA reduction (a non-finite value in this sequence's
// keys or values must not reach the next sequence's dQ), and a warp's box
// of rows all past it is not added; dK / dV rows past it are never stored.
// Dense calls compile none of this (kVarlen = false): their PTX is that of
// the kernel before it took variable-length calls.
//
// Head dims 64, 128 and 256, with or without dQ (the deterministic backward
// computes dQ in its own kernel). Head dim 256 (WsBwdTraits::kSplitDims)
// has 64-key blocks whose consumers split the head dim of dK / dV / dQ and
// the queries of S^T / dP^T, exchanging P^T and dS^T in shared memory; it
// stages dQ in two rounds of 64 columns, with one dO stage beside Q's two
// (all of it 226.6 KB of the 227). The classic kernel at head dim 256 was
// bound by L2 (76% of its throughput, the LSU queue the top stall: its dQ
// went to dq_accum as per-thread 8-byte atomics). The launcher
// (launch_bwd_ws.cuh) sends head dim 256's variable-length calls and
// tensors TMA cannot describe to the classic kernel.
#pragma once

#include <cuda.h>

#include "../../flash_params.h"
#include "../../mask.h"
#include "../flash_bwd_common.cuh"
#include "../score_rule.cuh"
#include "../tile_list.cuh"
#include "flash_bwd_sm90_kernel.cuh"  // probs_t, dscores_t, pack_p_operand, store_packed_sw128
#include "sync.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash {
namespace sm90 {

// The kernel's one parameter (a __grid_constant__, as in the forward): the
// call's params and the tensor maps of q, dout, k, v and dq_accum.
struct WsBwdParams {
  CUtensorMap tma_q, tma_do, tma_k, tma_v, tma_dq;
  FlashBwdParams bwd;
  // Dense causal calls: (batch, head)s in groups this wide, block-major
  // within a group (tile_list.cuh's group_block_major); 0: each in turn.
  int group_width = 0;
};

template <typename Element_, int kHeadDim_, int kStages_>
struct WsBwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kStages = kStages_;
  // 64 queries per step. At head dim 128 the dK / dV accumulators take 128
  // registers, which leaves no room for more; at 64, 128-query steps (the
  // classic kernel's) made ptxas serialize every wgmma of the loop for
  // want of registers (C7512), and ran at 0.87x the classic kernel.
  static constexpr int kBlockM = 64;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256,
                "the warp-specialized backward has head dims 64, 128 and 256");
  // Head dim 256 (kSplitDims): a 64-key row of dK and dV takes 256
  // registers, so the block has 64 keys and the consumers split the head
  // dim of dK / dV / dQ (128 columns each) and the queries of S^T / dP^T
  // (32 each), as the classic kernel does; both halves of P^T and dS^T meet
  // in shared memory, from where the dV / dK products read them (SS).
  static constexpr bool kSplitDims = kHeadDim == 256;
  static constexpr int kBlockN = kSplitDims ? 64 : 128;  // else 64 keys per consumer warpgroup
  static constexpr int kNThreads = 384;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 24 + 2 x 240 = 3 x 168 (see the forward's traits)
  // Per consumer: S^T / dP^T 64 keys x kSN queries, dK / dV 64 keys x the
  // head dim; dQ, summed over all 128 keys (so the consumers exchange
  // their halves of dS^T, a barrier of both, once per query block):
  //  * head dim 128: one head-dim half per consumer, every step;
  //  * head dim 64 (kDqAlternates): all 64 columns, by one consumer a step,
  //    consumer i % 2 at query block i. Halves of 32 columns would start
  //    mid-line in the 128-byte swizzle, which an MN-major wgmma operand
  //    cannot. (Before: each consumer summed dQ over its own 64 keys and
  //    the two never waited for each other, but every query row's dQ was
  //    staged and reduced into dq_accum twice per key block: twice the
  //    reduction traffic, the cost that step 7 of docs/perf-notes.md
  //    measured at head dim 128, 0.70-0.84x.)
  static constexpr int kSN = kSplitDims ? kBlockM / 2 : kBlockM;
  static constexpr int kDkvN = kSplitDims ? kHeadDim / 2 : kHeadDim;
  static constexpr bool kDqAlternates = kHeadDim == 64;
  static constexpr int kDqN = kDqAlternates ? kHeadDim : kHeadDim / 2;
  static constexpr int kDqBoxCols = 32;  // fp32 columns of one 128-byte swizzled TMA box
  // Columns of a consumer's dQ piece staged at a time: all of them, but at
  // head dim 256 (128 columns, 32 KB a consumer) half, in two rounds, for
  // want of shared memory.
  static constexpr int kDqSlabCols = kSplitDims ? kDqN / 2 : kDqN;
  // Stages of dO: as Q's, but one at head dim 256 (its stage is released
  // once dV is done, so the next dO loads under dK and the rest of the
  // step; two would need 32 KB more than a block has).
  static constexpr int kDoStages = kSplitDims ? 1 : kStages;
  static constexpr bool kDoOwnBarriers = kDoStages != kStages;  // else Q's full / empty barriers cover dO

  static constexpr int kTileN = kBlockN * kHeadDim * 2;  // K or V
  static constexpr int kTileM = kBlockM * kHeadDim * 2;  // one stage of Q or dO
  static constexpr int kTileDs = kBlockN * kBlockM * 2;  // one buffer of dS^T (and of P^T, kSplitDims)
  static constexpr int kDqPiece = 64 * kDqSlabCols * 4;  // one consumer's dQ staging slab, fp32
  static constexpr int kKOff = 0;
  static constexpr int kVOff = kKOff + kTileN;
  static constexpr int kQOff = kVOff + kTileN;
  static constexpr int kDoOff = kQOff + kStages * kTileM;
  static constexpr int kDsOff = kDoOff + kDoStages * kTileM;            // 2 buffers
  static constexpr int kPOff = kDsOff + 2 * kTileDs;                    // 2 buffers, kSplitDims only
  static constexpr int kDqOff = kPOff + (kSplitDims ? 2 * kTileDs : 0);  // 2 pieces
  static constexpr int kLseOff = kDqOff + 2 * kDqPiece;                 // kStages x kBlockM floats each
  static constexpr int kDeltaOff = kLseOff + kStages * kBlockM * 4;
  static constexpr int kResidualOff = kDeltaOff + kStages * kBlockM * 4;
  // mbarriers: K and V's, full and empty per stage, dO's full and empty
  // per dO stage (kDoOwnBarriers), then the partial query block's own
  // (kVarlen: the producer's load of it, before it zeroes the rows past
  // the sequence).
  static constexpr int kBarOff = kResidualOff + kStages * kBlockM * 4;
  static constexpr int kNumBars = 2 + 2 * kStages + (kDoOwnBarriers ? 2 * kDoStages : 0);
  static constexpr int kSmemBytes = kBarOff + 8 * kNumBars + 1024;  // + realignment to the swizzle atom
  // A stage is full after lane 0's arrive_expect_tx (Q and dO bytes) and
  // the 32 producer lanes' arrivals (the row statistics); empty after all
  // 256 consumer threads (each read some of the stage's statistics).
  static constexpr int kFullArrivals = 1 + 32, kEmptyArrivals = 256;
  // dO's own (kDoOwnBarriers): full after lane 0's arrive_expect_tx, empty
  // after all 256 consumer threads.
  static constexpr int kDoFullArrivals = 1;
  // Named barriers: the consumers' dS exchange (256 threads); then one per
  // consumer warp for its dQ slab (kSlabBarrier + warp, 32 threads); then
  // both consumers' zeroing of K / V rows past a sequence (kVarlen, 256
  // threads).
  static constexpr int kDsBarrier = 1, kSlabBarrier = 2, kTailBarrier = 10;
  static_assert(kTileM % 1024 == 0 && kTileDs % 1024 == 0 && kDqPiece % 1024 == 0, "1024-byte swizzle alignment");
};

// global += the box at `src` (shared memory), element-wise, by the TMA
// unit; completes in the issuing thread's bulk group.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2,
                                                  int c3) {
#ifdef FLASH_SM90_ENABLED
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}
__device__ __forceinline__ void bulk_commit() {
#ifdef FLASH_SM90_ENABLED
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Until the issuing thread's bulk groups have read their shared memory
// (kRead), or completed.
template <bool kRead>
__device__ __forceinline__ void bulk_wait_all() {
#ifdef FLASH_SM90_ENABLED
  if constexpr (kRead) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  } else {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
#endif
}

// One warp's 16 rows of kCols columns of a consumer's dQ piece (accumulator
// fragments of 16 x kDqN, rows g and g + 8; the columns from 8 kJ0 on) into
// its slab of kCols / 32 boxes of 64 rows x 32 fp32 columns in TMA's
// 128-byte swizzle: row r at r * 128 bytes, its
// 16-byte chunk c at c ^ (r % 8). The warp's rows 16 w .. 16 w + 15 start
// 2048 bytes into each box, on a swizzle atom, so the warp hands them to the
// TMA unit itself (boxes of 16 rows) and no other warp waits for it. The
// 8-byte stores of a warp fall on every bank exactly twice (two wavefronts,
// the minimum for 256 bytes). Column 8j + 2t lies in chunk 2 (j % 4) + t / 2
// of box j / 4, so a lane's address is its base (row, and (t / 2) ^ g in bits
// 4-6) XOR (j % 4) * 32, plus the box: one LOP3 a store (as
// store_packed_sw128).
template <int kCols, int kJ0, int kDqN>
__device__ __forceinline__ void store_dq_slab(uint32_t dst, const float (&acc)[kDqN / 8][4], int warp_in_wg,
                                              int lane) {
  static_assert(kJ0 % 4 == 0 && 8 * kJ0 + kCols <= kDqN, "whole boxes of the piece");
  const int g = lane / 4, t = lane % 4;
  const int r = 16 * warp_in_wg + g;  // r + 8 has the same r % 8
  const uint32_t base = dst + r * kLineBytes + ((((t / 2) ^ g)) << 4) + (t % 2) * 8;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
    const uint32_t addr = (base ^ ((j % 4) << 5)) + (j / 4) * 64 * kLineBytes;
    const float(&a)[4] = acc[kJ0 + j];
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a[0]), "f"(a[1]) : "memory");
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr + 8 * kLineBytes), "f"(a[2]), "f"(a[3]) : "memory");
  }
}

// Rows [valid, kRows) of two SW128 tiles of kRows rows and kPanels panels
// each, at tile0 and tile0 + tile_bytes, to zero: whole 128-byte rows, so
// the swizzle does not matter. kThreads threads (thread index `idx`, a
// multiple of 8 threads) share the work, 8 to a row. A rolled loop: the
// producer warp runs it with 24 registers (unrolled, ptxas precomputed the
// addresses and spilled 2.6 KB).
template <int kRows, int kPanels, int kThreads>
__device__ __forceinline__ void zero_rows_from(uint32_t tile0, uint32_t tile_bytes, int valid, int idx) {
  constexpr int kChunksPerRow = kLineBytes / 16, kRowStep = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0, "whole rows per round of the threads");
  uint32_t addr = tile0 + (valid + idx / kChunksPerRow) * kLineBytes + (idx % kChunksPerRow) * 16;
#pragma unroll 1
  for (int row = valid + idx / kChunksPerRow; row < kRows; row += kRowStep, addr += kRowStep * kLineBytes) {
#pragma unroll
    for (int c = 0; c < kPanels; ++c) {
      asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr + c * kRows * kLineBytes), "r"(0)
                   : "memory");
      asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr + tile_bytes + c * kRows * kLineBytes),
                   "r"(0)
                   : "memory");
    }
  }
}

// kVarlen, the key block that ends past its sequence's keys (`valid` of
// kBlockN rows inside it): K and V's rows from `valid` on to zero, by the
// 256 consumer threads, after K and V have landed and before either
// consumer's first wgmma (fence.proxy.async: ordinary stores, read next by
// the async proxy). Every consumer thread must call this (it ends on a
// named barrier).
template <typename T>
__device__ __forceinline__ void zero_tile_tails(uint32_t sK, int valid, int ctid) {
  static_assert(T::kVOff == T::kKOff + T::kTileN, "V follows K");
  zero_rows_from<T::kBlockN, T::kHeadDim / kPanelCols, 256>(sK, T::kTileN, valid, ctid);
  fence_proxy_async();
  named_barrier_sync(T::kTailBarrier, 256);
}

template <typename T, bool kDq, int kFeatures, bool kVarlen>
__global__ void __launch_bounds__(T::kNThreads, 1) flash_bwd_sm90_ws_kernel(const __grid_constant__ WsBwdParams pw) {
#ifdef FLASH_SM90_ENABLED
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim, kStages = T::kStages;
  constexpr int kSN = T::kSN, kDkvN = T::kDkvN, kDqN = T::kDqN, kPanels = kHeadDim / kPanelCols;
  constexpr int kLine = kLineBytes;
  const FlashBwdParams& p = pw.bwd;
  extern __shared__ char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t s_base = smem_u32(smem);
  const uint32_t sK = s_base + T::kKOff, sV = s_base + T::kVOff;
  const uint32_t bar_kv = s_base + T::kBarOff, full = bar_kv + 8, empty = full + 8 * kStages;  // + 8 * stage
  // dO's own (kDoOwnBarriers), + 8 * its stage.
  const uint32_t do_full = empty + 8 * kStages, do_empty = do_full + 8 * T::kDoStages;
  const uint32_t bar_tail = T::kDoOwnBarriers ? do_empty + 8 * T::kDoStages : empty + 8 * kStages;  // kVarlen
  // kDoOwnBarriers: the producer's tail path below loads Q and dO of one
  // stage index together; head dim 256 takes dense calls only.
  static_assert(!(T::kDoOwnBarriers && kVarlen), "variable-length calls share Q and dO's stages");
  // The shared-memory tile of dO for query block i.
  auto do_tile = [&](int i) { return s_base + T::kDoOff + (i % T::kDoStages) * T::kTileM; };

  // The block's key block: blockIdx.x in BwdBlock's order, or in groups
  // of heads (group_width), or a variable-length call's entry of the list
  // of those that hold rows (launch_bwd_ws.cuh; the blocks past its count
  // have none).
  int tile = blockIdx.x;
  if constexpr (kVarlen) {
    if (p.tile_list != nullptr) {
      if (tile >= p.tile_list[0]) return;
      tile = p.tile_list[1 + tile];
    }
  } else if (pw.group_width > 0) {
    tile = group_block_major(tile, (p.seqlen_k + kBlockN - 1) / kBlockN, p.batch * p.nheads, pw.group_width);
  }
  const BwdBlock<Element> blk(p, kBlockN, p.seqlen_k, tile);  // one key block
  const int b = blk.b, h = blk.h;
  const int n0 = blk.block * kBlockN;
  if (kVarlen && n0 >= blk.seq.seqlen_k) return;  // past the end of a shorter sequence
  // The tensor-map coordinates of the sequence's row 0: a dense side has a
  // batch entry per sequence, a varlen side one entry of all its rows
  // (launch_bwd_ws.cuh).
  auto q_row = [&](int m0) { return kVarlen ? int(blk.seq.q_start) + m0 : m0; };
  auto q_batch = [&]() { return kVarlen && p.cu_seqlens_q != nullptr ? 0 : b; };
  const int k_row0 = kVarlen ? int(blk.seq.k_start) + n0 : n0;
  const int k_batch = kVarlen && p.cu_seqlens_k != nullptr ? 0 : b;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  const MaskGeometry geo(p, blk.seq);
  const int m_begin = geo.m_block_begin(n0, kBlockM);
  const int count = geo.m_block_end(n0, kBlockN, kBlockM) - m_begin;  // query blocks, i = 0 .. count - 1

  if (tid == 0) {
    mbar_init(bar_kv, 1);
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full + 8 * st, T::kFullArrivals);
      mbar_init(empty + 8 * st, T::kEmptyArrivals);
    }
    if constexpr (T::kDoOwnBarriers) {
#pragma unroll
      for (int st = 0; st < T::kDoStages; ++st) {
        mbar_init(do_full + 8 * st, T::kDoFullArrivals);
        mbar_init(do_empty + 8 * st, T::kEmptyArrivals);
      }
    }
    if constexpr (kVarlen) mbar_init(bar_tail, 1);
    fence_mbar_init();
  }
  __syncthreads();

  // ------------------------------------------------------------ producer
  if (wg == 0) {
    setmaxnreg_dec<T::kProducerRegs>();
    if (warp != 0 || count <= 0) return;  // nothing is loaded for a block no query sees
    if (lane == 0) {
      tma_prefetch_map(&pw.tma_q);
      tma_prefetch_map(&pw.tma_do);
      mbar_arrive_expect_tx(bar_kv, 2 * T::kTileN);
#pragma unroll
      for (int c = 0; c < kPanels; ++c) {
        tma_load_4d(sK + c * kBlockN * kLine, &pw.tma_k, bar_kv, c * kPanelCols, k_row0, blk.hk, k_batch);
        tma_load_4d(sV + c * kBlockN * kLine, &pw.tma_v, bar_kv, c * kPanelCols, k_row0, blk.hk, k_batch);
      }
    }
    const float* lse = p.softmax_lse + blk.row_bh;
    const float* delta = p.softmax_d + blk.row_bh;
    const float* residual = p.lse_residual ? p.lse_residual + blk.row_bh : nullptr;
    for (int i = 0; i < count; ++i) {
      const int stage = i % kStages;
      mbar_wait(empty + 8 * stage, ((i / kStages) & 1) ^ 1);
      const int m0 = (m_begin + i) * kBlockM;
      // The rows' statistics (no alignment guarantee: 4 bytes a load), zero
      // past the sequence, the lse in the log2 domain; the residual is zero
      // without a bias. Each lane's
      // arrival releases its stores to the consumers. (4-byte cp.async with
      // cp.async.mbarrier.arrive did the same without the registers, but
      // compute-sanitizer's racecheck does not see that arrival order the
      // copies and reported every stage.)
      float* stats = reinterpret_cast<float*>(smem + stage * kBlockM * 4);
#pragma unroll
      for (int k = 0; k < kBlockM / 32; ++k) {
        const int r = lane + 32 * k;
        const bool in = m0 + r < blk.seq.seqlen_q;
        stats[T::kLseOff / 4 + r] = in ? lse_log2(lse[m0 + r]) : 0.f;  // probs_t<..., true>
        stats[T::kDeltaOff / 4 + r] = in ? delta[m0 + r] : 0.f;
        stats[T::kResidualOff / 4 + r] = in && residual != nullptr ? residual[m0 + r] : 0.f;
      }
      // kVarlen: the sequence's last query block, when partial (then it is
      // also this loop's last), loads on bar_tail instead; its rows past
      // the sequence are zeroed below before the stage is full.
      const bool tail = kVarlen && m0 + kBlockM > blk.seq.seqlen_q;
      if (!tail) mbar_arrive(full + 8 * stage);
      if (lane == 0 && T::kDoOwnBarriers) {
        // Q on the stage's barrier; dO, once its own stage is free (after
        // the dV of query block i - kDoStages), on dO's.
        mbar_arrive_expect_tx(full + 8 * stage, T::kTileM);
#pragma unroll
        for (int c = 0; c < kPanels; ++c) {
          tma_load_4d(s_base + T::kQOff + stage * T::kTileM + c * kBlockM * kLine, &pw.tma_q, full + 8 * stage,
                      c * kPanelCols, q_row(m0), h, q_batch());
        }
        const int do_stage = i % T::kDoStages;
        mbar_wait(do_empty + 8 * do_stage, ((i / T::kDoStages) & 1) ^ 1);
        mbar_arrive_expect_tx(do_full + 8 * do_stage, T::kTileM);
#pragma unroll
        for (int c = 0; c < kPanels; ++c) {
          tma_load_4d(do_tile(i) + c * kBlockM * kLine, &pw.tma_do, do_full + 8 * do_stage, c * kPanelCols,
                      q_row(m0), h, q_batch());
        }
      } else if (lane == 0) {
        const uint32_t bar = tail ? bar_tail : full + 8 * stage;
        mbar_arrive_expect_tx(bar, 2 * T::kTileM);
#pragma unroll
        for (int c = 0; c < kPanels; ++c) {
          tma_load_4d(s_base + T::kQOff + stage * T::kTileM + c * kBlockM * kLine, &pw.tma_q, bar, c * kPanelCols,
                      q_row(m0), h, q_batch());
          tma_load_4d(s_base + T::kDoOff + stage * T::kTileM + c * kBlockM * kLine, &pw.tma_do, bar, c * kPanelCols,
                      q_row(m0), h, q_batch());
        }
      }
      if (tail) {
        // Once the boxes have landed (the one use of bar_tail), Q and dO's
        // rows of the next sequence to zero (Q and dO are adjacent tile
        // rings, kStages tiles apart), ordered before the consumers' wgmmas
        // by fence.proxy.async and each lane's arrival; lane 0 arrives once
        // more in place of the arrive_expect_tx the stage did not get.
        static_assert(T::kDoOff == T::kQOff + kStages * T::kTileM, "dO's ring follows Q's");
        mbar_wait(bar_tail, 0);
        zero_rows_from<kBlockM, kPanels, 32>(s_base + T::kQOff + stage * T::kTileM, kStages * T::kTileM,
                                                blk.seq.seqlen_q - m0, lane);
        fence_proxy_async();
        mbar_arrive(full + 8 * stage);
        if (lane == 0) mbar_arrive(full + 8 * stage);
      }
    }
    return;
  }

  // ------------------------------------------------------------ consumers
  setmaxnreg_inc<T::kConsumerRegs>();
  // kDqAlternates: cw through a shuffle from lane 0, so that ptxas knows it
  // is the same in every lane and a branch on it (dq_here, below) is not a
  // divergent path, on which ptxas serializes every wgmma (C7520). (Head
  // dim 128 keeps the plain form: with the shuffle ptxas scheduled its
  // kernels differently, 0.99x with another change, not separated.)
  const int cw = T::kDqAlternates ? __shfl_sync(0xffffffffu, wg - 1, 0) : wg - 1;
  const int warp_in_wg = warp % 4;
  // This consumer's part: keys [wg_key0, + 64) x queries [q_col0, + kSN)
  // of S^T; head-dim columns [dkv_col0, + kDkvN) of dK / dV; rows key_row0
  // + g (+ 8) for this thread; its dQ piece at columns dq_col0...
  const int wg_key0 = T::kSplitDims ? 0 : 64 * cw, key_row0 = wg_key0 + 16 * warp_in_wg;
  const int q_col0 = T::kSplitDims ? kSN * cw : 0;
  const int dkv_col0 = T::kSplitDims ? kDkvN * cw : 0;
  const int dq_col0 = T::kDqAlternates ? 0 : kDqN * cw;
  const uint32_t sDq = s_base + T::kDqOff + cw * T::kDqPiece;

  float acc_dk[kDkvN / 8][4] = {};
  float acc_dv[kDkvN / 8][4] = {};
  using Rule = BwdScoreRule<Element, kFeatures>;
  const Rule rule(p, geo, b, h);
  Element* dbias = dbias_of<Element>(p, b, h);
  constexpr uint32_t kSbo = 8 * kLine;
  constexpr uint32_t kPanelN = kBlockN * kLine, kPanelM = kBlockM * kLine;

  if (count > 0) {
    mbar_wait(bar_kv, 0);
    if constexpr (kVarlen) {
      if (n0 + kBlockN > blk.seq.seqlen_k) zero_tile_tails<T>(sK, blk.seq.seqlen_k - n0, tid - 128);
    }
  }
  for (int i = 0; i < count; ++i) {
    const int stage = i % kStages;
    const int m0 = (m_begin + i) * kBlockM;
    const uint32_t sQ = s_base + T::kQOff + stage * T::kTileM, sDo = do_tile(i);
    const uint32_t sDs = s_base + T::kDsOff + (i & 1) * T::kTileDs;
    const float* stats = reinterpret_cast<const float*>(smem + stage * kBlockM * 4);
    const float* sLse = stats + T::kLseOff / 4 + q_col0;
    const float* sDelta = stats + T::kDeltaOff / 4 + q_col0;
    const float* sResidual = stats + T::kResidualOff / 4 + q_col0;
    mbar_wait(full + 8 * stage, (i / kStages) & 1);

    float acc_s[kSN / 8][4], acc_dp[kSN / 8][4];
    wgmma_fence();
    wgmma_abt_kmajor<Element, kSN, kHeadDim>(acc_s, sK + wg_key0 * kLine, kPanelN, sQ + q_col0 * kLine, kPanelM);
    wgmma_commit();
    if constexpr (T::kDoOwnBarriers) mbar_wait(do_full + 8 * (i % T::kDoStages), (i / T::kDoStages) & 1);
    wgmma_abt_kmajor<Element, kSN, kHeadDim>(acc_dp, sV + wg_key0 * kLine, kPanelN, sDo + q_col0 * kLine, kPanelM);
    wgmma_commit();
    uint64_t keep_bits = 0;  // dropout's, drawn under the two products
    if constexpr (Rule::kDropout) {
      if (rule.has_dropout()) keep_bits = rule.template dropout_keep_bits_t<kSN>(n0 + key_row0, m0 + q_col0, lane);
    }

    wgmma_wait<1>();
    fence_regs(acc_s);
    SoftcapFactors<Element, kSN / 8> softcap_factors;
    probs_t<Element, kSN, true>(acc_s, softcap_factors, rule, geo, m0 + q_col0, n0 + wg_key0, n0 + key_row0, sLse,
                               sResidual, lane);
    uint32_t p_frag[kSN / 16][4];
    pack_p_operand<Element, kSN>(p_frag, acc_s, rule, keep_bits);
    if constexpr (!T::kSplitDims) {
      // dV += P^T dO (A from registers, B MN-major): on the tensor cores
      // while dS^T is computed.
      wgmma_fence();
      wgmma_rs_b_mn<Element, kDkvN>(acc_dv, p_frag, sDo, kPanelM);
      wgmma_commit();
    }

    wgmma_wait<T::kSplitDims ? 0 : 1>();  // dP^T (dV may still run)
    fence_regs(acc_dp);
    dscores_t<Element, kSN>(acc_dp, acc_s, softcap_factors, rule, p, dbias, sDelta, keep_bits, m0 + q_col0,
                            n0 + key_row0, lane);
    uint32_t ds_frag[kSN / 16][4];
    pack_a_frags<Element>(ds_frag, acc_dp);
    if (kDq || T::kSplitDims) {
      // This consumer's part of dS^T (kSplitDims: and of P^T) into this
      // step's buffer, before dK's wgmma takes ds_frag (its A registers may
      // not be read while it runs).
      store_packed_sw128(smem + T::kDsOff + (i & 1) * T::kTileDs, kBlockN, key_row0, q_col0, ds_frag, lane);
      if constexpr (T::kSplitDims) {
        store_packed_sw128(smem + T::kPOff + (i & 1) * T::kTileDs, kBlockN, key_row0, q_col0, p_frag, lane);
      }
      fence_proxy_async();
      // Lane 0 of each warp arrives only after its previous dQ reduction
      // has read the warp's staging slab, so after this barrier the slabs
      // are free to overwrite; the barrier also publishes both consumers'
      // parts of dS^T (and P^T).
      if (kDq && lane == 0) bulk_wait_all<true>();
      named_barrier_sync(T::kDsBarrier, 256);
    }
    // dQ's staging and reduction (kDq): this warp's rows of the piece, in
    // rounds of kDqSlabCols columns, to shared memory; then its lane 0 hands
    // them to the TMA unit, after a barrier of the warp's 32 threads (a
    // named barrier orders the other lanes' stores before lane 0's
    // reduction; __syncwarp compiles to nothing here). A round after the
    // first waits for the previous one's reduction to have read the slab.
    // kSplitDims: dO's stage is released after the first round (below).
    const int warp_m0 = m0 + 16 * warp_in_wg;  // the warp's first query row
    const int slab_barrier = T::kSlabBarrier + 4 * cw + warp_in_wg;
    // dV done: the stage of dO is free (kSplitDims, whose dV is not done
    // with the stage's Q).
    auto release_do = [&] {
      wgmma_wait<1>();  // dV done (dK may still run)
      fence_regs(acc_dv);
      mbar_arrive(do_empty + 8 * (i % T::kDoStages));
    };
    auto reduce_dq = [&](float (&acc_dq)[kDqN / 8][4]) {
      if constexpr (kVarlen) {
        // Rows past the sequence (the next sequence's in dq_accum): exact
        // zeros when this sequence's K and V rows are finite; cleared, so
        // that they stay zeros when they are not.
        const int row = warp_m0 + lane / 4;
#pragma unroll
        for (int j = 0; j < kDqN / 8; ++j) {
          if (row >= blk.seq.seqlen_q) acc_dq[j][0] = acc_dq[j][1] = 0.f;
          if (row + 8 >= blk.seq.seqlen_q) acc_dq[j][2] = acc_dq[j][3] = 0.f;
        }
      }
      // (kVarlen: a warp whose rows all lie past the sequence adds nothing.)
      const bool adds = lane == 0 && (!kVarlen || warp_m0 < blk.seq.seqlen_q);
      auto round = [&](auto r) {
        constexpr int kRound = decltype(r)::value;
        if constexpr (kRound > 0) {
          if (adds) bulk_wait_all<true>();
          named_barrier_sync(slab_barrier, 32);
        }
        store_dq_slab<T::kDqSlabCols, kRound * T::kDqSlabCols / 8, kDqN>(sDq, acc_dq, warp_in_wg, lane);
        fence_proxy_async();
        named_barrier_sync(slab_barrier, 32);
        if (adds) {
#pragma unroll
          for (int box = 0; box < T::kDqSlabCols / T::kDqBoxCols; ++box) {
            tma_reduce_add_4d(&pw.tma_dq, sDq + box * 64 * kLine + 16 * warp_in_wg * kLine,
                              dq_col0 + kRound * T::kDqSlabCols + box * T::kDqBoxCols, q_row(warp_m0), h,
                              q_batch());
          }
          bulk_commit();
        }
      };
      static_assert(kDqN / T::kDqSlabCols <= 2, "one or two rounds");
      round(std::integral_constant<int, 0>{});
      if constexpr (T::kSplitDims) release_do();
      if constexpr (kDqN / T::kDqSlabCols == 2) round(std::integral_constant<int, 1>{});
    };
    // The dQ piece = dS K (A = dS^T read MN-major, B = K MN-major, over
    // all of the block's keys), issued, not committed.
    auto issue_dq = [&](float (&acc_dq)[kDqN / 8][4]) {
      const uint64_t desc_a = make_desc(sDs, kPanelN, kSbo);
      const uint64_t desc_b = make_desc(sK + (dq_col0 / 64) * kPanelN, kPanelN, kSbo);
#pragma unroll
      for (int s = 0; s < kBlockN / 16; ++s) {
        wgmma_ss<Element, kDqN, 1, 1>(acc_dq, desc_advance(desc_a, s * 16 * kLine),
                                      desc_advance(desc_b, s * 16 * kLine), s > 0);
      }
    };
    if constexpr (T::kSplitDims) {
      // The dQ piece first, then dV += P^T dO and dK += dS^T Q for this
      // consumer's head-dim columns (A = both consumers' P^T / dS^T, K-major,
      // from shared memory; B MN-major), so that dQ's two rounds of staging
      // and reduction run while dV and dK are on the tensor cores. dO's
      // stage is free once dV is done (between the rounds).
      const uint32_t sP = s_base + T::kPOff + (i & 1) * T::kTileDs;
      const uint32_t col_off = (dkv_col0 / 64) * kPanelM;
      wgmma_fence();
      float acc_dq[kDqN / 8][4];
      if constexpr (kDq) {
        issue_dq(acc_dq);
        wgmma_commit();
      }
      wgmma_ss_a_kmajor_b_mn<Element, kDkvN, kBlockM / 16>(acc_dv, sP, sDo + col_off, kPanelM);
      wgmma_commit();
      wgmma_ss_a_kmajor_b_mn<Element, kDkvN, kBlockM / 16>(acc_dk, sDs, sQ + col_off, kPanelM);
      wgmma_commit();
      if constexpr (kDq) {
        wgmma_wait<2>();  // dQ done (dV and dK may still run)
        fence_regs(acc_dq);
        reduce_dq(acc_dq);
      } else {
        release_do();
      }
      wgmma_wait<0>();
    } else {
      // dK += dS^T Q (A from registers, B MN-major).
      auto issue_dk = [&] {
        wgmma_rs_b_mn<Element, kDkvN>(acc_dk, ds_frag, sQ, kPanelM);
        wgmma_commit();
      };
      // Whether this consumer computes a dQ piece at this step (at head dim
      // 64 the consumers take turns). Each branch below ends with every
      // wgmma complete, so that ptxas sees whole pipeline stages on both
      // paths (with the dQ product alone under a branch, it serialized every
      // wgmma, C7514 / C7520).
      const bool dq_here = kDq && (!T::kDqAlternates || (i & 1) == cw);
      wgmma_fence();
      if (dq_here) {
        // The dQ piece first, then dK, so that dQ's store and reduction run
        // while dK is on the tensor cores. (dK first, then dQ after a wait
        // for both, left the tensor cores idle through dQ's store: 1.02-1.04x
        // for this order, H200, docs/perf-notes.md step 11.)
        float acc_dq[kDqN / 8][4];
        issue_dq(acc_dq);
        wgmma_commit();
        issue_dk();
        wgmma_wait<1>();  // dV and dQ done (dK may still run)
        fence_regs(acc_dq);
        fence_regs(acc_dv);
        fence_regs(p_frag);
        reduce_dq(acc_dq);
        wgmma_wait<0>();
      } else {
        issue_dk();
        wgmma_wait<0>();
      }
    }
    // dV and dK done: the stage is free.
    fence_regs(acc_dv);
    fence_regs(acc_dk);
    if constexpr (!T::kSplitDims) {  // register operands of dV / dK
      fence_regs(p_frag);
      fence_regs(ds_frag);
    }
    // Every consumer thread arrives: an mbarrier arrival releases only the
    // arriving thread's own accesses, and each thread read some of the
    // stage's row statistics (lane 0 arriving after a __syncwarp, which
    // compiles to nothing here, left that order to the hardware; racecheck
    // reported the producer's next stores against those reads).
    mbar_arrive(empty + 8 * stage);
  }

  store_dkdv_strip<Element, kDkvN>(p, blk.seq, b, h, n0 + key_row0, dkv_col0, acc_dk, acc_dv, rule.dv_scale(), lane);
  if (kDq && lane == 0) bulk_wait_all<false>();  // the reductions read shared memory until they complete
#endif  // FLASH_SM90_ENABLED
}

}  // namespace sm90
}  // namespace flash
