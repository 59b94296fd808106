"""The score features (issue 9) through flash_attn_func, on every device:
softcap, ALiBi slopes and attention sinks, alone and together, with causal
masks, windows, GQA and seqlen_q != seqlen_k; out, lse and every gradient
(the sinks' included) against the float64 reference under the 2x rule; the
errors that name a bad argument; the ops under opcheck and gradcheck."""
from __future__ import annotations

import math

import pytest
import torch

import flash_attn_ext
from conftest import (
    DEVICES,
    assert_close_to_ref,
    attention_ref,
    device_dtype_params,
    poison_allocator,
    random_qkv,
    sinks_grad_from,
)

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (2, 65, 65, 4, 2, 64),
    (1, 40, 129, 2, 2, 128),
    (2, 130, 70, 4, 1, 96),
    (1, 17, 300, 2, 1, 32),
]


def random_features(batch, nheads, device, softcap=0.0, alibi=None, sinks=False):
    """Feature arguments for flash_attn_func: alibi in (None, "head", "batch")."""
    slopes = None
    if alibi == "head":
        slopes = torch.rand(nheads, device=device) * 0.3 + 0.01
    elif alibi == "batch":
        slopes = torch.rand(batch, nheads, device=device) * 0.3 + 0.01
    sink = (torch.randn(nheads, device=device) * 2).requires_grad_() if sinks else None
    return dict(softcap=softcap, alibi_slopes=slopes, s_aux=sink)


def ref_kwargs(f):
    return dict(softcap=f["softcap"], alibi_slopes=f["alibi_slopes"], sinks=f["s_aux"])


def check_features(q, k, v, causal=False, window=(-1, -1), softmax_scale=None, deterministic=False, lse_grad=False,
                   **features):
    """lse_grad: the loss also weighs lse (random weights on its finite
    entries), so that every backward, the sinks' included, takes dlse."""
    f = dict(softcap=0.0, alibi_slopes=None, s_aux=None, deterministic=deterministic)
    f.update(features)
    sinks = f["s_aux"]
    out_bytes = q.numel() * q.element_size()
    poison_allocator(q.device, out_bytes)
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                                 window_size=window, return_attn_probs=True, **f)
    assert out.shape == q.shape and not torch.isnan(out).any()
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    low_in = [x.detach().clone().requires_grad_() for x in leaves]

    def ref_call(xs, upcast):
        kw = ref_kwargs(f)
        if sinks is not None:
            kw["sinks"] = xs[3]
        return attention_ref(xs[0], xs[1], xs[2], causal, window, softmax_scale=softmax_scale, upcast=upcast, **kw)

    ref_out, ref_lse = ref_call(ref_in, True)
    low_out, low_lse = ref_call(low_in, False)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf rows differ"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        lse_err = (lse[finite].double() - ref_lse[finite]).abs().max().item()
        assert lse_err <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {lse_err}"
    # The 2x rule in every dtype, fp32 included: softcap's derivative 1 - tanh^2
    # cancels where tanh saturates, in PyTorch's fp32 as in ours, and the
    # sinks' gradient sums rowsum(dout * out) over rows of the rounded out.
    assert_close_to_ref(out, ref_out, low_out, "out")

    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(~torch.isfinite(lse), 0.0) if lse_grad else None
    poison_allocator(q.device, 3 * out_bytes)
    if lse_grad:
        grads = torch.autograd.grad((out, lse), leaves, (dout, dlse))
        ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_in, (dout.double(), dlse.double()))
        low_grads = torch.autograd.grad((low_out, low_lse), low_in, (dout, dlse.to(low_lse.dtype)))
    else:
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
        low_grads = torch.autograd.grad(low_out, low_in, dout)
    baselines = [(low,) for low in low_grads]
    if sinks is not None:
        # Like dq, dk and dv of every FlashAttention backward (conftest.py), the
        # sinks' gradient takes D = rowsum(dout * out) from the output rounded
        # to the dtype. It is a sum over a few heads, so one draw of rounding
        # can land anywhere; the baselines are the same formula on PyTorch's
        # own rounded output and on the exact output rounded to the dtype.
        def grad_of(o, lse):
            return sinks_grad_from(sinks.detach(), dout, o.detach().to(q.dtype), lse.detach(), dlse)

        baselines[3] = (low_grads[3], grad_of(low_out, low_lse), grad_of(ref_out, ref_lse))
    for name, ours, ref, low in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, baselines):
        assert ours.shape == ref.shape, name
        # dsinks is a handful of sums (one per head), so the baselines' own
        # rounding draws are noisy: one unit of the dtype's precision on top.
        slack = max(1e-5, torch.finfo(q.dtype).eps) if name == "dsinks" else 1e-5
        assert_close_to_ref(ours, ref, low, name, slack=slack)


CASES = [
    pytest.param(dict(softcap=5.0), id="softcap"),
    pytest.param(dict(alibi="head"), id="alibi-head"),
    pytest.param(dict(alibi="batch"), id="alibi-batch"),
    pytest.param(dict(sinks=True), id="sinks"),
    pytest.param(dict(softcap=8.0, alibi="head"), id="softcap-alibi"),
    pytest.param(dict(softcap=4.0, alibi="batch", sinks=True), id="all"),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (24, 8))],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_features(device, dtype, case, causal, window, shape):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    q.data *= 3  # scores large enough for the cap and the slopes to matter
    features = random_features(batch, nheads, device, **case)
    check_features(q, k, v, causal=causal, window=window, **features)


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_caps(device):
    """With huge scores, softcap bounds them: the softmax stays soft."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 33, 33, 2, 2, 64, dtype, device)
    q.data *= 100
    check_features(q, k, v, softcap=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_on_rows_without_keys(device):
    """A row that sees no key (causal, seqlen_q > seqlen_k) has only the sink: out 0, lse = sink."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 40, 8, 2, 2, 32, dtype, device)
    sinks = torch.tensor([0.5, -1.5], device=device, requires_grad=True)
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, s_aux=sinks)
    assert (out[:, :32] == 0).all()
    torch.testing.assert_close(lse[0, :, :32], sinks.detach()[:, None].expand(2, 32))
    check_features(q, k, v, causal=True, s_aux=sinks)
    # A sink of -inf is no sink.
    no_sink = torch.full((2,), -math.inf, device=device)
    torch.testing.assert_close(flash_attn_ext.flash_attn_func(q, k, v, s_aux=no_sink), flash_attn_ext.flash_attn_func(q, k, v))


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (24, 8))],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_sinks_grad_with_lse_grad(device, dtype, causal, window, deterministic):
    """The sinks' gradient (from the backward's D = rowsum(dout * out) - dlse)
    with a gradient flowing into lse too, fresh random sinks, GQA and
    seqlen_q > seqlen_k (rows that see no key under the causal mask)."""
    q, k, v = random_qkv(2, 97, 70, 4, 2, 64, dtype, device)
    q.data *= 3
    sinks = (torch.randn(4, device=device) * 2).requires_grad_()
    check_features(q, k, v, causal=causal, window=window, deterministic=deterministic, lse_grad=True, s_aux=sinks)


def _softmax_d_expected(dout, out, dlse):
    # (batch, nheads, seqlen_q) D = rowsum(dout * out) - dlse, in fp64.
    return (dout.double() * out.double()).sum(-1).transpose(1, 2) - (0 if dlse is None else dlse.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dlse_given", [False, True], ids=["no-dlse", "dlse"])
@pytest.mark.parametrize("seqlens", [(50, 20), (9, 0), (0, 7)], ids=str)
def test_bwd_returns_softmax_d(device, dlse_given, seqlens):
    """bwd(return_softmax_d=True) returns the kernels' D for every row (rows
    that see no key, and calls without keys, included): fp64 for fp64 inputs
    (exact to fp64 rounding), fp32 otherwise; empty without it."""
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float64, torch.float32, torch.bfloat16]
    for dtype in dtypes:
        q, k, v = random_qkv(2, seqlens[0], seqlens[1], 4, 2, 32, dtype, device, requires_grad=False)
        sinks = torch.randn(4, device=device)
        out, lse, residual = torch.ops.flash_attn_ext.fwd(q, k, v, None, 0.2, True, -1, -1, False, 0.0, None, sinks)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse) if dlse_given else None
        for det in (False, True):
            *grads, softmax_d = torch.ops.flash_attn_ext.bwd(dout, q, k, v, out, lse, residual, dlse, None, 0.2, True,
                                                             -1, -1, det, False, 0.0, None, 0.0, None, True)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert softmax_d.dtype == acc and softmax_d.shape == lse.shape
            expected = _softmax_d_expected(dout, out, dlse)
            tol = 1e-12 if acc == torch.float64 else 1e-5
            torch.testing.assert_close(softmax_d.double(), expected, rtol=tol, atol=tol)
            assert torch.ops.flash_attn_ext.bwd(dout, q, k, v, out, lse, residual, dlse, None, 0.2, True, -1, -1,
                                                det, False)[4].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_bwd_returns_softmax_d(device):
    """varlen_bwd's D: every row of (nheads, total_q), those of a sequence
    without keys and those outside every sequence included."""
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float64, torch.bfloat16]
    lens_q, lens_k = [5, 40, 3, 0], [9, 0, 70, 4]
    cu_q = torch.tensor([0, 5, 45, 48, 48], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 9, 79, 83], dtype=torch.int32, device=device)
    total_q, total_k = sum(lens_q) + 6, sum(lens_k)  # 6 rows outside every sequence
    for dtype in dtypes:
        q = torch.randn(total_q, 4, 32, device=device).to(dtype)
        k = torch.randn(total_k, 2, 32, device=device).to(dtype)
        v = torch.randn(total_k, 2, 32, device=device).to(dtype)
        sinks = torch.randn(4, device=device)
        out, lse, residual = torch.ops.flash_attn_ext.varlen_fwd(q, k, v, cu_q, cu_k, None, 40, 70, 0.2, True, -1, -1,
                                                                 False, 0.0, None, sinks)
        dout = torch.randn_like(out)
        dlse = torch.randn_like(lse)
        for det in (False, True):
            *grads, softmax_d = torch.ops.flash_attn_ext.varlen_bwd(dout, q, k, v, out, lse, residual, dlse, cu_q, cu_k,
                                                                    None, 40, 70, 0.2, True, -1, -1, det, 0.0, None,
                                                                    0.0, None, True)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert softmax_d.dtype == acc and softmax_d.shape == lse.shape
            expected = _softmax_d_expected(dout[None], out[None], dlse[None])[0]
            tol = 1e-12 if acc == torch.float64 else 1e-5
            torch.testing.assert_close(softmax_d.double(), expected, rtol=tol, atol=tol)


def test_sinks_grad_fp64():
    """fp64 inputs: the sinks' gradient, with dlse in use, matches the fp64
    reference to the rounding of its fp32 result (D stays fp64 throughout,
    and lse_residual carries what fp32 softmax_lse cannot hold)."""
    q, k, v = random_qkv(2, 37, 29, 4, 2, 16, torch.float64, "cpu")
    sinks = (torch.randn(4) * 2).requires_grad_()
    out, lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=True, window_size=(20, 3), return_attn_probs=True,
                                                 s_aux=sinks)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v, sinks), (dout, dlse))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    ref_out, ref_lse = attention_ref(*ref_in[:3], True, (20, 3), sinks=ref_in[3])
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_in, (dout, dlse.double()))
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9, msg=name)
    assert grads[3].dtype == torch.float32
    torch.testing.assert_close(grads[3].double(), ref_grads[3], rtol=2e-7, atol=2e-7 * ref_grads[3].abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_grad_with_lse_residual(device):
    """A bias and a sink of -2**30 (exact in bf16 and fp32) with q = 0: every
    logit of a row is -2**30, lse = -2**30 + log(seqlen_k + 1), which fp32
    softmax_lse rounds to -2**30; only with lse_residual (a natural log on
    the CPU, log2-domain on CUDA) does the sink's probability come out as
    1 / (seqlen_k + 1) instead of 1, and with it the sinks' gradient."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, k, v = random_qkv(2, 40, 64, 2, 2, 32, dtype, device, requires_grad=False)
    q = torch.zeros(2, 40, 2, 32, device=device, dtype=dtype)
    bias = torch.full((2, 2, 40, 64), -2.0**30, device=device, dtype=dtype)
    sinks = torch.full((2,), -2.0**30, device=device).requires_grad_()
    out, lse, residual = flash_attn_ext._ops.fwd(q, k, v, bias, 0.2, False, -1, -1, False, 0.0, None, sinks)
    assert residual.numel() == lse.numel()
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (dsinks,) = torch.autograd.grad((out, lse), (sinks,), (dout, dlse))

    s64 = sinks.detach().double().requires_grad_()
    ref_out, ref_lse = attention_ref(q, k, v, bias=bias, softmax_scale=0.2, sinks=s64)
    (ref,) = torch.autograd.grad((ref_out, ref_lse), (s64,), (dout.double(), dlse.double()))
    # The baseline: the formula on the exact output rounded to the dtype.
    # (PyTorch's own math in the dtype has the same fp32 lse problem, so its
    # gradient is no yardstick here.)
    baseline = sinks_grad_from(sinks.detach(), dout, ref_out.to(dtype), ref_lse, dlse)
    assert_close_to_ref(dsinks, ref, baseline, "dsinks", slack=max(1e-5, torch.finfo(dtype).eps))


@pytest.mark.parametrize("device", DEVICES)
def test_sink_names(device):
    q, k, v = random_qkv(1, 16, 16, 2, 2, 32, torch.float32 if device == "cpu" else torch.bfloat16, device)
    sinks = torch.randn(2, device=device)
    a = flash_attn_ext.flash_attn_func(q, k, v, s_aux=sinks)
    b = flash_attn_ext.flash_attn_func(q, k, v, learnable_sink=sinks)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="s_aux or as learnable_sink"):
        flash_attn_ext.flash_attn_func(q, k, v, s_aux=sinks, learnable_sink=sinks)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_feature_arguments(device):
    q, k, v = random_qkv(2, 16, 16, 4, 2, 32, torch.float32 if device == "cpu" else torch.bfloat16, device)
    f = flash_attn_ext.flash_attn_func
    for bad, err in [(-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), (True, TypeError),
                     ("5", TypeError), (None, TypeError)]:
        with pytest.raises(err, match="softcap"):
            f(q, k, v, softcap=bad)
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.1", None):
        with pytest.raises(ValueError, match="dropout_p must be a number in"):
            f(q, k, v, dropout_p=bad)
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\)"):
        f(q, k, v, alibi_slopes=torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be \(nheads,\)"):
        f(q, k, v, alibi_slopes=torch.ones(3, 4, device=device))
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        f(q, k, v, alibi_slopes=torch.ones(4, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="alibi_slopes must have a contiguous last dimension"):
        f(q, k, v, alibi_slopes=torch.ones(4, 2, device=device)[:, 0])
    with pytest.raises(RuntimeError, match=r"sinks must be \(nheads,\) = \(4,\), got \(2, 4\)"):
        f(q, k, v, s_aux=torch.ones(2, 4, device=device))
    with pytest.raises(RuntimeError, match="sinks must be float32"):
        f(q, k, v, s_aux=torch.ones(4, device=device, dtype=torch.bfloat16))
    other = "meta"
    with pytest.raises(RuntimeError, match=rf"same device.*alibi_slopes on {other}"):
        f(q, k, v, alibi_slopes=torch.ones(4, device=other))
    with pytest.raises(RuntimeError, match=rf"same device.*sinks on {other}"):
        f(q, k, v, s_aux=torch.ones(4, device=other))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_features(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 20, 30, 4, 2, 32, dtype, device)
    slopes = torch.rand(2, 4, device=device)
    sinks = torch.randn(4, device=device, requires_grad=True)
    args = (q, k, v, None, 0.2, True, -1, -1, False, 6.0, slopes, sinks)
    torch.library.opcheck(torch.ops.flash_attn_ext.fwd.default, args)
    out, lse, residual = torch.ops.flash_attn_ext.fwd(*args)
    torch.library.opcheck(
        torch.ops.flash_attn_ext.bwd.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), residual.detach(), None,
         None, 0.2, True, -1, -1,
         False, False, 6.0, slopes),
    )


def test_gradcheck_fp64_features():
    q, k, v = random_qkv(1, 9, 13, 2, 1, 8, torch.float64, "cpu")
    sinks = torch.randn(2, dtype=torch.float64).float().requires_grad_()
    slopes = torch.rand(2)

    def f(q, k, v):
        out, _, _ = flash_attn_ext._ops.fwd(q, k, v, None, 0.7, True, -1, -1, False, 3.0, slopes, sinks.detach())
        return out

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_with_features(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(3, 16, 16, 2, 2, 32, dtype, device, requires_grad=False)
    slopes = torch.rand(3, 2, device=device)  # one set of slopes per vmapped element
    sinks = torch.randn(3, 2, device=device)

    def one(q, k, v, slopes, sinks):
        return flash_attn_ext.flash_attn_func(q[None], k[None], v[None], softcap=3.0, alibi_slopes=slopes,
                                              s_aux=sinks)[0]

    batched = torch.func.vmap(one)(q, k, v, slopes, sinks)
    looped = torch.stack([one(q[i], k[i], v[i], slopes[i], sinks[i]) for i in range(3)])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", [pytest.param(dict(softcap=3.0), id="softcap"),
                                  pytest.param(dict(softcap=3.0, alibi="batch"), id="softcap-alibi")])
def test_bias_grad_with_features(device, dtype, case):
    """dbias is the gradient of the logit: the bias joins after the cap, so
    softcap's factor belongs to dq and dk, not to dbias."""
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = 2, 70, 90, 2, 1, 64
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device)
    q.data *= 3
    bias = torch.randn(batch, nheads, seqlen_q, seqlen_k, device=device, dtype=dtype, requires_grad=True)
    f = random_features(batch, nheads, device, **case)
    scale = headdim ** -0.5

    def ours(q, k, v, bias):
        return flash_attn_ext._ops.fwd(q, k, v, bias, scale, True, -1, -1, False, f["softcap"], f["alibi_slopes"],
                                       None)[0]

    def ref(q, k, v, bias, upcast):
        return attention_ref(q, k, v, True, bias=bias, softmax_scale=scale, upcast=upcast, **ref_kwargs(f))[0]

    leaves = [q, k, v, bias]
    out = ours(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    low_in = [x.detach().clone().requires_grad_() for x in leaves]
    ref_out, low_out = ref(*ref_in, True), ref(*low_in, False)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_grads = torch.autograd.grad(low_out, low_in, dout)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, low_grads):
        assert_close_to_ref(a, r, lo, name)  # the 2x rule in every dtype (see check_features)


# --------------------------------------------------------------------------
# Every CUDA kernel family with the features: on an H100/H200 the Hopper
# kernels take head dims 64/128/256 and FLASH_ATTN_EXT_DISABLE_SM90=1 hands
# them to the mma.sync ones (which alone serve 96); deterministic=True adds
# the separate dQ kernel. The shapes have a query block that sees no key
# (causal, seqlen_q > seqlen_k: the forward's empty-block path, where a sink
# is the whole lse) and ragged tile ends.

FAMILY_CASES = [
    pytest.param(dict(softcap=5.0), id="softcap"),
    pytest.param(dict(alibi="batch"), id="alibi"),
    pytest.param(dict(sinks=True), id="sinks"),
    pytest.param(dict(softcap=4.0, alibi="head", sinks=True), id="all"),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels")
@pytest.mark.parametrize("case", FAMILY_CASES)
@pytest.mark.parametrize("headdim", [64, 96, 128, 256])
@pytest.mark.parametrize("sm90", [True, False], ids=["default", "sm90-disabled"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_features_cuda_kernel_families(monkeypatch, case, headdim, sm90, deterministic, causal):
    if not sm90:
        monkeypatch.setenv("FLASH_ATTN_EXT_DISABLE_SM90", "1")
    seqlen_q, seqlen_k = (300, 100) if causal else (130, 257)
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, 2, headdim, torch.bfloat16, "cuda")
    q.data *= 3
    check_features(q, k, v, causal=causal, deterministic=deterministic, **random_features(2, 4, "cuda", **case))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels")
@pytest.mark.parametrize("sm90", [True, False], ids=["default", "sm90-disabled"])
def test_features_cuda_deterministic_bit_identical(monkeypatch, sm90):
    """The kMods dQ kernel keeps deterministic=True bit-identical."""
    if not sm90:
        monkeypatch.setenv("FLASH_ATTN_EXT_DISABLE_SM90", "1")
    q, k, v = random_qkv(2, 200, 200, 4, 2, 128, torch.bfloat16, "cuda")
    f = random_features(2, 4, "cuda", softcap=5.0, alibi="head", sinks=True)
    runs = []
    for _ in range(3):
        out = flash_attn_ext.flash_attn_func(q, k, v, causal=True, deterministic=True, **f)
        runs.append(torch.autograd.grad(out, [q, k, v], torch.ones_like(out)))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_sinks_without_keys(device):
    """seqlen_k = 0: every row has only its sink (lse = the sink, +inf for a -inf sink), out 0, and the
    sinks' gradient comes from dlse alone."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(2, 5, 3, 32, device=device, dtype=dtype)
    k = v = torch.randn(2, 0, 3, 32, device=device, dtype=dtype)
    sinks = torch.tensor([0.5, -math.inf, -2.0], device=device, requires_grad=True)
    out, lse, _ = flash_attn_ext._ops.fwd(q, k, v, None, 0.3, False, -1, -1, False, 0.0, None, sinks)
    assert (out == 0).all()
    expected = torch.tensor([0.5, math.inf, -2.0], device=device)[None, :, None].expand(2, 3, 5)
    torch.testing.assert_close(lse, expected)
    (dsinks,) = torch.autograd.grad(lse.masked_fill(lse.isinf(), 0).sum(), [sinks])
    torch.testing.assert_close(dsinks, torch.tensor([10.0, 0.0, 10.0], device=device))
