// Registers the CUDA implementation (flash_fwd_host.cpp, flash_bwd_host.cpp).
// A development build may compile one direction only (setup.py's
// FLASH_ATTN_EXT_DIRECTIONS); the other op then reports that it has no CUDA
// kernel.
#include <torch/library.h>

#include "../flash_api.h"

TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
#ifdef FLASH_ATTN_EXT_BUILD_FWD
  m.impl("fwd", &flash_attn_ext::fwd_cuda);
#endif
#ifdef FLASH_ATTN_EXT_BUILD_BWD
  m.impl("bwd", &flash_attn_ext::bwd_cuda);
#endif
}
