// fwd_kvcache on the CPU (csrc/kvcache.h says what the op computes): one
// (batch, head) per work unit, each query row walking its visible keys in
// blocks with an online softmax, K and V rows read where the cache (or its
// block table) keeps them. Simple rather than fast: decoding on a CPU is
// bound by reading the cache once per query head, which this does. Unlike
// the CUDA kernels it checks the index values (cache_seqlens, leftpad,
// batch indices, block ids) and raises on a bad one: on the CPU that costs
// no synchronisation.
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../flash_api.h"
#include "../format.h"
#include "../kvcache.h"
#include "cpu_tile.h"

namespace flash_attn_ext {
namespace cpu {
namespace {

constexpr int kKeyBlock = 256;

// Raises on index values the kernels would clamp.
void check_index_values(const FlashKvcacheParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const int end = p.cache_seqlens[b];
    FLASH_CHECK(end >= 0 && end <= p.capacity, "flash_attn_ext: cache_seqlens[", num(b), "] = ", num(end),
                " is outside [0, ", num(p.capacity), "], the keys the cache holds per sequence");
    if (p.cache_leftpad != nullptr) {
      const int lp = p.cache_leftpad[b];
      FLASH_CHECK(lp >= 0 && lp <= end, "flash_attn_ext: cache_leftpad[", num(b), "] = ", num(lp),
                  " is outside [0, cache_seqlens[", num(b), "] = ", num(end), "]");
    }
    if (p.cache_batch_idx != nullptr) {
      const int row = p.cache_batch_idx[b];
      FLASH_CHECK(row >= 0 && row < p.cache_rows, "flash_attn_ext: cache_batch_idx[", num(b), "] = ", num(row),
                  " is outside [0, ", num(p.cache_rows), "), the batch rows of k_cache");
    }
    if (p.block_table != nullptr && end > 0) {
      const int first = (p.cache_leftpad != nullptr ? p.cache_leftpad[b] : 0) / p.page_size;
      for (int i = first; i < (end + p.page_size - 1) / p.page_size; ++i) {
        const int block = p.block_table[b * p.block_table_batch_stride + i];
        FLASH_CHECK(block >= 0 && block < p.cache_rows, "flash_attn_ext: block_table[", num(b), ", ", num(i),
                    "] = ", num(block), " is outside [0, ", num(p.cache_rows), "), the blocks of k_cache");
      }
    }
  }
}

template <typename scalar_t, bool kMods>
void kvcache_kernel(const FlashKvcacheParams& p) {
  using acc = acc_t<scalar_t>;
  const int D = p.headdim;
  const int group = p.nheads / p.nheads_k;
  const acc scale = static_cast<acc>(p.softmax_scale);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const int64_t units = static_cast<int64_t>(p.batch) * p.nheads;

  torch::stable::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q_row(D), o_row(D), s(kKeyBlock);
    std::vector<const scalar_t*> k_rows(kKeyBlock), v_rows(kKeyBlock);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int b = static_cast<int>(unit / p.nheads), h = static_cast<int>(unit % p.nheads);
      const int h_k = h / group;
      const flash::KvSequence seq = flash::clamp_sequence(p, b);
      const flash::MaskGeometry geo(p, flash::sequence_info(p, seq));
      const flash::ScoreRule<acc, scalar_t, flash::ScoreUnits::kNaturalPrescaled, false,
                            kMods ? flash::kAllFeatures : flash::kNoFeatures>
          rule(p, geo, b, h);
      const auto* k_base = static_cast<const scalar_t*>(p.k) + h_k * p.k_head_stride;
      const auto* v_base = static_cast<const scalar_t*>(p.v) + h_k * p.v_head_stride;
      const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
      const acc sink = p.sinks != nullptr ? static_cast<acc>(p.sinks[h]) : neg_inf;

      for (int i = 0; i < p.seqlen_q; ++i) {
        load_rows(q + i * p.q_row_stride, 0, 1, D, q_row.data(), scale);
        std::fill(o_row.begin(), o_row.end(), acc(0));
        acc run_max = neg_inf, run_sum = 0;
        const flash::KeyRange keys = geo.keys(i);
        for (int col0 = keys.begin; col0 < keys.end; col0 += kKeyBlock) {
          const int cols = std::min(kKeyBlock, keys.end - col0);
          for (int c = 0; c < cols; ++c) {
            const int pos = seq.leftpad + col0 + c;
            k_rows[c] = k_base + flash::cache_row_offset(p, b, seq, pos, p.k_batch_stride, p.k_row_stride);
            v_rows[c] = v_base + flash::cache_row_offset(p, b, seq, pos, p.v_batch_stride, p.v_row_stride);
          }
          acc tile_max = neg_inf;
          for (int c = 0; c < cols; ++c) {
            const scalar_t* k = k_rows[c];
            acc dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; ++d) dot += q_row[d] * to_acc(k[d]);
            // Steps 1-4 of the rule (the scale came with q); every key here is
            // visible, so step 5 has nothing to hide.
            s[c] = rule.logit(dot, i, col0 + c, acc(0));
            tile_max = std::max(tile_max, s[c]);
          }
          const acc new_max = std::max(run_max, tile_max);
          const acc ref = new_max == neg_inf ? acc(0) : new_max;
          const acc correction = std::exp(run_max - ref);
          acc sum = 0;
          for (int c = 0; c < cols; ++c) {
            s[c] = std::exp(s[c] - ref);
            sum += s[c];
          }
          run_sum = run_sum * correction + sum;
          run_max = new_max;
          for (int d = 0; d < D; ++d) o_row[d] *= correction;
          for (int c = 0; c < cols; ++c) {
            const scalar_t* v = v_rows[c];
            const acc w = s[c];
#pragma omp simd
            for (int d = 0; d < D; ++d) o_row[d] += w * to_acc(v[d]);
          }
        }
        // The sink joins the sum with no value (lse includes it); a row that
        // saw no key gets out 0 and lse = the sink, or +inf without one.
        acc o_scale = 1;
        if (sink != neg_inf) {
          const acc new_max = std::max(run_max, sink);
          o_scale = run_max == neg_inf ? acc(0) : std::exp(run_max - new_max);
          run_sum = run_sum * o_scale + std::exp(sink - new_max);
          run_max = new_max;
        }
        const bool empty = run_sum == acc(0);
        const acc inv = empty ? acc(0) : o_scale / run_sum;
        for (int d = 0; d < D; ++d) out[i * p.o_row_stride + d] = static_cast<scalar_t>(o_row[d] * inv);
        p.softmax_lse[(static_cast<int64_t>(b) * p.nheads + h) * p.seqlen_q + i] =
            empty ? std::numeric_limits<float>::infinity() : static_cast<float>(run_max + std::log(run_sum));
      }
    }
  });
}

}  // namespace
}  // namespace cpu

std::tuple<Tensor, Tensor> fwd_kvcache_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                           const Tensor& cache_seqlens, const std::optional<Tensor>& cache_batch_idx,
                                           const std::optional<Tensor>& cache_leftpad,
                                           const std::optional<Tensor>& block_table, double softmax_scale,
                                           bool causal, int64_t window_left, int64_t window_right, double softcap,
                                           const std::optional<Tensor>& alibi_slopes,
                                           const std::optional<Tensor>& sinks,
                                           int64_t num_splits /* one pass per row on the CPU */) {
  check_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                        softmax_scale, softcap, alibi_slopes, sinks, num_splits);
  Tensor out = empty_on(q, q.sizes(), q.scalar_type());
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(2), q.size(1)};
  Tensor lse = empty_on(q, lse_shape, ScalarType::Float);
  if (q.numel() == 0) return {out, lse};
  FlashKvcacheParams params;
  set_kvcache_params(params, q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks);
  params.out = out.data_ptr();
  params.o_batch_stride = out.stride(0), params.o_row_stride = out.stride(1), params.o_head_stride = out.stride(2);
  params.softmax_lse = static_cast<float*>(lse.data_ptr());
  cpu::check_index_values(params);
  cpu::dispatch_dtype(q.scalar_type(), [&](auto element) {
    if (flash::has_score_mods(params)) {
      cpu::kvcache_kernel<decltype(element), true>(params);
    } else {
      cpu::kvcache_kernel<decltype(element), false>(params);
    }
  });
  return {out, lse};
}

}  // namespace flash_attn_ext
