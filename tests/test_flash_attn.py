"""Parity of flash_attn_func and friends (out, lse, dq, dk, dv) with a float64
reference, on every available device, under the 2x-PyTorch-error rule."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import (
    DEVICES,
    assert_close_to_ref,
    assert_fp32_close,
    attention_ref,
    device_dtype_params,
    poison_allocator,
    random_qkv,
    sdpa_default,
)

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 7, 7, 2, 2, 16),
    (1, 64, 64, 4, 2, 40),
    (3, 113, 256, 2, 1, 64),
    (2, 256, 113, 4, 4, 72),
    (1, 1000, 1000, 2, 1, 128),
    (4, 37, 300, 2, 2, 96),
    (1, 128, 200, 1, 1, 256),
    (2, 200, 64, 6, 3, 3),
]


def run_and_check(q, k, v, causal=False, window=(-1, -1), softmax_scale=None, check_grads=True):
    out_bytes = q.numel() * q.element_size()
    poison_allocator(q.device, out_bytes)
    out, lse, _ = flash_attn_ext.flash_attn_func(
        q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window, return_attn_probs=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = attention_ref(qd, kd, vd, causal, window, softmax_scale=softmax_scale)
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    low_out, _ = attention_ref(ql, kl, vl, causal, window, softmax_scale=softmax_scale, upcast=False)
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    sdpa_out = sdpa_default(qs, ks, vs, causal, window, softmax_scale)

    # LSE is fp32 in every dtype; rows that see no key are +inf in both.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() <= 1e-3 if finite.any() else True
    if q.dtype == torch.float32:
        assert_fp32_close(out, ref_out, "out")
    else:
        assert_close_to_ref(out, ref_out, (low_out, sdpa_out), "out")
    if not check_grads:
        return
    dout = torch.randn_like(out)
    poison_allocator(q.device, 3 * out_bytes)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    low_grads = torch.autograd.grad(low_out, (ql, kl, vl), dout)
    sdpa_grads = torch.autograd.grad(sdpa_out, (qs, ks, vs), dout)
    for name, ours, ref, low, sdpa in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads, sdpa_grads):
        assert ours.shape == ref.shape
        if q.dtype == torch.float32:
            assert_fp32_close(ours, ref, name)
        else:
            assert_close_to_ref(ours, ref, (low, sdpa), name)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(device, dtype, causal, shape):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    run_and_check(q, k, v, causal=causal)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("window", [(16, 0), (0, 0), (32, 8), (-1, 20), (5, -1)], ids=str)
@pytest.mark.parametrize("seqlens", [(150, 150), (100, 300), (300, 90)], ids=str)
def test_sliding_window(device, dtype, window, seqlens):
    q, k, v = random_qkv(2, seqlens[0], seqlens[1], 2, 1, 64, dtype, device)
    run_and_check(q, k, v, window=window)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_softmax_scale(device, dtype):
    q, k, v = random_qkv(2, 90, 130, 2, 2, 32, dtype, device)
    run_and_check(q, k, v, causal=True, softmax_scale=0.37)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """Inputs that are views with arbitrary batch/seq/head strides (last dim contiguous)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    big = torch.randn(3, 150, 7, 2, 64, device=device, dtype=dtype)
    q = big[:, 10:130, 1:5, 0].requires_grad_(False)  # non-contiguous in every dim but the last
    kv = torch.randn(3, 2, 4, 150, 64, device=device, dtype=dtype).transpose(2, 3)  # (3, 2, 150, 4, 64)
    k, v = kv[:, 0], kv[:, 1]
    assert not q.is_contiguous() and not k.is_contiguous()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    run_and_check(q, k, v, causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_packed(device, dtype):
    qkv = torch.randn(2, 77, 3, 4, 32, device=device, dtype=dtype, requires_grad=True)
    out = flash_attn_ext.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    ref = flash_attn_ext.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert qkv.grad is not None and not torch.isnan(qkv.grad).any()

    q = torch.randn(2, 50, 4, 32, device=device, dtype=dtype)
    kv = torch.randn(2, 90, 2, 2, 32, device=device, dtype=dtype)
    out = flash_attn_ext.flash_attn_kvpacked_func(q, kv)
    assert torch.equal(out, flash_attn_ext.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1]))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_lse_gradient(device, dtype):
    """Gradients flowing into softmax_lse (as when merging partial attentions)."""
    q, k, v = random_qkv(2, 70, 90, 2, 1, 32, dtype, device)
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    loss = (out.float() * w_out.float()).sum() + (lse * w_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = attention_ref(qd, kd, vd, causal=True)
    ref_loss = (ref_out * w_out.double()).sum() + (ref_lse * w_lse.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (qd, kd, vd))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        err = (g.double() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: {err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys(device):
    """Causal with seqlen_q > seqlen_k: the first rows see no key -> 0 out, +inf lse, 0 grads."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 50, 20, 2, 2, 32, dtype, device)
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :30] == 0) and torch.all(torch.isposinf(lse[:, :, :30]))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.float().sum().backward()
    assert torch.all(q.grad[:, :30] == 0) and not torch.isnan(q.grad).any()
    run_and_check(*(x.detach().requires_grad_() for x in (q, k, v)), causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlens", [(0, 5), (5, 0), (0, 0)], ids=str)
def test_empty_sequences(device, seqlens):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, seqlens[0], seqlens[1], 2, 2, 16, dtype, device)
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 2, seqlens[0])
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)
    q0, k0, v0 = random_qkv(0, 4, 4, 2, 2, 16, dtype, device)
    assert flash_attn_ext.flash_attn_func(q0, k0, v0).shape == (0, 4, 2, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeats(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 300, 300, 4, 2, 64, dtype, device)
    dout = torch.randn(2, 300, 4, 64, device=device, dtype=dtype)
    first = None
    for _ in range(3):
        out = flash_attn_ext.flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if first is None:
            first = (out, *grads)
        else:
            for a, b in zip(first, (out, *grads)):
                assert torch.equal(a, b)
