// FlashAttention backward on the CPU. Nothing of size seqlen_q x seqlen_k is
// stored: for each key tile K_j, V_j and each query tile Q_i the
// probabilities are recomputed from the saved log-sum-exp,
//   P = exp(S - lse),  dV_j += P^T dO_i,  dP = dO_i V_j^T,
//   dS = P * (dP - D_i),  dK_j += scale dS^T Q_i,  dQ_i += scale dS K_j,
// with D_i = rowsum(dO_i * O_i) - dlse_i, computed first for every row
// (row_deltas; returned too when asked, for the sinks' gradient). One thread
// owns a (batch, kv head) pair, so dK/dV of a GQA group and dQ accumulate
// without races and in a fixed order: the CPU backward is always
// deterministic.
#include "../checks.h"
#include "../flash_api.h"
#include "cpu_tile.h"
#include "tile_gemm.h"

namespace flash_attn_ext {
namespace cpu {
namespace {

// dp holds dP on entry, the logit's gradient on exit (one row): the score
// rule's backward twin before softcap's factor, which is also dbias (the
// bias joins after the cap).
template <typename Rule, typename acc>
void probs_grad_to_logits_grad(const Rule& rule, const acc* prob, acc* dp, int cols, acc d) {
#pragma omp simd
  for (int c = 0; c < cols; ++c) dp[c] = rule.score_grad(prob[c], dp[c], d);
}
// ... and on to the raw score's gradient, dS: times softcap's factor per
// score (rules with kMods).
template <typename Rule, typename acc>
void logits_grad_to_scores_grad(const Rule& rule, acc* ds, const acc* dsoftcap, int cols) {
#pragma omp simd
  for (int c = 0; c < cols; ++c) ds[c] = rule.through_softcap(ds[c], dsoftcap[c]);
}

// D_i = rowsum(dO_i * O_i) - dlse_i, in the accumulator type, for every row
// of out / dout (batch, rows, nheads, headdim) into d, laid out like
// softmax_lse (batch, nheads, rows): a varlen call's batch-1 views give every
// row, those outside all sequences included, as the CUDA preprocess does.
// dlse (null when unused) is laid out like d.
template <typename scalar_t>
void row_deltas(const Tensor& dout, const Tensor& out, const float* dlse, acc_t<scalar_t>* d) {
  using acc = acc_t<scalar_t>;
  const int64_t batch = out.size(0), rows = out.size(1), nheads = out.size(2);
  const int D = static_cast<int>(out.size(3));
  const auto* o = static_cast<const scalar_t*>(out.data_ptr());
  const auto* dO = static_cast<const scalar_t*>(dout.data_ptr());
  torch::stable::parallel_for(0, batch * nheads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nheads, h = bh % nheads;
      const scalar_t* o_bh = o + b * out.stride(0) + h * out.stride(2);
      const scalar_t* do_bh = dO + b * dout.stride(0) + h * dout.stride(2);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* o_r = o_bh + r * out.stride(1);
        const scalar_t* do_r = do_bh + r * dout.stride(1);
        acc sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < D; ++c) sum += to_acc(o_r[c]) * to_acc(do_r[c]);
        const int64_t i = bh * rows + r;
        d[i] = sum - (dlse ? static_cast<acc>(dlse[i]) : acc(0));
      }
    }
  });
}

// deltas: D of every row (row_deltas), laid out like softmax_lse.
template <typename scalar_t, bool kMods>
void bwd_kernel(const FlashBwdParams& p, const acc_t<scalar_t>* deltas) {
  using acc = acc_t<scalar_t>;
  const int D = p.headdim;
  const int group = p.nheads / p.nheads_k;
  const int64_t units = static_cast<int64_t>(p.batch) * p.nheads_k;
  const acc scale = static_cast<acc>(p.softmax_scale);
  // Buffers are sized for the longest sequence (varlen) and reused.
  const size_t head_elems = static_cast<size_t>(p.seqlen_q) * D;
  // Packed copies (tile_gemm_packed's B operand) of a head's Q and dO: panels
  // over the head dim, panel_stride apart, query row r at r * W in each.
  constexpr int W = kPanelWidth<acc>;
  const int64_t panel_stride = static_cast<int64_t>(p.seqlen_q) * W;
  const size_t head_packed = static_cast<size_t>((D + W - 1) / W) * panel_stride;
  static_assert(kBlockN % W == 0, "key blocks are whole panels");

  torch::stable::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    // Per (batch, kv head), for every query head g of its group: scale * Q
    // and dO, converted once and reused by every key block, both row-major
    // (left operands) and packed (right operands), and dQ (unscaled).
    // O(group * seqlen_q * D) per thread.
    std::vector<acc> qs(group * head_elems), dO(group * head_elems), dq_t(group * head_elems);
    std::vector<acc> qs_p(group * head_packed), dO_p(group * head_packed);
    // Per key block, packed: K (for dQ), K^T and V^T (for S and dP).
    const int d_panels = (D + W - 1) / W;
    std::vector<acc> k_p(static_cast<size_t>(d_panels) * kBlockN * W), k_tt(D * kBlockN), v_tt(D * kBlockN);
    std::vector<acc> dk_t(kBlockN * D), dv_t(kBlockN * D);
    std::vector<acc> p_t(kBlockM * kBlockN), ds_t(kBlockM * kBlockN);
    // Softcap's derivative factor per score of the tile (kMods only).
    std::vector<acc> dsoftcap_t(kMods ? kBlockM * kBlockN : 0);
    // Dropout (kMods only): the factor per score (1 / (1 - p) kept, 0
    // dropped) and P times it, dV's operand.
    std::vector<acc> drop_t(kMods ? kBlockM * kBlockN : 0), pdrop_t(kMods ? kBlockM * kBlockN : 0);
    const acc drop_scale = acc(1) / (acc(1) - static_cast<acc>(p.dropout_p));

    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.nheads_k, h_k = unit % p.nheads_k;
      const flash::SeqInfo seq(p, static_cast<int>(b));
      const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
      if (seqlen_q == 0 || seqlen_k == 0) continue;  // its gradients stay zero (zero-filled by bwd_cpu)
      const flash::MaskGeometry mask(p, seq);
      const int num_n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;
      const auto* k = static_cast<const scalar_t*>(p.k) + seq.k_offset(p.k_batch_stride, p.k_row_stride,
                                                                         p.k_head_stride, b, h_k);
      const auto* v = static_cast<const scalar_t*>(p.v) + seq.k_offset(p.v_batch_stride, p.v_row_stride,
                                                                         p.v_head_stride, b, h_k);

      for (int g = 0; g < group; ++g) {
        const int64_t h = h_k * group + g;
        const auto* q = static_cast<const scalar_t*>(p.q) + seq.q_offset(p.q_batch_stride, p.q_row_stride,
                                                                           p.q_head_stride, b, h);
        const auto* dout = static_cast<const scalar_t*>(p.dout) + seq.q_offset(p.do_batch_stride, p.do_row_stride,
                                                                                 p.do_head_stride, b, h);
        load_rows(q, p.q_row_stride, seqlen_q, D, qs.data() + g * head_elems, scale);
        load_rows(dout, p.do_row_stride, seqlen_q, D, dO.data() + g * head_elems);
        pack_rows(q, p.q_row_stride, seqlen_q, D, qs_p.data() + g * head_packed, panel_stride, scale);
        pack_rows(dout, p.do_row_stride, seqlen_q, D, dO_p.data() + g * head_packed, panel_stride);
      }
      std::fill(dq_t.begin(), dq_t.end(), acc(0));

      for (int n_block = 0; n_block < num_n_blocks; ++n_block) {
        const int col0 = n_block * kBlockN;
        const int cols = std::min(kBlockN, seqlen_k - col0);
        pack_rows(k + col0 * p.k_row_stride, p.k_row_stride, cols, D, k_p.data(), kBlockN * W);
        pack_rows_transposed(k + col0 * p.k_row_stride, p.k_row_stride, cols, D, k_tt.data());
        pack_rows_transposed(v + col0 * p.v_row_stride, p.v_row_stride, cols, D, v_tt.data());
        std::fill(dk_t.begin(), dk_t.end(), acc(0));
        std::fill(dv_t.begin(), dv_t.end(), acc(0));
        const int m_begin = mask.m_block_begin(col0, kBlockM);
        const int m_end = mask.m_block_end(col0, cols, kBlockM);

        for (int g = 0; g < group; ++g) {
          const int64_t h = h_k * group + g;
          const float* lse = p.softmax_lse + seq.lse_offset(p, b, h);
          const float* residual = p.lse_residual ? p.lse_residual + seq.lse_offset(p, b, h) : nullptr;
          const CpuScoreRule<scalar_t, kMods> rule(p, mask, b, h);
          const acc* d_head = deltas + seq.lse_offset(p, b, h);
          for (int m_block = m_begin; m_block < m_end; ++m_block) {
            const int row0 = m_block * kBlockM;
            const int rows = std::min(kBlockM, seqlen_q - row0);
            const int64_t off = g * head_elems + static_cast<int64_t>(row0) * D;
            const acc* q_i = qs.data() + off;
            const acc* do_i = dO.data() + off;
            const int64_t off_p = g * head_packed + static_cast<int64_t>(row0) * W;
            acc* dq_i = dq_t.data() + off;
            acc* prob = p_t.data();
            acc* ds = ds_t.data();
            const bool masked = !mask.tile_fully_visible(row0, rows, col0, cols);

            // P = exp((S - lse) - residual) with S = (scale Q) K^T + bias, masked -> 0
            // (rows with lse = +inf, which saw no key, get P = 0 too).
            tile_gemm_packed<false, false>(rows, cols, D, q_i, D, k_tt.data(), D * W, prob, kBlockN);
            for (int r = 0; r < rows; ++r) {
              acc* row = prob + static_cast<int64_t>(r) * kBlockN;
              if constexpr (kMods) {
                acc* dsoftcap = dsoftcap_t.data() + static_cast<int64_t>(r) * kBlockN;
                rule.visit([&](const auto& form) { apply_score_rule(form, row, dsoftcap, cols, row0 + r, col0, masked); });
              } else {
                rule.visit([&](const auto& form) { apply_score_rule(form, row, cols, row0 + r, col0, masked); });
              }
              exp_row(row, cols, static_cast<acc>(lse[row0 + r]), residual ? static_cast<acc>(residual[row0 + r]) : acc(0));
            }
            // With dropout, Z = P ∘ factor: dV += Z^T dO, and dP ∘ factor in dS below.
            const acc* dv_operand = prob;
            bool dropout_on = false;
            if constexpr (kMods) dropout_on = rule.unbiased.dropout.on;
            if (dropout_on) {
              for (int r = 0; r < rows; ++r) {
                const int64_t o_r = static_cast<int64_t>(r) * kBlockN;
                dropout_factors(rule.unbiased.dropout, drop_t.data() + o_r, row0 + r, col0, cols, drop_scale);
                for (int c = 0; c < cols; ++c) pdrop_t[o_r + c] = prob[o_r + c] * drop_t[o_r + c];
              }
              dv_operand = pdrop_t.data();
            }
            // dV += P^T dO;  dP = dO V^T;  dS = P * (dP - D)
            tile_gemm_packed<true, true>(cols, D, rows, dv_operand, kBlockN, dO_p.data() + off_p, panel_stride, dv_t.data(), D);
            tile_gemm_packed<false, false>(rows, cols, D, do_i, D, v_tt.data(), D * W, ds, kBlockN);
            if (dropout_on) {
              for (int r = 0; r < rows; ++r) {
                const int64_t o_r = static_cast<int64_t>(r) * kBlockN;
#pragma omp simd
                for (int c = 0; c < cols; ++c) ds[o_r + c] *= drop_t[o_r + c];
              }
            }
            for (int r = 0; r < rows; ++r) {
              probs_grad_to_logits_grad(rule, prob + static_cast<int64_t>(r) * kBlockN,
                                        ds + static_cast<int64_t>(r) * kBlockN, cols, d_head[row0 + r]);
            }
            if (p.dbias != nullptr) {
              // dbias is (batch, nheads, seqlen_q, seqlen_k) contiguous (dense calls only).
              auto* db = static_cast<scalar_t*>(p.dbias) + ((b * p.nheads + h) * p.seqlen_q + row0) * p.seqlen_k + col0;
              for (int r = 0; r < rows; ++r) {
                store_rows<scalar_t>(ds + static_cast<int64_t>(r) * kBlockN, 1, cols, db + r * p.seqlen_k, 0);
              }
            }
            if constexpr (kMods) {
              for (int r = 0; r < rows; ++r) {
                const int64_t o_r = static_cast<int64_t>(r) * kBlockN;
                logits_grad_to_scores_grad(rule, ds + o_r, dsoftcap_t.data() + o_r, cols);
              }
            }
            // dK += dS^T (scale Q);  dQ += dS K (scaled when stored)
            tile_gemm_packed<true, true>(cols, D, rows, ds, kBlockN, qs_p.data() + off_p, panel_stride, dk_t.data(), D);
            tile_gemm_packed<false, true>(rows, D, cols, ds, kBlockN, k_p.data(), kBlockN * W, dq_i, D);
          }
        }
        auto* dk = static_cast<scalar_t*>(p.dk) + seq.k_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, h_k) +
                   col0 * p.dk_row_stride;
        auto* dv = static_cast<scalar_t*>(p.dv) + seq.k_offset(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, b, h_k) +
                   col0 * p.dv_row_stride;
        store_rows<scalar_t>(dk_t.data(), cols, D, dk, p.dk_row_stride);
        store_rows<scalar_t>(dv_t.data(), cols, D, dv, p.dv_row_stride);
      }
      for (int g = 0; g < group; ++g) {
        const int64_t h = h_k * group + g;
        auto* dq = static_cast<scalar_t*>(p.dq) + seq.q_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, h);
        acc* dq_g = dq_t.data() + g * head_elems;
        const size_t seq_elems = static_cast<size_t>(seqlen_q) * D;
        for (size_t i = 0; i < seq_elems; ++i) dq_g[i] *= scale;
        store_rows<scalar_t>(dq_g, seqlen_q, D, dq, p.dq_row_stride);
      }
    }
  });
}

}  // namespace
}  // namespace cpu

namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cpu_impl(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool bias_requires_grad, const ScoreFeatures& features, const VarlenLayout* varlen,
    bool return_softmax_d) {
  check_bwd_inputs(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale,
                   bias_requires_grad, features, varlen);
  if (v.size(3) != q.size(3)) {
    return bwd_on_one_head_dim(dout, q, k, v, out, [&](const Tensor& dout1, const Tensor& q1, const Tensor& k1,
                                                       const Tensor& v1, const Tensor& out1) {
      return bwd_cpu_impl(dout1, q1, k1, v1, out1, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale,
                          causal, window_left, window_right, bias_requires_grad, features, varlen, return_softmax_d);
    });
  }
  const ScalarType dtype = q.scalar_type();
  // Sequences of a varlen call may leave rows to nobody (and empty sequences
  // are skipped): their gradients are zero.
  auto make = [&](const Tensor& like) {
    return varlen ? zeros_on(q, like.sizes(), dtype) : empty_on(q, like.sizes(), dtype);
  };
  Tensor dq = make(q), dk = make(k), dv = make(v);
  // Every entry of dbias is written below, except where a whole tile is masked away.
  const std::array<int64_t, 4> dbias_shape{q.size(0), q.size(2), q.size(1), k.size(1)};
  Tensor dbias = bias_requires_grad ? zeros_on(q, dbias_shape, dtype) : empty_on(q, {0}, dtype);
  // D of every row, in the accumulator type (fp64 for fp64 inputs, so that
  // the sinks' gradient formed from it keeps their precision). It needs no
  // key: rows of a call without keys get -dlse (their out is 0).
  const ScalarType acc_dtype = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  const Tensor softmax_d = empty_on(q, softmax_lse.sizes(), acc_dtype);
  const float* dlse = dsoftmax_lse.has_value() ? static_cast<const float*>(dsoftmax_lse->data_ptr()) : nullptr;
  cpu::dispatch_dtype(dtype, [&](auto element) {
    using scalar_t = decltype(element);
    cpu::row_deltas<scalar_t>(dout, out, dlse, static_cast<cpu::acc_t<scalar_t>*>(softmax_d.data_ptr()));
  });
  const Tensor d_out = return_softmax_d ? softmax_d : empty_on(q, {0}, acc_dtype);
  if (q.numel() == 0 || k.numel() == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv, dbias, d_out};
  }
  FlashBwdParams params;
  set_bwd_params(params, dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, dq, dk, dv,
                 bias_requires_grad ? std::optional<Tensor>(dbias) : std::nullopt, softmax_scale, causal, window_left,
                 window_right, /*deterministic=*/true, features, varlen);
  if (params.batch == 0 || params.seqlen_q == 0 || params.seqlen_k == 0) return {dq, dk, dv, dbias, d_out};
  cpu::dispatch_dtype(dtype, [&](auto element) {
    using scalar_t = decltype(element);
    const auto* deltas = static_cast<const cpu::acc_t<scalar_t>*>(softmax_d.data_ptr());
    if (flash::has_score_mods(params)) {
      cpu::bwd_kernel<scalar_t, true>(params, deltas);
    } else {
      cpu::bwd_kernel<scalar_t, false>(params, deltas);
    }
  });
  return {dq, dk, dv, dbias, d_out};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const std::optional<Tensor>& attn_bias, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool /*deterministic: the CPU backward always is*/, bool bias_requires_grad,
    double softcap, const std::optional<Tensor>& alibi_slopes, double dropout_p,
    const std::optional<Tensor>& rng_state, bool return_softmax_d) {
  return bwd_cpu_impl(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale, causal,
                      window_left, window_right, bias_requires_grad,
                      ScoreFeatures{softcap, alibi_slopes, std::nullopt, dropout_p, rng_state}, nullptr,
                      return_softmax_d);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const std::optional<Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, bool /*deterministic: the CPU backward always is*/, double softcap,
    const std::optional<Tensor>& alibi_slopes, double dropout_p, const std::optional<Tensor>& rng_state,
    bool return_softmax_d) {
  const VarlenLayout layout{cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k};
  check_varlen_inputs(q, k, v, layout);
  const VarlenViews views(dout, out, softmax_lse, lse_residual, dsoftmax_lse);
  auto [dq, dk, dv, dbias, softmax_d] =
      bwd_cpu_impl(views.dout, as_one_sequence(q), as_one_sequence(k), as_one_sequence(v), views.out, views.lse,
                   views.lse_residual, views.dlse, std::nullopt, softmax_scale, causal, window_left, window_right,
                   /*bias_requires_grad=*/false,
                   ScoreFeatures{softcap, alibi_slopes, std::nullopt, dropout_p, rng_state}, &layout,
                   return_softmax_d);
  return {drop_batch_dim(dq), drop_batch_dim(dk), drop_batch_dim(dv), drop_batch_dim(softmax_d)};
}

}  // namespace flash_attn_ext
