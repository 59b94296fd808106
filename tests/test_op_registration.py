"""The custom ops as PyTorch sees them: opcheck (schema, fake tensors,
autograd registration), gradcheck in float64, and torch.compile."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import DEVICES, random_qkv


def op_samples(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    samples = []
    for (b, sq, sk, h, hk, d), causal, window in [
        ((2, 17, 33, 4, 2, 32), False, (-1, -1)),
        ((1, 40, 20, 2, 1, 64), True, (-1, 0)),
        ((2, 64, 64, 2, 2, 16), False, (8, 8)),
    ]:
        q, k, v = random_qkv(b, sq, sk, h, hk, d, dtype, device)
        samples.append((q, k, v, None, d ** -0.5, causal, window[0], window[1], False))
    q, k, v = random_qkv(2, 20, 30, 2, 2, 16, dtype, device)
    bias = torch.randn(2, 1, 20, 30, device=device, dtype=dtype).expand(2, 2, 20, 30).requires_grad_()
    samples.append((q, k, v, bias, 0.25, False, -1, -1, False))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd(device):
    for args in op_samples(device):
        torch.library.opcheck(torch.ops.flash_attn_ext.fwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_bwd(device):
    for q, k, v, bias, scale, causal, wl, wr, det in op_samples(device):
        out, lse, residual = torch.ops.flash_attn_ext.fwd(q, k, v, bias, scale, causal, wl, wr, det)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse)
        args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), residual.detach(), dlse,
                None if bias is None else bias.detach(), scale, causal, wl, wr, det, bias is not None)
        torch.library.opcheck(torch.ops.flash_attn_ext.bwd.default, args)
        # With the backward's D (softmax_d) as a fifth output.
        torch.library.opcheck(torch.ops.flash_attn_ext.bwd.default, args + (0.0, None, 0.0, None, True))


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))])
def test_gradcheck_fp64(causal, window):
    q, k, v = random_qkv(1, 9, 13, 2, 1, 8, torch.float64, "cpu")
    bias = torch.randn(1, 2, 9, 13, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        # softmax_lse is float32 by contract, too coarse for finite differences
        # at eps=1e-6; its gradient is checked in test_flash_attn.test_lse_gradient.
        out, _, _ = flash_attn_ext._ops.fwd(q, k, v, bias, 0.3, causal, window[0], window[1], False)
        return out

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 48, 48, 4, 2, 32, dtype, device)

    def f(q, k, v):
        return flash_attn_ext.flash_attn_func(q * 2, k, v, causal=True).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("device", DEVICES)
def test_eager_calls_take_the_same_formula(device):
    """Eager calls that record a graph run the ops through _ops' Function (no torch.library
    fill_defaults on every call); the op called directly runs the formula register_autograd installed.
    Both give the same out, lse and gradients (dq, dk, dv, dbias, and through lse), bit for bit, dense
    and varlen; a call without a gradient, and a compiled one, see the op itself."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 37, 50, 4, 2, 32, dtype, device)
    bias = torch.randn(2, 4, 37, 50, device=device, dtype=dtype, requires_grad=True)
    args = (q, k, v, bias, 0.3, True, -1, 0, False, 0.0, None, None, 0.0, None)
    fast = flash_attn_ext._ops.call_fwd(*args)
    assert "Eager" in type(fast[0].grad_fn).__name__, type(fast[0].grad_fn).__name__
    registered = torch.ops.flash_attn_ext.fwd(*args)
    assert "Eager" not in type(registered[0].grad_fn).__name__
    dout, dlse = torch.randn_like(fast[0]), torch.randn_like(fast[1])
    grads = [torch.autograd.grad((r[0], r[1]), (q, k, v, bias), (dout, dlse)) for r in (fast, registered)]
    for a, b in zip(fast[:2], registered[:2]):
        assert torch.equal(a, b)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *grads):
        assert torch.isfinite(a).all() and a.abs().amax() > 0, name
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert flash_attn_ext._ops.call_fwd(*args)[0].grad_fn is None

    cu = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(40, 2, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    vargs = (qv, kv, vv, cu, cu, None, 35, 35, 0.25, True, -1, 0, False, 0.0, None, None, 0.0, None)
    fast = flash_attn_ext._ops.call_varlen_fwd(*vargs)
    registered = torch.ops.flash_attn_ext.varlen_fwd(*vargs)
    assert "Eager" in type(fast[0].grad_fn).__name__
    dout = torch.randn_like(fast[0])
    for name, a, b in zip(("dq", "dk", "dv"), *[torch.autograd.grad(r[0], (qv, kv, vv), dout)
                                               for r in (fast, registered)]):
        assert torch.isfinite(a).all() and a.abs().amax() > 0, name
        assert torch.equal(a, b), name
