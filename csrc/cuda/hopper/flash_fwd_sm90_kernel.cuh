// FlashAttention forward on Hopper warpgroup MMAs (sm_90a), head dims 64, 128
// and 256. One thread block per (query block of 128 rows, head, batch); two
// warpgroups own 64 rows each (wgmma's M). Per key block j (last to first, so
// the blocks that need masking come first):
//     S = Q K_j^T  (wgmma, Q and K_j read in place from swizzled smem)
//     online softmax in registers (softmax.cuh), P as the register A operand
//     O += P V_j   (wgmma, V_j read MN-major)
// Software pipeline inside each warpgroup: S_{j+1} = Q K_{j+1}^T is issued
// together with O += P_j V_j, and the softmax of S_{j+1} runs while the P V
// product is still on the tensor cores; only the rescale of O by the new row
// maxima waits for it (OnlineSoftmax::update_stats / rescale). K and V are
// double-buffered with cp.async, one barrier per key block.
// Score features as in the mma.sync forward (sm80/flash_fwd_kernel.cuh): kHasBias
// and kFeatures (softcap, ALiBi, dropout) are template variants of the score
// rule, an attention sink joins the row sums in the epilogue
// (OnlineSoftmax::add_sink).
#pragma once

#include "../../flash_params.h"
#include "../../mask.h"
#include "../score_rule.cuh"
#include "../softmax.cuh"
#include "wgmma.cuh"

namespace flash {
namespace sm90 {

template <typename Element_, int kHeadDim_, int kBlockN_, int kWarpgroups_ = 2>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kWarpgroups = kWarpgroups_;  // each owns 64 query rows
  static constexpr int kHeadDim = kHeadDim_, kBlockM = 64 * kWarpgroups, kBlockN = kBlockN_;
  static constexpr int kNThreads = 128 * kWarpgroups;
  // One warpgroup per block: two blocks share an SM and, synchronizing only
  // themselves, drift apart, so one's softmax overlaps the other's MMAs.
  static constexpr int kMinBlocks = kWarpgroups == 1 ? 2 : 1;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kQBytes;     // 2 stages
  static constexpr int kVOff = kKOff + 2 * kKVBytes;  // 2 stages
  static constexpr int kSmemBytes = kVOff + 2 * kKVBytes + 1024;  // + realignment to the swizzle atom
  static_assert(kHeadDim % 64 == 0 && (kBlockN == 64 || kBlockN == 128), "unsupported tile");
};

// O (64 x kHeadDim) += P (64 x kBlockN, register A fragments) V, V (kBlockN x
// kHeadDim) in SW128 panels of kBlockN rows, read MN-major; N is issued in
// pieces of at most 128 columns.
template <typename Element, int kHeadDim, int kBlockN>
__device__ __forceinline__ void gemm_pv(float (&acc_o)[kHeadDim / 8][4], const uint32_t (&p)[kBlockN / 16][4],
                                        uint32_t sV) {
  constexpr int kN = kHeadDim < 128 ? kHeadDim : 128;
  constexpr uint32_t kPanel = kBlockN * kLineBytes;
#pragma unroll
  for (int s = 0; s < kBlockN / 16; ++s) {
#pragma unroll
    for (int n = 0; n < kHeadDim / kN; ++n) {
      auto& acc = *reinterpret_cast<float(*)[kN / 8][4]>(&acc_o[n * kN / 8]);
      wgmma_rs<Element, kN, 1>(acc, p[s], make_desc(sV + n * (kN / 64) * kPanel + s * 16 * kLineBytes, kPanel, 8 * kLineBytes),
                               true);
    }
  }
}

// The forward's epilogue for warpgroup `wg` of the block (64 query rows
// from `first_row`):
// the sink (when the call has one) joins the row sums, lse and its residual
// are written, and O / rowsum goes through the warpgroup's own rows of the
// tile at `tile` (kBlockM rows, SW128; the Q tile, which nothing reads any
// more) and out to global memory in coalesced 16-byte stores, after named
// barrier `barrier` (128 threads) says the warpgroup's rows are written.
// out_scale multiplies every output (the FP8 forward's v_descale, dropout's
// 1 / (1 - p); 1 else).
// Shared by the classic and the warp-specialized kernels.
template <int kBlockM, typename Element, int kDT>
__device__ __forceinline__ void store_output(const FlashFwdParams& p, OnlineSoftmax<1>& softmax,
                                             float (&acc_o)[1][kDT][4], char* tile, int wg, int barrier,
                                             int first_row, int seqlen_q, int block_index, int num_m_blocks,
                                             Element* out, float* lse_out, float* residual_out,
                                             float out_scale = 1.f) {
  constexpr int kHeadDim = kDT * 8;
  const int tid = threadIdx.x, lane = tid % 32, warp = (tid / 32) % 4, g = lane / 4, t = lane % 4;
  const int tile_row0 = 64 * wg;  // this warpgroup's first row in the tile
  float inv_sum[1][2], lse[1][2], residual[1][2];
  if (p.sinks != nullptr) {
    // The head again, from an opaque copy of the block index (blockIdx.x, or
    // the persistent grid's tile): reusing h would keep it alive across the
    // key loop of every call, with a sink or without.
    int sink_block = block_index;
    asm volatile("" : "+r"(sink_block));
    softmax.add_sink(sink_log2(p, (sink_block / num_m_blocks) % p.nheads), acc_o, t == 0);
  }
  softmax.finalize(inv_sum, lse, residual);
  inv_sum[0][0] *= out_scale, inv_sum[0][1] *= out_scale;
  if (t == 0) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int row = first_row + 16 * warp + 8 * hr + g;
      if (row >= 0 && row < seqlen_q) {  // first_row < 0: WsFwdTraits::kAlignEnd
        lse_out[row] = lse[0][hr];
        if (residual_out) residual_out[row] = residual[0][hr];
      }
    }
  }
#pragma unroll
  for (int dj = 0; dj < kDT; ++dj) {
    acc_o[0][dj][0] *= inv_sum[0][0], acc_o[0][dj][1] *= inv_sum[0][0];
    acc_o[0][dj][2] *= inv_sum[0][1], acc_o[0][dj][3] *= inv_sum[0][1];
  }
  store_frag_sw128<kHeadDim, Element>(tile, kBlockM, tile_row0 + 16 * warp, 0, acc_o[0], lane);
  named_barrier_sync(barrier, 128);  // this warpgroup's rows are written
  constexpr int kChunks = kHeadDim / 8;
  const int wtid = tid % 128;
#pragma unroll
  for (int i = 0; i < 64 * kChunks / 128; ++i) {
    const int idx = wtid + 128 * i;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = first_row + r;
    if (row >= 0 && row < seqlen_q) {
      *reinterpret_cast<uint4*>(out + int64_t(row) * p.o_row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + swizzled_offset(kBlockM, tile_row0 + r, c * 8));
    }
  }
}

// S (64 x kBlockN) = Q_wg K^T, both K-major.
template <typename Element, int kHeadDim, int kBlockM, int kBlockN>
__device__ __forceinline__ void gemm_qk(float (&s)[kBlockN / 8][4], uint32_t sQ_wg, uint32_t sK) {
  wgmma_abt_kmajor<Element, kBlockN, kHeadDim>(s, sQ_wg, kBlockM * kLineBytes, sK, kBlockN * kLineBytes);
}

template <typename T, bool kHasBias, int kFeatures>
__global__ void __launch_bounds__(T::kNThreads, T::kMinBlocks) flash_fwd_sm90_kernel(const __grid_constant__ FlashFwdParams p) {
#ifdef FLASH_SM90_ENABLED
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM, kBlockN = T::kBlockN, kHeadDim = T::kHeadDim;
  constexpr int kNT = kBlockN / 8, kDT = kHeadDim / 8;
  extern __shared__ char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t sQ = smem_u32(smem) + T::kQOff, sK = smem_u32(smem) + T::kKOff, sV = smem_u32(smem) + T::kVOff;

  // Heaviest query blocks first (causal), so short ones fill the tail.
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int m_block = num_m_blocks - 1 - int(blockIdx.x % num_m_blocks);
  const int bh = blockIdx.x / num_m_blocks;
  const int h = bh % p.nheads, b = bh / p.nheads;
  const int hk = h / (p.nheads / p.nheads_k);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wg = warp / 4;
  const int row0 = m_block * kBlockM;
  const int wg_row0 = row0 + 64 * wg;                  // this warpgroup's first row
  const int warp_row0 = wg_row0 + 16 * (warp % 4);     // this warp's first row

  const SeqInfo seq(p, b);
  if (row0 >= seq.seqlen_q) return;  // past the end of a shorter sequence (varlen)
  const MaskGeometry geo(p, seq);
  const int n_begin = geo.n_block_begin(row0, kBlockN);
  const int n_end = geo.n_block_end(row0, kBlockM, kBlockN);
  Element* out = static_cast<Element*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h);
  const int64_t lse_offset = seq.lse_offset(p, b, h);
  float* lse_out = p.softmax_lse + lse_offset;
  float* residual_out = p.lse_residual ? p.lse_residual + lse_offset : nullptr;

  if (n_begin >= n_end) {  // no key visible to any row: out = 0, lse = +inf (or the sink), residual 0
    write_empty_block<kBlockM, kHeadDim, T::kNThreads>(p, h, out, lse_out, residual_out, row0, seq.seqlen_q, tid);
    return;
  }

  const Element* q = static_cast<const Element*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, h);
  const Element* k = static_cast<const Element*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, hk);
  const Element* v = static_cast<const Element*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk);
  auto load_k = [&](int nb, int stage) {
    load_tile_sw128<kBlockN, kHeadDim, T::kNThreads>(smem + T::kKOff + stage * T::kKVBytes, k, p.k_row_stride,
                                                     nb * kBlockN, seq.seqlen_k, tid);
  };
  auto load_v = [&](int nb, int stage) {
    load_tile_sw128<kBlockN, kHeadDim, T::kNThreads>(smem + T::kVOff + stage * T::kKVBytes, v, p.v_row_stride,
                                                     nb * kBlockN, seq.seqlen_k, tid);
  };

  // Scores of key block nb to probabilities (P in place): the score rule,
  // then the softmax statistics, returning the factors O must be rescaled by,
  // then dropout (calls that ask for it; under the P V wgmma too).
  const CudaScoreRule<Element, kHasBias, kFeatures> rule(p, geo, b, h);
  OnlineSoftmax<1> softmax;
  softmax.init();
  auto softmax_block = [&](float (&s)[1][kNT][4], float (&factor)[1][2], int nb) {
    const int col0 = nb * kBlockN;
    apply_score_rule<64, kBlockN>(s, rule, wg_row0, warp_row0, col0, lane);
    softmax.update_stats(s, factor, rule.exp_scale());
    apply_dropout(s, rule, warp_row0, col0, lane);  // after the row sums: lse does not see it
  };

  // Prologue: Q and the first K, then V of the first block and K of the second.
  const int count = n_end - n_begin;  // key blocks, visited n_end - 1 down to n_begin
  load_tile_sw128<kBlockM, kHeadDim, T::kNThreads>(smem + T::kQOff, q, p.q_row_stride, row0, seq.seqlen_q, tid);
  load_k(n_end - 1, 0);
  cp_async_commit();
  load_v(n_end - 1, 0);
  if (count > 1) load_k(n_end - 2, 1);
  cp_async_commit();
  cp_async_wait<1>();
  fence_proxy_async();
  __syncthreads();

  const uint32_t sQ_wg = sQ + 64 * wg * kLineBytes;
  float acc_o[1][kDT][4] = {};
  float s[1][kNT][4];
  float factor[1][2];
  wgmma_fence();
  gemm_qk<Element, kHeadDim, kBlockM, kBlockN>(s[0], sQ_wg, sK);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s[0]);
  softmax_block(s, factor, n_end - 1);  // acc_o is zero: no rescale needed
  uint32_t p_frag[kBlockN / 16][4];

  // Iteration i: [barrier: V(i), K(i + 1) landed; everyone is done with
  // K(i) and V(i - 1)] issue V(i + 1), K(i + 2); S(i + 1) = Q K(i + 1)^T and
  // O += P(i) V(i) on the tensor cores; softmax(S(i + 1)) under O += P V;
  // rescale O. The last block (no S to compute) is peeled off, which keeps
  // the loop body free of branches around the wgmmas: ptxas serializes them
  // otherwise.
  auto barrier_and_prefetch = [&](int i) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    if (i + 1 < count) load_v(n_end - 2 - i, (i + 1) % 2);
    if (i + 2 < count) load_k(n_end - 3 - i, i % 2);
    cp_async_commit();
  };
  for (int i = 0; i < count - 1; ++i) {
    pack_a_frags<Element>(p_frag, s[0]);
    barrier_and_prefetch(i);
    wgmma_fence();
    gemm_qk<Element, kHeadDim, kBlockM, kBlockN>(s[0], sQ_wg, sK + ((i + 1) % 2) * T::kKVBytes);
    wgmma_commit();
    gemm_pv<Element, kHeadDim, kBlockN>(acc_o[0], p_frag, sV + (i % 2) * T::kKVBytes);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(s[0]);
    softmax_block(s, factor, n_end - 2 - i);
    wgmma_wait<0>();
    fence_regs(acc_o[0]);
    fence_regs(p_frag);
    OnlineSoftmax<1>::rescale(acc_o, factor);
  }
  pack_a_frags<Element>(p_frag, s[0]);
  barrier_and_prefetch(count - 1);
  wgmma_fence();
  gemm_pv<Element, kHeadDim, kBlockN>(acc_o[0], p_frag, sV + ((count - 1) % 2) * T::kKVBytes);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc_o[0]);
  fence_regs(p_frag);

  // Epilogue: O / rowsum through this warpgroup's own rows of the Q tile (no
  // other warpgroup reads them), then coalesced 16-byte stores.
  store_output<kBlockM>(p, softmax, acc_o, smem + T::kQOff, wg, 1 + wg, wg_row0, seq.seqlen_q, blockIdx.x,
                        num_m_blocks, out, lse_out, residual_out, rule.dropout_out_scale());
#endif  // FLASH_SM90_ENABLED
}

}  // namespace sm90
}  // namespace flash
