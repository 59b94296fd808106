"""The SDPA function, MultiheadAttention, flash_attn_func and the
argument checks against PyTorch's own implementations (math SDPA in fp64,
torch.nn.MultiheadAttention with the same weights) and an fp64 reference.

Covers what the other test files leave out: 1-D and >4-D mask / input
shapes, mixed ranks and broadcast batches, float32 masks with fp16/bf16
inputs, last-dim-strided flash_attn_func inputs, non-finite propagation,
MultiheadAttention's weights-with-dropout consistency, ALiBi / softcap /
sinks / windows combined with Lq != Lk and a value head dim != qk's, dropout
keep-rate statistics, and the error messages of bad arguments.

Inputs are fresh random numbers every run (conftest seeds each test).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flash_attn_ext import (
    MultiheadAttention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    scaled_dot_product_attention,
)

F64 = torch.float64


def torch_sdpa(*args, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def assert_same(ours, theirs, atol=1e-10, name=""):
    """Equal up to atol, with NaN exactly where `theirs` has NaN."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}: NaN pattern differs"
    if ours.numel():
        err = torch.nan_to_num((ours.double() - theirs.double()).abs(), nan=0.0).max().item()
        assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g}"


def out_and_grads(fn, inputs, float_leaves=()):
    """fn's output and the gradients of `inputs` (and `float_leaves`) for a
    fixed random output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    extra = [x.detach().clone().requires_grad_() for x in float_leaves]
    out = fn(*leaves, *extra)
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    grads = torch.autograd.grad(out, leaves + extra, dout, allow_unused=True)
    return [out, *grads]


def compare_sdpa(q, k, v, mask=None, mask_grad=False, **kw):
    mask_leaves = (mask,) if mask_grad else ()

    def ours(q, k, v, *m):
        return scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else mask, **kw)

    def theirs(q, k, v, *m):
        return torch_sdpa(q, k, v, attn_mask=m[0] if m else mask, **kw)

    a = out_and_grads(ours, (q, k, v), mask_leaves)
    b = out_and_grads(theirs, (q, k, v), mask_leaves)
    for name, x, y in zip(["out", "dq", "dk", "dv", "dmask"], a, b):
        assert (x is None) == (y is None), name
        if x is not None:
            assert_same(x, y, name=name)


# ---------------------------------------------------------------------------
# SDPA against PyTorch's math path, fp64, with gradients


@pytest.mark.parametrize("mask_shape", [(7,), (1,), (5, 1), (1, 7), (3, 1, 7), (2, 1, 5, 7), (1, 3, 1, 1)])
@pytest.mark.parametrize("kind", ["bool", "float_grad"])
def test_sdpa_mask_shapes(mask_shape, kind):
    q, k, v = randn(2, 3, 5, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 6)
    if kind == "bool":
        mask = torch.rand(mask_shape) < 0.7
        mask[..., 0] = True
    else:
        mask = randn(*mask_shape)
    compare_sdpa(q, k, v, mask, mask_grad=(kind == "float_grad"))


@pytest.mark.parametrize("shapes", [
    ((3, 5, 8), (3, 7, 8), (3, 7, 6)),            # no batch dim
    ((5, 8), (7, 8), (7, 6)),                     # no batch, no head dim
    ((2, 2, 3, 5, 8), (2, 2, 3, 7, 8), (2, 2, 3, 7, 6)),  # two batch dims
    ((2, 2, 3, 5, 8), (1, 2, 3, 7, 8), (2, 1, 3, 7, 6)),  # broadcast batch dims
    ((2, 3, 5, 8), (3, 7, 8), (3, 7, 6)),         # key/value of lower rank
], ids=["3d", "2d", "5d", "broadcast", "mixed_rank"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_ranks(shapes, is_causal):
    q, k, v = (randn(*s) for s in shapes)
    compare_sdpa(q, k, v, is_causal=is_causal)
    if not is_causal:
        compare_sdpa(q, k, v, randn(5, 7), mask_grad=True)


@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (1, 6), (6, 1)])
def test_sdpa_causal_top_left_gqa_value_dim(L, S):
    q, k, v = randn(2, 6, L, 16), randn(2, 2, S, 16), randn(2, 2, S, 24)
    compare_sdpa(q, k, v, is_causal=True, enable_gqa=True, scale=0.37)


def test_sdpa_gqa_key_and_value_heads_differ():
    q, k, v = randn(1, 4, 5, 8), randn(1, 2, 7, 8), randn(1, 1, 7, 6)
    compare_sdpa(q, k, v, randn(4, 5, 7), mask_grad=True, enable_gqa=True)


@pytest.mark.parametrize("scale", [0.0, -0.5, 3.0])
def test_sdpa_unusual_scales(scale):
    compare_sdpa(randn(1, 2, 5, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8), scale=scale)


def test_sdpa_permuted_inputs():
    # Head dim strided (not last-dim contiguous) and arbitrary other strides.
    q = randn(2, 8, 5, 3).permute(0, 3, 2, 1)
    k = randn(2, 8, 7, 3).permute(0, 3, 2, 1)
    v = randn(7, 2, 3, 6).permute(1, 2, 0, 3)
    compare_sdpa(q, k, v, randn(5, 7).t().contiguous().t(), mask_grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_float32_mask_with_low_precision_inputs(dtype):
    """A float32 mask with fp16/bf16 inputs: PyTorch's math path adds it in
    float32. Casting it to the inputs' dtype overflowed fp16 (-1e5 -> -inf,
    so a row of large finite biases became a row without keys, output 0)
    and rounded bf16 (spacing 512 at 1e5, so +3 between keys vanished)."""
    q, k, v = randn(2, 2, 4, 16), randn(2, 2, 6, 16), randn(2, 2, 6, 16)
    mask = torch.full((4, 6), -1e5) + 3 * torch.rand(4, 6)
    mask[1] = torch.tensor([-7e4, -8e4, -9e4, -1e5, -1.1e5, -1.2e5])
    mask[2] = torch.randn(6)
    mask = mask.requires_grad_()
    ref = torch_sdpa(q, k, v, attn_mask=mask.detach().double())
    ours = scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask)
    theirs = torch_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask.detach())
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert not ours.isnan().any()
    err, base = (ours.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-2, f"error {err:.3g}, PyTorch's {base:.3g}"
    ours.float().sum().backward()
    assert mask.grad is not None and mask.grad.dtype == torch.float32 and torch.isfinite(mask.grad).all()


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sdpa_non_finite_inputs_propagate(where, value):
    xs = {"q": randn(2, 2, 5, 8), "k": randn(2, 2, 7, 8), "v": randn(2, 2, 7, 8)}
    xs[where][1, 0, 3, 2] = value
    if where == "k":
        # An infinite key component reaches the output only through a query
        # with a positive component there (a negative one gives that key a
        # score of -inf, a weight of 0): without this, 1 draw in 32 had all
        # five queries negative and a finite output.
        xs["q"][1, 0, 0, 2] = 1.0
    a = scaled_dot_product_attention(xs["q"], xs["k"], xs["v"])
    b = torch_sdpa(xs["q"], xs["k"], xs["v"])
    assert not torch.isfinite(b).all()
    assert_same(a, b)


def test_sdpa_nan_in_float_mask_propagates():
    q, k, v = randn(1, 2, 5, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8)
    mask = torch.zeros(5, 7, dtype=F64)
    mask[2, 3] = float("nan")
    assert_same(scaled_dot_product_attention(q, k, v, attn_mask=mask), torch_sdpa(q, k, v, attn_mask=mask))


def test_sdpa_fully_masked_rows_match_torch():
    # PyTorch's math path (safe softmax) gives 0 for a row without keys.
    q, k, v = randn(2, 3, 5, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) < 0.6
    mask[..., 0] = True
    mask[0, 0, 2] = False
    mask[1, 0, 4] = False
    compare_sdpa(q, k, v, mask)
    compare_sdpa(q, k, v, torch.zeros(mask.shape, dtype=F64).masked_fill(~mask, float("-inf")), mask_grad=True)


def test_sdpa_dropout_reproducible_and_unbiased():
    q, k, v = randn(1, 2, 16, 8, dtype=torch.float32), randn(1, 2, 24, 8, dtype=torch.float32), \
        randn(1, 2, 24, 8, dtype=torch.float32)
    mask = randn(16, 24, dtype=torch.float32)
    with torch.no_grad():  # no training flag: dropout applies whenever dropout_p > 0
        torch.manual_seed(5)
        a = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
        torch.manual_seed(5)
        b = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
        plain = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mean = sum(scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3) for _ in range(200)) / 200
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert (mean - plain).abs().mean() < 0.2 * (a - plain).abs().mean()


# ---------------------------------------------------------------------------
# flash_attn_func against an fp64 reference


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                  sinks=None):
    """flash-attn's semantics written out (bottom-right alignment); sinks add
    a logit column without a value. Returns (out, lse)."""
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(h // hk, 2), v.repeat_interleave(h // hk, 2)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    diag = i + lk - lq
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(-1, h)[:, :, None, None]
        s = s - slopes * (diag - j).abs()
    left, right = window_size
    if causal:
        right = 0
    hidden = torch.zeros(lq, lk, dtype=torch.bool)
    if right >= 0:
        hidden |= j > diag + right
    if left >= 0:
        hidden |= j < diag - left
    s = s.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, h, 1, 1).expand(b, h, lq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # flash-attn's lse of a row without keys
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


@pytest.mark.parametrize("lq,lk", [(5, 9), (9, 5)])
@pytest.mark.parametrize("dv", [16, 8, 24])
@pytest.mark.parametrize("kw", [
    dict(window_size=(2, 1), alibi_slopes="batch"),
    dict(window_size=(3, -1), softcap=2.0, sinks=True),
    dict(causal=True, alibi_slopes="head", softcap=1.5, sinks=True),
    dict(softmax_scale=0.3, alibi_slopes="head"),
], ids=["window_alibi", "window_softcap_sinks", "causal_all", "scale_alibi"])
def test_flash_attn_func_features_with_grads(lq, lk, dv, kw):
    b, h, hk, d = 2, 4, 2, 16
    kw = dict(kw)
    alibi = kw.pop("alibi_slopes", None)
    if alibi is not None:
        kw["alibi_slopes"] = torch.rand(h) * 0.5 if alibi == "head" else torch.rand(b, h) * 0.5
    use_sinks = kw.pop("sinks", False)
    q, k, v = randn(b, lq, h, d), randn(b, lk, hk, d), randn(b, lk, hk, dv)
    sinks = (torch.randn(h),) if use_sinks else ()
    a = out_and_grads(lambda q, k, v, *s: flash_attn_func(q, k, v, s_aux=s[0] if s else None, **kw), (q, k, v), sinks)
    r = out_and_grads(lambda q, k, v, *s: attention_ref(q, k, v, sinks=s[0] if s else None, **kw)[0], (q, k, v),
                      sinks)
    for name, x, y in zip(["out", "dq", "dk", "dv", "dsinks"], a, r):
        # dsinks: fp32 sinks, so fp32 accuracy
        assert_same(x, y.to(x.dtype), atol=1e-5 if name == "dsinks" else 1e-9, name=name)
    out, lse, s_dmask = flash_attn_func(q, k, v, s_aux=sinks[0] if sinks else None, return_attn_probs=True, **kw)
    ref_lse = attention_ref(q, k, v, sinks=sinks[0] if sinks else None, **kw)[1]
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq) and s_dmask is None
    assert_same(lse, ref_lse.float(), atol=1e-5, name="lse")


@pytest.mark.parametrize("d,dv", [(192, 128), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_func_value_head_dim_low_precision(d, dv, dtype):
    q, k, v = randn(1, 6, 2, d), randn(1, 9, 1, d), randn(1, 9, 1, dv)
    ref = out_and_grads(lambda q, k, v: attention_ref(q, k, v, causal=True)[0], (q, k, v))
    low = out_and_grads(lambda q, k, v: attention_ref(q, k, v, causal=True)[0], (q.to(dtype), k.to(dtype),
                                                                               v.to(dtype)))
    ours = out_and_grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q.to(dtype), k.to(dtype),
                                                                                 v.to(dtype)))
    for name, a, lo, r in zip(["out", "dq", "dk", "dv"], ours, low, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        base = (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: {err:.3g} vs PyTorch's {base:.3g}"


def test_flash_attn_func_last_dim_strided_inputs():
    """flash-attn copies inputs whose last dimension is strided
    (maybe_contiguous) instead of refusing them."""
    base = [randn(2, 5, 4, 16), randn(2, 7, 2, 16), randn(2, 7, 2, 8)]
    strided = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in base]
    assert all(x.stride(-1) != 1 for x in strided)
    a = out_and_grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True), strided)
    b = out_and_grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True), base)
    for x, y in zip(a, b):
        assert_same(x, y, atol=1e-12)
    kv = torch.stack(base[1:2] * 2, dim=2).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_same(flash_attn_kvpacked_func(strided[0], kv), flash_attn_func(base[0], base[1], base[1]))
    qkv = randn(2, 5, 16, 3, 2).permute(0, 1, 3, 4, 2)
    assert qkv.stride(-1) != 1
    assert_same(flash_attn_qkvpacked_func(qkv), flash_attn_qkvpacked_func(qkv.contiguous()))


def test_flash_attn_func_dropout_keep_rate_and_seed():
    """With near-uniform probabilities and one-hot values, out[i, j] is
    p_ij / (1 - p) where kept and 0 where dropped."""
    p, lk = 0.3, 64
    q = randn(2, 32, 2, lk, dtype=torch.float32)
    k = randn(2, lk, 2, lk, dtype=torch.float32)
    v = torch.eye(lk).expand(2, 2, lk, lk).permute(0, 2, 1, 3).contiguous()
    torch.manual_seed(11)
    a = flash_attn_func(q, k, v, dropout_p=p, softmax_scale=1e-6)
    torch.manual_seed(11)
    b = flash_attn_func(q, k, v, dropout_p=p, softmax_scale=1e-6)
    c = flash_attn_func(q, k, v, dropout_p=p, softmax_scale=1e-6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = (a == 0).float().mean().item()
    assert abs(dropped - p) < 0.02, dropped
    kept = a[a != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (lk * (1 - p))), rtol=0.01)


@pytest.mark.parametrize("shape", [((0, 5, 2, 8), (0, 7, 1, 8)), ((2, 0, 2, 8), (2, 7, 1, 8)),
                                   ((2, 5, 2, 8), (2, 0, 1, 8))], ids=["batch0", "seqlen_q0", "seqlen_k0"])
def test_flash_attn_func_empty(shape):
    q, k, v = randn(*shape[0]), randn(*shape[1]), randn(*shape[1][:3], 6)
    out = out_and_grads(lambda q, k, v: flash_attn_func(q, k, v, causal=True), (q, k, v))
    assert out[0].shape == (*shape[0][:3], 6)
    assert [g.shape for g in out[1:]] == [q.shape, k.shape, v.shape]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in out)
    o, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert lse.shape == (shape[0][0], shape[0][2], shape[0][1])


# ---------------------------------------------------------------------------
# Bad arguments


def _qkv32():
    return randn(2, 5, 4, 16, dtype=torch.float32), randn(2, 7, 2, 16, dtype=torch.float32), \
        randn(2, 7, 2, 16, dtype=torch.float32)


@pytest.mark.parametrize("case,exc,match", [
    ("dropout_neg", ValueError, "dropout_p"),
    ("dropout_one", ValueError, "dropout_p"),
    ("softcap_neg", ValueError, "softcap"),
    ("alibi_shape", RuntimeError, "alibi_slopes"),
    ("alibi_dtype", RuntimeError, "alibi_slopes must be float32"),
    ("alibi_device", RuntimeError, "alibi_slopes on meta"),
    ("sinks_shape", RuntimeError, "sinks must be"),
    ("v_dim", RuntimeError, "head dim of v must be at most 256"),
    ("dtypes", RuntimeError, "same dtype"),
    ("rank", RuntimeError, "q must be 4-D"),
    ("heads", RuntimeError, "divisible by nheads_k"),
])
def test_flash_attn_func_bad_arguments(case, exc, match):
    q, k, v = _qkv32()
    kw = {}
    if case == "dropout_neg":
        kw["dropout_p"] = -0.1
    elif case == "dropout_one":
        kw["dropout_p"] = 1.0
    elif case == "softcap_neg":
        kw["softcap"] = -1.0
    elif case == "alibi_shape":
        kw["alibi_slopes"] = torch.rand(3)
    elif case == "alibi_dtype":
        kw["alibi_slopes"] = torch.rand(4, dtype=F64)
    elif case == "alibi_device":
        kw["alibi_slopes"] = torch.rand(4, device="meta")
    elif case == "sinks_shape":
        kw["s_aux"] = torch.rand(2)
    elif case == "v_dim":
        v = randn(2, 7, 2, 257, dtype=torch.float32)
    elif case == "dtypes":
        k = k.double()
    elif case == "rank":
        q, k, v = q[0], k[0], v[0]
    elif case == "heads":
        k, v = randn(2, 7, 3, 16, dtype=torch.float32), randn(2, 7, 3, 16, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        flash_attn_func(q, k, v, **kw)


def test_sdpa_bad_arguments():
    q, k, v = randn(2, 4, 5, 16), randn(2, 4, 7, 16), randn(2, 4, 7, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(RuntimeError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=F64), is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 6, dtype=F64))
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="heads"):
        scaled_dot_product_attention(q, randn(2, 3, 7, 16), randn(2, 3, 7, 16), enable_gqa=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        scaled_dot_product_attention(q, k.float(), v)
    with pytest.raises(RuntimeError, match="head dim of v"):
        scaled_dot_product_attention(q, k, randn(2, 4, 7, 300))


# ---------------------------------------------------------------------------
# MultiheadAttention against torch.nn.MultiheadAttention


def mha_pair(embed=16, heads=2, **kw):
    ref = nn.MultiheadAttention(embed, heads, dtype=F64, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    ours = MultiheadAttention(embed, heads, dtype=F64, **kw)
    ours.load_state_dict(ref.state_dict())
    back = nn.MultiheadAttention(embed, heads, dtype=F64, **kw)
    back.load_state_dict(ours.state_dict())  # and the other way round
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
    return ref, ours


def compare_mha(ref, ours, inputs, **kw):
    results = []
    for module in (ref, ours):
        xs = []
        seen = {}
        for x in inputs:  # keep the identity pattern (q is k is v)
            if id(x) not in seen:
                seen[id(x)] = x.detach().clone().requires_grad_()
            xs.append(seen[id(x)])
        out, w = module(*xs, **kw)
        loss = (out * torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))).sum()
        if w is not None:
            loss = loss + (w * torch.randn(w.shape, dtype=F64, generator=torch.Generator().manual_seed(2))).sum()
        grads = torch.autograd.grad(loss, list(seen.values()) + list(module.parameters()), allow_unused=True)
        results.append((out, w, grads))
    (o1, w1, g1), (o2, w2, g2) = results
    assert_same(o2, o1, name="out")
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        assert_same(w2, w1, name="weights")
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert (a is None) == (b is None), f"grad {i}"
        if a is not None:
            assert_same(a, b, name=f"grad {i}")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, False)])
def test_mha_kdim_vdim_bias_kv_zero_attn_mixed_masks(batch_first, need_weights, average):
    ref, ours = mha_pair(kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True, batch_first=batch_first)
    n, L, S = 3, 5, 7
    shape = (lambda s, d: (n, s, d)) if batch_first else (lambda s, d: (s, n, d))
    q, k, v = randn(*shape(L, 16)), randn(*shape(S, 6)), randn(*shape(S, 10))
    kpm = torch.rand(n, S) < 0.3
    kpm[:, 0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatched mask dtypes are deprecated, not refused
        compare_mha(ref, ours, (q, k, v), key_padding_mask=kpm, attn_mask=randn(n * 2, L, S),
                    need_weights=need_weights, average_attn_weights=average)
        compare_mha(ref, ours, (q, k, v), key_padding_mask=randn(n, S), attn_mask=torch.rand(L, S) < 0.2,
                    need_weights=need_weights, average_attn_weights=average)


@pytest.mark.parametrize("config", [{}, dict(add_bias_kv=True), dict(add_zero_attn=True)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_is_causal_hint(config, need_weights):
    ref, ours = mha_pair(batch_first=True, **config)
    x = randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    compare_mha(ref, ours, (x, x, x), attn_mask=causal, is_causal=True, need_weights=need_weights)
    compare_mha(ref, ours, (x, x, x), attn_mask=causal.isinf(), is_causal=True, need_weights=need_weights)


def test_mha_unbatched_3d_mask_and_kpm():
    ref, ours = mha_pair()
    q, k = randn(5, 16), randn(7, 16)
    kpm = torch.rand(7) < 0.3
    kpm[0] = False
    compare_mha(ref, ours, (q, k, k), attn_mask=randn(2, 5, 7), key_padding_mask=kpm, average_attn_weights=False)
    compare_mha(ref, ours, (q, q, q), need_weights=False)


def test_mha_dropout_train_and_eval():
    ref, ours = mha_pair(dropout=0.4, batch_first=True, add_bias_kv=True)
    x = randn(3, 6, 16)
    # eval: exactly dropout-free, deterministic, equal to PyTorch's
    ref.eval(), ours.eval()
    compare_mha(ref, ours, (x, x, x), average_attn_weights=False)
    # train: the returned weights are the ones (after dropout) the output used
    ours.train()
    out, w = ours(x, x, x, need_weights=True, average_attn_weights=False)
    assert 0.2 < (w == 0).double().mean().item() < 0.6
    qkv = F.linear(x, ours.in_proj_weight, ours.in_proj_bias)
    v = torch.cat([qkv.chunk(3, -1)[2], ours.bias_v.expand(3, 1, 16)], 1).view(3, 7, 2, 8).transpose(1, 2)
    manual = ours.out_proj((w @ v).transpose(1, 2).reshape(3, 6, 16))
    assert_same(out, manual, atol=1e-12)


def test_mha_fully_masked_rows_without_weights_match_torch():
    # need_weights=False: PyTorch goes through SDPA, whose rows without keys give 0.
    ref, ours = mha_pair(batch_first=True)
    x = randn(2, 5, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True
    compare_mha(ref, ours, (x, x, x), key_padding_mask=kpm, need_weights=False)


def test_dropout_p_accepts_real_scalars_like_torch():
    """PyTorch's SDPA takes numpy scalars and 0-d tensors as dropout_p."""
    import numpy as np

    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)
    plain = scaled_dot_product_attention(q, k, v)
    for p in (np.float32(0.0), np.float64(0.0), torch.tensor(0.0), 0):
        assert_same(scaled_dot_product_attention(q, k, v, dropout_p=p), plain)
        assert_same(flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p),
                    plain.transpose(1, 2))
    torch.manual_seed(3)
    a = scaled_dot_product_attention(q, k, v, dropout_p=np.float32(0.5))
    torch.manual_seed(3)
    assert torch.equal(a, scaled_dot_product_attention(q, k, v, dropout_p=float(np.float32(0.5))))
    for bad in (True, np.bool_(True), torch.tensor([0.1]), torch.tensor(1.0), np.float64(1.0)):
        with pytest.raises(ValueError, match="dropout_p"):
            scaled_dot_product_attention(q, k, v, dropout_p=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_mha_float32_mask_with_low_precision_module(dtype, which):
    """need_weights=False: PyTorch hands a float32 mask to SDPA, which adds it
    in float32; casting it to fp16 overflowed -1e5 to -inf (rows of large
    finite biases became rows without keys)."""
    ref = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    low = copy.deepcopy(ref).to(dtype)
    ours = MultiheadAttention(16, 2, batch_first=True, dtype=dtype)
    ours.load_state_dict(low.state_dict())
    x = torch.randn(2, 5, 16)
    if which == "attn_mask":
        mask = {"attn_mask": torch.full((5, 5), -1e5) + 3 * torch.rand(5, 5)}
    else:
        mask = {"key_padding_mask": torch.full((2, 5), -1e5) + 3 * torch.rand(2, 5)}
    expected = ref(x, x, x, need_weights=False, **mask)[0]
    theirs = low(x.to(dtype), x.to(dtype), x.to(dtype), need_weights=False, **mask)[0]
    got = ours(x.to(dtype), x.to(dtype), x.to(dtype), need_weights=False, **mask)[0]
    assert got.dtype == dtype and not got.isnan().any()
    err, base = (got.float() - expected).abs().max().item(), (theirs.float() - expected).abs().max().item()
    assert err <= 2 * base + 1e-2, f"error {err:.3g}, PyTorch's {base:.3g}"
