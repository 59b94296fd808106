"""A value head dim different from the query/key head dim (issue 9, feature
5): DeepSeek's MLA prefill (192 / 128), 128 / 64 and the reverse, through
flash_attn_func, flash_attn_varlen_func and scaled_dot_product_attention, on
every device; out, lse and every gradient against the float64 reference
under the 2x rule; the errors that name a bad head dim."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import DEVICES, assert_close_to_ref, attention_ref, device_dtype_params, poison_allocator

HEAD_DIMS = [(192, 128), (128, 64), (64, 128), (40, 72)]


def check(q, k, v, causal, window=(-1, -1)):
    poison_allocator(q.device, 4 * q.numel() * q.element_size())
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    low_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_in, causal, window)
    low_out, _ = attention_ref(*low_in, causal, window, upcast=False)
    assert_close_to_ref(out, ref_out, low_out, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 1e-3 * max(1.0, ref_lse[finite].abs().max())
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_grads = torch.autograd.grad(low_out, low_in, dout)
    for name, ours, r, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert ours.shape == r.shape, name
        assert_close_to_ref(ours, r, low, name)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_value_head_dim(device, dtype, dims, causal):
    d_qk, d_v = dims
    q = torch.randn(2, 70, 4, d_qk, device=device).to(dtype).requires_grad_()
    k = torch.randn(2, 90, 2, d_qk, device=device).to(dtype).requires_grad_()
    v = torch.randn(2, 90, 2, d_v, device=device).to(dtype).requires_grad_()
    check(q, k, v, causal)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_value_head_dim(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [5, 0, 70]
    cu = torch.tensor([0, 5, 5, 75], dtype=torch.int32, device=device)
    q = torch.randn(75, 4, 192, device=device, dtype=dtype)
    k = torch.randn(75, 4, 192, device=device, dtype=dtype)
    v = torch.randn(75, 4, 128, device=device, dtype=dtype)
    out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, causal=True)
    assert out.shape == (75, 4, 128)
    for a, b in ((0, 5), (5, 75)):
        dense = flash_attn_ext.flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
        torch.testing.assert_close(out[a:b], dense, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_value_head_dim(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(2, 4, 33, 192, device=device, dtype=dtype)
    k = torch.randn(2, 4, 40, 192, device=device, dtype=dtype)
    v = torch.randn(2, 4, 40, 128, device=device, dtype=dtype)
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close_to_ref(out, ref, low, "out")


@pytest.mark.parametrize("device", DEVICES)
def test_value_head_dim_errors(device):
    q = torch.randn(1, 8, 2, 64, device=device)
    with pytest.raises(RuntimeError, match="head dim of v must be at most 256"):
        flash_attn_ext.flash_attn_func(q, q, torch.randn(1, 8, 2, 300, device=device))
    with pytest.raises(RuntimeError, match="q and k must have the same head dim"):
        flash_attn_ext.flash_attn_func(q, torch.randn(1, 8, 2, 32, device=device), q)


def test_value_head_dim_opcheck():
    q = torch.randn(1, 9, 2, 48, requires_grad=True)
    v = torch.randn(1, 9, 2, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.flash_attn_ext.fwd.default, (q, q, v, None, 0.2, True, -1, -1, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
