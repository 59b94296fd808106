// Registers the C++ CPU implementation (flash_fwd_cpu.cpp, flash_bwd_cpu.cpp).
#include <torch/library.h>

#include "../flash_api.h"

TORCH_LIBRARY_IMPL(flash_attn_ext, CPU, m) {
  m.impl("fwd", &flash_attn_ext::fwd_cpu);
  m.impl("bwd", &flash_attn_ext::bwd_cpu);
}
