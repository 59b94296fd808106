// Launchers of the split-KV decode kernel (flash_decode_kernel.cuh): the
// tile configuration that fits the shared-memory budget, the number of
// splits, and the two launches (decode, then combine when split).
// Instantiated per (dtype, head dim) in flash_decode_{fp16,bf16}.cu; the
// host code (flash_decode_host.cpp) sees only flash_decode.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_check.h"
#include "device_props.cuh"
#include "flash_decode.h"
#include "flash_decode_kernel.cuh"
#include "hopper/sm90_dispatch.cuh"

namespace flash {
namespace decode {

// ---- The decode configurations: THE table (the only place they are
// listed). Developer switch: FLASH_ATTN_EXT_DECODE_CONFIG=<name>, read on
// every call (empty: the first entry, the default), picks one for head dim
// 128, the benchmarked one (benchmarks/bench_decode.py --sweep times them
// all; tests/test_kvcache.py checks them all); the other head dims always
// run the first entry. An unknown name raises an error listing the names.
//   warps:  4 -> 64-key tiles (16 keys per warp), 2 -> 32-key tiles, ...
//   stages: pipeline depth; kStages - 1 tiles are in flight. About 110 KB
//           at 4 warps x 3 stages or 2 x 6 (two blocks per H100/H200 SM),
//           214 KB at 4 x 6 or 8 x 3 (one block per SM, more bytes in
//           flight).
//   (Head dims other than 128 keep the shape first tuned for them, 4 warps
//   and 4 / 3 / 2 stages up to head dim 64 / 128 / 256, with the first
//   entry's load, evict_first and pdl: at head dim 256 two warps of
//   cp.async spill registers, four do not.)
//   load:   kCpAsync (16-byte cp.async by every thread), kBulk (one TMA
//           bulk copy per K/V row onto an mbarrier) or kTma (tensor-map
//           boxes into swizzled panels, for the calls tma_maps_refusal
//           accepts, else kBulk of the same shape); kBulk and kTma are
//           sm_90a only, elsewhere the same shape runs with cp.async.
//   evict_first: L2 evict-first policy on the K/V copies (and, cp.async,
//           a 256-byte L2 prefetch size).
//   pdl:    programmatic dependent launch (sm_90a): the decode kernel may
//           start while the previous kernel on the stream drains, and the
//           combine kernel launches while the decode kernel runs; each waits
//           (griddepcontrol.wait) before reading what the other wrote.
// Where a configuration does not fit the shared-memory budget (A100, Ada,
// FLASH_ATTN_EXT_SMEM_BUDGET_KB) the small one (2 warps, 2 stages, cp.async)
// runs instead.
struct DecodeConfig {
  const char* name;
  int warps;
  int stages;
  DecodeLoad load;
  bool evict_first;
  bool pdl;
};
inline constexpr DecodeConfig kDecodeConfigs[] = {
    // name     warps stages load                  evict_first pdl
    // Sweep on an H200 (torch 2.11, bf16, hd 128, the 17 contiguous shapes of
    // bench_decode.py; geometric mean / minimum of ours / cuDNN, paged-16 /
    // contiguous), before the kTma load: b4s3p 0.936 / 0.917, 0.963 (the default then); b4s3 (no PDL)
    // 0.932; b8s3p 0.922; a4s3ep 0.919; a4s3p 0.918; a4s3 0.916 / 0.899,
    // 0.980; a4s6ep 0.899; a2s6ep 0.895; bulk copies with 6 stages (b2s6p,
    // b4s6p) 0.57-0.61, dropped with the other losers.
    // Tensor-map loads (kTma): see flash_decode_kernel.cuh's file comment
    // for why. Sweep on an H200 (same shapes, one process, ours / cuDNN):
    // t4s3p 1.006 geometric mean, 0.985 minimum (MHA batch 8), paged-16 /
    // contiguous 0.965 (the default); t4s2p (three blocks per SM, one tile
    // in flight each) 0.989 / 0.878 (batch 1 x 4k) but ahead of t4s3p by
    // 0.5-1.3% on caches of 1 GB and more; b4s3p 0.943 in that run.
    {"t4s3p", 4, 3, DecodeLoad::kTma, true, true},
    {"t4s2p", 4, 2, DecodeLoad::kTma, true, true},
    {"b4s3p", 4, 3, DecodeLoad::kBulk, true, true},
    {"a4s3", 4, 3, DecodeLoad::kCpAsync, false, false},  // the kernel as first measured, for comparisons
};
inline constexpr int kNumDecodeConfigs = sizeof(kDecodeConfigs) / sizeof(kDecodeConfigs[0]);
inline constexpr int kSweepHeadDim = 128;  // the head dim that instantiates every entry

constexpr int config_warps(int index, int head_dim) {
  return head_dim == kSweepHeadDim ? kDecodeConfigs[index].warps : 4;
}
constexpr int config_stages(int index, int head_dim) {
  return head_dim == kSweepHeadDim ? kDecodeConfigs[index].stages : (head_dim <= 64 ? 4 : (head_dim <= 128 ? 3 : 2));
}

// The entry FLASH_ATTN_EXT_DECODE_CONFIG names (0 when unset or empty).
inline int decode_config_from_env() {
  const char* env = std::getenv("FLASH_ATTN_EXT_DECODE_CONFIG");
  if (env == nullptr || env[0] == '\0') return 0;
  std::string names;
  for (int i = 0; i < kNumDecodeConfigs; ++i) {
    if (std::strcmp(env, kDecodeConfigs[i].name) == 0) return i;
    names += (i ? ", " : "") + std::string(kDecodeConfigs[i].name);
  }
  FLASH_CHECK(false, "flash_attn_ext: FLASH_ATTN_EXT_DECODE_CONFIG='", env,
              "' names no decode configuration; the configurations are: ", names);
  return 0;
}

// Whether sm_90a code runs here (bulk copies, programmatic dependent launch).
inline bool decode_sm90() { return flash::sm90::kBuilt && flash::sm90::enabled(); }

// Why the kTma load cannot take these parameters (null when it can), with
// the tensor maps it needs written to `maps`: the head dim is not a whole
// number of 64-column panels (or is padded), a paged cache's pages are not a
// multiple of 8 rows or the sequences are left-padded (boxes would straddle
// pages), or the driver's encoder refuses the cache's layout (alignment,
// strides). Called when planning and again when launching, so both pick the
// same kernel.
template <typename Element>
const char* tma_maps_refusal(const FlashKvcacheParams& p, int head_dim, int block_n, DecodeMaps* maps) {
  if (head_dim % 64 != 0 || p.headdim != head_dim) return "the head dim is not a multiple of 64";
  const bool paged = p.block_table != nullptr;
  if (paged && (p.page_size % 8 != 0 || p.cache_leftpad != nullptr)) {
    return "a paged cache whose pages are not a multiple of 8 rows, or with left padding";
  }
  const int box_rows = paged ? tma_box_rows(p.page_size, block_n) : block_n;
  const int64_t rows = paged ? p.page_size : p.capacity;
  constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
  const char* why = sm90::encode_bshd_map(&maps->k, p.k, kBf16, p.cache_rows, rows, p.nheads_k, head_dim,
                                          p.k_batch_stride, p.k_row_stride, p.k_head_stride, box_rows);
  if (why == nullptr) {
    why = sm90::encode_bshd_map(&maps->v, p.v, kBf16, p.cache_rows, rows, p.nheads_k, head_dim, p.v_batch_stride,
                                p.v_row_stride, p.v_head_stride, box_rows);
  }
  return why;
}

template <typename Element, int kHeadDim, int kIndex, DecodeLoad kLoad>
using ConfigTraits = DecodeTraits<Element, kHeadDim, config_warps(kIndex, kHeadDim), config_stages(kIndex, kHeadDim),
                                  kLoad, kDecodeConfigs[kIndex].evict_first>;

// Calls fn(TypeTag<Traits>, maps) for configuration `index` (the first
// entry for head dims other than kSweepHeadDim), as this device and these
// parameters can run it (maps: the kTma load's tensor maps, else zeros).
template <typename Element, int kHeadDim, int kIndex, typename Fn>
void with_config_index(const FlashKvcacheParams& p, Fn&& fn) {
  constexpr DecodeConfig c = kDecodeConfigs[kIndex];
  using Small = DecodeTraits<Element, kHeadDim, 2, 2>;
  using CpAsync = ConfigTraits<Element, kHeadDim, kIndex, DecodeLoad::kCpAsync>;
  DecodeMaps maps{};
  auto with_maps = [&](auto tag) { fn(tag, maps); };
  if constexpr (c.load != DecodeLoad::kCpAsync) {
    if (decode_sm90()) {
      if constexpr (c.load == DecodeLoad::kTma && kHeadDim % 64 == 0) {
        using Tma = ConfigTraits<Element, kHeadDim, kIndex, DecodeLoad::kTma>;
        if (tma_maps_refusal<Element>(p, kHeadDim, Tma::kBlockN, &maps) == nullptr) {
          launch_first_fitting<Tma, Small>("decode", kHeadDim, smem_budget(), with_maps);
          return;
        }
        maps = DecodeMaps{};
      }
      launch_first_fitting<ConfigTraits<Element, kHeadDim, kIndex, DecodeLoad::kBulk>, Small>("decode", kHeadDim,
                                                                                             smem_budget(), with_maps);
      return;
    }
  }
  launch_first_fitting<CpAsync, Small>("decode", kHeadDim, smem_budget(), with_maps);
}

template <typename Element, int kHeadDim, typename Fn, int... kIndex>
void with_config_impl(int index, const FlashKvcacheParams& p, Fn&& fn, std::integer_sequence<int, kIndex...>) {
  ((index == kIndex ? with_config_index<Element, kHeadDim, kIndex>(p, fn) : void()), ...);
}

template <typename Element, int kHeadDim, typename Fn>
void with_config(int index, const FlashKvcacheParams& p, Fn&& fn) {
  if constexpr (kHeadDim == kSweepHeadDim) {
    with_config_impl<Element, kHeadDim>(index, p, fn, std::make_integer_sequence<int, kNumDecodeConfigs>{});
  } else {
    with_config_index<Element, kHeadDim, 0>(p, fn);
  }
}

// Launches kernel<<<grid, threads, smem, stream>>>(args...), with the
// programmatic-stream-serialization attribute when `pdl`.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, int smem, cudaStream_t stream, bool pdl,
                   Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  FLASH_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
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
// of `tile_keys` keys per sequence, on `sms` SMs holding `per_sm` blocks
// each. The tile count is the cache's capacity, the longest the sequences
// can be (their lengths live on the device). Measured on the H200 (132 SMs,
// 2 blocks each; bf16, head dim 128, CUDA graphs, ours / cuDNN; session 6's
// decode_splits log):
//  * base below the SM count: one block per SM reads as fast as two and
//    leaves fewer partial results to combine, so the count is the smallest
//    that fills one wave of one block per SM to 95% of the best count:
//    one sequence, 32 heads, 4k keys: 4 splits 1.06x (8, the two-per-SM
//    fill, 1.02x); 8 kv heads, 128k: 16 splits 1.02x (32: 1.01x); batch 8,
//    8 kv heads, 32k: 2 splits 1.02x (4: 1.00x);
//  * otherwise the smallest count that fills a wave of `per_sm` blocks per
//    SM to 95% of the best; and where that is one wave of splits longer
//    than kLongSplitKeys keys, as many more (up to 16) as keep a split at
//    kMinSplitKeys or more: the blocks of a single wave finish unevenly,
//    many short waves even out. Batch 8, 32 heads, 32k: 8 splits 1.00x (1:
//    0.98x); 128k: 16 splits 1.00x (1: 0.98x; 8: 0.99x); 4k stays at 1.
//  * several waves of splits longer than kLongSplitKeys whose last wave is
//    under kThinTailFill full: the long count too, so that the thin last
//    wave is short. Measured in the tenth session (each count against
//    cuDNN in one process; results/h200_2026-12-03_session10_decode_splits.log):
//    batch 64, 32 heads (2048 blocks, 7.8 waves, the last 76% full), 32k:
//    1 split 0.99x, 2 1.01x, 4 1.02x, 8 1.02x; batch 64, 8 kv heads (512
//    blocks, the last wave 94% full), 32k: 1 split 1.005x, 4 0.98x, 8
//    0.99x, so a nearly full last wave keeps 1; at 4k (splits of 4k keys
//    already) 1 split reads 1.00x, 2 0.99x.
// The lengths are the capacity's: a cache much longer than its sequences
// gets the splits of a full one (mostly empty splits, and their combine).
// A paged cache keeps the plain two-per-SM fill rule: a block reading pages
// issues one copy per page and needs the second block per SM to hide their
// latency. With the first two rules above, the seventh session's full table
// (benchmarks/results/h200_2026-12-03_session7_decode_before_paged_rule.json) read paged-16 at 0.71-0.79x of contiguous for one
// sequence and for GQA batch 8 (page 256: 0.95-0.96x), against 0.96-0.97x
// (page 256: 0.99x) with the fill rule in the fourth session's.
inline int choose_splits(int64_t base, int tiles, int tile_keys, int sms, int per_sm, bool paged) {
  constexpr int64_t kLongSplitKeys = 16384, kMinSplitKeys = 4096;
  constexpr int kMaxLongSplits = 16;
  constexpr double kThinTailFill = 0.85;
  const int max_splits = std::max(1, std::min(tiles, 256));
  auto smallest_filling = [&](int64_t slots) {
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
  };
  const int64_t slots = static_cast<int64_t>(sms) * per_sm;
  if (paged) return smallest_filling(slots);
  if (base < sms) return smallest_filling(sms);
  int splits = smallest_filling(slots);
  const int64_t keys = static_cast<int64_t>(tiles) * tile_keys;
  const int64_t blocks = base * splits, tail = blocks % slots;
  const bool one_wave = blocks <= slots;
  const bool thin_tail = !one_wave && tail != 0 && static_cast<double>(tail) < kThinTailFill * slots;
  if ((one_wave || thin_tail) && keys / splits > kLongSplitKeys) {
    const int64_t longest = std::min<int64_t>(kMaxLongSplits, keys / kMinSplitKeys);
    splits = static_cast<int>(std::min<int64_t>(std::max<int64_t>(splits, longest), max_splits));
  }
  return splits;
}

}  // namespace decode
}  // namespace flash

template <typename Element, int kHeadDim>
int plan_flash_decode(FlashKvcacheParams& params, int requested_splits) {
  int splits = 1;
  params.decode_config = flash::decode::decode_config_from_env();
  flash::decode::with_config<Element, kHeadDim>(params.decode_config, params, [&](auto tag, const auto&) {
    using Traits = typename decltype(tag)::type;
    const int tiles = std::max(1, (params.capacity + Traits::kBlockN - 1) / Traits::kBlockN);
    if (requested_splits > 0) {
      splits = std::min(requested_splits, tiles);
      return;
    }
    const int64_t base = static_cast<int64_t>(params.batch) * params.nheads_k *
                         flash::decode::num_row_chunks(params, Traits::kRows);
    splits = flash::decode::choose_splits(base, tiles, Traits::kBlockN, flash::current_device_props().num_sms,
                                          flash::decode::blocks_per_sm<Traits>(), params.block_table != nullptr);
  });
  return splits;
}

template <typename Element, int kHeadDim>
void run_flash_decode(const FlashKvcacheParams& params, cudaStream_t stream) {
  const int index = kHeadDim == flash::decode::kSweepHeadDim ? params.decode_config : 0;
  const bool pdl = flash::decode::kDecodeConfigs[index].pdl && flash::decode::decode_sm90();
  flash::decode::with_config<Element, kHeadDim>(index, params, [&](auto tag, const flash::decode::DecodeMaps& maps) {
    using Traits = typename decltype(tag)::type;
    const int chunks = flash::decode::num_row_chunks(params, Traits::kRows);
    const int64_t blocks = static_cast<int64_t>(params.batch) * params.nheads_k * chunks * params.num_splits;
    FLASH_CHECK(blocks <= 0x7fffffff, "flash_attn_ext: the decode grid (batch * nheads_k * row chunks * num_splits = ",
                std::to_string(blocks), " blocks) exceeds 2**31 - 1; use fewer splits");
    auto launch = [&](auto kernel) {
      FLASH_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
      flash::decode::launch_kernel(kernel, blocks, Traits::kNThreads, Traits::kSmemBytes, stream, pdl, params, chunks,
                                   maps);
    };
    if (flash::has_score_mods(params)) {
      launch(flash::decode::flash_decode_kernel<Traits, true>);
    } else {
      launch(flash::decode::flash_decode_kernel<Traits, false>);
    }
  });
  if (params.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(params.batch) * params.nheads * params.seqlen_q;
    flash::decode::launch_kernel(flash::decode::flash_decode_combine_kernel<Element, kHeadDim>, rows,
                                 flash::decode::kCombineThreads, 0, stream, pdl, params);
  }
}
