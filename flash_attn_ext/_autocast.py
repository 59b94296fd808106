"""Autocast for the custom ops.

torch.autocast does not know custom ops, so the Python entry points apply
the rule autocast has for PyTorch's own attention themselves.
"""
from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """Autocast's rule for SDPA, which it lists as a lower-precision op: inside
    an autocast region for the inputs' device, floating tensors other than
    fp64 are cast to the autocast dtype. Custom ops are not covered by
    autocast, so the wrapper applies the rule itself."""
    device_type = tensors[0].device.type
    # Devices autocast does not know (meta: shape inference) have no autocast
    # region to honour; torch.is_autocast_enabled would raise for them.
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return tensors
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in tensors)
