// Registers the CUDA implementation (flash_fwd_host.cpp, flash_bwd_host.cpp).
// A development build may compile one direction only (setup.py's
// FLASH_ATTN_EXT_DIRECTIONS); the other op then reports that it has no CUDA
// kernel. This file and everything else under cuda/ build the second
// library, flash_attn_ext._C_cuda, which the package imports only under a
// CUDA build of torch: the CPU library alone loads under a CPU-only torch.
#include "../flash_api.h"
#include "../python_module.h"

FLASH_ATTN_EXT_EMPTY_PYTHON_MODULE(_C_cuda)

STABLE_TORCH_LIBRARY_IMPL(flash_attn_ext, CUDA, m) {
#ifdef FLASH_ATTN_EXT_BUILD_FWD
  m.impl("fwd", TORCH_BOX(&flash_attn_ext::fwd_cuda));
  m.impl("varlen_fwd", TORCH_BOX(&flash_attn_ext::varlen_fwd_cuda));
  m.impl("fwd_fp8", TORCH_BOX(&flash_attn_ext::fwd_fp8_cuda));
#endif
#ifdef FLASH_ATTN_EXT_BUILD_BWD
  m.impl("bwd", TORCH_BOX(&flash_attn_ext::bwd_cuda));
  m.impl("varlen_bwd", TORCH_BOX(&flash_attn_ext::varlen_bwd_cuda));
#endif
  // Built with either direction (flash_decode_*): flash_decode_host.cpp.
  m.impl("fwd_kvcache", TORCH_BOX(&flash_attn_ext::fwd_kvcache_cuda));
}
