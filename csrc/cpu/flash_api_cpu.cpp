// Registers the C++ CPU implementation (flash_fwd_cpu.cpp, flash_bwd_cpu.cpp).
#include "../flash_api.h"

STABLE_TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("fwd", TORCH_BOX(&flash_attn_ext::fwd_cpu));
  m.impl("bwd", TORCH_BOX(&flash_attn_ext::bwd_cpu));
  m.impl("varlen_fwd", TORCH_BOX(&flash_attn_ext::varlen_fwd_cpu));
  m.impl("varlen_bwd", TORCH_BOX(&flash_attn_ext::varlen_bwd_cpu));
  m.impl("fwd_kvcache", TORCH_BOX(&flash_attn_ext::fwd_kvcache_cpu));  // kvcache_cpu.cpp
  m.impl("dropout_mask", TORCH_BOX(&flash_attn_ext::dropout_mask_cpu));
}
