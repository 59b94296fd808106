"""Adapters that plug flash_attn_ext into other libraries' attention hooks.
Each adapter is its own module and imports its library only when imported
itself, so this package adds no dependency:
  flash_attn_ext.integrations.torch_flash
      PyTorch's flash-attention registry (torch.nn.attention): the kernels
      behind SDPA's FLASH backend and varlen_attn (registered on import of
      flash_attn_ext; torch only).
  flash_attn_ext.integrations.transformers
      Hugging Face transformers' AttentionInterface / AttentionMaskInterface
      (`attn_implementation="faext"`); needs `pip install flash_attn_ext[transformers]`.
"""
