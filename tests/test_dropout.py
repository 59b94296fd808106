"""Dropout in the kernels (issue 9, feature 1), on every device: the
Philox4x32-7 stream against an independent Python Philox (itself checked
against the authors' known answers); the keep rate
within statistical bounds; out and every gradient equal to the float64
reference that applies the mask the call used (the 2x rule), alone and with
causal masks, windows, GQA, softcap, ALiBi, sinks and a bias, through both
backward paths; the same seed gives bit-identical results and another seed
other ones; forward and backward agree on the mask (gradcheck on a small
fp64 CPU case with a fixed rng_state); the entry points (flash_attn_func's
S_dmask, SDPA, MultiheadAttention in training, the flash-attn shim), bad
arguments, and CUDA graph capture."""
from __future__ import annotations

import math

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import _ops
from conftest import (DEVICES, assert_close_to_ref, attention_ref, capture_graph, device_dtype_params, op_supports,
                      poison_allocator, random_qkv, sinks_grad_from)


def rng_state_for(device, seed=1234, offset=5678):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# --------------------------------------------------------------------------
# The stream itself.

PHILOX_ROUNDS = 7  # csrc/dropout.h, Philox4x32::kRounds


def philox4x32(counter, key, rounds):
    """Philox4x32-R (Salmon et al., SC 2011) in Python: the test's
    independent copy of the generator."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def test_python_philox_known_answer():
    # Random123's known-answer vectors for Philox4x32-10: counter and key 0
    # give 6627e8d5 e169c58d bc57ac4c 9b00dbd8; all ones give 408f276d
    # 41c83b0e a20bc7c6 6d5451fd.
    assert philox4x32((0, 0, 0, 0), (0, 0), 10) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFF
    assert philox4x32((ones,) * 4, (ones, ones), 10) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


def draws_of_tile(seed, offset, bh, row0, col0):
    """The 16-bit draw of each score of the 16 x 16 tile at (row0, col0) of
    (batch * nheads + head) `bh`, as csrc/dropout.h lays the stream out."""
    mask = 0xFFFFFFFF
    key = (seed & mask, ((seed >> 32) + (offset >> 32)) & mask)
    draws = {}
    for r in range(16):
        row = row0 + r
        qp = (row >> 4 << 3) | (row & 7)
        for c in range(16):
            col = col0 + c
            kg = (col >> 4 << 2) | ((col >> 1) & 3)
            w = philox4x32((kg, qp, bh, offset & mask), key, PHILOX_ROUNDS)[2 * ((row >> 3) & 1) + ((col >> 3) & 1)]
            draws[(r, c)] = (w >> 16) if col & 1 else (w & 0xFFFF)
    return draws


@pytest.mark.parametrize("seed,offset,bh,row0,col0", [(0, 0, 0, 0, 0), (1234, 5678, 5, 16, 32),
                                                      (2**40 + 7, 2**33 + 3, 2, 48, 16)])
def test_stream_matches_python_philox(seed, offset, bh, row0, col0):
    """Every score's keep decision is the Python Philox's draw against the
    threshold: kept at p just below the draw's keep boundary, dropped just
    above it (the mask op runs the library's generator)."""
    draws = draws_of_tile(seed, offset, bh, row0, col0)
    nheads = bh + 1
    state = torch.tensor([seed, offset], dtype=torch.int64)
    for (r, c), draw in list(draws.items())[::7]:
        # Kept iff draw < round((1 - p) * 2^16): p = 1 - (draw + 1) / 2^16 keeps it, 1 - draw / 2^16 drops it.
        kept = _ops.dropout_mask(state, 1, nheads, row0 + 16, col0 + 16, 1 - (draw + 1) / 65536)
        dropped = _ops.dropout_mask(state, 1, nheads, row0 + 16, col0 + 16, 1 - draw / 65536)
        assert kept[0, bh, row0 + r, col0 + c] and not dropped[0, bh, row0 + r, col0 + c], (r, c)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    mask = _ops.dropout_mask(rng_state_for("cpu", seed=torch.randint(0, 2**62, ()).item()), 2, 4, 200, 333, p)
    n = mask.numel()
    rate = mask.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma + 2**-16, f"keep rate {rate} for p={p}"
    # Heads, batches and rows draw independently.
    per_head = mask.float().mean(dim=(2, 3))
    assert (per_head - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / (200 * 333))
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


def test_mask_depends_on_seed_and_offset():
    a = _ops.dropout_mask(rng_state_for("cpu", 1, 2), 1, 2, 40, 50, 0.5)
    assert not torch.equal(a, _ops.dropout_mask(rng_state_for("cpu", 3, 2), 1, 2, 40, 50, 0.5))
    assert not torch.equal(a, _ops.dropout_mask(rng_state_for("cpu", 1, 4), 1, 2, 40, 50, 0.5))
    assert not torch.equal(a, _ops.dropout_mask(rng_state_for("cpu", 1, 2 + 2**40), 1, 2, 40, 50, 0.5))
    assert torch.equal(a, _ops.dropout_mask(rng_state_for("cpu", 1, 2), 1, 2, 40, 50, 0.5))
    assert _ops.dropout_mask(rng_state_for("cpu"), 1, 1, 8, 8, 0.0).all()


# --------------------------------------------------------------------------
# Against the reference with the call's mask.

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
SHAPES = [
    (2, 65, 65, 4, 2, 64),
    (1, 40, 157, 2, 2, 128),
    (2, 130, 70, 4, 1, 64),
]

CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(20, 7)), id="window"),
    pytest.param(dict(causal=True, softcap=6.0, alibi="head"), id="causal-softcap-alibi"),
    pytest.param(dict(window=(33, -1), sinks=True), id="window-sinks"),
    pytest.param(dict(bias=True), id="bias"),
    pytest.param(dict(bias=True, causal=True, softcap=5.0, deterministic=True), id="bias-causal-softcap-det"),
]


def check_against_reference(q, k, v, p, causal=False, window=(-1, -1), softcap=0.0, alibi=None, sinks=False,
                            bias=False, deterministic=False):
    """The op (fwd and its autograd formula) with dropout p against the
    reference that applies the op's mask: out and every gradient, 2x rule."""
    device, dtype = q.device, q.dtype
    batch, seqlen_q, nheads = q.shape[:3]
    seqlen_k = k.shape[1]
    slopes = torch.rand(nheads, device=device) * 0.3 + 0.01 if alibi else None
    sink = torch.randn(nheads, device=device).requires_grad_() if sinks else None
    bias_t = (torch.randn(batch, nheads, seqlen_q, seqlen_k, device=device) * 2).to(dtype).requires_grad_() if bias \
        else None
    rng_state = _ops.draw_rng_state(device)
    scale = q.shape[-1] ** -0.5
    left, right = window
    if causal:
        right = 0
    poison_allocator(device, q.numel() * q.element_size())
    out, lse, _ = _ops.call_fwd(q, k, v, bias_t, scale, causal, left, right, deterministic, softcap, slopes, sink, p,
                                rng_state)
    assert not torch.isnan(out).any()
    mask = _ops.dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, p)
    leaves = [x for x in (q, k, v, bias_t, sink) if x is not None]
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    low_in = [x.detach().clone().requires_grad_() for x in leaves]

    def ref_call(xs, upcast):
        it = iter(xs[3:])
        b = next(it) if bias else None
        s = next(it) if sinks else None
        return attention_ref(xs[0], xs[1], xs[2], causal, (left, right), bias=b, softmax_scale=scale, softcap=softcap,
                             alibi_slopes=slopes, sinks=s, dropout_mask=mask, dropout_p=p, upcast=upcast)

    ref_out, ref_lse = ref_call(ref_in, True)
    low_out, low_lse = ref_call(low_in, False)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse: +inf rows differ"
    if finite.any():  # dropout does not touch lse
        assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 1e-3 * max(1.0, ref_lse[finite].abs().max())
    assert_close_to_ref(out, ref_out, low_out, "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_grads = torch.autograd.grad(low_out, low_in, dout)
    names = ["dq", "dk", "dv"] + (["dbias"] if bias else []) + (["dsinks"] if sinks else [])
    for name, ours, ref, low in zip(names, grads, ref_grads, low_grads):
        if name == "dsinks":
            # Beside PyTorch's composite, the formula on its rounded output and
            # on the exact output rounded to the dtype (sinks_grad_from,
            # conftest.py: D comes from the rounded output).
            def grad_of(o, lse_of):
                return sinks_grad_from(sink.detach(), dout, o.detach().to(dtype), lse_of.detach())

            low = (low, grad_of(low_out, low_lse), grad_of(ref_out, ref_lse))
        slack = max(1e-5, torch.finfo(dtype).eps) if name == "dsinks" else 1e-5
        assert_close_to_ref(ours, ref, low, name, slack=slack)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_with_its_mask(device, dtype, shape, case):
    if device == "cpu" and dtype != torch.float32 and shape != SHAPES[0]:
        pytest.skip("CPU low precision: one shape keeps the suite quick")
    if not op_supports(device, dtype):
        pytest.skip("not in this build")
    q, k, v = random_qkv(*shape, dtype, device)
    check_against_reference(q, k, v, 0.17, **case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.95])
def test_extreme_rates(device, p):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 48, 80, 2, 1, 64, dtype, device)
    check_against_reference(q, k, v, p, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_s_dmask_of_flash_attn_func(device):
    """return_attn_probs gives flash-attn's S_dmask: the probabilities, negated
    where dropped, which the reference takes as its mask."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 50, 70, 4, 2, 64, dtype, device)
    out, lse, s_dmask = flash_attn_ext.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 50, 70) and s_dmask.dtype == dtype
    ref_out, ref_lse, probs = attention_ref(q, k, v, causal=True, return_probs=True)
    assert torch.allclose(s_dmask.abs().double(), probs, atol=1e-2)
    ref_out, _ = attention_ref(q, k, v, causal=True, dropout_mask=s_dmask, dropout_p=0.3)
    low_out, _ = attention_ref(q, k, v, causal=True, dropout_mask=s_dmask, dropout_p=0.3, upcast=False)
    assert_close_to_ref(out, ref_out, low_out, "out")
    dropped = torch.signbit(s_dmask) & (probs > 0)
    frac = dropped.sum() / (probs > 0).sum()
    assert 0.2 < frac.item() < 0.4
    # Without dropout S_dmask is None, as flash-attn's.
    assert flash_attn_ext.flash_attn_func(q, k, v, return_attn_probs=True)[2] is None
    qkv = torch.stack([q, q, q], dim=2).detach()
    _, _, s = flash_attn_ext.flash_attn_qkvpacked_func(qkv, dropout_p=0.5, return_attn_probs=True)
    assert s.shape == (2, 4, 50, 50) and torch.signbit(s).any()


# --------------------------------------------------------------------------
# Reproducibility and forward / backward agreement.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_same_seed_same_bits(device, deterministic):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(2, 96, 96, 4, 4, 64, dtype, device)
    dout = torch.randn_like(q)

    def run(seed):
        torch.manual_seed(seed)
        out = flash_attn_ext.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, deterministic=deterministic)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    a, b, c = run(11), run(11), run(12)
    if deterministic or device == "cpu":
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    else:  # dq's atomics may round differently; out, dk, dv are exact
        for x, y in zip(a[:1] + a[2:], b[:1] + b[2:]):
            assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_gradcheck_fixed_rng_state():
    """Forward and backward draw the same mask: the backward is the gradient
    of the function the forward computes with that mask."""
    q, k, v = (torch.randn(1, 21, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rng_state = rng_state_for("cpu")
    for causal in (False, True):
        fn = lambda q, k, v: _ops.call_fwd(q, k, v, None, 0.35, causal, -1, -1, False, 0.0, None, None, 0.3,  # noqa
                                           rng_state)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v))


# --------------------------------------------------------------------------
# Entry points.

@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_dropout(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    leaves = random_qkv(2, 64, 64, 4, 4, 64, dtype, device)
    q, k, v = (x.transpose(1, 2) for x in leaves)
    torch.manual_seed(3)
    a = flash_attn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    torch.manual_seed(3)
    b = flash_attn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    plain = flash_attn_ext.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(a, b) and not torch.equal(a, plain) and not torch.isnan(a).any()
    # Unbiased: the mean over many draws approaches the undropped output.
    torch.manual_seed(4)
    mean = sum(flash_attn_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True).float()
               for _ in range(64)) / 64
    assert (mean - plain.float()).abs().mean() < 0.25 * (a.float() - plain.float()).abs().mean()
    a.sum().backward()
    assert all(not torch.isnan(x.grad).any() for x in leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_training_step(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1, batch_first=True)
    model = flash_attn_ext.replace_attention(torch.nn.TransformerEncoder(layer, num_layers=2,
                                                                         enable_nested_tensor=False))
    model = model.to(device=device, dtype=dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(3, 40, 64, device=device, dtype=dtype)
    for _ in range(2):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    # Eval mode: no dropout, deterministic.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("device", DEVICES)
def test_mha_weights_after_dropout(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mha = flash_attn_ext.MultiheadAttention(32, 4, dropout=0.5, batch_first=True).to(device=device, dtype=dtype)
    x = torch.randn(2, 24, 32, device=device, dtype=dtype)
    out, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert not torch.isnan(out).any()
    assert (w == 0).float().mean() > 0.3  # dropped weights, as PyTorch returns them


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_shim_rng_state(device):
    from flash_attn_ext.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = random_qkv(1, 40, 40, 2, 2, 64, dtype, device, requires_grad=False)
    out, lse, s_dmask, rng_state = _flash_attn_forward(q, k, v, 0.3, 0.125, False, -1, -1, 0.0, None, True)
    assert rng_state.shape == (2,) and rng_state.dtype == torch.int64 and rng_state.device == q.device
    mask = _ops.dropout_mask(rng_state, 1, 2, 40, 40, 0.3)
    assert torch.equal(~torch.signbit(s_dmask), mask)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.3, 0.125, False, -1, -1, 0.0, None, False, rng_state)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    ref = _ops.call_fwd(q2, k2, v2, None, 0.125, False, -1, -1, False, 0.0, None, None, 0.3, rng_state)[0]
    assert torch.equal(ref, out)
    for ours, theirs in zip((dq, dk, dv), torch.autograd.grad(ref, (q2, k2, v2), dout)):
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-2, rtol=1e-2)
    # Without dropout: two zeros, as flash-attn's.
    assert not _flash_attn_forward(q, k, v, 0.0, 0.125, False, -1, -1, 0.0, None, False)[3].any()
    with pytest.raises(ValueError, match="rng_state"):
        _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.3, 0.125, False, -1, -1, 0.0, None, False, None)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_shim_varlen_s_dmask(device):
    """The varlen shim's return_softmax: flash-attn's S_dmask (batch, nheads,
    max_seqlen_q, max_seqlen_k), sequence b's probabilities in its corner,
    negated where the call dropped them, zero elsewhere; the output is that of
    the dense call on each sequence with the same mask."""
    from flash_attn_ext.flash_attn_interface import _flash_attn_varlen_forward

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens_q, lens_k = [5, 0, 17], [9, 4, 23]
    cu_q = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 13, 36], dtype=torch.int32, device=device)
    q = torch.randn(22, 2, 32, dtype=dtype, device=device)
    k, v = (torch.randn(36, 2, 32, dtype=dtype, device=device) for _ in range(2))
    out, lse, s_dmask, rng_state = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 17, 23, 0.4, 0.25, True,
                                                              return_softmax=True)
    assert s_dmask.shape == (3, 2, 17, 23) and s_dmask.dtype == dtype
    assert rng_state.shape == (2,)
    keep = _ops.dropout_mask(rng_state, 3, 2, 17, 23, 0.4)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        corner = s_dmask[b, :, :lq, :lk]
        assert not s_dmask[b, :, lq:].any() and not s_dmask[b, :, :, lk:].any()
        if lq == 0:
            continue
        rows_q = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rows_k = slice(int(cu_k[b]), int(cu_k[b + 1]))
        qb, kb, vb = q[None, rows_q], k[None, rows_k], v[None, rows_k]
        _, _, probs = attention_ref(qb, kb, vb, causal=True, softmax_scale=0.25, return_probs=True)
        assert torch.allclose(corner.abs().double(), probs[0], atol=1e-2)
        visible = probs[0] > 0
        assert torch.equal(~torch.signbit(corner) | ~visible, keep[b, :, :lq, :lk] | ~visible)
        ref_out, _ = attention_ref(qb, kb, vb, causal=True, softmax_scale=0.25, dropout_mask=corner[None],
                                   dropout_p=0.4)
        low_out, _ = attention_ref(qb, kb, vb, causal=True, softmax_scale=0.25, dropout_mask=corner[None],
                                   dropout_p=0.4, upcast=False)
        assert_close_to_ref(out[rows_q][None], ref_out, low_out, "out")
    # Without dropout it stays refused, as flash-attn's.
    with pytest.raises(NotImplementedError, match="return_softmax"):
        _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 17, 23, 0.0, 0.25, True, return_softmax=True)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_bad_dropout_p(bad):
    q, k, v = random_qkv(1, 8, 8, 1, 1, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_ext.flash_attn_func(q, k, v, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_ext.scaled_dot_product_attention(q, k, v, dropout_p=bad)


def test_op_checks_rng_state():
    q, k, v = random_qkv(1, 8, 8, 1, 1, 16, torch.float32, "cpu", requires_grad=False)
    fwd = torch.ops.flash_attn_ext.fwd
    with pytest.raises(RuntimeError, match="needs rng_state"):
        fwd(q, k, v, None, 1.0, False, -1, -1, False, 0.0, None, None, 0.1, None)
    with pytest.raises(RuntimeError, match="rng_state must be"):
        fwd(q, k, v, None, 1.0, False, -1, -1, False, 0.0, None, None, 0.1, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        fwd(q, k, v, None, 1.0, False, -1, -1, False, 0.0, None, None, 1.0, torch.zeros(2, dtype=torch.int64))


# --------------------------------------------------------------------------
# CUDA graphs: the seed is drawn on the device by a torch RNG op, which
# capture records; replays draw fresh masks, reproducibly from the seed.

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_graph_capture():
    q, k, v = random_qkv(2, 128, 128, 4, 4, 64, torch.bfloat16, "cuda")
    dout = torch.randn_like(q)
    static = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def step():
        out = flash_attn_ext.flash_attn_func(*static, dropout_p=0.1, causal=True)
        grads = torch.autograd.grad(out, static, dout)
        return (out,) + grads

    graph, results = capture_graph(step)

    def replay(seed):
        torch.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        return [r.clone() for r in results]

    a, b, c = replay(7), replay(7), replay(8)
    assert not any(torch.isnan(x).any() for x in a)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert not torch.equal(a[0], c[0])
    # A replay computes what an eager call with the same seed computes.
    torch.manual_seed(7)
    eager = step()
    assert torch.equal(eager[0], a[0])
