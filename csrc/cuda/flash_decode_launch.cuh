// Launchers of the split-KV decode kernel (flash_decode_kernel.cuh): the
// tile configuration that fits the shared-memory budget, the number of
// splits, and the two launches (decode, then combine when split).
// Instantiated per (dtype, head dim) in flash_decode_{fp16,bf16}.cu; the
// host code (flash_decode_host.cpp) sees only flash_decode.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "device_props.cuh"
#include "flash_decode.h"
#include "flash_decode_kernel.cuh"

namespace flash {
namespace decode {

// Pipeline depth by head dim: about 100 KB of shared memory per block at
// head dim 128 (three stages of 64-key K and V tiles), so that two blocks
// fit an H100/H200 SM with two tiles each in flight; head dims up to 64 take
// four stages, 192/256 two. GPUs with less shared memory (A100: 163 KB per
// block, sm86/89: 99 KB) fall back to two warps and two stages.
template <typename Element, int kHeadDim>
struct DecodeConfigs {
  static constexpr int kStages = kHeadDim <= 64 ? 4 : (kHeadDim <= 128 ? 3 : 2);
  using Primary = DecodeTraits<Element, kHeadDim, 4, kStages>;
  using Small = DecodeTraits<Element, kHeadDim, 2, 2>;
};

template <typename Element, int kHeadDim, typename Fn>
void with_config(Fn&& fn) {
  using C = DecodeConfigs<Element, kHeadDim>;
  launch_first_fitting<typename C::Primary, typename C::Small>("decode", kHeadDim, smem_budget(), fn);
}

// Blocks of this configuration one SM holds, asked once per device.
template <typename Traits>
int blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int device = 0;
  FLASH_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) device = 0;
  if (cache[device] == 0) {
    auto kernel = flash_decode_kernel<Traits, false>;
    FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
    int n = 0;
    FLASH_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Traits::kNThreads, Traits::kSmemBytes));
    cache[device] = std::max(n, 1);
  }
  return cache[device];
}

inline int num_row_chunks(const FlashKvcacheParams& p, int rows_per_block) {
  const int64_t rows = static_cast<int64_t>(p.seqlen_q) * (p.nheads / p.nheads_k);
  return static_cast<int>((rows + rows_per_block - 1) / rows_per_block);
}

// The split count for `base` blocks per split and at most `tiles` key tiles
// per sequence, on `slots` concurrent blocks (SMs x blocks per SM): the
// smallest count whose last wave is at least 95% as full as the best count
// up to `tiles` manages. Decoding one sequence with 8 kv heads on an H200
// (132 SMs, 2 blocks each) gives 32 splits; a batch of 64 such sequences
// fills the GPU without splitting. The tile count is the cache's capacity,
// the longest the sequences can be (their lengths live on the device).
inline int choose_splits(int64_t base, int tiles, int slots) {
  const int max_splits = std::max(1, std::min(tiles, 256));
  auto fill = [&](int s) {
    const int64_t blocks = base * s, waves = (blocks + slots - 1) / slots;
    return static_cast<double>(blocks) / static_cast<double>(waves * slots);
  };
  double best = 0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, fill(s));
  for (int s = 1; s <= max_splits; ++s) {
    if (fill(s) >= 0.95 * best) return s;
  }
  return 1;
}

}  // namespace decode
}  // namespace flash

template <typename Element, int kHeadDim>
int plan_flash_decode(const FlashKvcacheParams& params, int requested_splits) {
  int splits = 1;
  flash::decode::with_config<Element, kHeadDim>([&](auto tag) {
    using Traits = typename decltype(tag)::type;
    const int tiles = std::max(1, (params.capacity + Traits::kBlockN - 1) / Traits::kBlockN);
    if (requested_splits > 0) {
      splits = std::min(requested_splits, tiles);
      return;
    }
    const int64_t base = static_cast<int64_t>(params.batch) * params.nheads_k *
                         flash::decode::num_row_chunks(params, Traits::kRows);
    const int slots = flash::current_device_props().num_sms * flash::decode::blocks_per_sm<Traits>();
    splits = flash::decode::choose_splits(base, tiles, slots);
  });
  return splits;
}

template <typename Element, int kHeadDim>
void run_flash_decode(const FlashKvcacheParams& params, cudaStream_t stream) {
  flash::decode::with_config<Element, kHeadDim>([&](auto tag) {
    using Traits = typename decltype(tag)::type;
    const int chunks = flash::decode::num_row_chunks(params, Traits::kRows);
    const int64_t blocks = static_cast<int64_t>(params.batch) * params.nheads_k * chunks * params.num_splits;
    FLASH_CHECK(blocks <= 0x7fffffff, "flash_attn_ext: the decode grid (batch * nheads_k * row chunks * num_splits = ",
                std::to_string(blocks), " blocks) exceeds 2**31 - 1; use fewer splits");
    auto launch = [&](auto kernel) {
      FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
      kernel<<<static_cast<unsigned>(blocks), Traits::kNThreads, Traits::kSmemBytes, stream>>>(params, chunks);
      FLASH_CUDA_LAUNCH_CHECK();
    };
    if (flash::has_score_mods(params)) {
      launch(flash::decode::flash_decode_kernel<Traits, true>);
    } else {
      launch(flash::decode::flash_decode_kernel<Traits, false>);
    }
  });
  if (params.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(params.batch) * params.nheads * params.seqlen_q;
    flash::decode::flash_decode_combine_kernel<Element, kHeadDim>
        <<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(params);
    FLASH_CUDA_LAUNCH_CHECK();
  }
}
