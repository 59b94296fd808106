// The two small kernels around the main backward kernel.
//   preprocess:  D_i = rowsum(dO_i ∘ O_i) - dsoftmax_lse_i  (fp32, (B, H, Sq));
//                also zeroes the row's fp32 dq_accum (when there is one),
//                which a memset did before it: at 1k, B 16, H 16, head dim
//                128 on an H200 the two took 30 + 48 us of an 825 us
//                backward, the fused kernel 72 us
//   postprocess: dq = softmax_scale * dq_accum, in the input dtype
// Both are memory bound and move 16-byte chunks.
#pragma once

#include "../flash_params.h"
#include "flash_bwd_common.cuh"

namespace flash {

// 8 threads per row (b, s, h); each sums kHeadDim/64 chunks of 8 elements
// (unrolled: all of a thread's loads are in flight at once).
template <typename Element, int kHeadDim>
__global__ void flash_bwd_preprocess_kernel(const FlashBwdParams p) {
  constexpr int kThreadsPerRow = 8, kChunks = kHeadDim / 8;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kThreadsPerRow;
  const int sub = threadIdx.x % kThreadsPerRow;
  const int64_t num_rows = int64_t(p.batch) * p.seqlen_q * p.nheads;
  const bool valid = row < num_rows;
  const int h = valid ? row % p.nheads : 0;
  const int s = valid ? (row / p.nheads) % p.seqlen_q : 0;
  const int b = valid ? row / (int64_t(p.nheads) * p.seqlen_q) : 0;
  float sum = 0.f;
  if (valid) {
    const Element* o = static_cast<const Element*>(p.out) + b * p.o_batch_stride + s * p.o_row_stride + h * p.o_head_stride;
    const Element* d = static_cast<const Element*>(p.dout) + b * p.do_batch_stride + s * p.do_row_stride +
                       h * p.do_head_stride;
    // dq_accum is (B, Sq, H, kHeadDim) contiguous: row `row` of it.
    float4* acc = p.dq_accum != nullptr ? reinterpret_cast<float4*>(p.dq_accum + row * kHeadDim) : nullptr;
#pragma unroll
    for (int it = 0; it < (kChunks + kThreadsPerRow - 1) / kThreadsPerRow; ++it) {
      const int c = sub + it * kThreadsPerRow;
      if (c < kChunks) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8);
        const uint4 dv = *reinterpret_cast<const uint4*>(d + c * 8);
        if (acc != nullptr) acc[2 * c] = acc[2 * c + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
        const Element* oe = reinterpret_cast<const Element*>(&ov);
        const Element* de = reinterpret_cast<const Element*>(&dv);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += to_float(oe[i]) * to_float(de[i]);
      }
    }
  }
  // The 8 lanes of a row are consecutive and aligned within the warp.
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (valid && sub == 0) {
    const int64_t idx = (int64_t(b) * p.nheads + h) * p.seqlen_q + s;
    p.softmax_d[idx] = sum - (p.dsoftmax_lse ? p.dsoftmax_lse[idx] : 0.f);
  }
}

// One thread per 8 elements of dq; dq_accum is (B, Sq, H, kHeadDim) contiguous.
template <typename Element, int kHeadDim>
__global__ void flash_bwd_postprocess_kernel(const FlashBwdParams p) {
  constexpr int kChunks = kHeadDim / 8;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_chunks = int64_t(p.batch) * p.seqlen_q * p.nheads * kChunks;
  if (idx >= num_chunks) return;
  const int c = idx % kChunks;
  const int64_t row = idx / kChunks;
  const int h = row % p.nheads;
  const int s = (row / p.nheads) % p.seqlen_q;
  const int b = row / (int64_t(p.nheads) * p.seqlen_q);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + idx * 8);
  const float4 lo = src[0], hi = src[1];
  const float sc = p.softmax_scale_f;
  uint4 out;
  out.x = pack2<Element>(lo.x * sc, lo.y * sc);
  out.y = pack2<Element>(lo.z * sc, lo.w * sc);
  out.z = pack2<Element>(hi.x * sc, hi.y * sc);
  out.w = pack2<Element>(hi.z * sc, hi.w * sc);
  Element* dst = static_cast<Element*>(p.dq) + b * p.dq_batch_stride + s * p.dq_row_stride + h * p.dq_head_stride;
  *reinterpret_cast<uint4*>(dst + c * 8) = out;
}

}  // namespace flash
