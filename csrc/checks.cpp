#include "checks.h"

#include <array>
#include <cmath>
#include <limits>

#include "format.h"

namespace flash_attn_ext {
namespace {

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  FLASH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "flash_attn_ext: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", num(t.stride(-1)),
              "; call .contiguous() first");
}

// Sizes the kernels index with 32-bit ints. Sequence lengths stay below
// 2^30 so that mask arithmetic (row + seqlen_k - seqlen_q + window) cannot
// overflow either.
constexpr int64_t kMaxSeqlen = (int64_t{1} << 30) - 1;
constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

void check_sizes_fit(int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t nheads) {
  FLASH_CHECK(seqlen_q <= kMaxSeqlen, "flash_attn_ext: seqlen_q = ", num(seqlen_q),
              " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  FLASH_CHECK(seqlen_k <= kMaxSeqlen, "flash_attn_ext: seqlen_k = ", num(seqlen_k),
              " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  FLASH_CHECK(batch <= kMaxInt && nheads <= kMaxInt && batch * nheads <= kMaxInt, "flash_attn_ext: batch * nheads = ",
              num(batch), " * ", num(nheads), " exceeds 2**31 - 1");
}

// A window side is "unbounded" when negative or when it reaches past every
// key (row 0 sees up to key seqlen_k - seqlen_q + right, the last row from
// key seqlen_k - 1 - left); normalised to -1 before narrowing to int, so
// that no int64 value (-2**32, 2**40) can wrap into a real window.
int normalise_window_side(int64_t side, int64_t reach) { return (side < 0 || side >= reach) ? -1 : static_cast<int>(side); }

// fp32 per-head values (ALiBi slopes, sink logits): (nheads,) or, where
// per_batch, also (batch, nheads); on q's device, unit last stride.
void check_per_head(const Tensor& t, const char* name, const Tensor& q, bool per_batch, int64_t batch) {
  const int64_t nheads = q.size(2);
  FLASH_CHECK(t.scalar_type() == ScalarType::Float, "flash_attn_ext: ", name, " must be float32, got ",
              dtype_name(t.scalar_type()));
  FLASH_CHECK(same_device(t, q), "flash_attn_ext: ", name, " must be on the device of q (", device_name(q),
              "), got ", device_name(t));
  const bool shape_ok = (t.dim() == 1 && t.size(0) == nheads) ||
                        (per_batch && t.dim() == 2 && t.size(0) == batch && t.size(1) == nheads);
  FLASH_CHECK(shape_ok, "flash_attn_ext: ", name, " must be (nheads,) = (", num(nheads), ",)",
              per_batch ? " or (batch, nheads) = (" + num(batch) + ", " + num(nheads) + ")" : std::string(),
              ", got ", shape(t.sizes()));
  FLASH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "flash_attn_ext: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", num(t.stride(-1)));
}

// The scale must be finite, and representable in fp32 unless the inputs
// are fp64 (every other path computes in fp32, where it would become inf).
void check_softmax_scale(double softmax_scale, ScalarType dtype) {
  FLASH_CHECK(std::isfinite(softmax_scale), "flash_attn_ext: softmax_scale must be finite, got ", num(softmax_scale));
  FLASH_CHECK(dtype == ScalarType::Double || std::abs(softmax_scale) <= std::numeric_limits<float>::max(),
              "flash_attn_ext: softmax_scale = ", num(softmax_scale), " overflows float32, the precision ", dtype_name(dtype),
              " inputs are computed in");
}

// An int32 vector of `length` on q's device, contiguous.
void check_int_vector(const Tensor& t, const char* name, int64_t length, const char* what, const Tensor& q) {
  FLASH_CHECK(t.scalar_type() == ScalarType::Int, "flash_attn_ext: ", name, " must be int32, got ",
              dtype_name(t.scalar_type()));
  FLASH_CHECK(same_device(t, q), "flash_attn_ext: ", name, " must be on the device of q (", device_name(q), "), got ",
              device_name(t));
  FLASH_CHECK(t.dim() == 1 && (length < 0 || t.size(0) == length), "flash_attn_ext: ", name, " must be 1-D ", what,
              length >= 0 ? " = (" + num(length) + ",)" : std::string(), ", got ", shape(t.sizes()));
  FLASH_CHECK(t.is_contiguous(), "flash_attn_ext: ", name, " must be contiguous");
}

void check_score_features(const Tensor& q, const ScoreFeatures& f, int64_t batch) {
  FLASH_CHECK(std::isfinite(f.softcap) && f.softcap >= 0 && f.softcap <= std::numeric_limits<float>::max(),
              "flash_attn_ext: softcap must be a finite number >= 0 (0 = off), got ", num(f.softcap));
  if (f.alibi_slopes.has_value()) check_per_head(*f.alibi_slopes, "alibi_slopes", q, /*per_batch=*/true, batch);
  if (f.sinks.has_value()) check_per_head(*f.sinks, "sinks", q, /*per_batch=*/false, batch);
  FLASH_CHECK(f.dropout_p >= 0 && f.dropout_p < 1, "flash_attn_ext: dropout_p must be in [0, 1), got ",
              num(f.dropout_p));
  if (f.dropout_p > 0) {
    FLASH_CHECK(f.rng_state.has_value(), "flash_attn_ext: dropout_p > 0 needs rng_state, an int64 tensor [seed, offset]");
    const Tensor& r = *f.rng_state;
    FLASH_CHECK(r.scalar_type() == ScalarType::Long && r.dim() == 1 && r.size(0) == 2 && r.is_contiguous(),
                "flash_attn_ext: rng_state must be a contiguous int64 tensor of shape (2,) = [seed, offset], got ",
                shape(r.sizes()), " ", dtype_name(r.scalar_type()));
    FLASH_CHECK(same_device(r, q), "flash_attn_ext: rng_state must be on the device of q (", device_name(q), "), got ",
                device_name(r));
  }
}

}  // namespace

void check_fwd_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                      const std::optional<Tensor>& attn_bias, double softmax_scale, const ScoreFeatures& features,
                      const VarlenLayout* varlen) {
  FLASH_CHECK(q.dim() == 4, "flash_attn_ext: q must be 4-D (batch, seqlen_q, nheads, headdim), got ",
              num(q.dim()), "-D");
  FLASH_CHECK(k.dim() == 4, "flash_attn_ext: k must be 4-D (batch, seqlen_k, nheads_k, headdim), got ",
              num(k.dim()), "-D");
  FLASH_CHECK(v.dim() == 4, "flash_attn_ext: v must be 4-D (batch, seqlen_k, nheads_k, headdim), got ",
              num(v.dim()), "-D");
  const auto dtype = q.scalar_type();
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16 || dtype == ScalarType::Float || dtype == ScalarType::Double,
              "flash_attn_ext: unsupported dtype ", dtype_name(dtype), "; expected float16, bfloat16, float32 or float64");
  FLASH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "flash_attn_ext: q, k and v must have the same dtype, got ", dtype_name(dtype), ", ",
              dtype_name(k.scalar_type()), " and ", dtype_name(v.scalar_type()));
  FLASH_CHECK(same_device(k, q) && same_device(v, q), "flash_attn_ext: q, k and v must be on the same device, got ",
              device_name(q), ", ", device_name(k), " and ", device_name(v));
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), headdim = q.size(3);
  const int64_t seqlen_k = k.size(1), nheads_k = k.size(2);
  FLASH_CHECK(headdim >= 1 && headdim <= 256, "flash_attn_ext: head dim must be between 1 and 256, got ",
              num(headdim));
  FLASH_CHECK(nheads >= 1, "flash_attn_ext: nheads must be at least 1, got ", num(nheads));
  check_sizes_fit(batch, seqlen_q, seqlen_k, nheads);
  check_softmax_scale(softmax_scale, dtype);
  FLASH_CHECK(k.size(0) == batch && v.size(0) == batch, "flash_attn_ext: batch size mismatch: q has ", num(batch),
              ", k has ", num(k.size(0)), ", v has ", num(v.size(0)));
  FLASH_CHECK(v.size(1) == seqlen_k, "flash_attn_ext: k and v must have the same seqlen, got ", num(seqlen_k),
              " and ", num(v.size(1)));
  FLASH_CHECK(v.size(2) == nheads_k, "flash_attn_ext: k and v must have the same number of heads, got ",
              num(nheads_k), " and ", num(v.size(2)));
  FLASH_CHECK(k.size(3) == headdim, "flash_attn_ext: q and k must have the same head dim, got ", num(headdim), " and ",
              num(k.size(3)));
  // 0 is allowed: an empty output (SDPA's value dim may be 0).
  FLASH_CHECK(v.size(3) <= 256, "flash_attn_ext: the head dim of v must be at most 256, got ", num(v.size(3)));
  FLASH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, "flash_attn_ext: nheads (", num(nheads),
              ") must be divisible by nheads_k (", num(nheads_k), ")");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_score_features(q, features, varlen != nullptr ? varlen->batch() : batch);
  FLASH_CHECK(varlen == nullptr || !attn_bias.has_value(),
              "flash_attn_ext: attn_bias is not supported with variable-length (cu_seqlens) inputs");
  if (attn_bias.has_value()) {
    const Tensor& b = *attn_bias;
    FLASH_CHECK(b.scalar_type() == dtype, "flash_attn_ext: attn_bias must have the dtype of q (",
                dtype_name(dtype), "), got ", dtype_name(b.scalar_type()));
    FLASH_CHECK(same_device(b, q), "flash_attn_ext: attn_bias must be on the device of q (", device_name(q),
                "), got ", device_name(b));
    FLASH_CHECK(b.dim() == 4 && b.size(0) == batch && b.size(1) == nheads && b.size(2) == seqlen_q &&
                    b.size(3) == seqlen_k,
                "flash_attn_ext: attn_bias must be expanded to (batch, nheads, seqlen_q, seqlen_k) = (", num(batch),
                ", ", num(nheads), ", ", num(seqlen_q), ", ", num(seqlen_k), "), got ", shape(b.sizes()));
  }
}

void check_bwd_inputs(const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                      const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
                      const std::optional<Tensor>& attn_bias, double softmax_scale, bool bias_requires_grad,
                      const ScoreFeatures& features, const VarlenLayout* varlen) {
  check_fwd_inputs(q, k, v, attn_bias, softmax_scale, features, varlen);
  FLASH_CHECK(!bias_requires_grad || attn_bias.has_value(),
              "flash_attn_ext: bias_requires_grad=True needs an attn_bias");
  // out and dout: q's shape with v's head dim.
  const std::array<int64_t, 4> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  FLASH_CHECK(same_shape(dout.sizes(), out_shape), "flash_attn_ext: dout must have the shape of out ", shape(out_shape),
              ", got ", shape(dout.sizes()));
  FLASH_CHECK(same_shape(out.sizes(), out_shape), "flash_attn_ext: out must have the shape ", shape(out_shape),
              " (q's with v's head dim), got ", shape(out.sizes()));
  FLASH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "flash_attn_ext: dout and out must have the dtype of q (", dtype_name(q.scalar_type()), "), got ",
              dtype_name(dout.scalar_type()), " and ", dtype_name(out.scalar_type()));
  FLASH_CHECK(same_device(dout, q) && same_device(out, q) && same_device(softmax_lse, q),
              "flash_attn_ext: dout, out and softmax_lse must be on the device of q (", device_name(q), ")");
  check_last_dim_contiguous(dout, "dout");
  check_last_dim_contiguous(out, "out");
  FLASH_CHECK(softmax_lse.scalar_type() == ScalarType::Float, "flash_attn_ext: softmax_lse must be float32, got ",
              dtype_name(softmax_lse.scalar_type()));
  FLASH_CHECK(softmax_lse.dim() == 3 && softmax_lse.size(0) == q.size(0) && softmax_lse.size(1) == q.size(2) &&
                  softmax_lse.size(2) == q.size(1),
              "flash_attn_ext: softmax_lse must be (batch, nheads, seqlen_q) = (", num(q.size(0)), ", ", num(q.size(2)),
              ", ", num(q.size(1)), "), got ", shape(softmax_lse.sizes()));
  FLASH_CHECK(softmax_lse.is_contiguous(), "flash_attn_ext: softmax_lse must be contiguous");
  const bool residual_expected = needs_lse_residual(q, attn_bias);
  FLASH_CHECK(lse_residual.scalar_type() == ScalarType::Float && lse_residual.is_contiguous() &&
                  same_device(lse_residual, q) &&
                  (residual_expected ? same_shape(lse_residual.sizes(), softmax_lse.sizes()) : lse_residual.numel() == 0),
              "flash_attn_ext: lse_residual must be the contiguous float32 tensor fwd returned for these inputs (",
              residual_expected ? "shaped like softmax_lse " + shape(softmax_lse.sizes()) : std::string("empty"),
              ", on ", device_name(q), "), got ", shape(lse_residual.sizes()), " ", dtype_name(lse_residual.scalar_type()),
              " on ", device_name(lse_residual));
  if (dsoftmax_lse.has_value()) {
    FLASH_CHECK(dsoftmax_lse->scalar_type() == ScalarType::Float && same_shape(dsoftmax_lse->sizes(), softmax_lse.sizes()) &&
                    dsoftmax_lse->is_contiguous() && same_device(*dsoftmax_lse, q),
                "flash_attn_ext: dsoftmax_lse must be a contiguous float32 tensor shaped like softmax_lse ",
                shape(softmax_lse.sizes()), " on ", device_name(q));
  }
}

void set_fwd_params(FlashFwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                    const std::optional<Tensor>& attn_bias, const Tensor& out,
                    const Tensor& softmax_lse, const Tensor& lse_residual, double softmax_scale, bool causal,
                    int64_t window_left, int64_t window_right, const ScoreFeatures& features,
                    const VarlenLayout* varlen) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.softmax_lse = static_cast<float*>(softmax_lse.data_ptr());
  p.lse_residual = lse_residual.numel() > 0 ? static_cast<float*>(lse_residual.data_ptr()) : nullptr;
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  if (attn_bias.has_value()) {
    const Tensor& b = *attn_bias;
    p.bias = b.data_ptr();
    p.bias_batch_stride = b.stride(0), p.bias_head_stride = b.stride(1);
    p.bias_row_stride = b.stride(2), p.bias_col_stride = b.stride(3);
  } else {
    p.bias = nullptr;
  }
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.seqlen_k = static_cast<int>(k.size(1));
  p.nheads = static_cast<int>(q.size(2));
  p.nheads_k = static_cast<int>(k.size(2));
  p.headdim = static_cast<int>(q.size(3));
  p.lse_batch_stride = int64_t(p.nheads) * p.seqlen_q;
  p.lse_head_stride = p.seqlen_q;
  if (varlen != nullptr) {
    // The tensors are (1, total, heads, dim) views; the sequences come from
    // the cumulative lengths, and softmax_lse is (1, nheads, total_q).
    p.cu_seqlens_q = static_cast<const int*>(varlen->cu_seqlens_q.data_ptr());
    p.cu_seqlens_k = static_cast<const int*>(varlen->cu_seqlens_k.data_ptr());
    p.seqused_k = varlen->seqused_k.has_value() ? static_cast<const int*>(varlen->seqused_k->data_ptr()) : nullptr;
    p.total_q = p.seqlen_q;
    p.total_k = p.seqlen_k;
    p.batch = static_cast<int>(varlen->batch());
    p.seqlen_q = static_cast<int>(varlen->max_seqlen_q);
    p.seqlen_k = static_cast<int>(varlen->max_seqlen_k);
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = 0;
    p.lse_batch_stride = 0;
    p.lse_head_stride = p.total_q;
  }
  p.softmax_scale = softmax_scale;
  p.softmax_scale_f = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  // A window that reaches past every key of every row is no window;
  // normalising here also lets kernels take the cheaper unmasked path.
  p.window_left = normalise_window_side(window_left, p.seqlen_k);
  p.window_right = causal ? 0 : normalise_window_side(window_right, p.seqlen_q);
  p.is_causal = causal || (p.window_left < 0 && p.window_right == 0);
  p.softcap = static_cast<float>(features.softcap);
  if (features.alibi_slopes.has_value()) {
    const Tensor& slopes = *features.alibi_slopes;
    p.alibi_slopes = static_cast<const float*>(slopes.data_ptr());
    p.alibi_batch_stride = slopes.dim() == 2 ? slopes.stride(0) : 0;
  }
  if (features.sinks.has_value()) p.sinks = static_cast<const float*>(features.sinks->data_ptr());
  p.dropout_p = features.dropout_p;
  if (p.dropout_p > 0) p.rng_state = static_cast<const int64_t*>(features.rng_state->data_ptr());
}

void set_bwd_params(FlashBwdParams& p, const Tensor& dout, const Tensor& q, const Tensor& k,
                    const Tensor& v, const Tensor& out, const Tensor& softmax_lse,
                    const Tensor& lse_residual, const std::optional<Tensor>& dsoftmax_lse,
                    const std::optional<Tensor>& attn_bias, const Tensor& dq, const Tensor& dk,
                    const Tensor& dv, const std::optional<Tensor>& dbias, double softmax_scale,
                    bool causal, int64_t window_left, int64_t window_right, bool deterministic,
                    const ScoreFeatures& features, const VarlenLayout* varlen) {
  set_fwd_params(p, q, k, v, attn_bias, out, softmax_lse, lse_residual, softmax_scale, causal, window_left,
                 window_right, features, varlen);
  p.dout = dout.data_ptr();
  p.dsoftmax_lse = dsoftmax_lse.has_value() ? static_cast<const float*>(dsoftmax_lse->data_ptr()) : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias = dbias.has_value() ? dbias->data_ptr() : nullptr;
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
  if (varlen != nullptr) p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
  p.deterministic = deterministic;
}

namespace {

// The values of cumulative lengths that are on the CPU: they start at >= 0,
// never decrease, end within `total`, and no step exceeds `max_len`.
void check_cu_seqlens_values(const Tensor& cu, const char* name, int64_t total, int64_t max_len,
                             const char* max_name) {
  const int* v = static_cast<const int*>(cu.data_ptr());
  const int64_t n = cu.size(0);
  FLASH_CHECK(v[0] >= 0, "flash_attn_ext: ", name, "[0] must be >= 0, got ", num(v[0]));
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t len = int64_t(v[i + 1]) - v[i];
    FLASH_CHECK(len >= 0, "flash_attn_ext: ", name, " must be non-decreasing, but ", name, "[", num(i + 1), "] = ",
                num(v[i + 1]), " < ", name, "[", num(i), "] = ", num(v[i]));
    FLASH_CHECK(len <= max_len, "flash_attn_ext: sequence ", num(i), " has length ", num(len), " (from ", name,
                "), more than ", max_name, " = ", num(max_len));
  }
  FLASH_CHECK(v[n - 1] <= total, "flash_attn_ext: ", name, "[-1] = ", num(v[n - 1]),
              " exceeds the number of rows of the tensor it indexes (", num(total), ")");
}

}  // namespace

void check_varlen_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const VarlenLayout& layout) {
  FLASH_CHECK(q.dim() == 3, "flash_attn_ext: varlen q must be 3-D (total_q, nheads, headdim), got ", num(q.dim()),
              "-D");
  FLASH_CHECK(k.dim() == 3, "flash_attn_ext: varlen k must be 3-D (total_k, nheads_k, headdim), got ", num(k.dim()),
              "-D");
  FLASH_CHECK(v.dim() == 3, "flash_attn_ext: varlen v must be 3-D (total_k, nheads_k, headdim), got ", num(v.dim()),
              "-D");
  check_int_vector(layout.cu_seqlens_q, "cu_seqlens_q", -1, "(batch + 1,)", q);
  FLASH_CHECK(layout.cu_seqlens_q.size(0) >= 1, "flash_attn_ext: cu_seqlens_q must have batch + 1 >= 1 entries");
  const int64_t batch = layout.batch();
  check_int_vector(layout.cu_seqlens_k, "cu_seqlens_k", batch + 1, "(batch + 1,), like cu_seqlens_q", q);
  if (layout.seqused_k.has_value()) check_int_vector(*layout.seqused_k, "seqused_k", batch, "(batch,)", q);
  FLASH_CHECK(layout.max_seqlen_q >= 0 && layout.max_seqlen_q <= kMaxSeqlen, "flash_attn_ext: max_seqlen_q must be in [0, ",
              num(kMaxSeqlen), "], got ", num(layout.max_seqlen_q));
  FLASH_CHECK(layout.max_seqlen_k >= 0 && layout.max_seqlen_k <= kMaxSeqlen, "flash_attn_ext: max_seqlen_k must be in [0, ",
              num(kMaxSeqlen), "], got ", num(layout.max_seqlen_k));
  FLASH_CHECK(q.size(0) <= kMaxInt && k.size(0) <= kMaxInt, "flash_attn_ext: total_q and total_k must be below 2**31");
  if (layout.cu_seqlens_q.is_cpu()) {
    check_cu_seqlens_values(layout.cu_seqlens_q, "cu_seqlens_q", q.size(0), layout.max_seqlen_q, "max_seqlen_q");
  }
  if (layout.cu_seqlens_k.is_cpu()) {
    // With seqused_k a sequence's span of k may be longer than the keys it uses.
    const int64_t max_k = layout.seqused_k.has_value() ? k.size(0) : layout.max_seqlen_k;
    check_cu_seqlens_values(layout.cu_seqlens_k, "cu_seqlens_k", k.size(0), max_k,
                            layout.seqused_k.has_value() ? "total_k" : "max_seqlen_k");
  }
  if (layout.seqused_k.has_value() && layout.seqused_k->is_cpu()) {
    const int* used = static_cast<const int*>(layout.seqused_k->data_ptr());
    const int* cu = static_cast<const int*>(layout.cu_seqlens_k.data_ptr());
    for (int64_t i = 0; i < batch; ++i) {
      FLASH_CHECK(used[i] >= 0 && used[i] <= layout.max_seqlen_k && used[i] <= cu[i + 1] - cu[i],
                  "flash_attn_ext: seqused_k[", num(i), "] = ", num(used[i]),
                  " must be in [0, min(max_seqlen_k, its sequence's length in cu_seqlens_k)]");
    }
  }
}

Tensor as_one_sequence(const Tensor& t) {
  const std::array<int64_t, 4> shape4{1, t.size(0), t.size(1), t.size(2)};
  return torch::stable::view(t, shape4);
}

Tensor drop_batch_dim(const Tensor& t) {
  if (t.dim() <= 1) return t;  // an empty placeholder
  if (t.dim() == 3) {
    const std::array<int64_t, 2> shape2{t.size(1), t.size(2)};
    return torch::stable::view(t, shape2);
  }
  const std::array<int64_t, 3> shape3{t.size(1), t.size(2), t.size(3)};
  return torch::stable::view(t, shape3);
}

namespace {

Tensor rows_view(const Tensor& t, const char* name) {
  FLASH_CHECK(t.dim() == 3, "flash_attn_ext: varlen ", name, " must be 3-D (total_q, nheads, headdim), got ",
              num(t.dim()), "-D");
  return as_one_sequence(t);
}

Tensor lse_view(const Tensor& t, const char* name) {
  FLASH_CHECK(t.dim() == 2, "flash_attn_ext: varlen ", name, " must be 2-D (nheads, total_q), got ", num(t.dim()), "-D");
  const std::array<int64_t, 3> shape3{1, t.size(0), t.size(1)};
  return torch::stable::view(t, shape3);
}

}  // namespace

VarlenViews::VarlenViews(const Tensor& dout_, const Tensor& out_, const Tensor& softmax_lse,
                         const Tensor& lse_residual_, const std::optional<Tensor>& dsoftmax_lse)
    : dout(rows_view(dout_, "dout")),
      out(rows_view(out_, "out")),
      lse(lse_view(softmax_lse, "softmax_lse")),
      lse_residual(lse_residual_.dim() != 2 ? lse_residual_ : lse_view(lse_residual_, "lse_residual")) {
  if (dsoftmax_lse.has_value()) dlse = lse_view(*dsoftmax_lse, "dsoftmax_lse");
}

void check_kvcache_inputs(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                          const std::optional<Tensor>& cache_batch_idx, const std::optional<Tensor>& cache_leftpad,
                          const std::optional<Tensor>& block_table, double softmax_scale, double softcap,
                          const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks,
                          int64_t num_splits) {
  FLASH_CHECK(q.dim() == 4, "flash_attn_ext: q must be 4-D (batch, seqlen_q, nheads, headdim), got ", num(q.dim()),
              "-D");
  FLASH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "flash_attn_ext: k_cache and v_cache must be 4-D (batch_cache, seqlen_cache, nheads_k, headdim), or "
              "(num_blocks, page_size, nheads_k, headdim) with a block_table; got ",
              num(k_cache.dim()), "-D and ", num(v_cache.dim()), "-D");
  const auto dtype = q.scalar_type();
  FLASH_CHECK(dtype == ScalarType::Half || dtype == ScalarType::BFloat16 || dtype == ScalarType::Float ||
                  dtype == ScalarType::Double,
              "flash_attn_ext: unsupported dtype ", dtype_name(dtype),
              "; expected float16, bfloat16, float32 or float64");
  FLASH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "flash_attn_ext: q, k_cache and v_cache must have the same dtype, got ", dtype_name(dtype), ", ",
              dtype_name(k_cache.scalar_type()), " and ", dtype_name(v_cache.scalar_type()));
  FLASH_CHECK(same_device(k_cache, q) && same_device(v_cache, q),
              "flash_attn_ext: q, k_cache and v_cache must be on the same device, got ", device_name(q), ", ",
              device_name(k_cache), " and ", device_name(v_cache));
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), headdim = q.size(3);
  const int64_t nheads_k = k_cache.size(2);
  FLASH_CHECK(headdim >= 1 && headdim <= 256, "flash_attn_ext: head dim must be between 1 and 256, got ",
              num(headdim));
  FLASH_CHECK(nheads >= 1, "flash_attn_ext: nheads must be at least 1, got ", num(nheads));
  FLASH_CHECK(same_shape(k_cache.sizes(), v_cache.sizes()), "flash_attn_ext: k_cache and v_cache must have one shape, got ",
              shape(k_cache.sizes()), " and ", shape(v_cache.sizes()));
  FLASH_CHECK(k_cache.size(3) == headdim, "flash_attn_ext: q and k_cache must have the same head dim, got ",
              num(headdim), " and ", num(k_cache.size(3)));
  FLASH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, "flash_attn_ext: nheads (", num(nheads),
              ") must be divisible by the cache's nheads_k (", num(nheads_k), ")");
  FLASH_CHECK(seqlen_q <= kMaxSeqlen, "flash_attn_ext: seqlen_q = ", num(seqlen_q),
              " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  FLASH_CHECK(batch * nheads <= kMaxInt, "flash_attn_ext: batch * nheads = ", num(batch),
              " * ", num(nheads), " exceeds 2**31 - 1");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");

  // The kernels index these as contiguous int32 vectors.
  check_int_vector(cache_seqlens, "cache_seqlens", batch, "(batch,)", q);
  if (cache_batch_idx.has_value()) check_int_vector(*cache_batch_idx, "cache_batch_idx", batch, "(batch,)", q);
  if (cache_leftpad.has_value()) check_int_vector(*cache_leftpad, "cache_leftpad", batch, "(batch,)", q);
  if (block_table.has_value()) {
    const Tensor& bt = *block_table;
    FLASH_CHECK(bt.scalar_type() == ScalarType::Int, "flash_attn_ext: block_table must be int32, got ",
                dtype_name(bt.scalar_type()));
    FLASH_CHECK(same_device(bt, q), "flash_attn_ext: block_table must be on the device of q (", device_name(q),
                "), got ", device_name(bt));
    FLASH_CHECK(bt.dim() == 2 && bt.size(0) == batch,
                "flash_attn_ext: block_table must be (batch, max_blocks_per_seq) with batch = ", num(batch), ", got ",
                shape(bt.sizes()));
    FLASH_CHECK(bt.numel() == 0 || bt.size(1) <= 1 || bt.stride(1) == 1,
                "flash_attn_ext: block_table must have a contiguous last dimension (stride 1)");
    FLASH_CHECK(!cache_batch_idx.has_value(),
                "flash_attn_ext: cache_batch_idx cannot be combined with a block_table (the block table already "
                "says where each sequence's keys are)");
    FLASH_CHECK(k_cache.size(1) >= 1, "flash_attn_ext: a paged k_cache needs a page size >= 1, got shape ",
                shape(k_cache.sizes()));
    FLASH_CHECK(bt.size(1) == 0 || k_cache.size(0) >= 1, "flash_attn_ext: a paged k_cache needs at least one block");
    FLASH_CHECK(bt.size(1) * k_cache.size(1) <= kMaxSeqlen, "flash_attn_ext: max_blocks_per_seq * page_size = ",
                num(bt.size(1)), " * ", num(k_cache.size(1)), " exceeds the supported maximum of ",
                num(kMaxSeqlen), " keys per sequence");
  } else {
    FLASH_CHECK(cache_batch_idx.has_value() || k_cache.size(0) >= batch, "flash_attn_ext: k_cache has ",
                num(k_cache.size(0)), " batch rows, fewer than q's batch of ", num(batch),
                " (pass cache_batch_idx to pick rows)");
    FLASH_CHECK(!cache_batch_idx.has_value() || batch == 0 || k_cache.size(0) >= 1,
                "flash_attn_ext: cache_batch_idx needs a k_cache with at least one batch row");
    FLASH_CHECK(k_cache.size(1) <= kMaxSeqlen, "flash_attn_ext: seqlen_cache = ", num(k_cache.size(1)),
                " is longer than the supported maximum of ", num(kMaxSeqlen), " (2**30 - 1)");
  }
  FLASH_CHECK(k_cache.size(0) <= kMaxInt, "flash_attn_ext: k_cache.size(0) = ",
              num(k_cache.size(0)), " exceeds 2**31 - 1");

  check_softmax_scale(softmax_scale, dtype);
  check_score_features(q, ScoreFeatures{softcap, alibi_slopes, sinks}, batch);
  FLASH_CHECK(num_splits >= 0 && num_splits <= 1024, "flash_attn_ext: num_splits must be between 0 (automatic) and ",
              "1024, got ", num(num_splits));
}

namespace {

// A window side as the kernels take it: -1 (unbounded) or a width up to
// 2**30, so that the mask's sums (row + L - seqlen_q +- side) stay in int.
int kvcache_window_side(int64_t side) {
  if (side < 0) return -1;
  return static_cast<int>(side < kMaxSeqlen ? side : kMaxSeqlen);
}

}  // namespace

// Fills everything but out, softmax_lse and the split scratch. q, k_cache and
// v_cache are the tensors the kernels read (the CUDA host may pass padded
// or aligned copies of them).
void set_kvcache_params(FlashKvcacheParams& p, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& cache_seqlens, const std::optional<Tensor>& cache_batch_idx,
                        const std::optional<Tensor>& cache_leftpad, const std::optional<Tensor>& block_table,
                        double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
                        const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& sinks) {
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k_cache.stride(0), p.k_row_stride = k_cache.stride(1), p.k_head_stride = k_cache.stride(2);
  p.v_batch_stride = v_cache.stride(0), p.v_row_stride = v_cache.stride(1), p.v_head_stride = v_cache.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.nheads = static_cast<int>(q.size(2));
  p.nheads_k = static_cast<int>(k_cache.size(2));
  p.headdim = static_cast<int>(q.size(3));
  p.softmax_scale = softmax_scale;
  p.softmax_scale_f = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.window_left = kvcache_window_side(window_left);
  p.window_right = causal ? 0 : kvcache_window_side(window_right);
  p.is_causal = p.window_left < 0 && p.window_right == 0;
  p.softcap = static_cast<float>(softcap);
  if (alibi_slopes.has_value()) {
    p.alibi_slopes = static_cast<const float*>(alibi_slopes->data_ptr());
    p.alibi_batch_stride = alibi_slopes->dim() == 2 ? alibi_slopes->stride(0) : 0;
  }
  if (sinks.has_value()) p.sinks = static_cast<const float*>(sinks->data_ptr());
  p.cache_seqlens = static_cast<const int*>(cache_seqlens.data_ptr());
  p.cache_batch_idx = cache_batch_idx.has_value() ? static_cast<const int*>(cache_batch_idx->data_ptr()) : nullptr;
  p.cache_leftpad = cache_leftpad.has_value() ? static_cast<const int*>(cache_leftpad->data_ptr()) : nullptr;
  p.cache_rows = static_cast<int>(k_cache.size(0));
  if (block_table.has_value()) {
    p.block_table = static_cast<const int*>(block_table->data_ptr());
    p.block_table_batch_stride = block_table->stride(0);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.max_blocks = static_cast<int>(block_table->size(1));
    p.capacity = p.max_blocks * p.page_size;
  } else {
    p.capacity = static_cast<int>(k_cache.size(1));
  }
  p.seqlen_k = p.capacity;  // the longest a sequence can be; kernels use each one's own
}

Tensor lse_without_keys(const Tensor& q, const std::optional<Tensor>& sinks) {
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(2), q.size(1)};
  Tensor lse = full_on(q, lse_shape, ScalarType::Float, std::numeric_limits<double>::infinity());
  if (!sinks.has_value()) return lse;
  // lse[b, h, i] = sinks[h] (copy_ broadcasts), then -inf (no sink) -> +inf.
  const std::array<int64_t, 3> per_head{1, q.size(2), 1};
  torch::stable::copy_(lse, torch::stable::reshape(*sinks, per_head));
  const double inf = std::numeric_limits<double>::infinity();
  std::array<StableIValue, 4> stack{torch::stable::detail::from(lse),
                                    torch::stable::detail::from(std::optional<double>()),
                                    torch::stable::detail::from(std::optional<double>(inf)),
                                    torch::stable::detail::from(std::optional<double>(inf))};
  FLASH_CHECK(torch_call_dispatcher("aten::nan_to_num", "", stack.data(), TORCH_ABI_VERSION) == 0,
              "flash_attn_ext: aten::nan_to_num failed inside PyTorch");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace flash_attn_ext
