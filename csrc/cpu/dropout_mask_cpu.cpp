// The dropout_mask op (ops.cpp): the keep-mask every kernel applies for a
// given rng_state and dropout_p (../dropout.h), materialised as a bool
// tensor for tests and for return_attn_probs on small problems. CPU only;
// the Python side moves rng_state to the CPU and the mask back.
#include <array>

#include "../checks.h"
#include "../dropout.h"
#include "../format.h"
#include "../flash_api.h"

namespace flash_attn_ext {

Tensor dropout_mask_cpu(const Tensor& rng_state, int64_t batch, int64_t nheads, int64_t seqlen_q, int64_t seqlen_k,
                        double dropout_p) {
  FLASH_CHECK(dropout_p >= 0 && dropout_p < 1, "flash_attn_ext: dropout_p must be in [0, 1), got ", num(dropout_p));
  FLASH_CHECK(rng_state.scalar_type() == ScalarType::Long && rng_state.dim() == 1 && rng_state.size(0) == 2 &&
                  rng_state.is_contiguous(),
              "flash_attn_ext: rng_state must be a contiguous int64 tensor of shape (2,) = [seed, offset]");
  FLASH_CHECK(batch >= 0 && nheads >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && seqlen_q < (int64_t(1) << 30) &&
                  seqlen_k < (int64_t(1) << 30),
              "flash_attn_ext: dropout_mask: bad shape");
  const std::array<int64_t, 4> shape{batch, nheads, seqlen_q, seqlen_k};
  Tensor mask = empty_on(rng_state, shape, ScalarType::Bool);
  bool* m = static_cast<bool*>(mask.data_ptr());
  FlashFwdParams p;
  p.nheads = static_cast<int>(nheads);
  p.dropout_p = dropout_p;
  p.rng_state = static_cast<const int64_t*>(rng_state.data_ptr());
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < nheads; ++h) {
      const flash::Dropout dropout(p, b, h);
      for (int64_t r = 0; r < seqlen_q; ++r) {
        bool* row = m + ((b * nheads + h) * seqlen_q + r) * seqlen_k;
        if (!dropout.on) {
          for (int64_t c = 0; c < seqlen_k; ++c) row[c] = true;
          continue;
        }
        dropout.for_row(static_cast<int>(r), 0, static_cast<int>(seqlen_k), [&](int col, bool kept) { row[col] = kept; });
      }
    }
  }
  return mask;
}

}  // namespace flash_attn_ext
