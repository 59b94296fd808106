"""Python side of the two custom ops defined in csrc/ops.cpp.

Loading `flash_attn_ext._C` registers the schemas and the CPU/CUDA kernels;
this module adds what torch.compile and autograd need: fake (meta)
implementations that compute output shapes without running anything, and the
backward formula of `fwd`, which calls the `bwd` op.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: schemas and kernels)

fwd = torch.ops.flash_attn_ext.fwd.default
bwd = torch.ops.flash_attn_ext.bwd.default


@torch.library.register_fake("flash_attn_ext::fwd")
def _fwd_fake(q, k, v, attn_bias, softmax_scale, causal, window_left, window_right, deterministic):
    batch, seqlen_q, nheads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    return out, softmax_lse


@torch.library.register_fake("flash_attn_ext::bwd")
def _bwd_fake(dout, q, k, v, out, softmax_lse, dsoftmax_lse, attn_bias, softmax_scale, causal, window_left, window_right,
              deterministic, bias_requires_grad):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if bias_requires_grad:
        batch, seqlen_q, nheads, _ = q.shape
        dbias = q.new_empty((batch, nheads, seqlen_q, k.shape[1]))
    else:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, softmax_scale, causal, window_left, window_right, deterministic = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, attn_bias)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.window = (window_left, window_right)
    ctx.deterministic = deterministic


def _backward(ctx, dout, dsoftmax_lse):
    q, k, v, out, softmax_lse, attn_bias = ctx.saved_tensors
    # Autograd may hand in an expanded gradient (e.g. from out.sum()): the
    # kernels need a contiguous last dimension.
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    bias_requires_grad = attn_bias is not None and ctx.needs_input_grad[3]
    if dsoftmax_lse is not None:
        dsoftmax_lse = dsoftmax_lse.float().contiguous()
    dq, dk, dv, dbias = bwd(
        dout, q, k, v, out, softmax_lse, dsoftmax_lse, attn_bias, ctx.softmax_scale, ctx.causal, ctx.window[0],
        ctx.window[1], ctx.deterministic, bias_requires_grad,
    )
    return dq, dk, dv, (dbias if bias_requires_grad else None), None, None, None, None, None


torch.library.register_autograd("flash_attn_ext::fwd", _backward, setup_context=_setup_context)
