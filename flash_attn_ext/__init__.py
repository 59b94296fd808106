"""flash_attn_ext: FlashAttention for PyTorch as custom ops on CPU and CUDA.

Entry points:
  flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func
      flash-attn 2.x compatible (layout batch, seqlen, nheads, headdim).
The ops themselves are torch.ops.flash_attn_ext.fwd / bwd.
"""
from . import _ops  # noqa: F401  (registers fake and autograd implementations)
from .interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
]
