"""flash_attn_ext.scaled_dot_product_attention against PyTorch's SDPA.

Each case runs three computations on the same random inputs: ours in the test
dtype, PyTorch's math backend in the same dtype, and an fp64 reference. Ours
passes when its error against fp64 is at most twice PyTorch's own error plus
a small slack relative to the reference's magnitude. The fp64 reference gives
rows that see no key 0 output and 0 gradients (our documented semantics,
where PyTorch gives NaN).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext.sdpa as sdpa_mod
from conftest import op_supports
from flash_attn_ext.sdpa import attention_bshd, scaled_dot_product_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SLACK = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def need(device, dtype):
    if not op_supports(device, dtype):
        pytest.skip(f"op has no {dtype} kernel on {device}")


def reference(q, k, v, bias=None, is_causal=False, scale=None, enable_gqa=False):
    """Attention written out in the inputs' dtype (use fp64): PyTorch semantics,
    except that fully masked rows give 0 and zero gradients."""
    hq = q.size(-3) if q.dim() >= 3 else 1
    if enable_gqa:
        k = k.repeat_interleave(hq // k.size(-3), dim=-3)
        v = v.repeat_interleave(hq // v.size(-3), dim=-3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    L, S = s.shape[-2:]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if bias is not None:
        s = s + (torch.zeros((), dtype=s.dtype, device=s.device).masked_fill(~bias, float("-inf"))
                 if bias.dtype == torch.bool else bias)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
    p = torch.where(dead, torch.zeros_like(p), p)
    return torch.matmul(p, v)


def check(name, ours, torch_lp, ref, dtype):
    assert not torch.isnan(ours).any(), f"{name}: NaN in our result"
    ref = ref.double()
    err = (ours.double() - ref).abs().max().item()
    base = 0.0 if torch_lp is None else torch.nan_to_num(torch_lp.double() - ref, nan=0.0).abs().max().item()
    tol = 2 * base + SLACK[dtype] * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (PyTorch's own error {base:.3g})"


def run_case(device, dtype, q_shape, k_shape, v_shape=None, mask=None, mask_grad=False, is_causal=False,
             scale=None, enable_gqa=False, views=False):
    """Compares out and grads of q, k, v (and of a float mask that requires grad)."""
    need(device, dtype)
    gen = torch.Generator().manual_seed(hash((q_shape, k_shape, is_causal)) % 2**31)
    v_shape = v_shape or k_shape
    master = [torch.randn(s, generator=gen, dtype=torch.float64) for s in (q_shape, k_shape, v_shape)]
    if views:
        # (B, S, H, D) storage seen as (B, H, S, D): the layout the op reads natively.
        master = [m.transpose(1, 2).contiguous().transpose(1, 2) for m in master]
    mask64 = None
    if mask is not None:
        mask64 = mask.to(device) if mask.dtype == torch.bool else mask.double().to(device)
        mask64.requires_grad_(mask_grad)

    def inputs(dt):
        xs = [m.to(device=device, dtype=dt).requires_grad_() for m in master]
        if views:
            xs = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in xs]
        mk = None
        if mask64 is not None:
            mk = mask64 if mask64.dtype == torch.bool else mask64.detach().to(dt).requires_grad_(mask_grad)
        return xs, mk

    (q, k, v), m = inputs(dtype)
    out = scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale,
                                       enable_gqa=enable_gqa)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    grads_of = [q, k, v] + ([m] if mask_grad else [])
    grads = torch.autograd.grad(out, grads_of, dout.to(dtype))

    (q2, k2, v2), m2 = inputs(dtype)
    with sdpa_kernel(SDPBackend.MATH):
        out_lp = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m2, is_causal=is_causal, scale=scale,
                                                enable_gqa=enable_gqa)
    grads_lp = torch.autograd.grad(out_lp, [q2, k2, v2] + ([m2] if mask_grad else []), dout.to(dtype))

    (q3, k3, v3), m3 = inputs(torch.float64)
    out_ref = reference(q3, k3, v3, m3, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    grads_ref = torch.autograd.grad(out_ref, [q3, k3, v3] + ([m3] if mask_grad else []), dout)

    assert out.shape == out_ref.shape and out.dtype == dtype
    check("out", out, out_lp, out_ref, dtype)
    for name, g, g_lp, g_ref in zip(["dq", "dk", "dv", "dmask"], grads, grads_lp, grads_ref):
        assert g.shape == g_ref.shape, name
        check(name, g, g_lp, g_ref, dtype)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlens", [(17, 17), (9, 33), (12, 8), (33, 9), (1, 5), (6, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_parity(device, dtype, seqlens, is_causal):
    L, S = seqlens
    run_case(device, dtype, (2, 3, L, 32), (2, 3, S, 32), is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(2, 3, 13, 21), (1, 1, 13, 21), (2, 1, 1, 21), (13, 21), (3, 1, 21)])
@pytest.mark.parametrize("kind", ["bool", "float", "float_grad"])
def test_masks(device, dtype, mask_shape, kind):
    gen = torch.Generator().manual_seed(7)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=gen) < 0.7
        mask[..., 0] = True  # every row keeps a key; fully masked rows are tested separately
    else:
        mask = torch.randn(mask_shape, generator=gen)
    run_case(device, dtype, (2, 3, 13, 32), (2, 3, 21, 32), mask=mask, mask_grad=(kind == "float_grad"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows(device, dtype):
    need(device, dtype)
    mask = torch.rand(2, 1, 11, 19, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[..., 0] = True
    mask[0, 0, 4] = False  # row 4 of batch 0: no key at all
    mask[1, 0, 0] = False
    mask[1, 0, 10] = False
    for mask_grad in (False, True):
        float_mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask_grad else mask
        out = run_case(device, dtype, (2, 3, 11, 32), (2, 3, 19, 32), mask=float_mask, mask_grad=mask_grad)
        assert (out[0, :, 4] == 0).all() and (out[1, :, 0] == 0).all() and (out[1, :, 10] == 0).all()
    # The gradients of a fully masked row are zero, not NaN.
    q = torch.randn(2, 3, 11, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, 19, 32, device=device, dtype=dtype, requires_grad=True)
    scaled_dot_product_attention(q, k, k, attn_mask=mask.to(device)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[0, :, 4] == 0).all() and (q.grad[1, :, 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_float_mask_makes_its_row_nan(device, dtype):
    # As PyTorch's math path: the row with a NaN bias is NaN, every other row
    # finite and right (a NaN used to act as a masked key, silently).
    need(device, dtype)
    q = torch.randn(2, 3, 9, 32, device=device, dtype=dtype)
    k = torch.randn(2, 3, 13, 32, device=device, dtype=dtype)
    v = torch.randn(2, 3, 13, 32, device=device, dtype=dtype)
    mask = torch.randn(9, 13, device=device, dtype=dtype)
    mask[4, 7] = float("nan")
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isnan(out[:, :, 4]).all()
    rows = [i for i in range(9) if i != 4]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    assert torch.isfinite(out[:, :, rows]).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[:, :, rows].double(), ref[:, :, rows], atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_mask_beyond_fp16_range(device):
    # A float32 -1e5 on every key of a row (PyTorch's math path: the softmax
    # of the scores alone) must not become -inf in fp16 (a row without keys).
    need(device, torch.float16)
    q = torch.randn(1, 2, 6, 32, device=device, dtype=torch.float16)
    k = torch.randn(1, 2, 10, 32, device=device, dtype=torch.float16)
    v = torch.randn(1, 2, 10, 32, device=device, dtype=torch.float16)
    mask = torch.zeros(6, 10, device=device)
    mask[2] = -1e5
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 2].double(), ref[:, :, 2], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(device, dtype, is_causal):
    run_case(device, dtype, (2, 6, 15, 32), (2, 2, 23, 32), enable_gqa=True, is_causal=is_causal)
    run_case(device, dtype, (2, 4, 9, 32), (2, 1, 9, 32), enable_gqa=True, is_causal=is_causal)  # MQA


@pytest.mark.parametrize("device", DEVICES)
def test_scale_and_layouts(device):
    dtype = torch.float32 if op_supports(device, torch.float32) else torch.bfloat16
    run_case(device, dtype, (2, 3, 12, 32), (2, 3, 20, 32), scale=0.3)
    run_case(device, dtype, (2, 3, 12, 32), (2, 3, 20, 32), is_causal=True, views=True)
    run_case(device, dtype, (3, 12, 32), (3, 20, 32))  # 3-D (H, L, E)
    run_case(device, dtype, (12, 32), (20, 32), is_causal=True)  # 2-D (L, E)
    run_case(device, dtype, (2, 2, 3, 12, 32), (2, 2, 3, 20, 32), mask=torch.randn(2, 1, 1, 12, 20))  # 5-D
    run_case(device, dtype, (2, 3, 12, 32), (1, 3, 20, 32))  # key/value batch broadcast
    run_case(device, dtype, (2, 3, 12, 32), (2, 3, 20, 32), v_shape=(2, 3, 20, 16))  # Ev != E
    run_case(device, dtype, (2, 3, 12, 16), (2, 3, 20, 16), v_shape=(2, 3, 20, 48), is_causal=True)


class _RecordingOps:
    """Stands in for flash_attn_ext._ops and records what the op receives
    (through call_fwd, which the entry points call)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def call_fwd(self, *args):
        self.calls.append(args)
        return self.real.call_fwd(*args)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("device", DEVICES)
def test_no_copies(device, monkeypatch):
    dtype = torch.float32 if op_supports(device, torch.float32) else torch.bfloat16
    need(device, dtype)
    rec = _RecordingOps(sdpa_mod._ops)
    monkeypatch.setattr(sdpa_mod, "_ops", rec)
    # Contiguous (B, H, S, D) inputs: the op gets their (B, S, H, D) transposes.
    q, k, v = (torch.randn(2, 3, n, 32, device=device, dtype=dtype) for n in (9, 14, 14))
    mask = torch.randn(1, 3, 1, 14, device=device, dtype=dtype)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (oq, ok, ov, bias, scale, causal, wl, wr, _), = rec.calls
    for a, b in ((oq, q), (ok, k), (ov, v), (bias, mask)):
        assert a.data_ptr() == b.data_ptr(), "input was copied"
    assert bias.shape == (2, 3, 9, 14) and bias.stride() == (0, 14, 0, 1)
    assert scale == pytest.approx(1 / math.sqrt(32)) and not causal
    assert out.shape == (2, 3, 9, 32)
    # Causal with Sq < Sk: keys sliced (a view), bottom-right causal.
    rec.calls.clear()
    scaled_dot_product_attention(q, k, v, is_causal=True)
    (oq, ok, ov, bias, scale, causal, wl, wr, _), = rec.calls
    assert ok.data_ptr() == k.data_ptr() and ok.shape[1] == 9 and causal and bias is None
    # (B, S, H, D) storage seen as (B, H, S, D): passed through unchanged.
    rec.calls.clear()
    qs = torch.randn(2, 14, 3, 32, device=device, dtype=dtype)
    scaled_dot_product_attention(qs.transpose(1, 2), qs.transpose(1, 2), qs.transpose(1, 2))
    assert all(t.data_ptr() == qs.data_ptr() and t.stride() == qs.stride() for t in rec.calls[0][:3])
    # Causal with Sq > Sk (< 2 Sk): one call with a right window of Sq - Sk.
    rec.calls.clear()
    scaled_dot_product_attention(k, q, q, is_causal=True)
    (_, _, _, _, _, causal, wl, wr, _), = rec.calls
    assert (causal, wl, wr) == (False, -1, 14 - 9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seqlens", [(6, 6), (6, 10), (10, 6), (13, 4)])
def test_mask_composes_with_causal(device, seqlens):
    """attention_bshd (used by MultiheadAttention) applies a bias and the
    top-left causal mask together, also through the Sq > Sk mappings."""
    dtype = torch.float32 if op_supports(device, torch.float32) else torch.bfloat16
    need(device, dtype)
    L, S = seqlens
    q = torch.randn(2, L, 3, 32, device=device, dtype=torch.float64)
    k = torch.randn(2, S, 3, 32, device=device, dtype=torch.float64)
    v = torch.randn(2, S, 3, 32, device=device, dtype=torch.float64)
    bias = torch.randn(2, 1, L, S, device=device, dtype=torch.float64)
    bias[0, 0, -1, 0] = float("-inf")
    args = [t.to(dtype).requires_grad_() for t in (q, k, v, bias)]
    out = attention_bshd(*args[:3], args[3].expand(2, 3, L, S), 0.2, causal_top_left=True)
    ref_args = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ref = reference(*(t.transpose(1, 2) for t in ref_args[:3]), ref_args[3], is_causal=True,
                    scale=0.2).transpose(1, 2)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, args, dout.to(dtype))
    grads_ref = torch.autograd.grad(ref, ref_args, dout)
    # PyTorch's own error in the same dtype sets the bar (the 2x rule; the
    # fixed slack alone made this flaky in bf16, whose input rounding alone
    # moves dbias by up to ~1%).
    low_args = [t.detach().clone().requires_grad_() for t in args]
    low = reference(*(t.transpose(1, 2) for t in low_args[:3]), low_args[3], is_causal=True,
                    scale=0.2).transpose(1, 2)
    grads_low = torch.autograd.grad(low, low_args, dout.to(dtype))
    for name, a, lo, b in zip(["out", "dq", "dk", "dv", "dbias"], (out,) + grads, (low,) + grads_low,
                              (ref,) + grads_ref):
        check(name, a, lo, b, dtype if dtype == torch.float32 else torch.bfloat16)


def test_errors():
    q = torch.randn(2, 4, 8, 16)
    k2 = torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal=True"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        scaled_dot_product_attention(q, k2, k2)
    with pytest.raises(RuntimeError, match="must divide"):
        scaled_dot_product_attention(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16), enable_gqa=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="not broadcastable"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="at least 2 dimensional"):
        scaled_dot_product_attention(torch.randn(16), torch.randn(16), torch.randn(16))
    with pytest.raises(RuntimeError, match="head dim"):
        scaled_dot_product_attention(q, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8))


def test_exported_from_package():
    """The integration entry points are public names of the package."""
    import flash_attn_ext
    from flash_attn_ext.mha import MultiheadAttention, replace_attention

    assert flash_attn_ext.scaled_dot_product_attention is scaled_dot_product_attention
    assert flash_attn_ext.MultiheadAttention is MultiheadAttention
    assert flash_attn_ext.replace_attention is replace_attention


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    """Inside autocast, fp32 inputs run in the autocast dtype, as PyTorch's SDPA
    (a lower-precision op for autocast) does; gradients reach the fp32 leaves."""
    need(device, torch.bfloat16)
    q = torch.randn(2, 3, 10, 32, device=device, requires_grad=True)
    k = torch.randn(2, 3, 14, 32, device=device, requires_grad=True)
    mask = torch.randn(10, 14, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = scaled_dot_product_attention(q, k, k, attn_mask=mask)
        ref = F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
        out_causal = scaled_dot_product_attention(q, k, k, is_causal=True)
    assert out.dtype == ref.dtype == out_causal.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    (out.float().sum() + out_causal.float().sum()).backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
