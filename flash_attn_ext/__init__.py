"""flash_attn_ext: FlashAttention for PyTorch as custom ops on CPU and CUDA.

Entry points:
  flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func
      flash-attn 2.x compatible (layout batch, seqlen, nheads, headdim).
  flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func
      the same over variable-length batches (total_tokens, nheads, headdim)
      described by cumulative lengths, with paged keys (block_table).
  flash_attn_with_kvcache
      flash-attn 2.8's decoding entry point: append to a (paged) KV cache, attend.
  scaled_dot_product_attention
      torch.nn.functional.scaled_dot_product_attention compatible, with masks.
  MultiheadAttention, replace_attention
      a drop-in for torch.nn.MultiheadAttention, and a model-wide swap.
  flash_attn_ext.distributed (imported on its own)
      context parallelism: ring / all-gather attention over torch.distributed.
  flash_attn_ext.flash_attn_interface (imported on its own)
      flash-attn 2.8's low-level _flash_attn_forward / _flash_attn_backward.
  flash_attn_ext.integrations.torch_flash
      registered (not activated) on import as "flash_attn_ext" in PyTorch's
      flash-attention registry: torch.nn.attention.activate_flash_attention_impl
      ("flash_attn_ext") makes SDPA's FLASH backend and varlen_attn run our kernels.
  flash_attn_ext.integrations.transformers (imported on its own)
      Hugging Face transformers: attn_implementation="faext" (needs transformers).
The ops themselves are torch.ops.flash_attn_ext.fwd / bwd, varlen_fwd / varlen_bwd and fwd_kvcache.
"""
from . import _ops  # noqa: F401  (registers fake and autograd implementations)
from .interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .kvcache import flash_attn_with_kvcache
from .mha import MultiheadAttention, replace_attention
from .sdpa import scaled_dot_product_attention
from .varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from .integrations import torch_flash as _torch_flash

_torch_flash.register()  # registration only: activating is the user's choice

__version__ = "0.2.0"  # pyproject.toml says the same (tests/test_packaging.py)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "MultiheadAttention",
    "replace_attention",
    "scaled_dot_product_attention",
]
