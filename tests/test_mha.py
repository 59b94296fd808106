"""flash_attn_ext.MultiheadAttention and replace_attention against
torch.nn.MultiheadAttention.

Outputs, attention weights and the gradients of inputs and parameters are
compared with PyTorch's module run in the same dtype and in fp64: ours must
be within twice PyTorch's own error plus a small slack.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn_ext.sdpa as sdpa_mod
from conftest import device_dtype_params, op_supports
from flash_attn_ext.mha import MultiheadAttention, replace_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
SLACK = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
E, H, N, L, S = 64, 2, 2, 7, 11


def default_dtype(device):
    return torch.float32 if op_supports(device, torch.float32) else torch.bfloat16


def close(name, ours, lp, ref, dtype, nan_ok=False):
    if not nan_ok:
        assert not torch.isnan(ours).any(), f"{name}: NaN"
    ref = ref.double()
    diff = ours.double() - ref
    if nan_ok:  # PyTorch's NaN rows (fully masked) must be NaN for us too
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{name}: NaN pattern differs"
        diff = torch.nan_to_num(diff, nan=0.0)
    err = diff.abs().max().item()
    base = torch.nan_to_num(lp.double() - ref, nan=0.0).abs().max().item()
    tol = 2 * base + SLACK[dtype] * max(1.0, torch.nan_to_num(ref).abs().max().item())
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (PyTorch's own error {base:.3g})"


def make_inputs(kw, device, batched=True, self_attn=False, kv_same=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    bf = kw.get("batch_first", False)
    kd, vd = kw.get("kdim") or E, kw.get("vdim") or E

    def t(n, d):
        shape = ((N, n, d) if bf else (n, N, d)) if batched else (n, d)
        return torch.randn(shape, generator=g, dtype=torch.float64, device="cpu").to(device)

    q = t(L if not self_attn else S, E)
    if self_attn:
        return q, q, q
    k = t(S, kd)
    return q, k, (k if kv_same else t(S, vd))


def run_three(kw, device, dtype, inputs, call_kw, nan_ok=False):
    """Our module vs torch's in `dtype` and torch's in fp64; returns ours' outputs."""
    torch.manual_seed(0)
    ref64 = nn.MultiheadAttention(E, H, device=device, dtype=torch.float64, **kw)
    with torch.no_grad():  # nonzero biases so that every parameter is exercised
        for p in ref64.parameters():
            if p.dim() == 1:
                p.normal_()
    ref_lp = copy.deepcopy(ref64).to(dtype)
    ours = MultiheadAttention(E, H, device=device, dtype=dtype, **kw)
    ours.load_state_dict(ref_lp.state_dict())

    def go(module, dt):
        # Keep the identity pattern (q is k is v) of `inputs`.
        cast = {}
        xs = []
        for x in inputs:
            if id(x) not in cast:
                cast[id(x)] = x.to(dt).requires_grad_()
            xs.append(cast[id(x)])
        ck = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in call_kw.items()}
        out, w = module(*xs, **ck)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        loss = (out * gout.to(out.device, dt)).sum()
        if w is not None:
            gw = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            loss = loss + (torch.nan_to_num(w) * gw.to(w.device, dt)).sum()
        leaves = list(cast.values()) + list(module.parameters())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return out, w, grads

    o, w, g = go(ours, dtype)
    o_lp, w_lp, g_lp = go(ref_lp, dtype)
    o_64, w_64, g_64 = go(ref64, torch.float64)
    assert o.shape == o_64.shape and o.dtype == dtype
    if nan_ok:
        rows_nan = torch.isnan(o_64)
        assert not torch.isnan(o).any()
        o_64, o_lp, o = (torch.where(rows_nan, torch.zeros_like(x), x) for x in (o_64, o_lp, o))
    close("out", o, o_lp, o_64, dtype)
    assert (w is None) == (w_64 is None)
    if w is not None:
        assert w.shape == w_64.shape
        close("weights", w, w_lp, w_64, dtype, nan_ok=True)
    if not nan_ok:
        for i, (a, b, c) in enumerate(zip(g, g_lp, g_64)):
            assert (a is None) == (c is None), f"grad {i}"
            if a is not None:
                close(f"grad {i}", a, b, c, dtype)
    return o, w


CONFIGS = {
    "default": {},
    "kdim_vdim": dict(kdim=24, vdim=40),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "no_bias": dict(bias=False),
    "all": dict(kdim=24, vdim=40, add_bias_kv=True, add_zero_attn=True, bias=False),
}


def masks(kind, device):
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(N, S, generator=g) < 0.3
    kpm[:, 0] = False
    out = {
        "none": {},
        "kpm_bool": dict(key_padding_mask=kpm),
        "kpm_float": dict(key_padding_mask=torch.randn(N, S, generator=g)),
        "mask2d_bool": dict(attn_mask=torch.rand(L, S, generator=g) < 0.3),
        "mask2d_float": dict(attn_mask=torch.randn(L, S, generator=g)),
        "mask3d_float": dict(attn_mask=torch.randn(N * H, L, S, generator=g)),
        "mask3d_bool_kpm": dict(attn_mask=torch.rand(N * H, L, S, generator=g) < 0.3, key_padding_mask=kpm),
        "mask2d_float_kpm_float": dict(attn_mask=torch.randn(L, S, generator=g),
                                       key_padding_mask=torch.randn(N, S, generator=g)),
    }[kind]
    if "attn_mask" in out and out["attn_mask"].dtype == torch.bool:
        out["attn_mask"][..., 0] = False  # no fully masked row here
    return {k: v.to(device) for k, v in out.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_configs(device, config, batch_first, need_weights, average):
    kw = dict(CONFIGS[config], batch_first=batch_first)
    inputs = make_inputs(kw, device)
    call = dict(masks("mask3d_bool_kpm", device), need_weights=need_weights, average_attn_weights=average)
    run_three(kw, device, default_dtype(device), inputs, call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", "kpm_bool", "kpm_float", "mask2d_bool", "mask2d_float", "mask3d_float",
                                  "mask3d_bool_kpm", "mask2d_float_kpm_float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_masks(device, kind, need_weights):
    kw = dict(batch_first=True)
    run_three(kw, device, default_dtype(device), make_inputs(kw, device),
              dict(masks(kind, device), need_weights=need_weights))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["self", "kv_same", "distinct"])
def test_dtypes_and_packing(device, dtype, pattern):
    if not op_supports(device, dtype):
        pytest.skip(f"no {dtype} kernel on {device}")
    if device == "cpu" and dtype == torch.float16 and pattern != "self":
        pytest.skip("keep the CPU run short")
    kw = dict(batch_first=False)
    inputs = make_inputs(kw, device, self_attn=pattern == "self", kv_same=pattern == "kv_same")
    run_three(kw, device, dtype, inputs, dict(masks("kpm_bool", device), need_weights=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_is_causal_hint(device, batch_first, need_weights, with_kpm):
    kw = dict(batch_first=batch_first, add_bias_kv=True)
    inputs = make_inputs(kw, device, self_attn=True)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)  # True = may not attend
    call = dict(attn_mask=causal, is_causal=True, need_weights=need_weights)
    if with_kpm:
        call.update(masks("kpm_bool", device))
    run_three(kw, device, default_dtype(device), inputs, call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("average", [False, True])
def test_unbatched(device, average):
    kw = dict(CONFIGS["all"])
    inputs = make_inputs(kw, device, batched=False)
    kpm = torch.zeros(S, device=device)
    kpm[3] = float("-inf")  # float, like attn_mask (mixed mask types are deprecated)
    run_three(kw, device, default_dtype(device), inputs,
              dict(key_padding_mask=kpm, attn_mask=torch.randn(H, L, S, device=device), average_attn_weights=average))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device):
    """PyTorch gives NaN where a query sees no key; we give a finite output
    (out_proj's bias), NaN weights as PyTorch, and finite gradients."""
    kw = dict(batch_first=True)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=device)
    kpm[1] = True  # batch element 1: every key is padding
    call = dict(key_padding_mask=kpm, need_weights=True)
    o, w = run_three(kw, device, default_dtype(device), make_inputs(kw, device), call, nan_ok=True)
    assert torch.isnan(w[1]).all() and not torch.isnan(w[0]).any()
    m = MultiheadAttention(E, H, batch_first=True, device=device, dtype=default_dtype(device))
    x = torch.randn(N, S, E, device=device, dtype=default_dtype(device), requires_grad=True)
    out, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(S, E).detach())
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters()) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kw", [{}, dict(kdim=24, vdim=40, add_bias_kv=True, bias=False)])
def test_state_dict_round_trip(kw):
    theirs = nn.MultiheadAttention(E, H, **kw)
    ours = MultiheadAttention(E, H, **kw)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(ours.state_dict())
    for (n, a), b in zip(theirs.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randn(L, N, E)
    k = torch.randn(S, N, kw.get("kdim", E))
    v = torch.randn(S, N, kw.get("vdim", E))
    torch.testing.assert_close(ours(x, k, v)[0], theirs(x, k, v)[0], rtol=1e-5, atol=1e-5)


def test_dropout_and_errors():
    m = MultiheadAttention(E, H, dropout=0.1)
    x = torch.randn(L, N, E)
    out, _ = m(x, x, x)  # training: dropout in the kernels (tests/test_dropout.py)
    assert not torch.isnan(out).any()
    m.eval()  # dropout is ignored in eval mode, as in PyTorch
    ref = nn.MultiheadAttention(E, H, dropout=0.1).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        m(x, x, x, is_causal=True)
    with pytest.raises(AssertionError, match="2-D"):
        m(x, x, x, key_padding_mask=torch.zeros(N, 1, S, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(RuntimeError, match="3D attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(N, L, L))
    with pytest.raises(AssertionError, match="only bool and floating"):
        m(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.inner = nn.Sequential(nn.Linear(E, E), nn.ModuleDict({"cross": nn.MultiheadAttention(E, H)}))

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        h = self.inner[0](x).transpose(0, 1)
        return x + self.inner[1]["cross"](h, h, h)[0].transpose(0, 1)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_replace_attention(device, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        _Block(),
        nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True),
        nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True),
    ).to(device, dtype)
    already = MultiheadAttention(E, H, device=device, dtype=dtype)
    model.append(nn.ModuleList([already]))  # ours already: left alone
    reference = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(N, L, E, device=device, dtype=dtype)
    # A fixed random projection of the output as the loss: the output ends in
    # a LayerNorm, so a loss like y.square().sum() would be nearly constant and
    # leave every gradient at rounding level.
    w = torch.randn(N, L, E, device=device)

    def run(m, dtype=dtype):
        xi = x.detach().to(dtype).clone().requires_grad_()
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=device, dtype=dtype)
        y = m[2](m[1](m[0](xi), src_mask=mask, is_causal=True), xi)
        (y.float() * w).sum().backward()
        return y, xi.grad

    assert replace_attention(model) is model
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 6 and all(type(m) is MultiheadAttention for m in mhas)
    assert model[3][0] is already
    assert all(p is params_before[n] for n, p in model.named_parameters())  # shared, not copied
    assert all(p.device.type == device and p.dtype == dtype for p in model.parameters())
    assert model.training
    y, gx = run(model)
    y_ref, gx_ref = run(reference)
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(gx, gx_ref, **tol)
        for (n, p), q in zip(model.named_parameters(), reference.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)
    else:
        # Low precision: the 2x-PyTorch rule against an fp32 run, where
        # "PyTorch's error" is the worse of its own two low-precision runs
        # (default SDPA backend and MATH). Whole-model parameter gradients are
        # ill-conditioned in bf16: on the same inputs the two torch runs differ
        # by up to 16x in error depending on the rounding of intermediate
        # values, so one torch run alone is no yardstick. Kernel bugs are
        # caught by the fp32 branch above, whose tolerance detects a 2% error in dq.
        torch_math = copy.deepcopy(reference)
        for p in torch_math.parameters():
            p.grad = None
        with sdpa_kernel(SDPBackend.MATH):
            y_math, gx_math = run(torch_math)
        exact = copy.deepcopy(reference).float()
        for p in exact.parameters():
            p.grad = None
        y32, gx32 = run(exact, torch.float32)
        pairs = [("output", y, (y_ref, y_math), y32), ("input grad", gx, (gx_ref, gx_math), gx32)]
        pairs += [(n, p.grad, (q.grad, m.grad), e.grad) for (n, p), q, m, e in
                  zip(model.named_parameters(), reference.parameters(), torch_math.parameters(),
                      exact.parameters()) if e.grad is not None]
        for name, ours, torch_runs, ref in pairs:
            ours_err = (ours.float() - ref).norm().item()
            torch_err = max((t.float() - ref).norm().item() for t in torch_runs)
            assert ours_err <= 2 * torch_err + 1e-3 * ref.norm().item(), (
                f"{name}: error {ours_err:.3e} > 2 x PyTorch's {torch_err:.3e} (+ slack)")
    # A bare MultiheadAttention is converted too; eval mode is kept.
    bare = nn.MultiheadAttention(E, H).eval()
    assert type(replace_attention(bare)) is MultiheadAttention and not bare.training


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    """An fp32 module under autocast: the projections give bf16 q, k, v and the
    attention runs in bf16 with the masks cast to match."""
    if not op_supports(device, torch.bfloat16):
        pytest.skip("no bf16 kernel")
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True, device=device)
    ours = MultiheadAttention(E, H, batch_first=True, device=device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E, device=device)
    call = dict(masks("mask2d_float_kpm_float", device))
    call["attn_mask"], call["key_padding_mask"] = call["attn_mask"][:, :L], call["key_padding_mask"][:, :L]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out, w = ours(x, x, x, **call)
        out_ref, w_ref = ref(x, x, x, **call)
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w, w_ref, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
