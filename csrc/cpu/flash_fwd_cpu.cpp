// FlashAttention forward on the CPU: for each (batch, head, query block) the
// key/value sequence is streamed in tiles while each query row keeps a
// running max m, a running sum l and an output accumulator rescaled whenever
// m grows. Extra memory is a few tiles per thread; the seqlen_q x seqlen_k
// score matrix never exists.
#include "../checks.h"
#include "../flash_api.h"
#include "cpu_tile.h"
#include "tile_gemm.h"

namespace flash_attn_ext {
namespace cpu {
namespace {

// One thread's copy of the K and V of the (batch, kv head) it is working on,
// converted to the accumulation type and packed as tile_gemm_packed's B
// operand once, then reused by every query block of that head (and of the
// other query heads of its GQA group). K^T goes per key block (D x kBlockN,
// for S = Q K^T), V as panels over the head dim (for O += P V), where the
// rows of key block n start at n * kBlockN * W. O(seqlen_k * D) per thread.
template <typename scalar_t>
struct HeadKV {
  using acc = acc_t<scalar_t>;
  static constexpr int W = kPanelWidth<acc>;
  static_assert(kBlockN % W == 0, "key blocks are whole panels");
  std::vector<acc> kt, v;
  int64_t b = -1, h_k = -1;
  int64_t v_panel_stride = 0;

  void load(const FlashFwdParams& p, const flash::SeqInfo& seq, int64_t batch, int64_t head_k) {
    if (batch == b && head_k == h_k) return;
    b = batch;
    h_k = head_k;
    const int D = p.headdim;
    const int num_n_blocks = (seq.seqlen_k + kBlockN - 1) / kBlockN;
    const int d_panels = (D + W - 1) / W;
    v_panel_stride = static_cast<int64_t>(seq.seqlen_k) * W;
    kt.resize(static_cast<size_t>(num_n_blocks) * D * kBlockN);
    v.resize(static_cast<size_t>(d_panels) * v_panel_stride);
    const auto* k_src = static_cast<const scalar_t*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride,
                                                                          p.k_head_stride, b, h_k);
    const auto* v_src = static_cast<const scalar_t*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride,
                                                                          p.v_head_stride, b, h_k);
    for (int n = 0; n < num_n_blocks; ++n) {
      const int col0 = n * kBlockN;
      const int cols = std::min(kBlockN, seq.seqlen_k - col0);
      pack_rows_transposed(k_src + col0 * p.k_row_stride, p.k_row_stride, cols, D,
                           kt.data() + static_cast<size_t>(n) * D * kBlockN);
    }
    pack_rows(v_src, p.v_row_stride, seq.seqlen_k, D, v.data(), v_panel_stride);
  }
};

// Query blocks in the order (0, last, 1, last - 1, ...): parallel_for
// hands each thread a contiguous range of units, and with a causal mask the
// cost of a block grows with its index, so pairing cheap and dear blocks
// keeps the threads' shares even.
inline int balanced_m_block(int i, int num_m_blocks) {
  return (i % 2 == 0) ? i / 2 : num_m_blocks - 1 - i / 2;
}

template <typename scalar_t, bool kMods>
void fwd_kernel(const FlashFwdParams& p) {
  using acc = acc_t<scalar_t>;
  const int D = p.headdim;
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;  // of the longest sequence
  const int group = p.nheads / p.nheads_k;
  const int64_t units = static_cast<int64_t>(p.batch) * p.nheads * num_m_blocks;
  const acc scale = static_cast<acc>(p.softmax_scale);  // exact for fp64 (params keep a double)
  const acc neg_inf = -std::numeric_limits<acc>::infinity();

  torch::stable::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // Per-thread tiles, reused across the units this thread owns.
    HeadKV<scalar_t> kv;
    std::vector<acc> q_t(kBlockM * D), s_t(kBlockM * kBlockN), o_t(kBlockM * D);
    std::vector<acc> run_max(kBlockM), run_sum(kBlockM);
    std::vector<acc> drop_factor(kMods ? kBlockN : 0);  // dropout's factors of a row (kMods)
    const acc drop_scale = acc(1) / (acc(1) - static_cast<acc>(p.dropout_p));

    for (int64_t unit = begin; unit < end; ++unit) {
      const int m_block = balanced_m_block(unit % num_m_blocks, num_m_blocks);
      const int64_t bh = unit / num_m_blocks;
      const int64_t b = bh / p.nheads, h = bh % p.nheads, h_k = h / group;
      const flash::SeqInfo seq(p, static_cast<int>(b));
      const int row0 = m_block * kBlockM;
      const int rows = std::min(kBlockM, seq.seqlen_q - row0);
      if (rows <= 0) continue;  // a block past the end of a shorter sequence (varlen)
      const flash::MaskGeometry mask(p, seq);
      const int num_n_blocks = (seq.seqlen_k + kBlockN - 1) / kBlockN;

      const auto* q = static_cast<const scalar_t*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride,
                                                                         p.q_head_stride, b, h);
      const CpuScoreRule<scalar_t, kMods> rule(p, mask, b, h);
      kv.load(p, seq, b, h_k);

      load_rows(q + row0 * p.q_row_stride, p.q_row_stride, rows, D, q_t.data(), scale);
      std::fill(o_t.begin(), o_t.end(), acc(0));
      std::fill(run_max.begin(), run_max.end(), neg_inf);
      std::fill(run_sum.begin(), run_sum.end(), acc(0));

      const int n_begin = mask.n_block_begin(row0, kBlockN);
      const int n_end = std::min(mask.n_block_end(row0, kBlockM, kBlockN), num_n_blocks);
      for (int n_block = n_begin; n_block < n_end; ++n_block) {
        const int col0 = n_block * kBlockN;
        const int cols = std::min(kBlockN, seq.seqlen_k - col0);
        const acc* kt = kv.kt.data() + static_cast<size_t>(n_block) * D * kBlockN;
        const acc* v = kv.v.data() + static_cast<size_t>(col0) * HeadKV<scalar_t>::W;
        // S = (scale Q) K^T (rows x cols, row stride kBlockN).
        tile_gemm_packed<false, false>(rows, cols, D, q_t.data(), D, kt, D * HeadKV<scalar_t>::W, s_t.data(), kBlockN);
        const bool masked = !mask.tile_fully_visible(row0, rows, col0, cols);
        // Online softmax per row: P = exp(S - m_new), l = l * exp(m_old - m_new) + rowsum(P),
        // O *= exp(m_old - m_new); then O += P V below.
        for (int r = 0; r < rows; ++r) {
          acc* row = s_t.data() + static_cast<int64_t>(r) * kBlockN;
          rule.visit([&](const auto& form) { apply_score_rule(form, row, cols, row0 + r, col0, masked); });
          const acc tile_max = row_max(row, cols);
          const acc new_max = std::max(run_max[r], tile_max);
          // A row that has seen only masked keys keeps max -inf; exponentiate
          // against 0 so that exp(-inf - max) is 0 rather than NaN.
          const acc ref = new_max == neg_inf ? acc(0) : new_max;
          const acc correction = exp_approx(run_max[r] - ref);
          run_sum[r] = run_sum[r] * correction + exp_row_sum(row, cols, ref);
          run_max[r] = new_max;
          // Dropout after the sum: softmax_lse does not see it.
          if constexpr (kMods) {
            if (rule.unbiased.dropout.on) {
              apply_dropout_row(rule.unbiased.dropout, row, drop_factor.data(), row0 + r, col0, cols, drop_scale);
            }
          }
          if (correction != acc(1)) {
            acc* o = o_t.data() + static_cast<int64_t>(r) * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) o[d] *= correction;
          }
        }
        tile_gemm_packed<false, true>(rows, D, cols, s_t.data(), kBlockN, v, kv.v_panel_stride, o_t.data(), D);
      }

      // Epilogue: normalise, and record lse = max + log(sum) as fp32 lse plus
      // the residual the rounding lost; rows that saw no key get 0, +inf and
      // 0 (the backward then gives them zero gradient). An attention sink
      // joins the sum first, with no value: a row that saw no key then has
      // out 0 and lse = the sink.
      acc* o = o_t.data();
      const int64_t row_bh = seq.lse_offset(p, b, h) + row0;
      float* lse = p.softmax_lse + row_bh;
      float* residual = p.lse_residual ? p.lse_residual + row_bh : nullptr;
      const acc sink = p.sinks ? static_cast<acc>(p.sinks[h]) : neg_inf;
      for (int r = 0; r < rows; ++r) {
        acc o_scale = acc(1);
        if (sink != neg_inf) {
          const acc new_max = std::max(run_max[r], sink);
          o_scale = run_max[r] == neg_inf ? acc(0) : std::exp(run_max[r] - new_max);
          run_sum[r] = run_sum[r] * o_scale + std::exp(sink - new_max);
          run_max[r] = new_max;
        }
        const bool empty = run_sum[r] == acc(0);
        const acc inv = empty ? acc(0) : o_scale / run_sum[r];
        for (int d = 0; d < D; ++d) o[r * D + d] *= inv;
        const acc log_sum = std::log(run_sum[r]);
        lse[r] = empty ? std::numeric_limits<float>::infinity() : static_cast<float>(run_max[r] + log_sum);
        if (residual) residual[r] = empty ? 0.f : static_cast<float>((run_max[r] - static_cast<acc>(lse[r])) + log_sum);
      }
      auto* out = static_cast<scalar_t*>(p.out) + seq.q_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, h) +
                  row0 * p.o_row_stride;
      store_rows<scalar_t>(o, rows, D, out, p.o_row_stride);
    }
  });
}

}  // namespace
}  // namespace cpu

namespace {

// The forward of a dense call, or of a varlen call given as its batch-1
// views (checks.h, VarlenLayout); rows of a varlen q outside every sequence
// get out 0 and lse +inf.
std::tuple<Tensor, Tensor, Tensor> fwd_cpu_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const std::optional<Tensor>& attn_bias, double softmax_scale,
                                                bool causal, int64_t window_left, int64_t window_right,
                                                const ScoreFeatures& features, const VarlenLayout* varlen) {
  check_fwd_inputs(q, k, v, attn_bias, softmax_scale, features, varlen);
  if (v.size(3) != q.size(3)) {
    return fwd_on_one_head_dim(q, k, v, [&](const Tensor& q1, const Tensor& k1, const Tensor& v1) {
      return fwd_cpu_impl(q1, k1, v1, attn_bias, softmax_scale, causal, window_left, window_right, features, varlen);
    });
  }
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(2), q.size(1)};
  Tensor out = varlen ? zeros_on(q, q.sizes(), q.scalar_type()) : empty_on(q, q.sizes(), q.scalar_type());
  Tensor lse = varlen ? full_on(q, lse_shape, ScalarType::Float, std::numeric_limits<double>::infinity())
                      : empty_on(q, lse_shape, ScalarType::Float);
  Tensor residual = needs_lse_residual(q, attn_bias) ? zeros_on(q, lse_shape, ScalarType::Float)
                                                     : empty_on(q, {0}, ScalarType::Float);
  if (q.numel() == 0) return {out, lse, residual};
  if (k.size(1) == 0) {  // no keys: every row is empty (but for its sink)
    torch::stable::zero_(out);
    return {out, lse_without_keys(q, features.sinks), residual};
  }
  FlashFwdParams params;
  set_fwd_params(params, q, k, v, attn_bias, out, lse, residual, softmax_scale, causal, window_left, window_right,
                 features, varlen);
  if (params.batch == 0 || params.seqlen_q == 0) return {out, lse, residual};
  cpu::dispatch_dtype(q.scalar_type(), [&](auto element) {
    if (flash::has_score_mods(params)) {
      cpu::fwd_kernel<decltype(element), true>(params);
    } else {
      cpu::fwd_kernel<decltype(element), false>(params);
    }
  });
  return {out, lse, residual};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal,
                                           int64_t window_left, int64_t window_right,
                                           bool /*deterministic: used by the backward only*/, double softcap,
                                           const std::optional<Tensor>& alibi_slopes,
                                           const std::optional<Tensor>& sinks, double dropout_p,
                                           const std::optional<Tensor>& rng_state) {
  return fwd_cpu_impl(q, k, v, attn_bias, softmax_scale, causal, window_left, window_right,
                      ScoreFeatures{softcap, alibi_slopes, sinks, dropout_p, rng_state}, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                  const std::optional<Tensor>& seqused_k, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                  int64_t window_left, int64_t window_right,
                                                  bool /*deterministic: used by the backward only*/, double softcap,
                                                  const std::optional<Tensor>& alibi_slopes,
                                                  const std::optional<Tensor>& sinks, double dropout_p,
                                                  const std::optional<Tensor>& rng_state) {
  const VarlenLayout layout{cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k};
  check_varlen_inputs(q, k, v, layout);
  auto [out, lse, residual] = fwd_cpu_impl(as_one_sequence(q), as_one_sequence(k), as_one_sequence(v), std::nullopt,
                                           softmax_scale, causal, window_left, window_right,
                                           ScoreFeatures{softcap, alibi_slopes, sinks, dropout_p, rng_state}, &layout);
  return {drop_batch_dim(out), drop_batch_dim(lse), drop_batch_dim(residual)};
}

}  // namespace flash_attn_ext
