// FlashAttention forward on Hopper, warp-specialized (sm_90a): the same
// arithmetic as flash_fwd_sm90_kernel.cuh (wgmma on SW128 shared memory, the
// score rule, the online softmax, dropout, sinks, lse), with the data
// movement taken off the warps that compute. A thread block of 128 x
// (kConsumerWGs + 1) threads works on query blocks ("tiles") of kBlockM =
// 64 x kConsumerWGs rows of one (batch, head): one tile (blockIdx.x), or, in
// a persistent grid (kPersistent with the launcher's per-call counter), one
// block per SM taking tile after tile from the counter, its producer
// loading the next tile's Q and first K / V blocks while the consumers finish
// the current one:
//
//   warpgroup 0, the producer: setmaxnreg.dec gives its registers to the
//     consumers; one thread takes the tiles, hands each to the consumers
//     through a slot in shared memory (published with Q's barrier, freed by
//     Q's "empty" barrier), and issues TMA loads (tma.cuh) of the tile's Q
//     and of its K and V blocks into a ring of kStages stages (whose
//     positions and phases run on across tiles), each stage's K and
//     V with their own "full" mbarrier (the TMA bytes complete it) and
//     "empty" mbarrier (the consumers' warps arrive once they are done with
//     it). The producer waits only for a stage to be empty; the consumers
//     never wait for each other's loads, and no __syncthreads runs after the
//     set-up (the classic kernel's per-key-block barrier was 30% of its
//     stall cycles in an ncu profile at head dim 128).
//   warpgroups 1..kConsumerWGs, the consumers: setmaxnreg.inc; each owns 64
//     query rows and runs the classic kernel's software pipeline: S_{j+1} =
//     Q K_{j+1}^T is issued with O += P_j V_j, and the softmax of S_{j+1}
//     runs while P_j V_j is on the tensor cores.
//   ping-pong (kPingPong): the consumers take turns issuing their wgmmas,
//     in a fixed round robin over named barriers ("turns", below), so that
//     while one warpgroup's GEMMs run the other does its softmax: the tensor
//     cores see one warpgroup's products back to back instead of two
//     warpgroups contending at the same moment and then both idling in
//     their softmax.
//
// Visiting order, masking, the score rule, dropout and the epilogue are the
// classic kernel's, line for line where they can be: key blocks from last to
// first; the rule (`Rule`, chosen by the launcher) constructed per (batch,
// head) and applied by apply_score_rule / apply_dropout; sinks joined in
// the epilogue; O through this warpgroup's rows of a staging tile (its own
// at head dims up to 128 and FP8, so that Q is free for the next tile once
// the last S product has completed; the Q tile at 256) to coalesced 16-byte
// stores. Measured (H200, bf16, against one block per query block): the
// persistent grid 1.03-1.13x at 1k and 2k, level from 4k (1.0-1.5% either
// way; docs/perf-notes.md, step 6).
//
// FP8 (Element = __nv_fp8_e4m3, the fwd_fp8 op; kFp8 in the traits): the
// same kernel with e4m3 wgmmas (k = 32 a step, fp32 accumulators). What
// differs, all decided at compile time:
//   - tiles hold 128 e4m3 columns a 128-byte line (one panel at head dim
//     128), and 8-bit wgmmas read both operands K-major, so V arrives
//     transposed, V^T (batch, nheads_k, headdim, keys), loaded as headdim
//     lines of 128 keys (one box), which is the K-major B operand of
//     O += P V^T^T. The transpose is done once per call, before the kernel
//     (cuda/flash_fwd_fp8_transpose.cu: one read and write of V, 1 byte an
//     element, next to the kernel's seqlen_q / 128 reads of every V tile),
//     rather than in shared memory by extra warps (FlashAttention-3's way),
//     which costs shared-memory bandwidth and registers in every key block;
//   - P goes from the fp32 scores to e4m3 A fragments in the thread that
//     holds them (pack_a_frags_e4m3), the key order within 32-key slices
//     permuted instead, which the transpose writes V^T's columns in
//     (wgmma.cuh);
//   - P is exp2(s - max + 8) in [0, 256] (OnlineSoftmax's kPShift): e4m3's
//     normal range then reaches P values 2^8 times smaller (the sums carry
//     the factor, out and lse are unchanged);
//   - q_descale * k_descale of the (batch, kv head) multiplies the exp2
//     scale; v_descale multiplies 1 / rowsum in the epilogue; the output is
//     bf16, staged through a buffer of its own (the Q tile is half its size);
//   - variable-length calls read V^T at the sequence's own column start
//     (fp8_vt_start, flash_params.h), whose columns past the sequence are
//     zero up to the next multiple of 128: a key block never reaches another
//     sequence, and zero_v_tail is not needed.
// Only the plain rule (no bias, softcap, ALiBi, dropout, sinks): the
// dispatcher in fp8.py sends calls with those to the dequantizing path.
//
// Dense (batch, seqlen, heads, dim) inputs through three 4-D tensor maps;
// variable-length calls (kVarlen) through maps of all rows of a side as one
// batch entry, at each sequence's first row (SeqInfo). A box that runs past
// a sequence's end then reads the next sequence's rows instead of TMA's
// zero fill: masked scores make those keys' P zero, surplus query rows are
// never stored, and zero_v_tail clears the V rows (0 times a non-finite
// value would not vanish). The launcher (launch_ws.cuh) sends calls whose
// tensors TMA cannot describe to the classic kernel.
#pragma once

#include <cuda.h>

#include <type_traits>

#include "../../flash_params.h"
#include "../../mask.h"
#include "../../seq_info.h"
#include "../score_rule.cuh"
#include "../softmax.cuh"
#include "../tile_list.cuh"
#include "flash_fwd_sm90_kernel.cuh"  // gemm_qk, gemm_pv: the same products
#include "sm90_dispatch.cuh"           // fwd_persistent_head_dim
#include "sync.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash {
namespace sm90 {

// The kernel's one parameter: the call's params and the tensor maps of q, k
// and v (encoded by the launcher), as a __grid_constant__ so that the TMA
// unit reads the maps where the launch put them.
struct WsFwdParams {
  CUtensorMap tma_q, tma_k, tma_v;  // 64-byte aligned by their type
  FlashFwdParams fwd;
  // Dense causal calls: (batch, head)s in groups this wide, block-major
  // within a group (tile_list.cuh's group_block_major); 0: each in turn.
  int group_width = 0;
};

template <typename Element_, int kHeadDim_, int kBlockN_, int kStages_, int kConsumerWGs_ = 2>
struct WsFwdTraits {
  using Element = Element_;  // of q, k and v
  static constexpr bool kFp8 = kIsFp8<Element>;
  // The output's type: bf16 for FP8 inputs (FlashAttention-3's), else the inputs'.
  using Out = std::conditional_t<kFp8, __nv_bfloat16, Element>;
  static constexpr int kElemBytes = kFp8 ? 1 : 2;
  static constexpr int kPanelElems = kLineBytes / kElemBytes;  // columns of a 128-byte line (a TMA box)
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kConsumerWGs = kConsumerWGs_;
  static constexpr int kBlockM = 64 * kConsumerWGs;
  static constexpr int kNThreads = 128 * (kConsumerWGs + 1);
  // Ping-pong for head dims up to 128, as FlashAttention-3 does; at 256 the
  // O accumulator (128 registers) leaves the two warpgroups' 16-bit products
  // long enough to overlap on their own. FP8 products take half the time,
  // so the softmax is the larger share and ping-pong hides it at 256 too.
  static constexpr bool kPingPong = kConsumerWGs >= 2 && (kHeadDim <= 128 || kFp8);
  // P = exp2(s - max + kPShift) (OnlineSoftmax::update_stats): FP8 only.
  static constexpr int kPShift = kFp8 ? 8 : 0;
  // Register budgets after setmaxnreg. The block is launched with 65536 /
  // kNThreads registers a thread (ptxas: 168 at 384 threads, 128 at 512),
  // and the budgets must add up to no more than that block total, or
  // setmaxnreg.inc waits forever: 24 + 2 x 240 = 3 x 168, 32 + 3 x 160 =
  // 4 x 128. The producer's one thread holds a few addresses and counters.
  static constexpr int kProducerRegs = kConsumerWGs == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;
  static_assert(kConsumerWGs == 2 || kConsumerWGs == 3, "two or three consumer warpgroups");
  static_assert(kProducerRegs + kConsumerWGs * kConsumerRegs <= (65536 / kNThreads / 8 * 8) * (kConsumerWGs + 1),
                "setmaxnreg budgets exceed the block's registers");

  static constexpr int kQBytes = kBlockM * kHeadDim * kElemBytes;
  static constexpr int kKVBytes = kBlockN * kHeadDim * kElemBytes;  // one stage of K or of V (V^T for FP8)
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kQBytes;
  static constexpr int kVOff = kKOff + kStages * kKVBytes;
  // The epilogue's staging tile of O (kBlockM x kHeadDim of Out, SW128
  // panels): a buffer of its own after the V stages (FP8, whose Q tile is
  // half its size; and head dims up to 128, so that the next query block's
  // Q loads while this one's O is written out), else the Q tile (head dim
  // 256, where shared memory has no room for both).
  static constexpr bool kOwnOTile = kFp8 || kHeadDim <= 128;
  static constexpr int kOBytes = kOwnOTile ? kBlockM * kHeadDim * 2 : 0;
  static constexpr int kOOff = kOwnOTile ? kVOff + kStages * kKVBytes : kQOff;
  // A persistent grid (with p.tile_counter) where the next query block's Q
  // can load under this one's epilogue (kOwnOTile). Head dim 256 keeps one
  // query block per thread block: in 16 bits the tile loop's state cost
  // 240-300 bytes of spills (ptxas) on top of O's 128 registers, and the
  // FP8 forward there ran slower persistent (H200, B x S = 16k: 4k 999 -> 913
  // TFLOP/s, causal 807 -> 677, causal 16k 1033 -> 939), where at 128 it
  // gained (4k 723 -> 765, 16k 797 -> 817).
  static constexpr bool kPersistent = kOwnOTile && fwd_persistent_head_dim(kHeadDim);
  // Dense calls' query blocks aligned to the sequence's end rather than its
  // start (row0 = m_block * kBlockM - (num_m_blocks * kBlockM - seqlen_q)),
  // so that a partial block is the first, whose rows see the fewest keys
  // under a causal mask, not the last, which sees them all. The rows before
  // 0 are TMA's zero fill, see no key under a causal mask (and are never
  // stored). Only the 192-row tiles (three consumers: the head dim 64 plain
  // kernel), and only dense calls (a variable-length sequence's blocks
  // start at its first row: kVarlen), where seqlen_q is rarely a multiple
  // of kBlockM: at 1k causal
  // (5 blocks of 192 and one of 64) the last block did 8 key blocks of work
  // for 64 rows; aligned to the end, the partial block does 1, and the
  // tiles' work (key blocks x 192 rows) goes from 32 to 27 blocks' worth.
  static constexpr bool kAlignEnd = kConsumerWGs == 3;
  // mbarriers, 8 bytes each: Q's full and empty, then full K, full V, empty
  // K, empty V per stage; then the tile slot (the producer's query block
  // for the consumers, an int).
  static constexpr int kBarOff = kVOff + kStages * kKVBytes + kOBytes;
  static constexpr int kNumBarriers = 2 + 4 * kStages;
  static constexpr int kSlotOff = kBarOff + 8 * kNumBarriers;
  static constexpr int kSmemBytes = kSlotOff + 16 + 1024;  // + realignment to the swizzle atom
  // Arrivals that empty a stage: lane 0 of every consumer warp. Arrivals
  // that free the Q tile and the slot: every consumer thread (some of them
  // read the slot, and where O is staged in the Q tile, all read it).
  static constexpr int kEmptyArrivals = 4 * kConsumerWGs;
  static constexpr int kQEmptyArrivals = 128 * kConsumerWGs;

  // Named barriers (0 is __syncthreads): each consumer's turn to issue
  // wgmmas, then each consumer's epilogue.
  static constexpr int kTurnBarrier = 1;
  static constexpr int kEpilogueBarrier = kTurnBarrier + kConsumerWGs;
  static constexpr int kTailBarrier = kEpilogueBarrier + kConsumerWGs;  // zero_v_tail

  // Key blocks of whole 16-key k-steps of P V (and of dropout's 16 x 16 draws).
  static_assert(kHeadDim % 64 == 0 && kBlockN % 16 == 0, "unsupported tile");
  // FP8: whole 128-byte lines of Q and K (head dims 128 and 256) and V^T
  // lines of 128 keys (one box of kHeadDim <= 256 rows).
  static_assert(!kFp8 || (kHeadDim % 128 == 0 && kHeadDim <= 256 && kBlockN == 128), "unsupported FP8 tile");
  static_assert(kBlockM <= 256 && kBlockN <= 256, "TMA boxes have at most 256 rows");
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "tiles must keep the 1024-byte swizzle alignment");
};

// Variable-length calls: the first key block a consumer visits (the V stage
// at sV, loaded in the round `parity` of full_v) may end past its
// sequence's keys, at rows `valid` to kBlockN - 1.
// Those rows are inside the tensor (the next sequence's keys, or unused
// cache memory under seqused_k), so TMA loaded them instead of zero-filling.
// Their scores are masked (P = 0), but 0 times a non-finite value there
// would reach O: the consumers zero the rows, between them, before either
// multiplies by V. Whole 128-byte rows, so the swizzle does not matter.
// Every consumer thread must call this (it ends on a named barrier).
template <typename T>
__device__ __forceinline__ void zero_v_tail(uint32_t sV, uint32_t full_v, int parity, int valid) {
  if (valid >= T::kBlockN) return;  // uniform: the block lies within the sequence
  mbar_wait(full_v, parity);        // the block has landed
  constexpr int kChunksPerRow = kLineBytes / 16, kPanels = T::kHeadDim / kPanelCols;
  const int chunks = (T::kBlockN - valid) * kChunksPerRow;
  const int ctid = threadIdx.x - 128;  // consumer threads are 128 .. 128 * (kConsumerWGs + 1) - 1
  for (int i = ctid; i < kPanels * chunks; i += 128 * T::kConsumerWGs) {
    const int panel = i / chunks, chunk = i % chunks;
    const uint32_t addr = sV + panel * T::kBlockN * kLineBytes + valid * kLineBytes + chunk * 16;
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
  }
  fence_proxy_async();  // ordinary stores, read next by wgmma (the async proxy)
  named_barrier_sync(T::kTailBarrier, 128 * T::kConsumerWGs);
}

template <typename T, typename Rule, bool kVarlen>
__global__ void __launch_bounds__(T::kNThreads, 1) flash_fwd_sm90_ws_kernel(const __grid_constant__ WsFwdParams pw) {
#ifdef FLASH_SM90_ENABLED
  using Element = typename T::Element;
  using Out = typename T::Out;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim, kStages = T::kStages;
  constexpr int kNT = kBlockN / 8, kDT = kHeadDim / 8, kPanels = kHeadDim / T::kPanelElems;
  const FlashFwdParams& p = pw.fwd;
  extern __shared__ char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t sQ = smem_u32(smem) + T::kQOff, sK = smem_u32(smem) + T::kKOff, sV = smem_u32(smem) + T::kVOff;
  const uint32_t bar_q = smem_u32(smem) + T::kBarOff, empty_q = bar_q + 8;
  const uint32_t full_k = empty_q + 8, full_v = full_k + 8 * kStages;  // + 8 * stage
  const uint32_t empty_k = full_v + 8 * kStages, empty_v = empty_k + 8 * kStages;
  volatile int* slot = reinterpret_cast<volatile int*>(smem + T::kSlotOff);

  // Query blocks ("tiles"), heaviest first within each (batch, head)
  // (causal), so short ones fill the tail. The producer takes them one
  // after another -- blockIdx.x first, then, with p.tile_counter (a
  // persistent grid of one block per SM), the next one not yet taken,
  // from the counter (or, varlen, from p.tile_list at the counter's
  // position) -- and hands each to the consumers through the slot
  // and Q's barrier. A persistent block loads the next query block's Q and
  // first K / V blocks while its consumers finish the current one (its last
  // P V and the epilogue), which a grid of one block per query block leaves
  // idle between blocks.
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int num_tiles = num_m_blocks * p.batch * p.nheads;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  // The tile of the grid's v-th take (v >= num_tiles: none left).
  auto ordered = [&](int v) {
    return !kVarlen && pw.group_width > 0 && v < num_tiles
               ? group_block_major(v, num_m_blocks, p.batch * p.nheads, pw.group_width)
               : v;
  };

  // Everything a tile's loop needs, from its index: (batch, head, query
  // block), the sequence's lengths and the key blocks it visits. Dense
  // calls know every sequence's lengths and start at compile time (row 0 of
  // its batch entry, the call's lengths): fewer live registers than
  // SeqInfo(p, b), which variable-length calls need.
  struct Tile {
    int m_block, b, h, hk, row0;
    SeqInfo seq;
    MaskGeometry geo;
    int n_begin, n_end;
    __device__ Tile(const FlashFwdParams& p, int tile, int num_m_blocks)
        : m_block(num_m_blocks - 1 - tile % num_m_blocks),
          b(tile / num_m_blocks / p.nheads),
          h(tile / num_m_blocks % p.nheads),
          hk(h / (p.nheads / p.nheads_k)),
          row0(m_block * T::kBlockM - (T::kAlignEnd && !kVarlen ? num_m_blocks * T::kBlockM - p.seqlen_q : 0)),
          seq(kVarlen ? SeqInfo(p, b) : SeqInfo::of_lengths(p.seqlen_q, p.seqlen_k)),
          geo(p, seq),
          n_begin(geo.n_block_begin(row0, T::kBlockN)),
          n_end(geo.n_block_end(row0, T::kBlockM, T::kBlockN)) {}
    // Past the end of a shorter sequence: nothing to do.
    __device__ bool past_end() const { return kVarlen && row0 >= seq.seqlen_q; }
    __device__ int count() const { return n_end - n_begin; }  // key blocks, visited n_end - 1 down to n_begin
  };

  if (tid == 0) {
    mbar_init(bar_q, 1);  // the producer's arrive_expect_tx (or plain arrive: no Q to load)
    mbar_init(empty_q, T::kQEmptyArrivals);
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full_k + 8 * st, 1);  // the producer's arrive_expect_tx; the TMA bytes do the rest
      mbar_init(full_v + 8 * st, 1);
      mbar_init(empty_k + 8 * st, T::kEmptyArrivals);
      mbar_init(empty_v + 8 * st, T::kEmptyArrivals);
    }
    fence_mbar_init();
  }
  __syncthreads();

  // ------------------------------------------------------------ producer
  if (wg == 0) {
    setmaxnreg_dec<T::kProducerRegs>();  // all four warps; three of them then leave
    if (tid != 0) return;
    tma_prefetch_map(&pw.tma_q);
    tma_prefetch_map(&pw.tma_k);
    tma_prefetch_map(&pw.tma_v);
    int loaded = 0;  // key blocks loaded so far: block `loaded` goes to stage loaded % kStages
    // Variable-length calls with a tile list (flash_params.h): the grid's
    // blocks and the counter walk the list's entries, and a tile index past
    // them (num_tiles) ends the grid.
    const int* list = kVarlen && T::kPersistent ? p.tile_list : nullptr;
    const int listed = list != nullptr ? list[0] : 0;
    auto tile_at = [&](int v) { return list == nullptr ? ordered(v) : (v < listed ? list[1 + v] : num_tiles); };
    int tile = tile_at(blockIdx.x);
    for (int round = 0;; ++round) {
      if constexpr (T::kPersistent) {
        // The consumers are done with the previous tile's Q (and the slot).
        mbar_wait(empty_q, (round & 1) ^ 1);
        if (tile >= num_tiles) {
          *slot = -1;  // no more tiles
          mbar_arrive(bar_q);
          break;
        }
        *slot = tile;
      } else if (round > 0) {
        break;
      }
      const Tile t(p, tile, num_m_blocks);
      const int count = t.count();
      // The tile after this one, fetched now so that the atomic's latency
      // hides under this tile's loads.
      const int next = T::kPersistent && p.tile_counter != nullptr
                           ? tile_at(int(gridDim.x) + atomicAdd(p.tile_counter, 1))
                           : num_tiles;
      if (t.past_end() || count <= 0) {
        mbar_arrive(bar_q);  // nothing to load: the consumers skip it or write an empty block
      } else {
        mbar_arrive_expect_tx(bar_q, T::kQBytes);
#pragma unroll
        for (int c = 0; c < kPanels; ++c) {
          tma_load_4d(sQ + c * kBlockM * kLineBytes, &pw.tma_q, bar_q, c * T::kPanelElems,
                      int(t.seq.q_start) + t.row0, t.h, p.cu_seqlens_q ? 0 : t.b);
        }
        // Block i of the visit (key block n_end - 1 - i) into stage
        // (loaded + i) % kStages, once the consumers have emptied that
        // stage's previous round.
        auto load = [&](const CUtensorMap* map, uint32_t tiles, uint32_t full, uint32_t empty, int i) {
          const int g = loaded + i, stage = g % kStages;
          mbar_wait(empty + 8 * stage, ((g / kStages) & 1) ^ 1);
          mbar_arrive_expect_tx(full + 8 * stage, T::kKVBytes);
          const int key0 = int(t.seq.k_start) + (t.n_end - 1 - i) * kBlockN;
#pragma unroll
          for (int c = 0; c < kPanels; ++c) {
            tma_load_4d(tiles + stage * T::kKVBytes + c * kBlockN * kLineBytes, map, full + 8 * stage,
                        c * T::kPanelElems, key0, t.hk, p.cu_seqlens_k ? 0 : t.b);
          }
        };
        // FP8's V^T: one box of kHeadDim lines x 128 keys, at the sequence's
        // own column start when variable-length (fp8_vt_start).
        auto load_vt = [&](int i) {
          const int g = loaded + i, stage = g % kStages;
          mbar_wait(empty_v + 8 * stage, ((g / kStages) & 1) ^ 1);
          mbar_arrive_expect_tx(full_v + 8 * stage, T::kKVBytes);
          const int col0 = int(fp8_vt_start(p, t.b, t.seq.k_start)) + (t.n_end - 1 - i) * kBlockN;
          tma_load_4d(sV + stage * T::kKVBytes, &pw.tma_v, full_v + 8 * stage, col0, 0, t.hk,
                      p.cu_seqlens_k ? 0 : t.b);
        };
        auto load_v = [&](int i) {
          if constexpr (T::kFp8) {
            load_vt(i);
          } else {
            load(&pw.tma_v, sV, full_v, empty_v, i);
          }
        };
        // In the order the consumers need them: K(0); then K(i + 1) and V(i),
        // which the consumers' i-th loop step reads together.
        load(&pw.tma_k, sK, full_k, empty_k, 0);
        for (int i = 0; i < count; ++i) {
          if (i + 1 < count) load(&pw.tma_k, sK, full_k, empty_k, i + 1);
          load_v(i);
        }
        loaded += count;
      }
      tile = next;
    }
    return;
  }

  // ------------------------------------------------------------ consumers
  setmaxnreg_inc<T::kConsumerRegs>();
  const int cw = wg - 1;  // this consumer warpgroup

  // Turns (kPingPong): a consumer issues its wgmmas only between
  // turn_begin (bar.sync on its own barrier) and turn_end (bar.arrive on
  // the next consumer's), round robin from consumer 0; the last consumer
  // opens the first turn. Every consumer takes count + 1 turns a tile (S(0)
  // alone, count - 1 steps, P V of the last block), so the last consumer's
  // final arrival is left over at the end, and consumer 0 takes it then
  // (every barrier ends with as many arrivals as waits).
  auto turn_begin = [&]() {
    if constexpr (T::kPingPong) named_barrier_sync(T::kTurnBarrier + cw, 256);
  };
  auto turn_end = [&]() {
    if constexpr (T::kPingPong) named_barrier_arrive(T::kTurnBarrier + (cw + 1) % T::kConsumerWGs, 256);
  };
  if constexpr (T::kPingPong) {
    if (cw == T::kConsumerWGs - 1) named_barrier_arrive(T::kTurnBarrier, 256);
  }
  // This warp is done reading a stage (its wgmmas on it have completed:
  // wgmma.wait_group is warp-synchronous, so every lane has passed it).
  auto release = [&](uint32_t empty_bar) {
    if (lane == 0) mbar_arrive(empty_bar);
  };
  // A row's max moves only by more than 8 (log2 units) and O is rescaled
  // only when some row of the warp moved (OnlineSoftmax::update_stats): in
  // one run on the H200 (bf16, B 2, 8k, H x D = 2048, non-causal, against
  // the exact max) softcap 1.16x, dropout 1.07x, ALiBi 1.03x, head dim 64
  // 1.05x faster; plain head dim 128 0.92x (0.98x causal) and 256 0.95x
  // slower, where the softmax hides under the other warpgroup's GEMMs
  // anyway and the vote and branch only lengthen the step. Dropout keeps P
  // as it is (apply_dropout; 1 / (1 - p) is the epilogue's), so P stays
  // below 2^8 in fp16 too.
  // FP8: no slack (P would reach 2^(8 + kPShift), past e4m3's 448).
  constexpr bool kSlackFits = !T::kFp8;
  constexpr int kMaxSlack = (Rule::kFeatures != kNoFeatures || kHeadDim == 64) && kSlackFits ? 8 : 0;
  static_assert(!T::kFp8 || (Rule::kFeatures == kNoFeatures && !Rule::kHasBias && Rule::kDefersScale),
                "the FP8 forward takes the plain rule, whose exp2 FFMA carries the whole scale");

  int visited = 0;  // key blocks consumed so far: block `visited` is in stage visited % kStages
  for (int round = 0;; ++round) {
    int tile;
    if constexpr (T::kPersistent) {
      mbar_wait(bar_q, round & 1);
      tile = *slot;
      if (tile < 0) break;
    } else {
      if (round > 0) break;
      tile = ordered(blockIdx.x);
      mbar_wait(bar_q, 0);
    }
    const Tile t(p, tile, num_m_blocks);
    const int count = t.count(), n_end = t.n_end, b = t.b, h = t.h;
    const SeqInfo& seq = t.seq;
    // The outputs of a (batch, head), worked out where they are written
    // rather than held across the key loop: the epilogue decodes the tile
    // again from an opaque copy of its index (holding b, h and the
    // sequence's offsets through the loop spilled registers).
    auto out_ptr = [&](const Tile& t) {
      return static_cast<Out*>(p.out) + t.seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, t.b, t.h);
    };
    auto lse_ptr = [&](const Tile& t) { return p.softmax_lse + t.seq.lse_offset(p, t.b, t.h); };
    auto residual_ptr = [&](const Tile& t) {
      return p.lse_residual ? p.lse_residual + t.seq.lse_offset(p, t.b, t.h) : nullptr;
    };
    if (t.past_end() || count <= 0) {
      // No key visible to any row: out = 0, lse = +inf (or the sink), residual 0.
      if (!t.past_end()) {
        write_empty_block<kBlockM, kHeadDim, 128 * T::kConsumerWGs>(p, h, out_ptr(t), lse_ptr(t), residual_ptr(t),
                                                                    t.row0, seq.seqlen_q, tid - 128);
      }
      if constexpr (T::kPersistent) mbar_arrive(empty_q);
      continue;
    }
    const int wg_row0 = t.row0 + 64 * cw;             // this warpgroup's first row
    const int warp_row0 = wg_row0 + 16 * (warp % 4);  // this warp's first row
    const uint32_t sQ_wg = sQ + 64 * cw * kLineBytes;

    float acc_o[1][kDT][4] = {};
    float s[1][kNT][4];
    float factor[1][2];

    // Scores of key block nb to probabilities (P in place), as in the classic
    // kernel: the score rule, the softmax statistics (returning the factors O
    // must be rescaled by), then dropout.
    const Rule rule(p, t.geo, b, h);
    // FP8: the q and k descales of this (batch, kv head) join the exp2 scale
    // (16-bit inputs keep reading the scale at its use, a constant-bank operand).
    // A zero product (q or k all zero, quantized with descale 0) becomes a tiny
    // positive one, as the host does with a zero softmax_scale: every score
    // is then 0, and masked ones stay -inf instead of 0 x -inf = NaN.
    const float qk_descale = T::kFp8 ? fmaxf(p.q_descale.at(b, t.hk) * p.k_descale.at(b, t.hk), 1e-30f) : 1.f;
    OnlineSoftmax<1> softmax;
    softmax.init();
    auto softmax_block = [&](float (&s)[1][kNT][4], float (&factor)[1][2], int nb) {
      const int col0 = nb * kBlockN;
      apply_score_rule<64, kBlockN>(s, rule, wg_row0, warp_row0, col0, lane);
      softmax.template update_stats<kMaxSlack>(s, factor, T::kFp8 ? rule.exp_scale() * qk_descale : rule.exp_scale(),
                                               std::integral_constant<int, T::kPShift>{});
      apply_dropout(s, rule, warp_row0, col0, lane);  // after the row sums: lse does not see it
    };
    // P V: 16-bit P as k16 fragments and V read MN-major; e4m3 P as k32
    // fragments and V^T read K-major, N in pieces of 128 head-dim rows.
    auto pack_p = [&](auto& p_frag) {
      if constexpr (T::kFp8) {
        pack_a_frags_e4m3(p_frag, s[0]);
      } else {
        pack_a_frags<Element>(p_frag, s[0]);
      }
    };
    auto gemm_o = [&](const auto& p_frag, uint32_t sv) {
      if constexpr (T::kFp8) {
#pragma unroll
        for (int n = 0; n < kHeadDim / 128; ++n) {
          auto& acc = *reinterpret_cast<float(*)[16][4]>(&acc_o[0][n * 16]);
          wgmma_rs_e4m3_b_kmajor<128>(acc, p_frag, sv + n * 128 * kLineBytes);
        }
      } else {
        gemm_pv<Element, kHeadDim, kBlockN>(acc_o[0], p_frag, sv);
      }
    };
    // Stage and round of the tile's key block i.
    auto stage_of = [&](int i) { return (visited + i) % kStages; };
    auto parity_of = [&](int i) { return ((visited + i) / kStages) & 1; };

    uint32_t p_frag[kBlockN / kKStep<Element>][4];

    // S(0) = Q K(0)^T.
    mbar_wait(full_k + 8 * stage_of(0), parity_of(0));
    turn_begin();
    wgmma_fence();
    gemm_qk<Element, kHeadDim, kBlockM, kBlockN>(s[0], sQ_wg, sK + stage_of(0) * T::kKVBytes);
    wgmma_commit();
    turn_end();
    wgmma_wait<0>();
    fence_regs(s[0]);
    release(empty_k + 8 * stage_of(0));
    softmax_block(s, factor, n_end - 1);  // acc_o is zero: no rescale needed
    if constexpr (kVarlen && !T::kFp8) {
      zero_v_tail<T>(sV + stage_of(0) * T::kKVBytes, full_v + 8 * stage_of(0), parity_of(0),
                     seq.seqlen_k - (n_end - 1) * kBlockN);
    }

    // Step i: S(i + 1) = Q K(i + 1)^T and O += P(i) V(i) on the tensor cores;
    // the softmax of S(i + 1) under O += P V; release K(i + 1) and V(i);
    // rescale O. The last block (no S to compute) is peeled off, which keeps
    // the loop body free of branches around the wgmmas (ptxas serializes
    // them otherwise).
    for (int i = 0; i < count - 1; ++i) {
      pack_p(p_frag);
      const int sk = stage_of(i + 1), sv = stage_of(i);
      mbar_wait(full_k + 8 * sk, parity_of(i + 1));
      mbar_wait(full_v + 8 * sv, parity_of(i));
      turn_begin();
      wgmma_fence();
      gemm_qk<Element, kHeadDim, kBlockM, kBlockN>(s[0], sQ_wg, sK + sk * T::kKVBytes);
      wgmma_commit();
      gemm_o(p_frag, sV + sv * T::kKVBytes);
      wgmma_commit();
      turn_end();
      wgmma_wait<1>();
      fence_regs(s[0]);
      release(empty_k + 8 * sk);
      softmax_block(s, factor, n_end - 2 - i);
      const bool keep_o = kMaxSlack > 0 && OnlineSoftmax<1>::all_factors_one(factor);
      wgmma_wait<0>();
      fence_regs(acc_o[0]);
      fence_regs(p_frag);
      release(empty_v + 8 * sv);
      if (!keep_o) OnlineSoftmax<1>::rescale(acc_o, factor);
    }
    // Every S product has completed: Q is free for the next tile's (O has
    // a staging tile of its own).
    if constexpr (T::kPersistent) mbar_arrive(empty_q);
    pack_p(p_frag);
    {
      const int sv = stage_of(count - 1);
      mbar_wait(full_v + 8 * sv, parity_of(count - 1));
      turn_begin();
      wgmma_fence();
      gemm_o(p_frag, sV + sv * T::kKVBytes);
      wgmma_commit();
      turn_end();
      wgmma_wait<0>();
      fence_regs(acc_o[0]);
      fence_regs(p_frag);
      release(empty_v + 8 * sv);
    }
    visited += count;

    // Epilogue (the classic kernel's): O / rowsum through this warpgroup's own
    // rows of the staging tile, then coalesced 16-byte stores. Where the tile
    // is the Q tile (one query block per thread block), the last read of Q
    // (S of the last block) has completed; where it is a buffer of its own,
    // this warpgroup's reads of the previous tile's rows have completed once
    // all its threads pass the barrier below. FP8's v_descale and dropout's
    // 1 / (1 - p) join 1 / rowsum.
    if (round > 0) named_barrier_sync(T::kEpilogueBarrier + cw, 128);
    int tile_again = tile;
    asm volatile("" : "+r"(tile_again));
    const Tile te(p, tile_again, num_m_blocks);
    const float out_scale = (T::kFp8 ? p.v_descale.at(te.b, te.hk) : 1.f) * rule.dropout_out_scale();
    store_output<kBlockM>(p, softmax, acc_o, smem + T::kOOff, cw, T::kEpilogueBarrier + cw, te.row0 + 64 * cw,
                          te.seq.seqlen_q, tile_again, num_m_blocks, out_ptr(te), lse_ptr(te), residual_ptr(te),
                          out_scale);
  }
  if constexpr (T::kPingPong) {
    if (cw == 0) named_barrier_sync(T::kTurnBarrier, 256);  // the last consumer's final turn_end
  }
#endif  // FLASH_SM90_ENABLED
}

}  // namespace sm90
}  // namespace flash
