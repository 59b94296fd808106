"""Edge cases of the Python entry points (issue #8, section 3).

* mixed devices raise (the entry points, and the op when a meta tensor sends
  it to the fake kernel); all-meta inputs infer shapes;
* window_size is validated and normalised (every negative side and every
  side wider than any sequence means unbounded);
* double backward raises instead of returning zeros; torch.func.grad and
  torch.func.vmap work;
* head dim 0 and zero heads raise; zero-size inputs have a working backward
  (SDPA: the same outputs and gradients as PyTorch's);
* replace_attention is not bypassed by the fused fast path of
  nn.TransformerEncoderLayer / nn.TransformerEncoder in eval() + no_grad().

Inputs are fresh random numbers in every run (conftest seeds each test).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext
from conftest import DEVICES, random_qkv
from flash_attn_ext import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    replace_attention,
    scaled_dot_product_attention,
)


def dtype_for(device):
    """A dtype the op has kernels for on the device (CUDA: fp16/bf16 only)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def other_devices(device):
    """Devices to mix with `device`: meta always (it reaches the fake kernel),
    and the CPU when `device` is an accelerator."""
    return ["meta"] + (["cpu"] if device != "cpu" else [])


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ---------------------------------------------------------------------------
# 1. Devices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_flash_attn_func_mixed_devices_raise(device, which):
    for other in other_devices(device):
        tensors = dict(zip("qkv", random_qkv(2, 8, 8, 2, 2, 16, dtype_for(device), device, requires_grad=False)))
        tensors[which] = tensors[which].to(other)
        with pytest.raises(RuntimeError, match=rf"same device.*\b{which} on {other}"):
            flash_attn_func(**tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_mixed_devices_raise(device):
    for other in other_devices(device):
        q, k, v = random_qkv(2, 8, 8, 2, 2, 16, dtype_for(device), device, requires_grad=False)
        with pytest.raises(RuntimeError, match=rf"same device.*\bk on {other}"):
            flash_attn_kvpacked_func(q, torch.stack([k, v], 2).to(other))
        with pytest.raises(RuntimeError, match=rf"same device.*\bq on {other}"):
            flash_attn_kvpacked_func(q.to(other), torch.stack([k, v], 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["query", "key", "value", "attn_mask"])
def test_sdpa_mixed_devices_raise(device, which):
    for other in other_devices(device):
        dtype = dtype_for(device)
        t = {
            "query": torch.randn(2, 2, 5, 16, device=device, dtype=dtype),
            "key": torch.randn(2, 2, 7, 16, device=device, dtype=dtype),
            "value": torch.randn(2, 2, 7, 16, device=device, dtype=dtype),
            "attn_mask": torch.randn(5, 7, device=device, dtype=dtype),
        }
        t[which] = t[which].to(other)
        with pytest.raises(RuntimeError, match=rf"same device.*\b{which} on {other}"):
            scaled_dot_product_attention(**t)


def _op_args(op, device, other, which):
    """Arguments for torch.ops.flash_attn_ext.<op> built from its schema (so the
    test does not depend on the argument or output lists), all on `device`
    except the tensor `which`, on `other`."""
    b, s, h, d = 2, 8, 2, 16
    dtype = dtype_for(device)
    args = []
    for arg in op.default._schema.arguments:
        name = arg.name
        if name in ("q", "k", "v", "dout", "out"):
            value = torch.randn(b, s, h, d, device=device, dtype=dtype)
        elif "lse" in name and not name.startswith("d"):  # softmax_lse and its fp32 companions
            value = torch.zeros(b, h, s, device=device, dtype=torch.float32)
        elif name == "attn_bias":
            value = torch.zeros(b, h, s, s, device=device, dtype=dtype) if which == "attn_bias" else None
        elif str(arg.type).startswith("Optional[Tensor]") or str(arg.type) == "Tensor?":
            value = None
        elif name == "softmax_scale":
            value = 0.25
        elif arg.has_default_value():  # the score features: off
            value = arg.default_value
        elif str(arg.type) == "bool":
            value = False
        elif str(arg.type) == "int":
            value = -1
        else:
            raise AssertionError(f"unexpected argument {name}: {arg.type}")
        if name == which:
            value = value.to(other)
        args.append(value)
    return args


@pytest.mark.parametrize("device", DEVICES)
def test_op_mixed_devices_raise(device):
    """A meta tensor among real ones sends the op to its fake kernel, which used
    to return uninitialised memory; it must raise, naming tensors and devices."""
    for which in ("q", "k", "v", "attn_bias"):
        with pytest.raises(RuntimeError, match=rf"same device.*\b{which} on meta"):
            torch.ops.flash_attn_ext.fwd(*_op_args(torch.ops.flash_attn_ext.fwd, device, "meta", which))
    for which in ("dout", "k", "out", "softmax_lse"):
        with pytest.raises(RuntimeError, match=rf"same device.*\b{which} on meta"):
            torch.ops.flash_attn_ext.bwd(*_op_args(torch.ops.flash_attn_ext.bwd, device, "meta", which))


def test_flash_attn_func_meta_shape_inference():
    q = torch.empty(2, 9, 4, 32, device="meta", requires_grad=True)
    k = torch.empty(2, 13, 2, 32, device="meta", requires_grad=True)
    v = torch.empty(2, 13, 2, 32, device="meta", requires_grad=True)
    out = flash_attn_func(q, k, v, causal=True, window_size=(4, 0))
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    out.sum().backward()
    assert all(t.grad.shape == t.shape and t.grad.device.type == "meta" for t in (q, k, v))
    kv = torch.empty(2, 13, 2, 2, 32, device="meta", dtype=torch.bfloat16)
    out = flash_attn_kvpacked_func(q.detach().bfloat16(), kv)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    qkv = torch.empty(3, 5, 3, 2, 16, device="meta")
    assert flash_attn_qkvpacked_func(qkv, causal=True).shape == (3, 5, 2, 16)


def test_sdpa_meta_shape_inference():
    q = torch.empty(2, 4, 9, 32, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 13, 32, device="meta", requires_grad=True)
    v = torch.empty(2, 2, 13, 48, device="meta", requires_grad=True)
    mask = torch.empty(9, 13, device="meta", dtype=torch.bool)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 9, 48) and out.dtype == q.dtype
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in (q, k, v))
    q3 = torch.empty(3, 9, 16, device="meta", dtype=torch.float16)
    assert scaled_dot_product_attention(q3, q3, q3, is_causal=True).shape == (3, 9, 16)


# ---------------------------------------------------------------------------
# 2. window_size

BAD_WINDOWS = [
    (None, TypeError),
    (3, TypeError),
    (2.5, TypeError),
    ("ab", TypeError),
    ((1.5, 2), TypeError),
    ((1, 2.0), TypeError),
    ((True, 0), TypeError),
    ((1, None), TypeError),
    ((torch.tensor(1.5), 0), TypeError),
    ((1,), ValueError),
    ((1, 2, 3), ValueError),
    ([], ValueError),
]


@pytest.mark.parametrize("window,error", BAD_WINDOWS, ids=[repr(w) for w, _ in BAD_WINDOWS])
def test_bad_window_size_raises(window, error):
    q, k, v = random_qkv(1, 6, 6, 2, 2, 8, torch.float32, "cpu", requires_grad=False)
    with pytest.raises(error, match="window_size"):
        flash_attn_func(q, k, v, window_size=window)
    with pytest.raises(error, match="window_size"):
        flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), window_size=window)
    with pytest.raises(error, match="window_size"):
        flash_attn_kvpacked_func(q, torch.stack([k, v], 2), window_size=window)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_like_window_size_accepted(device):
    q, k, v = random_qkv(2, 12, 12, 2, 2, 16, dtype_for(device), device, requires_grad=False)
    ref = flash_attn_func(q, k, v, window_size=(3, 2))
    for window in [[3, 2], (np.int64(3), np.int32(2)), (torch.tensor(3), torch.tensor(2, dtype=torch.int32))]:
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=window), ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "window,same_as",
    [
        ((-2**32, -2**40), dict(window_size=(-1, -1))),
        ((-2, -5), dict(window_size=(-1, -1))),
        ((2**40, 0), dict(causal=True)),
        ((2**31, 2**40), dict(window_size=(-1, -1))),
        ((5, -2**32), dict(window_size=(5, -1))),
        ((-2**40, 3), dict(window_size=(-1, 3))),
    ],
    ids=str,
)
def test_extreme_window_sizes(device, window, same_as):
    """Every negative side is unbounded, and so is a side wider than any
    sequence, whatever its magnitude (values outside the int range included)."""
    q, k, v = random_qkv(2, 19, 27, 4, 2, 32, dtype_for(device), device)
    out = flash_attn_func(q, k, v, window_size=window)
    w = torch.randn_like(out)
    g = grads((out * w).sum(), (q, k, v))
    ref = flash_attn_func(q, k, v, **same_as)
    g_ref = grads((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# 3. Double backward and torch.func


def _entry(name):
    """The entry point `name` on (batch, seqlen, heads, headdim) tensors."""
    if name == "flash_attn_func":
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    # SDPA on the transposed layout, GQA and top-left causal.
    return lambda q, k, v: scaled_dot_product_attention(
        q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), is_causal=True, enable_gqa=True
    ).transpose(-3, -2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["flash_attn_func", "sdpa"])
def test_double_backward_raises(device, entry):
    f = _entry(entry)
    q, k, v = random_qkv(2, 11, 14, 4, 2, 32, dtype_for(device), device)
    out = f(q, k, v)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
    # First order with create_graph=True is still right...
    g_ref = torch.autograd.grad((f(q, k, v) * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    # ...but differentiating the gradient raises instead of returning zeros.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sum((x.float() ** 2).sum() for x in g), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises_with_mask_gradient(device):
    dtype = dtype_for(device)
    q = torch.randn(2, 2, 6, 16, device=device, dtype=dtype, requires_grad=True)
    mask = torch.randn(6, 6, device=device, dtype=dtype, requires_grad=True)
    out = scaled_dot_product_attention(q, q, q, attn_mask=mask)
    gq, gm = torch.autograd.grad(out.float().square().sum(), (q, mask), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gm.float().sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_create_graph_first_order(device):
    q, k, v = random_qkv(2, 9, 9, 2, 2, 16, dtype_for(device), device)
    out = flash_attn_func(q, k, v)
    w = torch.randn_like(out)
    (out * w).sum().backward(create_graph=True)
    g = [t.grad.detach().clone() for t in (q, k, v)]
    g_ref = grads((flash_attn_func(q, k, v) * w).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["flash_attn_func", "sdpa"])
def test_func_grad(device, entry):
    f = _entry(entry)
    q, k, v = random_qkv(2, 11, 14, 4, 2, 32, dtype_for(device), device, requires_grad=False)
    w = torch.randn(2, 11, 4, 32, device=device)

    def loss(q, k, v):
        return (f(q, k, v).float() * w).sum()

    g = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    g_ref = grads(loss(qr, kr, vr), (qr, kr, vr))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    # grad_and_value and vjp go through the same path.
    (_, value) = torch.func.grad_and_value(loss)(q, k, v)
    torch.testing.assert_close(value, loss(q, k, v))
    out, vjp_fn = torch.func.vjp(f, q, k, v)
    for a, b in zip(vjp_fn(w.to(out.dtype)), grads((f(qr, kr, vr) * w.to(out.dtype)).sum(), (qr, kr, vr))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_func_vmap(device):
    dtype = dtype_for(device)
    n = 3
    q = torch.randn(n, 2, 9, 4, 16, device=device, dtype=dtype)
    k = torch.randn(n, 2, 12, 2, 16, device=device, dtype=dtype)
    v = torch.randn(2, 12, 2, 16, device=device, dtype=dtype)  # shared across the vmapped dim
    f = _entry("flash_attn_func")
    out = torch.func.vmap(f, in_dims=(0, 0, None))(q, k, v)
    ref = torch.stack([f(q[i], k[i], v) for i in range(n)])
    torch.testing.assert_close(out, ref)
    # vmap over a non-leading dim of the SDPA layout
    qs = torch.randn(2, 4, 9, n, 16, device=device, dtype=dtype)
    g = _entry("sdpa")
    out = torch.func.vmap(lambda x: g(x.transpose(1, 2), k[0], k[1]), in_dims=3)(qs)
    ref = torch.stack([g(qs[..., i, :].transpose(1, 2), k[0], k[1]) for i in range(n)])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_func_vmap_of_grad(device):
    """Per-sample gradients: vmap(grad(loss))."""
    dtype = dtype_for(device)
    n = 3
    q, k, v = (torch.randn(n, 1, 10, 2, 16, device=device, dtype=dtype) for _ in range(3))
    w = torch.randn(n, 1, 10, 2, 16, device=device)
    f = _entry("flash_attn_func")

    def loss(q, k, v, w):
        return (f(q, k, v).float() * w).sum()

    g = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)))(q, k, v, w)
    for i in range(n):
        qi, ki, vi = (t[i].clone().requires_grad_() for t in (q, k, v))
        for a, b in zip(g, grads(loss(qi, ki, vi, w[i]), (qi, ki, vi))):
            torch.testing.assert_close(a[i], b)


@pytest.mark.parametrize("device", DEVICES)
def test_func_vmap_masks_and_jacrev(device):
    """vmap with attention masks (batched or shared, with their gradient), and
    jacrev (a vmap over the backward with the inputs shared)."""
    dtype = dtype_for(device)
    n = 3
    q = torch.randn(n, 2, 2, 7, 16, device=device, dtype=dtype)
    k = torch.randn(2, 2, 9, 16, device=device, dtype=dtype)
    masks = torch.randn(n, 7, 9, device=device, dtype=dtype)
    keep = torch.rand(7, 9, device=device) < 0.7
    keep[:, 0] = True
    w = torch.randn(2, 2, 7, 16, device=device)

    def f(q, m):
        return scaled_dot_product_attention(q, k, k, attn_mask=m)

    torch.testing.assert_close(torch.func.vmap(f)(q, masks), torch.stack([f(q[i], masks[i]) for i in range(n)]))
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(0, None))(q, keep),
                               torch.stack([f(q[i], keep) for i in range(n)]))

    def loss(q, m):
        return (f(q, m).float() * w).sum()

    gq, gm = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(q, masks)
    for i in range(n):
        qi, mi = q[i].clone().requires_grad_(), masks[i].clone().requires_grad_()
        ref_q, ref_m = grads(loss(qi, mi), (qi, mi))
        torch.testing.assert_close(gq[i], ref_q)
        torch.testing.assert_close(gm[i], ref_m)

    qs, ks, vs = random_qkv(1, 3, 5, 2, 1, 4, dtype, device, requires_grad=False)

    def g(q):
        return flash_attn_func(q, ks, vs, causal=True)

    jac = torch.func.jacrev(g)(qs)
    ref = torch.autograd.functional.jacobian(g, qs)
    assert jac.shape == (1, 3, 2, 4, 1, 3, 2, 4)
    torch.testing.assert_close(jac, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_func_second_order_raises(device):
    q, k, v = random_qkv(1, 6, 6, 2, 2, 16, dtype_for(device), device, requires_grad=False)
    f = _entry("flash_attn_func")

    def loss(q):
        return f(q, k, v).float().square().sum()

    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q).float().sum())(q)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda q: f(q, k, v), (q,), (torch.randn_like(q),))


# ---------------------------------------------------------------------------
# 4. Degenerate sizes


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_zero_raises(device):
    q, k, v = random_qkv(2, 5, 7, 2, 2, 0, dtype_for(device), device)
    with pytest.raises(RuntimeError, match="head dim"):
        flash_attn_func(q, k, v)
    with pytest.raises(RuntimeError, match="head dim"):
        flash_attn_kvpacked_func(q, torch.stack([k, v], 2))
    with pytest.raises(RuntimeError, match="head dim"):
        flash_attn_qkvpacked_func(torch.stack([k, k, v], 2))
    with pytest.raises(RuntimeError, match="head dim"):
        scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    with pytest.raises(RuntimeError, match="head dim"):
        scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], torch.randn(2, 7, 8, device=device, dtype=q.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_heads_raise(device):
    dtype = dtype_for(device)
    for h, hk in ((0, 0), (2, 0), (0, 2)):
        q, k, v = random_qkv(2, 5, 7, h, hk, 16, dtype, device)
        with pytest.raises(RuntimeError, match="at least one head"):
            flash_attn_func(q, k, v)
    q = torch.randn(2, 0, 5, 16, device=device, dtype=dtype)
    with pytest.raises(RuntimeError, match="at least one head"):
        scaled_dot_product_attention(q, q, q)
    with pytest.raises(RuntimeError, match="at least one head"):
        scaled_dot_product_attention(q[0], q[0], q[0])


EMPTY_CASES = {
    "batch0": ((0, 2, 5, 8), (0, 2, 7, 8), (0, 2, 7, 8), {}),
    "seqlen_q0": ((2, 2, 0, 8), (2, 2, 7, 8), (2, 2, 7, 8), {}),
    "seqlen_k0": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8), {}),
    "seqlen_k0_causal": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8), {"is_causal": True}),
    "seqlen_q0_causal": ((2, 2, 0, 8), (2, 2, 7, 8), (2, 2, 7, 8), {"is_causal": True}),
    "both0": ((2, 2, 0, 8), (2, 2, 0, 8), (2, 2, 0, 8), {}),
    "seqlen_k0_bool_mask": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 8), {"mask": (torch.bool, (5, 0))}),
    "seqlen_q0_float_mask_grad": ((2, 2, 0, 8), (2, 2, 7, 8), (2, 2, 7, 8), {"mask": (None, (2, 1, 0, 7))}),
    "batch0_gqa": ((0, 4, 5, 8), (0, 2, 7, 8), (0, 2, 7, 8), {"enable_gqa": True}),
    "seqlen_k0_value_dim": ((2, 2, 5, 8), (2, 2, 0, 8), (2, 2, 0, 16), {}),
    "value_dim0": ((2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 0), {}),
    "3d_seqlen_q0": ((2, 0, 8), (2, 7, 8), (2, 7, 8), {}),
    "5d_batch0": ((2, 0, 2, 5, 8), (2, 0, 2, 7, 8), (2, 0, 2, 7, 8), {}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_sdpa_zero_size_matches_pytorch(device, case):
    """Zero-size inputs: the output (shape and values) and every gradient
    (shape and values, zeros) are PyTorch's."""
    q_shape, k_shape, v_shape, kw = EMPTY_CASES[case]
    kw = dict(kw)
    dtype = dtype_for(device)
    inputs = [torch.randn(s, device=device, dtype=dtype) for s in (q_shape, k_shape, v_shape)]
    if "mask" in kw:
        mdtype, mshape = kw.pop("mask")
        if mdtype == torch.bool:
            inputs.append(torch.rand(mshape, device=device) < 0.5)
        else:
            inputs.append(torch.randn(mshape, device=device, dtype=dtype))
    results = []
    def pytorch_math(*args, **kwargs):
        # PyTorch's math backend: on CUDA, torch 2.11's default backend
        # returned None (an undefined tensor) for batch 0.
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*args, **kwargs)

    for fn in (scaled_dot_product_attention, pytorch_math):
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        mask = leaves[3] if len(leaves) > 3 else None
        out = fn(*leaves[:3], attn_mask=mask, **kw)
        w = torch.randn(out.shape, device=device, dtype=dtype)
        (out * w).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves if t.is_floating_point()]))
    (out, g), (ref, g_ref) = results
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref)
    for a, b, t in zip(g, g_ref, inputs):
        assert a is not None and a.shape == t.shape
        if b is None:
            assert not a.any()
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_zero_size_backward(device, shape, causal):
    b, sq, sk = shape
    q, k, v = random_qkv(b, sq, sk, 4, 2, 16, dtype_for(device), device)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (b, 4, sq)
    assert not out.any()  # no key or no row: zeros (or nothing)
    assert torch.isposinf(lse).all()
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# ---------------------------------------------------------------------------
# 5. replace_attention and the fused fast path of TransformerEncoder(Layer)


def _profile(fn):
    """fn() under the profiler: (result, how many times our forward op ran,
    whether PyTorch's fused encoder kernels ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    names = [e.name for e in prof.events()]
    fused = any(n in ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention") for n in names)
    return result, names.count("flash_attn_ext::fwd"), fused


def _encoder_inputs(device, dtype, batch_first, padded):
    n, s, e = 3, 9, 32
    x = torch.randn(n, s, e, device=device, dtype=dtype)
    kpm = None
    if padded:  # right padding: PyTorch's nested-tensor path takes only that
        kpm = torch.zeros(n, s, dtype=torch.bool, device=device)
        kpm[0, 6:] = True
        kpm[2, 4:] = True
    valid = torch.ones(n, s, dtype=torch.bool, device=device) if kpm is None else ~kpm
    return (x if batch_first else x.transpose(0, 1)), kpm, valid


def _compare_valid(out, ref, valid, batch_first, dtype):
    # Padded positions are left out: PyTorch's nested-tensor path zeroes them.
    if not batch_first:
        out, ref = out.transpose(0, 1), ref.transpose(0, 1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out[valid], ref[valid], **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_replace_attention_encoder_layer_eval_no_grad(device, batch_first, norm_first, padded):
    dtype = dtype_for(device)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first, activation="gelu", device=device, dtype=dtype)
    layer.eval()
    reference = copy.deepcopy(layer)
    assert replace_attention(layer) is layer
    x, kpm, valid = _encoder_inputs(device, dtype, batch_first, padded)
    with torch.no_grad():
        out, calls, fused = _profile(lambda: layer(x, src_key_padding_mask=kpm))
        ref = reference(x, src_key_padding_mask=kpm)
    assert calls == 1 and not fused
    _compare_valid(out, ref, valid, batch_first, dtype)
    # The swap survives a round trip through train() and deepcopy.
    layer.train().eval()
    with torch.no_grad():
        _, calls, fused = _profile(lambda: copy.deepcopy(layer)(x, src_key_padding_mask=kpm))
    assert calls == 1 and not fused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_replace_attention_encoder_eval_no_grad(device, batch_first, padded):
    dtype = dtype_for(device)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                       device=device, dtype=dtype)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first,
                                    norm=nn.LayerNorm(32, device=device, dtype=dtype)).eval()
    model = nn.Sequential(encoder)
    reference = copy.deepcopy(model)
    replace_attention(model)
    x, kpm, valid = _encoder_inputs(device, dtype, batch_first, padded)
    with torch.no_grad():
        out, calls, fused = _profile(lambda: model[0](x, src_key_padding_mask=kpm))
        ref = reference[0](x, src_key_padding_mask=kpm)
    assert calls == 2 and not fused
    assert not out.is_nested
    _compare_valid(out, ref, valid, batch_first, dtype)
    # A layer replaced first and then cloned into a new encoder stays ours.
    fresh = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                       device=device, dtype=dtype)
    replace_attention(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch may explain why it will not use nested tensors
        encoder2 = nn.TransformerEncoder(fresh, num_layers=3, enable_nested_tensor=batch_first).eval()
    with torch.no_grad():
        _, calls, fused = _profile(lambda: encoder2(x, src_key_padding_mask=kpm))
    assert calls == 3 and not fused

