"""Numerical edge cases of the op itself: huge finite biases, fp64 accuracy,
extreme scales, window sides and sequence lengths outside int range.

Each case here once gave a silently wrong answer (issue 8, section 3).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext
from conftest import (DEVICES, assert_close_to_ref, attention_ref, device_dtype_params, op_supports,
                      poison_allocator, random_qkv)

fwd = torch.ops.flash_attn_ext.fwd


def _math_sdpa(q, k, v, mask):
    """PyTorch's math attention on (B, H, S, D) inputs."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("fill", ["-1e9", "finfo.min"])
def test_rows_masked_by_large_finite_bias(device, dtype, fill):
    """Hugging Face masks with torch.finfo(dtype).min (or -1e9), a large finite
    value, not -inf. A query row whose keys all carry it sees equal scores
    after rounding: PyTorch's math path gives the uniform average of v and
    its gradient. So must we, forward and backward (the fp32 lse alone
    loses log(seqlen_k) next to -1e9, which once made those gradients
    seqlen_k times too large, and the CUDA forward once returned 0)."""
    if not op_supports(device, dtype):
        pytest.skip("no kernel for this dtype in this build")
    B, H, Sq, Sk, D = 2, 3, 80, 144, 64
    # In fp16, -1e9 would be -inf: its finite extreme is finfo.min = -65504.
    value = max(-1e9, torch.finfo(dtype).min) if fill == "-1e9" else torch.finfo(dtype).min
    q, k, v = (t.transpose(1, 2).detach() for t in random_qkv(B, Sq, Sk, H, H, D, dtype, device))
    mask = torch.zeros(B, 1, Sq, Sk, dtype=dtype, device=device)
    mask[:, :, :17] = value                      # rows that see no real key
    mask[:, :, 17:, Sk // 3:] = value            # the rest see a third of the keys
    dout = torch.randn(B, H, Sq, D, device=device, dtype=dtype)

    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs[:3], dout.to(out.dtype)))

    poison_allocator(device, q.numel() * q.element_size())
    ours = run(lambda q, k, v, m: flash_attn_ext.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    # Reference: PyTorch's math path with inputs and mask in fp32 (the mask
    # values are the same numbers); PyTorch's own error: its math path in dtype.
    ref = run(_math_sdpa, q.float(), k.float(), v.float(), mask.float())
    lowp = run(_math_sdpa, q, k, v, mask)
    if value <= -1e9:  # then fp32 rounding leaves equal scores: the uniform average
        uniform = v.float().mean(dim=2, keepdim=True).expand(B, H, 17, D)
        torch.testing.assert_close(ref[0][:, :, :17], uniform, atol=1e-5, rtol=1e-5)
    assert ours[0][:, :, :17].float().abs().amax() > 0.05, "masked rows came back as 0"
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), ours, ref, lowp):
        if dtype == torch.float32:
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4, msg=name)
        else:
            # Slack: at |bias| = 65504 (fp16's finfo.min) fp32 scores are rounded
            # to 2**-8, in the reference as in ours, so both carry ~0.2% noise in P.
            assert_close_to_ref(a, r, t, f"{name} ({fill})", slack=4e-3)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_minus_inf_rows_stay_zero(device, dtype):
    """Rows masked with -inf (or boolean False) keep the documented convention:
    output 0 and zero gradients."""
    if not op_supports(device, dtype):
        pytest.skip("no kernel for this dtype in this build")
    q, k, v = (t.transpose(1, 2) for t in random_qkv(1, 24, 40, 2, 2, 32, dtype, device))
    mask = torch.ones(1, 1, 24, 40, dtype=torch.bool, device=device)
    mask[:, :, :5] = False
    out = flash_attn_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dq, = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.isfinite(out).all() and (out[:, :, :5] == 0).all()
    assert (dq[:, :, :5] == 0).all() and dq[:, :, 5:].abs().amax() > 0


def test_fp64_is_accurate_to_fp64():
    """fp64 inputs are computed in fp64, scale and log-sum-exp included."""
    q, k, v = random_qkv(2, 37, 53, 4, 2, 24, torch.float64, "cpu")
    bias = torch.randn(2, 4, 37, 53, dtype=torch.float64) * 3
    scale = 0.123456789012345678
    out, lse, _ = fwd(q, k, v, bias, scale, True, 9, -1, False)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, window=(9, -1), bias=bias, softmax_scale=scale)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        err = (a - r).abs().max().item()
        assert err <= 1e-12 * max(1.0, r.abs().max().item()), f"{name}: fp64 error {err:.2e}"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float())


def test_fp64_scale_beyond_fp32_range():
    """softmax_scale = 1e39 overflows fp32; with tiny fp64 inputs the scores
    are ordinary numbers and the answer must be too (it used to be NaN)."""
    q, k, v = random_qkv(1, 16, 16, 2, 2, 8, torch.float64, "cpu")
    q, k = (q * 1e-20).detach().requires_grad_(), (k * 1e-20).detach().requires_grad_()
    out, _, _ = fwd(q, k, v, None, 1e39, False, -1, -1, False)
    ref, _ = attention_ref(q, k, v, softmax_scale=1e39)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    dq, = torch.autograd.grad(out.sum(), (q,))
    ref_dq, = torch.autograd.grad(ref.sum(), (q,))
    torch.testing.assert_close(dq, ref_dq, rtol=1e-10, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 1e39])
def test_scale_out_of_range_is_rejected(device, scale):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 8, 8, 2, 2, 16, dtype, device, requires_grad=False)
    with pytest.raises(RuntimeError, match="softmax_scale"):
        fwd(q, k, v, None, scale, False, -1, -1, False)


@pytest.mark.parametrize("device", DEVICES)
def test_window_sides_beyond_int_range(device):
    """The op takes int64 window sides: values past int32 must not wrap (-2**32
    used to become 0, a one-key window). Negative means unbounded; a side
    wider than the sequence is unbounded too."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 33, 47, 2, 2, 32, dtype, device, requires_grad=False)
    full, _, _ = fwd(q, k, v, None, 0.2, False, -1, -1, False)
    causal, _, _ = fwd(q, k, v, None, 0.2, True, -1, -1, False)
    for left, right in [(-2**32, -2**40), (-2**63, -2), (2**40, 2**33), (2**32, -2**32)]:
        out, _, _ = fwd(q, k, v, None, 0.2, False, left, right, False)
        torch.testing.assert_close(out, full, atol=0, rtol=0, msg=f"window ({left}, {right})")
    out, _, _ = fwd(q, k, v, None, 0.2, False, 2**40, 0, False)
    torch.testing.assert_close(out, causal, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlen", [2**32 + 3, 2**31 + 1, 2**31 - 1])
def test_sequence_length_beyond_int_range_is_rejected(device, seqlen):
    """A key sequence of 2**32 + 3 rows (stride 0, no memory) used to run on
    the CPU as 3 keys; 2**31 + 1 failed inside std::vector."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 4, 2, 16, device=device, dtype=dtype)
    k = torch.randn(1, 1, 2, 16, device=device, dtype=dtype).expand(1, seqlen, 2, 16)
    with pytest.raises(RuntimeError, match=f"seqlen_k = {seqlen} is longer than"):
        fwd(q, k, k, None, 0.25, False, -1, -1, False)
    with pytest.raises(RuntimeError, match=f"seqlen_k = {seqlen} is longer than"):
        flash_attn_ext.flash_attn_func(q, k, k)
    long_q = q[:, :1].expand(1, seqlen, 2, 16)
    with pytest.raises(RuntimeError, match=f"seqlen_q = {seqlen} is longer than"):
        fwd(long_q, q, q, None, 0.25, False, -1, -1, False)
