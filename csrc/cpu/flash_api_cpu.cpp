// Registers the C++ CPU implementation (flash_fwd_cpu.cpp, flash_bwd_cpu.cpp).
#include "../flash_api.h"

STABLE_TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("fwd", TORCH_BOX(&flash_attn_ext::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&flash_attn_ext::bwd_cpu));
  m.impl("dropout_mask", TORCH_BOX(&flash_attn_ext::dropout_mask_cpu));
}
