"""Adapters that plug flash_attn_ext into other libraries' attention hooks.

  flash_attn_ext.integrations.torch_flash
      PyTorch's flash-attention registry (torch.nn.attention): the kernels
      behind SDPA's FLASH backend and varlen_attn.
"""
