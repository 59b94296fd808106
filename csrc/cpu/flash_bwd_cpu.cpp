// FlashAttention backward on the CPU. Nothing of size seqlen_q x seqlen_k is
// stored: for each key tile K_j, V_j and each query tile Q_i the
// probabilities are recomputed from the saved log-sum-exp,
//   P = exp(S - lse),  dV_j += P^T dO_i,  dP = dO_i V_j^T,
//   dS = P * (dP - D_i),  dK_j += scale dS^T Q_i,  dQ_i += scale dS K_j,
// with D_i = rowsum(dO_i * O_i) - dlse_i. One thread owns a (batch, kv head)
// pair, so dK/dV of a GQA group and dQ accumulate without races and in a
// fixed order: the CPU backward is always deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../flash_api.h"
#include "cpu_tile.h"
#include "tile_gemm.h"

namespace flash_attn_ext {
namespace cpu {
namespace {

// s holds scores on entry, P on exit; lse = +inf rows give P = 0.
template <typename acc>
void scores_to_probs(acc* s, int rows, int cols, const float* lse) {
  for (int r = 0; r < rows; ++r) {
    acc* row = s + static_cast<int64_t>(r) * cols;
    const acc l = static_cast<acc>(lse[r]);
    for (int c = 0; c < cols; ++c) row[c] = exp_approx(row[c] - l);
  }
}

// dp holds dP on entry, dS = P * (dP - D) on exit.
template <typename acc>
void probs_grad_to_scores_grad(const acc* prob, acc* dp, int rows, int cols, const acc* d) {
  for (int r = 0; r < rows; ++r) {
    const acc* pr = prob + static_cast<int64_t>(r) * cols;
    acc* row = dp + static_cast<int64_t>(r) * cols;
    for (int c = 0; c < cols; ++c) row[c] = pr[c] * (row[c] - d[r]);
  }
}

template <typename scalar_t>
void bwd_kernel(const FlashBwdParams& p) {
  using acc = acc_t<scalar_t>;
  const int D = p.headdim;
  const int group = p.nheads / p.nheads_k;
  const int num_n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const flash::MaskGeometry mask(p);
  const int64_t units = static_cast<int64_t>(p.batch) * p.nheads_k;

  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> q_t(kBlockM * D), do_t(kBlockM * D);
    std::vector<acc> k_t(kBlockN * D), k_tt(D * kBlockN), v_tt(D * kBlockN), dk_t(kBlockN * D), dv_t(kBlockN * D);
    std::vector<acc> p_t(kBlockM * kBlockN), ds_t(kBlockM * kBlockN);
    std::vector<acc> dq_t(static_cast<size_t>(group) * p.seqlen_q * D);  // dQ of the whole group, O(seqlen)
    std::vector<acc> d_row(static_cast<size_t>(group) * p.seqlen_q);
    const acc scale = static_cast<acc>(p.softmax_scale);

    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.nheads_k, h_k = unit % p.nheads_k;
      const auto* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride;
      const auto* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride;

      // D_i = rowsum(dO_i * O_i) - dlse_i for every query row of the group.
      for (int g = 0; g < group; ++g) {
        const int64_t h = h_k * group + g;
        const auto* o = static_cast<const scalar_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
        const auto* dout = static_cast<const scalar_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
        const float* dlse = p.dsoftmax_lse ? p.dsoftmax_lse + (b * p.nheads + h) * p.seqlen_q : nullptr;
        for (int r = 0; r < p.seqlen_q; ++r) {
          acc sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int d = 0; d < D; ++d) {
            sum += static_cast<acc>(o[r * p.o_row_stride + d]) * static_cast<acc>(dout[r * p.do_row_stride + d]);
          }
          d_row[static_cast<size_t>(g) * p.seqlen_q + r] = sum - (dlse ? static_cast<acc>(dlse[r]) : acc(0));
        }
      }
      std::fill(dq_t.begin(), dq_t.end(), acc(0));

      for (int n_block = 0; n_block < num_n_blocks; ++n_block) {
        const int col0 = n_block * kBlockN;
        const int cols = std::min(kBlockN, p.seqlen_k - col0);
        load_rows(k + col0 * p.k_row_stride, p.k_row_stride, cols, D, k_t.data());
        load_rows_transposed(k + col0 * p.k_row_stride, p.k_row_stride, cols, D, k_tt.data(), cols);
        load_rows_transposed(v + col0 * p.v_row_stride, p.v_row_stride, cols, D, v_tt.data(), cols);
        std::fill(dk_t.begin(), dk_t.end(), acc(0));
        std::fill(dv_t.begin(), dv_t.end(), acc(0));
        const int m_begin = mask.m_block_begin(col0, kBlockM);
        const int m_end = mask.m_block_end(col0, cols, kBlockM);

        for (int g = 0; g < group; ++g) {
          const int64_t h = h_k * group + g;
          const auto* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
          const auto* dout = static_cast<const scalar_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
          const float* lse = p.softmax_lse + (b * p.nheads + h) * p.seqlen_q;
          const scalar_t* bias = bias_slice<scalar_t>(p, b, h);
          acc* dq_head = dq_t.data() + static_cast<size_t>(g) * p.seqlen_q * D;
          for (int m_block = m_begin; m_block < m_end; ++m_block) {
            const int row0 = m_block * kBlockM;
            const int rows = std::min(kBlockM, p.seqlen_q - row0);
            load_rows(q + row0 * p.q_row_stride, p.q_row_stride, rows, D, q_t.data());
            load_rows(dout + row0 * p.do_row_stride, p.do_row_stride, rows, D, do_t.data());
            acc* prob = p_t.data();
            acc* ds = ds_t.data();

            tile_gemm<false>(rows, cols, D, acc(1), q_t.data(), D, k_tt.data(), cols, acc(0), prob, cols);
            finish_scores<scalar_t>(prob, rows, cols, row0, col0, p, bias);
            scores_to_probs(prob, rows, cols, lse + row0);
            // dV += P^T dO;  dP = dO V^T;  dS = P * (dP - D)
            tile_gemm<true>(cols, D, rows, acc(1), prob, cols, do_t.data(), D, acc(1), dv_t.data(), D);
            tile_gemm<false>(rows, cols, D, acc(1), do_t.data(), D, v_tt.data(), cols, acc(0), ds, cols);
            probs_grad_to_scores_grad(prob, ds, rows, cols, d_row.data() + static_cast<size_t>(g) * p.seqlen_q + row0);
            if (p.dbias != nullptr) {
              // dbias is (batch, nheads, seqlen_q, seqlen_k) contiguous.
              auto* db = static_cast<scalar_t*>(p.dbias) + ((b * p.nheads + h) * p.seqlen_q + row0) * p.seqlen_k + col0;
              store_rows<scalar_t>(ds, rows, cols, db, p.seqlen_k);
            }
            // dK += scale dS^T Q;  dQ += scale dS K
            tile_gemm<true>(cols, D, rows, scale, ds, cols, q_t.data(), D, acc(1), dk_t.data(), D);
            tile_gemm<false>(rows, D, cols, scale, ds, cols, k_t.data(), D, acc(1), dq_head + static_cast<int64_t>(row0) * D, D);
          }
        }
        auto* dk = static_cast<scalar_t*>(p.dk) + b * p.dk_batch_stride + h_k * p.dk_head_stride + col0 * p.dk_row_stride;
        auto* dv = static_cast<scalar_t*>(p.dv) + b * p.dv_batch_stride + h_k * p.dv_head_stride + col0 * p.dv_row_stride;
        store_rows<scalar_t>(dk_t.data(), cols, D, dk, p.dk_row_stride);
        store_rows<scalar_t>(dv_t.data(), cols, D, dv, p.dv_row_stride);
      }
      for (int g = 0; g < group; ++g) {
        const int64_t h = h_k * group + g;
        auto* dq = static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
        store_rows<scalar_t>(dq_t.data() + static_cast<size_t>(g) * p.seqlen_q * D, p.seqlen_q, D, dq, p.dq_row_stride);
      }
    }
  });
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const std::optional<at::Tensor>& dsoftmax_lse,
    const std::optional<at::Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool /*deterministic: the CPU backward always is*/, bool bias_requires_grad) {
  check_bwd_inputs(dout, q, k, v, out, softmax_lse, dsoftmax_lse, attn_bias);
  TORCH_CHECK(!bias_requires_grad || attn_bias.has_value(),
              "flash_attn_ext: bias_requires_grad is set but no attn_bias was given");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  std::optional<at::Tensor> dbias;
  if (bias_requires_grad) {
    // Every entry is written below, except where a whole tile is masked away.
    dbias = at::zeros({q.size(0), q.size(2), q.size(1), k.size(1)}, q.options());
  }
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dbias.has_value() ? *dbias : at::empty({0}, q.options())};
  }
  FlashBwdParams params;
  set_bwd_params(params, dout, q, k, v, out, softmax_lse, dsoftmax_lse, attn_bias, dq, dk, dv, dbias, softmax_scale,
                 causal, window_left, window_right, /*deterministic=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn_ext::bwd_cpu",
                                  [&] { cpu::bwd_kernel<scalar_t>(params); });
  return {dq, dk, dv, dbias.has_value() ? *dbias : at::empty({0}, q.options())};
}

}  // namespace flash_attn_ext
