// The FP8 forward's V transpose: v (batch, seqlen_k, nheads_k, headdim) or
// varlen (total_k, nheads_k, headdim), float8_e4m3fn, to the v_t layout the
// kernel reads as the K-major B operand of O += P V (flash_params.h, v_t):
// headdim rows of keys, the keys of every 32-key group in the order of the
// kernel's P fragments (hopper/wgmma.cuh, pack_a_frags_e4m3: position
// 16h + 4t + 2i + e holds key 16h + 8i + 2t + e), zero past each sequence's
// keys up to its next multiple of 128 columns.
//
// Why a kernel of our own: the permuted transpose as a torch copy of an
// 8-dim permuted view gathers single bytes 1-2 KB apart (not measured;
// expected far below the bandwidth the attention's time allows), while this
// kernel reads and writes V once in 16-byte accesses: ~2 |V| bytes, e.g.
// 64 MB at 16k tokens x 2048 (H x D), an expected ~20 us on an H200 next to
// the attention's hundreds. One thread block per (64 columns,
// 64 head-dim rows, kv head, sequence): 256 threads load 64 keys x 64 bytes
// (a 16-byte load each) into shared memory, then each writes 16 permuted
// columns of one row (a 16-byte store each). Plain CUDA, every
// architecture (only Hopper calls it).
#include <cuda_runtime.h>

#include <cstdint>

#include "../flash_params.h"
#include "../seq_info.h"
#include "cuda_check.h"
#include "flash_launch.h"

namespace flash {
namespace {

constexpr int kCols = 64;   // key columns per block (two 32-key groups)
constexpr int kRows = 64;   // head-dim rows (bytes of a key) per block
constexpr int kPitch = 68;  // shared row pitch in bytes: the column reads of a warp spread over banks

// The key at position c of its 32-key group (see the file comment).
__device__ __forceinline__ int permuted_key(int c) {
  const int h = (c >> 4) & 1, t = (c >> 2) & 3, i = (c >> 1) & 1, e = c & 1;
  return (c & ~31) | (h << 4) | (i << 3) | (t << 1) | e;
}

__global__ void __launch_bounds__(256) fp8_transpose_v_kernel(const __grid_constant__ FlashFwdParams p,
                                                              uint8_t* __restrict__ vt, int col_tiles) {
  __shared__ uint32_t tile_words[kCols * kPitch / 4];
  uint8_t* tile = reinterpret_cast<uint8_t*>(tile_words);
  const int b = blockIdx.x / col_tiles, c0 = (blockIdx.x % col_tiles) * kCols;
  const int d_tiles = p.headdim / kRows;
  const int hk = blockIdx.y / d_tiles, d0 = (blockIdx.y % d_tiles) * kRows;
  const SeqInfo seq(p, b);
  const int region = (seq.seqlen_k + 127) / 128 * 128;  // the columns the attention kernel may read
  if (c0 >= region) return;
  const int tid = threadIdx.x;
  {
    // Key c0 + r of the sequence, bytes d0 + 16 q .. + 15; zero past its keys.
    const int r = tid / 4, q = tid % 4;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (c0 + r < seq.seqlen_k) {
      const uint8_t* src = static_cast<const uint8_t*>(p.v) +
                           seq.k_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, hk) +
                           int64_t(c0 + r) * p.v_row_stride + d0 + 16 * q;
      x = *reinterpret_cast<const uint4*>(src);
    }
    uint32_t* dst = reinterpret_cast<uint32_t*>(tile + r * kPitch + 16 * q);
    dst[0] = x.x, dst[1] = x.y, dst[2] = x.z, dst[3] = x.w;
  }
  __syncthreads();
  {
    // Row d0 + d of v_t, columns c0 + 16 q .. + 15.
    const int d = tid / 4, q = tid % 4;
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t word = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        word |= uint32_t(tile[permuted_key(16 * q + 4 * j + e) * kPitch + d]) << (8 * e);
      }
      w[j] = word;
    }
    const int64_t col = fp8_vt_start(p, b, seq.k_start) + c0 + 16 * q;
    uint8_t* dst = vt + (p.cu_seqlens_k ? 0 : b * p.vt_batch_stride) + hk * p.vt_head_stride +
                   int64_t(d0 + d) * p.vt_dim_stride + col;
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace
}  // namespace flash

void run_fp8_transpose_v(const FlashFwdParams& params, void* vt, cudaStream_t stream) {
  // Every sequence's columns up to the 128-multiple above its keys (at most
  // the call's seqlen_k / max_seqlen_k); blocks past a shorter one return.
  const int col_tiles = (params.seqlen_k + 127) / 128 * (128 / flash::kCols);
  const int64_t blocks_x = int64_t(col_tiles) * params.batch;
  FLASH_CHECK(params.headdim % flash::kRows == 0 && blocks_x < (int64_t(1) << 31),
              "flash_attn_ext: FP8 V transpose: unsupported shape");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(params.nheads_k * (params.headdim / flash::kRows)));
  flash::fp8_transpose_v_kernel<<<grid, 256, 0, stream>>>(params, static_cast<uint8_t*>(vt), col_tiles);
  FLASH_CUDA_LAUNCH_CHECK();
}
