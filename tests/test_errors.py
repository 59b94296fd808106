"""Bad input gets a clear exception that names the problem."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import DEVICES


def qkv(device, dtype=None, b=2, sq=16, sk=16, h=4, hk=4, d=32):
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_ndim(device):
    q, k, v = qkv(device)
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        flash_attn_ext.flash_attn_func(q[0], k, v)
    with pytest.raises(RuntimeError, match="k must be 4-D"):
        flash_attn_ext.flash_attn_func(q, k[0], v)
    with pytest.raises(RuntimeError, match="v must be 4-D"):
        flash_attn_ext.flash_attn_func(q, k, v.unsqueeze(0))


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_shapes(device):
    q, k, v = qkv(device)
    with pytest.raises(RuntimeError, match="batch size mismatch"):
        flash_attn_ext.flash_attn_func(q, k[:1], v[:1])
    with pytest.raises(RuntimeError, match="same seqlen"):
        flash_attn_ext.flash_attn_func(q, k, v[:, :8])
    with pytest.raises(RuntimeError, match="same head dim"):
        flash_attn_ext.flash_attn_func(q, k[..., :16], v[..., :16])
    with pytest.raises(RuntimeError, match="same number of heads"):
        flash_attn_ext.flash_attn_func(q, k, v[:, :, :2])


@pytest.mark.parametrize("device", DEVICES)
def test_heads_not_divisible(device):
    q, k, v = qkv(device, h=6, hk=4)
    with pytest.raises(RuntimeError, match=r"nheads \(6\) must be divisible by nheads_k \(4\)"):
        flash_attn_ext.flash_attn_func(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_too_large(device):
    q, k, v = qkv(device, d=264)
    with pytest.raises(RuntimeError, match="head dim must be between 1 and 256, got 264"):
        flash_attn_ext.flash_attn_func(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
def test_dtypes(device):
    q, k, v = qkv(device)
    with pytest.raises(RuntimeError, match="same dtype"):
        flash_attn_ext.flash_attn_func(q, k.half(), v)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        flash_attn_ext.flash_attn_func(q.int(), k.int(), v.int())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rejects_fp32_and_mixed_devices():
    q, k, v = qkv("cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float16 and bfloat16 only"):
        flash_attn_ext.flash_attn_func(q, k, v)
    q, k, v = qkv("cuda")
    with pytest.raises(RuntimeError, match="same device"):
        flash_attn_ext.flash_attn_func(q, k.cpu(), v)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_last_dim(device):
    q, k, v = qkv(device)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride != 1
    # The op refuses it; flash_attn_func copies it first, as flash-attn does.
    with pytest.raises(RuntimeError, match="q must have a contiguous last dimension"):
        torch.ops.flash_attn_ext.fwd(q_t, k, v, None, 1.0, False, -1, -1, False)
    assert torch.equal(flash_attn_ext.flash_attn_func(q_t, k, v), flash_attn_ext.flash_attn_func(q, k, v))


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_bad_dropout_p_raises(bad):
    # Every feature is implemented now; a dropout_p outside [0, 1) is named.
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_ext.flash_attn_func(q, k, v, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_ext.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_ext.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), dropout_p=bad)


def test_bad_packing_and_window():
    q, k, v = qkv("cpu")
    with pytest.raises(ValueError, match="qkv must be"):
        flash_attn_ext.flash_attn_qkvpacked_func(q)
    with pytest.raises(ValueError, match="kv must be"):
        flash_attn_ext.flash_attn_kvpacked_func(q, k)
    with pytest.raises(ValueError, match="window_size must be a pair"):
        flash_attn_ext.flash_attn_func(q, k, v, window_size=(1, 2, 3))


def test_bad_bias_and_lse():
    q, k, v = qkv("cpu")
    bias = torch.randn(2, 4, 16, 8)
    with pytest.raises(RuntimeError, match="attn_bias must be expanded"):
        torch.ops.flash_attn_ext.fwd(q, k, v, bias, 0.1, False, -1, -1, False)
    with pytest.raises(RuntimeError, match="attn_bias must have the dtype of q"):
        torch.ops.flash_attn_ext.fwd(q, k, v, torch.randn(2, 4, 16, 16).double(), 0.1, False, -1, -1, False)
    out, lse, res = torch.ops.flash_attn_ext.fwd(q, k, v, None, 0.1, False, -1, -1, False)
    bwd = torch.ops.flash_attn_ext.bwd
    with pytest.raises(RuntimeError, match="softmax_lse must be"):
        bwd(out, q, k, v, out, lse[:, :2], res, None, None, 0.1, False, -1, -1, False, False)
    with pytest.raises(RuntimeError, match="lse_residual must be"):
        bwd(out, q, k, v, out, lse, torch.zeros_like(lse), None, None, 0.1, False, -1, -1, False, False)
    with pytest.raises(RuntimeError, match="dsoftmax_lse must be"):
        bwd(out, q, k, v, out, lse, res, lse.double(), None, 0.1, False, -1, -1, False, False)
    with pytest.raises(RuntimeError, match="bias_requires_grad=True needs an attn_bias"):
        bwd(out, q, k, v, out, lse, res, None, None, 0.1, False, -1, -1, False, True)
