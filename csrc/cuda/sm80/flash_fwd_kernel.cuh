// FlashAttention-2 forward kernel on mma.sync m16n8k16 (sm80+).
//
// One thread block computes a kBlockM-row query tile of one (batch, head):
//  * kNWarps warps, warp w owning rows [w*kRowsPerWarp, (w+1)*kRowsPerWarp)
//    of the tile as kMT 16-row m-tiles (kMT = 2 for 128 rows over 4 warps, so
//    every K/V fragment read from shared memory feeds two MMAs);
//  * Q is copied once to shared memory with cp.async and, when kQInRegs, kept
//    in registers as A fragments for the whole key loop (else re-read with
//    ldmatrix each k-step, which leaves registers for larger head dims);
//  * K and V tiles (kBlockN keys) stream through a 2-stage cp.async pipeline
//    with one barrier per key block, placed either in front of S = Q K^T
//    (pipeline A: the loads of block j+1 are issued right after it) or in
//    front of O += P V (pipeline B: P V of block j and S of block j+1 then
//    form one branch-free instruction stream, which hides the ldmatrix
//    latency of one behind the MMAs of the other); see FwdTraits;
//  * S = Q K^T (fp32 accumulators), masking only on tiles that are not fully
//    visible, online softmax in registers with the scale folded into the exp2
//    FFMA, P converted to A fragments in registers, O += P V with V read
//    through ldmatrix.trans;
//  * shared memory rows are padded by 16 bytes (an odd number of 16-byte
//    units per row), which makes every 8-row ldmatrix phase and the epilogue's
//    4-byte stores bank-conflict free for any head dim;
//  * epilogue: O / rowsum written through the warp's own rows of the Q tile in
//    shared memory, then to global memory with coalesced 16-byte stores;
//    lse = (max + log2 sum) * ln 2, +inf and O = 0 for rows that saw no key.
//    An attention sink (params.sinks, read at run time) joins the row's sum
//    there (OnlineSoftmax::add_sink): lse includes it, and rows that saw no
//    key get O = 0 and lse = the sink.
// Variants (template arguments): kHasBias (an additive bias) and kFeatures
// (softcap, ALiBi, dropout; score_rule.h): the score rule with those steps
// compiled in, each instantiated only for the calls that use it
// (../variants.h).
// Key blocks are visited from the last to the first, so the blocks that need
// masking (past seqlen_k, the causal diagonal) come first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../../flash_params.h"
#include "../../mask.h"
#include "../primitives.cuh"
#include "../score_rule.cuh"
#include "../softmax.cuh"

namespace flash {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kQInRegs_,
          int kMinBlocks_, bool kCheckRescale_ = true, bool kBarrierBeforePV_ = false>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr bool kCheckRescale = kCheckRescale_;
  // Pipeline shape (see flash_fwd_kernel): false: one barrier per key block
  // in front of S = Q K^T; true: the barrier sits in front of O += P V, so
  // that P V of block j and Q K^T of block j + 1 form one instruction stream.
  static constexpr bool kBarrierBeforePV = kBarrierBeforePV_;

  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kMT = kRowsPerWarp / 16;  // 16-row m-tiles per warp
  static constexpr int kNT = kBlockN / 8;         // 8-column n-tiles of S
  static constexpr int kKT = kHeadDim / 16;       // k-steps of S = Q K^T
  static constexpr int kDT = kHeadDim / 8;        // 8-column n-tiles of O
  static constexpr int kPK = kBlockN / 16;        // k-steps of O += P V
  static constexpr int kChunks = kHeadDim / 8;    // 16-byte chunks per row
  static constexpr int kQFragM = kQInRegs ? kMT : 1;
  static constexpr int kQFragK = kQInRegs ? kKT : 1;

  // Shared-memory row pitch in elements / bytes: head dim plus one 16-byte pad.
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kPitchBytes = kPitch * 2;
  static constexpr int kQBytes = kBlockM * kPitchBytes;
  static constexpr int kKVBytes = kBlockN * kPitchBytes;
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes;  // Q, 2 x K, 2 x V

  static_assert(sizeof(Element) == 2, "fp16 / bf16 only");
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row m-tiles");
  static_assert(kBlockN % 16 == 0, "key block must be a multiple of 16");
  static_assert(kDT % 2 == 0 && kNT % 2 == 0, "fragments are loaded in pairs");
};

namespace fwd {

// The shared-memory addressed (32-bit) primitives (primitives.cuh).
using flash::cp_async_16;
using flash::ldsm_x4;
using flash::ldsm_x4_t;

// Copies `kRows` rows of kHeadDim elements (row pitch `row_stride` elements in
// global memory) into shared memory at `saddr`; rows >= rows_valid are
// zero-filled without being read.
template <typename Traits, int kRows>
__device__ __forceinline__ void load_tile(uint32_t saddr, const typename Traits::Element* gmem, int64_t row_stride,
                                          int rows_valid, int tid) {
  constexpr int kChunks = Traits::kChunks, kNThreads = Traits::kNThreads;
  if constexpr (kNThreads % kChunks == 0 && kRows % (kNThreads / kChunks) == 0) {
    // Every thread copies the same 16-byte column of rows r0, r0 + kRowStep, ...
    constexpr int kRowStep = kNThreads / kChunks;
    const int r0 = tid / kChunks, c = tid % kChunks;
    // Opaque to the optimiser, so that the per-row offsets i * step are not
    // hoisted out of the key loop into a register pair each.
    int64_t step = kRowStep * row_stride;
    asm volatile("" : "+l"(step));
    const auto* src = gmem + r0 * row_stride + c * 8;
    const uint32_t dst = saddr + r0 * Traits::kPitchBytes + c * 16;
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const bool pred = r0 + i * kRowStep < rows_valid;
      // With pred false the source is not read (src-size 0): no need to clamp it.
      cp_async_16(dst + i * kRowStep * Traits::kPitchBytes, src, pred);
      src += step;
    }
  } else {
    constexpr int kTotal = kRows * kChunks;
#pragma unroll
    for (int i = 0; i < (kTotal + kNThreads - 1) / kNThreads; ++i) {
      const int idx = tid + i * kNThreads;
      if (kTotal % kNThreads == 0 || idx < kTotal) {
        const int r = idx / kChunks, c = idx % kChunks;
        const bool pred = r < rows_valid;
        const auto* src = pred ? gmem + r * row_stride + c * 8 : gmem;
        cp_async_16(saddr + r * Traits::kPitchBytes + c * 16, src, pred);
      }
    }
  }
}

}  // namespace fwd

namespace fwd {

// S = Q K^T for one key block: s[kMT][kNT][4] (fp32 accumulators). Q comes
// from registers (kQInRegs) or from shared memory at sQ_lane (this lane's
// ldmatrix address of the warp's first m-tile), K from sK_lane.
template <typename Traits>
__device__ __forceinline__ void gemm_qk(float (&s)[Traits::kMT][Traits::kNT][4],
                                        const uint32_t (&q_frag)[Traits::kQFragM][Traits::kQFragK][4],
                                        uint32_t sQ_lane, uint32_t sK_lane) {
  using Element = typename Traits::Element;
  constexpr int kMT = Traits::kMT, kNT = Traits::kNT, kKT = Traits::kKT, kPitchBytes = Traits::kPitchBytes;
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNT; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKT; ++kk) {
    uint32_t a_smem[kMT][4];
    if constexpr (!Traits::kQInRegs) {
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) ldsm_x4(a_smem[mi], sQ_lane + mi * 16 * kPitchBytes + kk * 32);
    }
#pragma unroll
    for (int nj = 0; nj < kNT; nj += 2) {
      uint32_t bk[4];
      ldsm_x4(bk, sK_lane + nj * 8 * kPitchBytes + kk * 32);
      const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        if constexpr (Traits::kQInRegs) {
          mma_m16n8k16<Element>(s[mi][nj], q_frag[mi][kk], b0);
          mma_m16n8k16<Element>(s[mi][nj + 1], q_frag[mi][kk], b1);
        } else {
          mma_m16n8k16<Element>(s[mi][nj], a_smem[mi], b0);
          mma_m16n8k16<Element>(s[mi][nj + 1], a_smem[mi], b1);
        }
      }
    }
  }
}

// O += P V for one key block, P taken from the softmax'ed accumulators s.
template <typename Traits>
__device__ __forceinline__ void gemm_pv(float (&acc_o)[Traits::kMT][Traits::kDT][4],
                                        const float (&s)[Traits::kMT][Traits::kNT][4], uint32_t sV_lane) {
  using Element = typename Traits::Element;
  constexpr int kMT = Traits::kMT, kDT = Traits::kDT, kPK = Traits::kPK, kPitchBytes = Traits::kPitchBytes;
  uint32_t p[kMT][kPK][4];
  accum_to_a_frags<Element>(s, p);
#pragma unroll
  for (int kk = 0; kk < kPK; ++kk) {
#pragma unroll
    for (int dj = 0; dj < kDT; dj += 2) {
      uint32_t bv[4];
      ldsm_x4_t(bv, sV_lane + kk * 16 * kPitchBytes + dj * 16);
      const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        mma_m16n8k16<Element>(acc_o[mi][dj], p[mi][kk], b0);
        mma_m16n8k16<Element>(acc_o[mi][dj + 1], p[mi][kk], b1);
      }
    }
  }
}

// Scores of key block [col0, col0 + kBlockN) to probabilities: the score
// rule (bias; the mask only where the tile is not fully visible), then the
// online softmax update, then dropout (calls that ask for it).
template <typename Traits, typename Rule>
__device__ __forceinline__ void softmax_block(float (&s)[Traits::kMT][Traits::kNT][4],
                                              float (&acc_o)[Traits::kMT][Traits::kDT][4],
                                              OnlineSoftmax<Traits::kMT>& softmax, const Rule& rule, int row0,
                                              int warp_row0, int col0, int lane) {
  const float exp_scale = rule.exp_scale();
  apply_score_rule<Traits::kBlockM, Traits::kBlockN>(s, rule, row0, warp_row0, col0, lane);
  softmax.template update<Traits::kCheckRescale>(s, acc_o, exp_scale);
  apply_dropout(s, rule, warp_row0, col0, lane);  // after the row sums: lse does not see it
}

}  // namespace fwd

template <typename Traits, bool kHasBias, int kFeatures>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks)
    flash_fwd_kernel(const __grid_constant__ FlashFwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kMT = Traits::kMT, kNT = Traits::kNT, kKT = Traits::kKT, kDT = Traits::kDT;
  constexpr int kPitch = Traits::kPitch, kPitchBytes = Traits::kPitchBytes;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;
  constexpr uint32_t kKVBytes = Traits::kKVBytes;

  extern __shared__ uint4 smem_buf[];
  const uint32_t sQ = smem_u32(smem_buf);
  const uint32_t sK = sQ + Traits::kQBytes;  // 2 stages
  const uint32_t sV = sK + 2 * kKVBytes;     // 2 stages
  Element* const sQ_ptr = reinterpret_cast<Element*>(smem_buf);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;

  // Heaviest query blocks first (causal), so short ones fill the tail.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int row0 = m_block * kBlockM;
  const int warp_row0 = row0 + warp * kRowsPerWarp;  // first row of this warp

  // Per-lane ldmatrix byte offsets (fragment layouts: see softmax.cuh):
  // A (Q) row lane%16, column half lane/16; B (K, non-transposed) key
  // lane%8 + 8*(lane/16), column half (lane/8)%2; B (V, transposed) key
  // lane%16, column half lane/16.
  const uint32_t sQ_lane = sQ + (warp * kRowsPerWarp + (lane & 15)) * kPitchBytes + (lane >> 4) * 16;
  const uint32_t sK_lane = sK + ((lane & 7) + ((lane >> 4) << 3)) * kPitchBytes + ((lane >> 3) & 1) * 16;
  const uint32_t sV_lane = sV + (lane & 15) * kPitchBytes + (lane >> 4) * 16;

  const int total_bh = params.batch * params.nheads;
  for (int bh = blockIdx.y + blockIdx.z * gridDim.y; bh < total_bh; bh += gridDim.y * gridDim.z) {
    const int b = bh / params.nheads, h = bh - b * params.nheads;
    const int hk = h / (params.nheads / params.nheads_k);
    const SeqInfo seq(params, b);
    if (row0 >= seq.seqlen_q) continue;  // past the end of a shorter sequence (varlen); block-uniform
    const MaskGeometry geo(params, seq);
    const int n_begin = geo.n_block_begin(row0, kBlockN);
    const int n_end = geo.n_block_end(row0, kBlockM, kBlockN);
    const CudaScoreRule<Element, kHasBias, kFeatures> rule(params, geo, b, h);
    Element* out = static_cast<Element*>(params.out) +
                   seq.q_offset(params.o_batch_stride, params.o_row_stride, params.o_head_stride, b, h);
    const int64_t lse_offset = seq.lse_offset(params, b, h);
    float* lse_out = params.softmax_lse + lse_offset;
    float* residual_out = params.lse_residual ? params.lse_residual + lse_offset : nullptr;

    if (n_begin >= n_end) {
      // No key is visible to any row of this block: out = 0, lse = +inf (the
      // sink, where the head has one), residual 0.
      write_empty_block<kBlockM, Traits::kHeadDim, Traits::kNThreads>(params, h, out, lse_out, residual_out, row0,
                                                                     seq.seqlen_q, tid);
      continue;
    }

    const Element* q = static_cast<const Element*>(params.q) +
                       seq.q_offset(params.q_batch_stride, params.q_row_stride, params.q_head_stride, b, h) +
                       static_cast<int64_t>(row0) * params.q_row_stride;
    const Element* k = static_cast<const Element*>(params.k) +
                       seq.k_offset(params.k_batch_stride, params.k_row_stride, params.k_head_stride, b, hk);
    const Element* v = static_cast<const Element*>(params.v) +
                       seq.k_offset(params.v_batch_stride, params.v_row_stride, params.v_head_stride, b, hk);
    const int64_t k_step = static_cast<int64_t>(kBlockN) * params.k_row_stride;
    const int64_t v_step = static_cast<int64_t>(kBlockN) * params.v_row_stride;
    // Rows of key block nb that exist (0 for a block outside [n_begin, n_end),
    // whose copy then only zero-fills and reads nothing).
    auto rows_of = [&](int nb) { return nb >= n_begin ? seq.seqlen_k - nb * kBlockN : 0; };
    auto load_k = [&](int nb, int stage) {
      fwd::load_tile<Traits, kBlockN>(sK + stage * kKVBytes, k + nb * k_step, params.k_row_stride, rows_of(nb), tid);
    };
    auto load_v = [&](int nb, int stage) {
      fwd::load_tile<Traits, kBlockN>(sV + stage * kKVBytes, v + nb * v_step, params.v_row_stride, rows_of(nb), tid);
    };

    float acc_o[kMT][kDT][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int dj = 0; dj < kDT; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] = 0.f;
    OnlineSoftmax<kMT> softmax;
    softmax.init();
    uint32_t q_frag[Traits::kQFragM][Traits::kQFragK][4];
    auto load_q_frags = [&]() {
      if constexpr (Traits::kQInRegs) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
          for (int kk = 0; kk < kKT; ++kk) fwd::ldsm_x4(q_frag[mi][kk], sQ_lane + mi * 16 * kPitchBytes + kk * 32);
      }
    };
    float s[kMT][kNT][4];
    int n_block = n_end - 1;  // key blocks are visited from the last to the first

    if constexpr (!Traits::kBarrierBeforePV) {
      // Pipeline A. Iteration j: [barrier] issue K/V(j+1) -> stage^1;
      // S = Q K(j)^T; softmax; O += P V(j).
      fwd::load_tile<Traits, kBlockM>(sQ, q, params.q_row_stride, seq.seqlen_q - row0, tid);
      load_k(n_block, 0);
      load_v(n_block, 0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      load_q_frags();
      int stage = 0;
      while (true) {
        // K/V of n_block are in buffer `stage` and visible to every thread;
        // every warp is done with buffer stage^1: refill it.
        if (n_block > n_begin) {
          load_k(n_block - 1, stage ^ 1);
          load_v(n_block - 1, stage ^ 1);
          cp_async_commit();
        }
        fwd::gemm_qk<Traits>(s, q_frag, sQ_lane, sK_lane + stage * kKVBytes);
        fwd::softmax_block<Traits>(s, acc_o, softmax, rule, row0, warp_row0, n_block * kBlockN, lane);
        fwd::gemm_pv<Traits>(acc_o, s, sV_lane + stage * kKVBytes);
        if (--n_block < n_begin) break;
        stage ^= 1;
        cp_async_wait<0>();
        __syncthreads();
      }
    } else {
      // Pipeline B. Block j's K lives in K stage j%2, its V in V stage j%2.
      // Iteration j: [barrier: V(j), K(j+1) landed; everyone is done with
      // S(j) and P V(j-1)] issue V(j+1), K(j+2); O += P(j) V(j);
      // S(j+1) = Q K(j+1)^T; softmax(j+1).
      fwd::load_tile<Traits, kBlockM>(sQ, q, params.q_row_stride, seq.seqlen_q - row0, tid);
      load_k(n_block, 0);
      cp_async_commit();
      load_v(n_block, 0);
      load_k(n_block - 1, 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      load_q_frags();
      fwd::gemm_qk<Traits>(s, q_frag, sQ_lane, sK_lane);
      fwd::softmax_block<Traits>(s, acc_o, softmax, rule, row0, warp_row0, n_block * kBlockN, lane);
      int stage = 0;  // stage of block n_block
      for (; n_block > n_begin; --n_block, stage ^= 1) {
        cp_async_wait<0>();
        __syncthreads();
        load_v(n_block - 1, stage ^ 1);
        load_k(n_block - 2, stage);
        cp_async_commit();
        fwd::gemm_pv<Traits>(acc_o, s, sV_lane + stage * kKVBytes);
        fwd::gemm_qk<Traits>(s, q_frag, sQ_lane, sK_lane + (stage ^ 1) * kKVBytes);
        fwd::softmax_block<Traits>(s, acc_o, softmax, rule, row0, warp_row0, (n_block - 1) * kBlockN, lane);
      }
      cp_async_wait<0>();
      __syncthreads();
      fwd::gemm_pv<Traits>(acc_o, s, sV_lane + stage * kKVBytes);
    }

    // Epilogue.
    float inv_sum[kMT][2], lse[kMT][2], residual[kMT][2];
    if (params.sinks != nullptr) {
      // The head again, from an opaque copy of bh: reusing h would keep it
      // alive across the key loop of every call, with a sink or without.
      int sink_bh = bh;
      asm volatile("" : "+r"(sink_bh));
      softmax.add_sink(sink_log2(params, sink_bh % params.nheads), acc_o, t == 0);
    }
    softmax.finalize(inv_sum, lse, residual);
    {  // apply_dropout left dropout's 1 / (1 - p) to here (1 without dropout)
      const float drop_scale = rule.dropout_out_scale();
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) inv_sum[mi][0] *= drop_scale, inv_sum[mi][1] *= drop_scale;
    }
    if (t == 0) {
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int row = warp_row0 + mi * 16 + hr * 8 + g;
          if (row < seq.seqlen_q) {
            lse_out[row] = lse[mi][hr];
            if (residual_out) residual_out[row] = residual[mi][hr];
          }
        }
    }
    // The warp's own rows of the Q tile are read by this warp only, so they
    // can take the output without a block-wide barrier.
    __syncwarp();
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int dj = 0; dj < kDT; ++dj) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int r = warp * kRowsPerWarp + mi * 16 + hr * 8 + g;
          *reinterpret_cast<uint32_t*>(sQ_ptr + r * kPitch + dj * 8 + 2 * t) =
              pack2<Element>(acc_o[mi][dj][hr * 2] * inv_sum[mi][hr], acc_o[mi][dj][hr * 2 + 1] * inv_sum[mi][hr]);
        }
      }
    }
    __syncwarp();
    constexpr int kWarpChunks = kRowsPerWarp * Traits::kChunks;
#pragma unroll
    for (int i = 0; i < (kWarpChunks + 31) / 32; ++i) {
      const int idx = lane + i * 32;
      if (kWarpChunks % 32 == 0 || idx < kWarpChunks) {
        const int r = idx / Traits::kChunks, c = idx % Traits::kChunks;
        const int row = warp_row0 + r;
        if (row < seq.seqlen_q) {
          *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * params.o_row_stride + c * 8) =
              *reinterpret_cast<const uint4*>(sQ_ptr + (warp * kRowsPerWarp + r) * kPitch + c * 8);
        }
      }
    }
    // The next (batch, head) of this block reuses the shared memory.
    __syncthreads();
  }
}

}  // namespace flash
