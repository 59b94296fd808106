// flash_attn_ext::fwd_fp8 on CUDA: the native FP8 (float8_e4m3fn) forward on
// Hopper. Validates the op's arguments, allocates the bf16 output and the
// lse, fills FlashFwdParams (the shared set_fwd_params, then the FP8 fields:
// descale tables and the transposed V), transposes V into a scratch v_t
// (flash_fwd_fp8_transpose.cu) and launches the warp-specialized kernel's
// e4m3 instantiation (hopper/launch_ws.cuh) for head dim 128 or 256. The op
// is the native path only: flash_attn_ext/fp8.py decides which calls take it
// (native_fp8_reason) and sends the rest to the dequantizing path. Whatever
// this file cannot run raises, naming why; nothing falls back silently here.
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../checks.h"
#include "../flash_api.h"
#include "../format.h"
#include "cuda_context.h"
#include "flash_launch.h"
#include "tile_counter.h"

namespace flash_attn_ext {
namespace {

// The head dims with FP8 units in this build (setup.py compiles the
// *_e4m3_sm90ws.cu units with FLASH_ATTN_EXT_DTYPE_E4M3 and sm_90a).
bool fp8_head_dim_compiled(int64_t d) {
#if defined(FLASH_ATTN_EXT_DTYPE_E4M3) && defined(FLASH_ATTN_EXT_SM90)
#ifdef FLASH_ATTN_EXT_HDIM_128
  if (d == 128) return true;
#endif
#ifdef FLASH_ATTN_EXT_HDIM_256
  if (d == 256) return true;
#endif
#endif
  (void)d;
  return false;
}

void check_e4m3(const Tensor& t, const char* name, int64_t dims, const char* layout, const Tensor& q) {
  FLASH_CHECK(t.scalar_type() == ScalarType::Float8_e4m3fn, "flash_attn_ext: fwd_fp8: ", name,
              " must be torch.float8_e4m3fn, got ", dtype_name(t.scalar_type()));
  FLASH_CHECK(t.dim() == dims, "flash_attn_ext: fwd_fp8: ", name, " must be ", num(dims), "-D ", layout, ", got ",
              num(t.dim()), "-D");
  FLASH_CHECK(same_device(t, q), "flash_attn_ext: fwd_fp8: ", name, " must be on ", device_name(q), ", got ",
              device_name(t));
  FLASH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "flash_attn_ext: fwd_fp8: ", name,
              " must have a contiguous last dimension (stride 1), got stride ", num(t.stride(-1)));
}

// A descale table: fp32 (batch, nheads_k), any strides (a broadcast single
// value has strides 0), on q's device.
DescaleTable descale_table(const Tensor& t, const char* name, int64_t batch, int64_t nheads_k, const Tensor& q) {
  FLASH_CHECK(t.scalar_type() == ScalarType::Float, "flash_attn_ext: fwd_fp8: ", name, " must be torch.float32, got ",
              dtype_name(t.scalar_type()));
  FLASH_CHECK(same_device(t, q), "flash_attn_ext: fwd_fp8: ", name, " must be on ", device_name(q), ", got ",
              device_name(t));
  FLASH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == nheads_k, "flash_attn_ext: fwd_fp8: ", name,
              " must be (batch, nheads_k) = (", num(batch), ", ", num(nheads_k), ") (expand a single value), got ",
              shape(t.sizes()));
  DescaleTable table;
  table.ptr = static_cast<const float*>(t.data_ptr());
  table.batch_stride = t.stride(0);
  table.head_stride = t.stride(1);
  return table;
}

}  // namespace

std::tuple<Tensor, Tensor> fwd_fp8_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const Tensor& q_descale, const Tensor& k_descale, const Tensor& v_descale,
                                        const std::optional<Tensor>& cu_seqlens_q,
                                        const std::optional<Tensor>& cu_seqlens_k,
                                        const std::optional<Tensor>& seqused_k, int64_t max_seqlen_q,
                                        int64_t max_seqlen_k, double softmax_scale, bool causal,
                                        int64_t window_left, int64_t window_right) {
  FLASH_CHECK(q_in.is_cuda(), "flash_attn_ext: fwd_fp8 expects CUDA tensors, got q on ", device_name(q_in));
  const bool varlen = cu_seqlens_q.has_value();
  FLASH_CHECK(cu_seqlens_k.has_value() == varlen,
              "flash_attn_ext: fwd_fp8: cu_seqlens_q and cu_seqlens_k go together (variable-length calls) or not at "
              "all");
  FLASH_CHECK(varlen || !seqused_k.has_value(), "flash_attn_ext: fwd_fp8: seqused_k needs cu_seqlens");
  const int64_t dims = varlen ? 3 : 4;
  check_e4m3(q_in, "q", dims, varlen ? "(total_q, nheads, headdim)" : "(batch, seqlen_q, nheads, headdim)", q_in);
  check_e4m3(k_in, "k", dims, varlen ? "(total_k, nheads_k, headdim)" : "(batch, seqlen_k, nheads_k, headdim)", q_in);
  check_e4m3(v_in, "v", dims, varlen ? "(total_k, nheads_k, headdim)" : "(batch, seqlen_k, nheads_k, headdim)", q_in);
  FLASH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "flash_attn_ext: fwd_fp8: softmax_scale must be "
              "positive and finite, got ", num(softmax_scale));
  const CudaContext cuda(q_in);

  // Dense tensors as they are; varlen ones as batch-1 views (checks.h).
  const Tensor q = varlen ? as_one_sequence(q_in) : q_in;
  const Tensor k = varlen ? as_one_sequence(k_in) : k_in;
  const Tensor v = varlen ? as_one_sequence(v_in) : v_in;
  const int64_t nheads = q.size(2), head_dim = q.size(3), nheads_k = k.size(2);
  FLASH_CHECK(fp8_head_dim_compiled(head_dim), "flash_attn_ext: fwd_fp8: no FP8 kernel for head dim ",
              num(head_dim), " in this build (head dims 128 and 256, with e4m3 in FLASH_ATTN_EXT_DTYPES and sm_90a)");
  FLASH_CHECK(k.size(3) == head_dim, "flash_attn_ext: fwd_fp8: q and k must have the same head dim, got ",
              num(head_dim), " and ", num(k.size(3)));
  FLASH_CHECK(nheads >= 1 && nheads_k >= 1 && nheads % nheads_k == 0, "flash_attn_ext: fwd_fp8: nheads (",
              num(nheads), ") must be a multiple of nheads_k (", num(nheads_k), ")");
  FLASH_CHECK(same_shape(v.sizes(), k.sizes()), "flash_attn_ext: fwd_fp8: v must have k's shape ", shape(k.sizes()),
              " (one head dim for q, k and v), got ", shape(v.sizes()));
  // The kernels' 16-byte and TMA accesses: 16-byte aligned data and strides
  // (fp8.py makes copies of tensors that are not).
  for (const Tensor* t : {&q, &k, &v}) {
    bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
    for (int i = 0; i < 3; ++i) aligned = aligned && (t->size(i) <= 1 || t->stride(i) % 16 == 0);
    FLASH_CHECK(aligned, "flash_attn_ext: fwd_fp8: q, k and v need 16-byte aligned data and strides (got strides ",
                shape(t->strides()), "); call .contiguous() first");
  }

  int64_t batch = q.size(0);
  std::optional<VarlenLayout> layout;
  if (varlen) {
    layout.emplace(VarlenLayout{*cu_seqlens_q, *cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k});
    check_varlen_inputs(q_in, k_in, v_in, *layout);
    batch = layout->batch();
  } else {
    FLASH_CHECK(k.size(0) == batch, "flash_attn_ext: fwd_fp8: q and k must have the same batch, got ", num(batch),
                " and ", num(k.size(0)));
  }

  const DescaleTable q_table = descale_table(q_descale, "q_descale", batch, nheads_k, q_in);
  const DescaleTable k_table = descale_table(k_descale, "k_descale", batch, nheads_k, q_in);
  const DescaleTable v_table = descale_table(v_descale, "v_descale", batch, nheads_k, q_in);

  const int64_t rows_q = q.size(1);
  const std::array<int64_t, 4> out_shape{q.size(0), rows_q, nheads, head_dim};
  const std::array<int64_t, 3> lse_shape{q.size(0), nheads, rows_q};
  // Varlen rows outside every sequence: out 0, lse +inf (as varlen_fwd).
  Tensor out = varlen ? zeros_on(q, out_shape, ScalarType::BFloat16) : empty_on(q, out_shape, ScalarType::BFloat16);
  Tensor lse = varlen ? full_on(q, lse_shape, ScalarType::Float, std::numeric_limits<double>::infinity())
                      : empty_on(q, lse_shape, ScalarType::Float);
  auto result = [&]() -> std::tuple<Tensor, Tensor> {
    if (varlen) return {drop_batch_dim(out), drop_batch_dim(lse)};
    return {out, lse};
  };
  if (batch == 0 || rows_q == 0 || nheads == 0) return result();
  if (k.size(1) == 0) {  // no key at all: every row is empty
    out = zeros_on(q, out_shape, ScalarType::BFloat16);
    lse = full_on(q, lse_shape, ScalarType::Float, std::numeric_limits<double>::infinity());
    return result();
  }

  FlashFwdParams params;
  const Tensor no_residual = empty_on(q, {0}, ScalarType::Float);
  set_fwd_params(params, q, k, v, std::nullopt, out, lse, no_residual, softmax_scale, causal, window_left,
                 window_right, ScoreFeatures{}, layout ? &*layout : nullptr);
  if (params.batch == 0 || params.seqlen_q == 0 || params.seqlen_k == 0) return result();
  // v_t (flash_params.h): every column the kernel reads is written by the
  // transpose, so it needs no zero fill.
  const int64_t vt_cols = varlen ? fp8_vt_varlen_cols(k.size(1), batch) : (k.size(1) + 127) / 128 * 128;
  const std::array<int64_t, 4> vt_shape{varlen ? 1 : batch, nheads_k, head_dim, vt_cols};
  const Tensor v_t = empty_on(q, vt_shape, ScalarType::Byte);
  params.vt_batch_stride = v_t.stride(0);
  params.vt_head_stride = v_t.stride(1);
  params.vt_dim_stride = v_t.stride(2);
  params.vt_cols = vt_cols;
  params.q_descale = q_table;
  params.k_descale = k_table;
  params.v_descale = v_table;

#if defined(FLASH_ATTN_EXT_DTYPE_E4M3) && defined(FLASH_ATTN_EXT_SM90)
  const cudaStream_t stream = cuda.stream();
  run_fp8_transpose_v(params, v_t.data_ptr(), stream);  // reads params.v, V as given
  params.v = v_t.data_ptr();                            // the attention reads V^T
  params.v_batch_stride = params.v_row_stride = params.v_head_stride = 0;
  const std::optional<Tensor> tile_counter =
      make_tile_counter(q, flash::sm90::fwd_persistent_head_dim(static_cast<int>(head_dim)) &&
                               flash::sm90::fwd_persistent(),
                        &params.tile_counter);  // a persistent grid
  const std::optional<Tensor> tile_list = make_varlen_tile_list(q, params);
#ifdef FLASH_ATTN_EXT_HDIM_128
  if (head_dim == 128) run_flash_fwd_sm90_ws<__nv_fp8_e4m3, 128>(params, stream);
#endif
#ifdef FLASH_ATTN_EXT_HDIM_256
  if (head_dim == 256) run_flash_fwd_sm90_ws<__nv_fp8_e4m3, 256>(params, stream);
#endif
#endif
  return result();
}

}  // namespace flash_attn_ext
