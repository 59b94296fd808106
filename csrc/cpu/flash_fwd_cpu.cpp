// FlashAttention forward on the CPU: for each (batch, head, query block) the
// key/value sequence is streamed in tiles while each query row keeps a
// running max m, a running sum l and an output accumulator rescaled whenever
// m grows. Extra memory is a few tiles per thread; the seqlen_q x seqlen_k
// score matrix never exists.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include "../checks.h"
#include "../flash_api.h"
#include "cpu_tile.h"
#include "tile_gemm.h"

namespace flash_attn_ext {
namespace cpu {
namespace {

// Online-softmax update for one tile of scores (rows x cols, in place -> P).
// Returns nothing; updates row_max, row_sum and rescales acc (rows x D).
template <typename acc>
void online_softmax_update(acc* s, int rows, int cols, acc* row_max, acc* row_sum, acc* out_acc,
                                               int D) {
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  for (int r = 0; r < rows; ++r) {
    acc* row = s + static_cast<int64_t>(r) * cols;
    acc tile_max = neg_inf;
#pragma omp simd reduction(max : tile_max)
    for (int c = 0; c < cols; ++c) tile_max = std::max(tile_max, row[c]);
    const acc new_max = std::max(row_max[r], tile_max);
    // A row that has seen only masked keys keeps max -inf; exponentiate
    // against 0 so that exp(-inf - max) is 0 rather than NaN.
    const acc ref = new_max == neg_inf ? acc(0) : new_max;
    const acc correction = exp_approx(row_max[r] - ref);
    acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < cols; ++c) {
      row[c] = exp_approx(row[c] - ref);
      sum += row[c];
    }
    row_sum[r] = row_sum[r] * correction + sum;
    row_max[r] = new_max;
    acc* o = out_acc + static_cast<int64_t>(r) * D;
    for (int d = 0; d < D; ++d) o[d] *= correction;
  }
}

template <typename scalar_t>
void fwd_kernel(const FlashFwdParams& p) {
  using acc = acc_t<scalar_t>;
  const int D = p.headdim;
  const int num_m_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int group = p.nheads / p.nheads_k;
  const flash::MaskGeometry mask(p);
  const int64_t units = static_cast<int64_t>(p.batch) * p.nheads * num_m_blocks;

  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // Per-thread tiles, reused across the units this thread owns.
    std::vector<acc> q_t(kBlockM * D), k_tt(D * kBlockN), v_t(kBlockN * D), s_t(kBlockM * kBlockN), o_t(kBlockM * D);
    std::vector<acc> row_max(kBlockM), row_sum(kBlockM);

    for (int64_t unit = begin; unit < end; ++unit) {
      const int m_block = unit % num_m_blocks;
      const int64_t bh = unit / num_m_blocks;
      const int64_t b = bh / p.nheads, h = bh % p.nheads, h_k = h / group;
      const int row0 = m_block * kBlockM;
      const int rows = std::min(kBlockM, p.seqlen_q - row0);

      const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const auto* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride;
      const auto* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride;
      const scalar_t* bias = bias_slice<scalar_t>(p, b, h);

      load_rows(q + row0 * p.q_row_stride, p.q_row_stride, rows, D, q_t.data());
      std::fill(o_t.begin(), o_t.end(), acc(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc(0));

      const int n_begin = mask.n_block_begin(row0, kBlockN);
      const int n_end = std::min(mask.n_block_end(row0, kBlockM, kBlockN), (p.seqlen_k + kBlockN - 1) / kBlockN);
      for (int n_block = n_begin; n_block < n_end; ++n_block) {
        const int col0 = n_block * kBlockN;
        const int cols = std::min(kBlockN, p.seqlen_k - col0);
        load_rows_transposed(k + col0 * p.k_row_stride, p.k_row_stride, cols, D, k_tt.data(), cols);
        load_rows(v + col0 * p.v_row_stride, p.v_row_stride, cols, D, v_t.data());
        // S = Q K^T (rows x cols), then scores -> probabilities, O = O * correction + P V.
        tile_gemm<false>(rows, cols, D, acc(1), q_t.data(), D, k_tt.data(), cols, acc(0), s_t.data(), cols);
        finish_scores<scalar_t>(s_t.data(), rows, cols, row0, col0, p, bias);
        online_softmax_update(s_t.data(), rows, cols, row_max.data(), row_sum.data(), o_t.data(), D);
        tile_gemm<false>(rows, D, cols, acc(1), s_t.data(), cols, v_t.data(), D, acc(1), o_t.data(), D);
      }

      // Epilogue: normalise, and record lse = max + log(sum); rows that saw
      // no key get 0 and +inf (the backward then gives them zero gradient).
      acc* o = o_t.data();
      float* lse = p.softmax_lse + (b * p.nheads + h) * p.seqlen_q + row0;
      for (int r = 0; r < rows; ++r) {
        const bool empty = row_sum[r] == acc(0);
        const acc inv = empty ? acc(0) : acc(1) / row_sum[r];
        for (int d = 0; d < D; ++d) o[r * D + d] *= inv;
        lse[r] = empty ? std::numeric_limits<float>::infinity()
                       : static_cast<float>(row_max[r] + std::log(row_sum[r]));
      }
      auto* out = static_cast<scalar_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + row0 * p.o_row_stride;
      store_rows<scalar_t>(o, rows, D, out, p.o_row_stride);
    }
  });
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& attn_bias, double softmax_scale,
                                           bool causal, int64_t window_left, int64_t window_right,
                                           bool /*deterministic: used by the backward only*/) {
  check_fwd_inputs(q, k, v, attn_bias);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.size(1) == 0) {  // no keys: every row is empty
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  FlashFwdParams params;
  set_fwd_params(params, q, k, v, attn_bias, out, lse, softmax_scale, causal, window_left, window_right);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_ext::fwd_cpu",
                                  [&] { cpu::fwd_kernel<scalar_t>(params); });
  return {out, lse};
}

}  // namespace flash_attn_ext
