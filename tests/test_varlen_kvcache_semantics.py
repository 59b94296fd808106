"""flash_attn_varlen_func (and its packed variants) and
flash_attn_with_kvcache against flash-attn 2.8's semantics, on the CPU,
with an independent float64 reference written here (naive softmax
attention on each sequence alone): the gaps the other suites leave (odd
length mixes with seqlen_q > seqlen_k under causal, windows (-1, 0) and
(0, 0), alibi of both shapes with softcap and a scale, gradients of the
packed variants, max_seqlen above the real maximum, paged + seqused_k,
kvcache rotary corner cases (rotary_dim < headdim, windows wider than the
cache, left padding with ALiBi), whole-cache integrity after the append,
non-contiguous index tensors, and the errors bad inputs must raise).

Tolerances: fp32 within 1e-4 of the reference (relative to max(1, |ref|));
bf16 within twice a naive bf16 PyTorch computation's error plus a small
floor. Shapes are small so that the file runs in well under a minute."""
from __future__ import annotations

import math
import random

import pytest
import torch

import flash_attn_ext

DEVICE = "cpu"


# --------------------------------------------------------------------------
# An independent reference
# --------------------------------------------------------------------------

def naive_attention(q, k, v, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None, lowp=False,
                    raw_lse=False):
    """One sequence: q (Lq, H, D), k / v (Lk, Hk, D); slopes (H,) or None.
    Returns out (Lq, H, D) and lse (H, Lq). flash-attn's conventions: masks
    bottom-right aligned, a row that sees no key gives out 0 and lse +inf.
    lowp: the matmuls in the inputs' dtype, the softmax in fp32 (a naive
    PyTorch user's attention), else everything in fp64. raw_lse: lse 0 (not
    +inf) on rows without keys, for autograd."""
    dt = q.dtype if lowp else torch.float64
    sdt = torch.float32 if lowp else torch.float64
    Lq, H, D = q.shape
    Lk, Hk = k.shape[0], k.shape[1]
    g = H // Hk
    qd = q.to(dt).permute(1, 0, 2)
    kd = k.to(dt).repeat_interleave(g, dim=1).permute(1, 0, 2)
    vd = v.to(dt).repeat_interleave(g, dim=1).permute(1, 0, 2)
    s = (qd @ kd.transpose(-1, -2)).to(sdt) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    diag = i + Lk - Lq
    if slopes is not None:
        s = s - slopes.to(sdt)[:, None, None] * (diag - j).abs().to(sdt)
    left, right = window
    if causal:
        right = 0
    vis = torch.ones(Lq, Lk, dtype=torch.bool)
    if right >= 0:
        vis &= j <= diag + right
    if left >= 0:
        vis &= j >= diag - left
    s = s.masked_fill(~vis, float("-inf"))
    # Rows without a visible key get finite dummy scores (then out 0, lse
    # +inf), so that autograd through lse stays finite.
    empty = ~vis.any(-1)
    s = torch.where(empty[None, :, None], torch.zeros((), dtype=s.dtype), s)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).masked_fill(empty[None, :, None], 0.0)
    out = (p.to(dt) @ vd).permute(1, 0, 2)
    if raw_lse:
        return out, lse.masked_fill(empty[None, :], 0.0)
    return out, lse.masked_fill(empty[None, :], float("inf"))


def reference_grads(ref_out, ref_lse_raw, inputs, dout, rounded_out):
    """fp64 gradients of <dout, out> (exact), and the same with the
    backward's D = rowsum(dout * out) taken from `rounded_out` (the output
    rounded to the low dtype) as every FlashAttention backward does: that
    adds rowsum(dout * (out - rounded_out)) * d lse. The second is the
    error a correct FlashAttention backward cannot avoid."""
    exact = torch.autograd.grad(ref_out, inputs, dout.double(), retain_graph=True, allow_unused=True)
    c = (dout.double() * (ref_out.detach() - rounded_out.double())).sum(-1).transpose(0, 1)  # (H, total_q)
    fa = torch.autograd.grad((ref_out, ref_lse_raw), inputs, (dout.double(), c), allow_unused=True)
    fill = lambda gs: [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]  # noqa: E731
    return fill(exact), fill(fa)


def check_grad(ours, exact, fa_style, naive_lowp, name, dtype):
    """fp32: 1e-4 of the exact gradient. bf16: error within twice the worse
    of a naive bf16 computation's error and the FlashAttention-inherent one
    (D from the rounded output), plus a small floor."""
    if dtype == torch.float32 or ours.numel() == 0:
        check_close(ours, exact, None, name, torch.float32)
        return
    base = max((naive_lowp.double() - exact).abs().max().item(), (fa_style - exact).abs().max().item())
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    err = (ours.double() - exact).abs().max().item()
    floor = 2e-3 * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x {base:.3e} + {floor:.1e}"


def check_close(ours, ref64, lowp, name, dtype, floor=None):
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if ours.numel() == 0:
        return
    scale = max(1.0, ref64.abs().max().item())
    err = (ours.double() - ref64).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * scale, f"{name}: error {err:.3e} (fp32)"
    else:
        low_err = (lowp.double() - ref64).abs().max().item()
        floor = (2e-3 if floor is None else floor) * scale
        assert err <= 2 * low_err + floor, f"{name}: error {err:.3e} > 2 x naive {low_err:.3e} + {floor:.1e}"


def check_lse(lse, ref_lse, name):
    assert lse.dtype == torch.float32, f"{name}: lse dtype {lse.dtype}"
    assert lse.shape == ref_lse.shape, f"{name}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf_ref), f"{name}: lse +inf rows differ"
    assert (lse[inf_ref] > 0).all(), f"{name}: rows without keys must have lse +inf"
    fin = ~inf_ref
    if fin.any():
        err = (lse[fin].double() - ref_lse[fin]).abs().max().item()
        assert err <= 2e-3 * max(1.0, ref_lse[fin].abs().max().item()), f"{name}: lse error {err:.3e}"


def cu_of(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


# --------------------------------------------------------------------------
# varlen
# --------------------------------------------------------------------------

def varlen_reference(q, k, v, lens_q, lens_k, scale, causal, window, softcap, alibi, used_k=None, lowp=False,
                     raw_lse=False):
    outs, lses = [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        lu = lk if used_k is None else used_k[b]
        slopes = None
        if alibi is not None:
            slopes = alibi[b] if alibi.dim() == 2 else alibi
        o, l = naive_attention(q[q0:q0 + lq], k[k0:k0 + lu], v[k0:k0 + lu], scale, causal, window, softcap, slopes,
                               lowp=lowp, raw_lse=raw_lse)
        outs.append(o)
        lses.append(l)
        q0 += lq
        k0 += lk
    return torch.cat(outs, 0), torch.cat(lses, 1)


VARLEN_CASES = [
    # lens_q, lens_k, nheads, nheads_k, headdim, kwargs
    pytest.param([5, 0, 17, 3, 1], [9, 4, 17, 0, 30], 4, 2, 32, dict(), id="full-gqa"),
    pytest.param([5, 0, 12, 3, 1, 7], [9, 4, 5, 0, 30, 7], 4, 2, 32, dict(causal=True), id="causal-q-gt-k"),
    pytest.param([6, 12, 2], [6, 5, 11], 3, 1, 16, dict(window_size=(-1, 0)), id="window-(-1,0)-mqa"),
    pytest.param([6, 12, 2], [6, 5, 11], 2, 2, 16, dict(window_size=(0, 0)), id="window-(0,0)"),
    pytest.param([8, 13, 1], [20, 9, 4], 4, 1, 32, dict(window_size=(3, 2)), id="window-(3,2)"),
    pytest.param([8, 13, 1], [20, 9, 4], 4, 2, 32, dict(window_size=(4, -1)), id="window-(4,-1)"),
    pytest.param([8, 13, 1], [20, 9, 4], 4, 2, 32, dict(window_size=(2, 3), causal=True), id="window-causal"),
    pytest.param([7, 19, 0, 4], [11, 19, 3, 2], 4, 2, 32,
                 dict(softcap=3.0, alibi="head", softmax_scale=0.3), id="softcap-alibi-head-scale"),
    pytest.param([7, 19, 0, 4], [11, 19, 3, 2], 4, 4, 24,
                 dict(alibi="batch", causal=True, deterministic=True), id="alibi-batch-causal-det"),
    pytest.param([7, 19, 0, 4], [11, 19, 3, 2], 2, 1, 40,
                 dict(extra_max=(9, 13), causal=True), id="max-seqlen-above-real"),
    pytest.param([70, 3], [66, 80], 2, 1, 32, dict(causal=True, window_size=(10, 5)), id="longer-tiles"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lens_q,lens_k,nheads,nheads_k,headdim,kw", VARLEN_CASES)
def test_varlen_vs_naive(dtype, lens_q, lens_k, nheads, nheads_k, headdim, kw):
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    extra_q, extra_k = kw.pop("extra_max", (0, 0))
    causal = kw.get("causal", False)
    window = kw.get("window_size", (-1, -1))
    softcap = kw.get("softcap", 0.0)
    scale = kw.get("softmax_scale", None) or headdim ** -0.5
    batch = len(lens_q)
    slopes = None
    if alibi == "head":
        slopes = torch.rand(nheads) * 0.5 + 0.05
    elif alibi == "batch":
        slopes = torch.rand(batch, nheads) * 0.5 + 0.05
    q = rnd(sum(lens_q), nheads, headdim, dtype=dtype, scale=1.5).requires_grad_()
    k = rnd(sum(lens_k), nheads_k, headdim, dtype=dtype, scale=1.5).requires_grad_()
    v = rnd(sum(lens_k), nheads_k, headdim, dtype=dtype).requires_grad_()
    res = flash_attn_ext.flash_attn_varlen_func(
        q, k, v, cu_of(lens_q), cu_of(lens_k), max(lens_q) + extra_q, max(lens_k) + extra_k,
        alibi_slopes=slopes, return_attn_probs=True, **kw)
    assert isinstance(res, tuple) and len(res) == 3, "return_attn_probs: (out, softmax_lse, S_dmask)"
    out, lse, s_dmask = res
    assert s_dmask is None, "without dropout flash-attn returns no S_dmask"
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == (nheads, sum(lens_q)), "varlen lse is (nheads, total_q)"

    r_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    l_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse_raw = varlen_reference(*r_in, lens_q, lens_k, scale, causal, window, softcap, slopes,
                                            raw_lse=True)
    _, ref_lse = varlen_reference(*[t.detach() for t in r_in], lens_q, lens_k, scale, causal, window, softcap,
                                  slopes)
    low_out, _ = varlen_reference(*l_in, lens_q, lens_k, scale, causal, window, softcap, slopes, lowp=True)
    check_close(out, ref_out, low_out, "out", dtype)
    check_lse(lse, ref_lse, "lse")
    # Rows that see no key: exactly 0.
    zero_rows = torch.isinf(ref_lse).all(0)
    if zero_rows.any():
        assert (out[zero_rows] == 0).all(), "rows without keys must output 0"

    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exact, fa_style = reference_grads(ref_out, ref_lse_raw, r_in, dout, ref_out.detach().to(dtype))
    low_grads = torch.autograd.grad(low_out, l_in, dout, allow_unused=True)
    for name, g, r, fa, lg, x in zip(("dq", "dk", "dv"), grads, exact, fa_style, low_grads, (q, k, v)):
        lg = torch.zeros_like(x) if lg is None else lg
        check_grad(g, r, fa, lg, name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_packed_gradients(dtype):
    """qkvpacked / kvpacked: outputs, lse and the gradients into the packed tensors."""
    lens = [5, 0, 18, 1]
    H, D = 4, 32
    total = sum(lens)
    qkv = rnd(total, 3, H, D, dtype=dtype, scale=1.5).requires_grad_()
    out, lse, _ = flash_attn_ext.flash_attn_varlen_qkvpacked_func(qkv, cu_of(lens), max(lens), causal=True,
                                                                 return_attn_probs=True)
    r = qkv.detach().double().requires_grad_()
    lo = qkv.detach().clone().requires_grad_()
    ref_out, ref_lse_raw = varlen_reference(r[:, 0], r[:, 1], r[:, 2], lens, lens, D ** -0.5, True, (-1, -1), 0.0,
                                            None, raw_lse=True)
    ref_lse = ref_lse_raw.detach().masked_fill(torch.isinf(varlen_reference(
        r[:, 0].detach(), r[:, 1].detach(), r[:, 2].detach(), lens, lens, D ** -0.5, True, (-1, -1), 0.0, None)[1]),
        float("inf"))
    low_out, _ = varlen_reference(lo[:, 0], lo[:, 1], lo[:, 2], lens, lens, D ** -0.5, True, (-1, -1), 0.0, None,
                                  lowp=True)
    check_close(out, ref_out, low_out, "qkvpacked out", dtype)
    check_lse(lse, ref_lse, "qkvpacked lse")
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (rg,), (fa,) = reference_grads(ref_out, ref_lse_raw, [r], dout, ref_out.detach().to(dtype))
    (lg,) = torch.autograd.grad(low_out, lo, dout)
    assert g.shape == qkv.shape
    check_grad(g, rg, fa, lg, "dqkv", dtype)

    lens_q, lens_k = [3, 9, 0], [7, 2, 5]
    q = rnd(sum(lens_q), H, D, dtype=dtype, scale=1.5).requires_grad_()
    kv = rnd(sum(lens_k), 2, 2, D, dtype=dtype, scale=1.5).requires_grad_()
    out = flash_attn_ext.flash_attn_varlen_kvpacked_func(q, kv, cu_of(lens_q), cu_of(lens_k), 9, 7,
                                                         window_size=(2, 1))
    rq, rkv = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    lq, lkv = q.detach().clone().requires_grad_(), kv.detach().clone().requires_grad_()
    ref_out, ref_lse_raw = varlen_reference(rq, rkv[:, 0], rkv[:, 1], lens_q, lens_k, D ** -0.5, False, (2, 1), 0.0,
                                            None, raw_lse=True)
    low_out, _ = varlen_reference(lq, lkv[:, 0], lkv[:, 1], lens_q, lens_k, D ** -0.5, False, (2, 1), 0.0, None,
                                  lowp=True)
    check_close(out, ref_out, low_out, "kvpacked out", dtype)
    dout = torch.randn_like(out)
    gq, gkv = torch.autograd.grad(out, (q, kv), dout)
    (rgq, rgkv), (faq, fakv) = reference_grads(ref_out, ref_lse_raw, [rq, rkv], dout, ref_out.detach().to(dtype))
    lgq, lgkv = torch.autograd.grad(low_out, (lq, lkv), dout)
    check_grad(gq, rgq, faq, lgq, "kvpacked dq", dtype)
    check_grad(gkv, rgkv, fakv, lgkv, "kvpacked dkv", dtype)


def _paged(k, v, lens_k, page_size, nblocks_extra=3):
    """k, v (total_k, Hk, D) -> paged caches with a random permuted block table."""
    pages = [max(1, -(-lk // page_size)) for lk in lens_k]
    width = max(pages)
    num_blocks = sum(pages) + nblocks_extra
    perm = torch.randperm(num_blocks).tolist()
    kc = torch.randn(num_blocks, page_size, *k.shape[1:]).to(k.dtype)
    vc = torch.randn(num_blocks, page_size, *v.shape[1:]).to(v.dtype)
    table = torch.tensor([[perm[-1]] * width for _ in lens_k], dtype=torch.int32)
    used, k0 = 0, 0
    for b, lk in enumerate(lens_k):
        for j in range(pages[b]):
            blk = perm[used]
            used += 1
            table[b, j] = blk
            n = max(0, min(page_size, lk - j * page_size))
            kc[blk, :n] = k[k0 + j * page_size:k0 + j * page_size + n]
            vc[blk, :n] = v[k0 + j * page_size:k0 + j * page_size + n]
        k0 += lk
    return kc, vc, table


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_varlen_paged_with_seqused_k(page_size):
    """vLLM-style: paged keys and seqused_k below the lengths of cu_seqlens_k."""
    dtype = torch.float32
    lens_q, lens_k = [1, 4, 3, 0], [40, 9, 70, 5]
    used = [33, 9, 2, 0]
    H, Hk, D = 4, 2, 32
    q = rnd(sum(lens_q), H, D, dtype=dtype)
    k = rnd(sum(lens_k), Hk, D, dtype=dtype)
    v = rnd(sum(lens_k), Hk, D, dtype=dtype)
    kc, vc, table = _paged(k, v, lens_k, page_size)
    seqused = torch.tensor(used, dtype=torch.int32)
    out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q, kc, vc, cu_of(lens_q), cu_of(lens_k), max(lens_q),
                                                        max(lens_k), causal=True, block_table=table,
                                                        seqused_k=seqused, return_attn_probs=True)
    ref_out, ref_lse = varlen_reference(q.double(), k.double(), v.double(), lens_q, lens_k, D ** -0.5, True,
                                        (-1, -1), 0.0, None, used_k=used)
    check_close(out, ref_out, None, "paged out", dtype)
    check_lse(lse, ref_lse, "paged lse")
    # And the same keys unpaged.
    out2 = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens_q), cu_of(lens_k), max(lens_q), max(lens_k),
                                                 causal=True, seqused_k=seqused)
    check_close(out2, ref_out, None, "seqused out", dtype)


def test_varlen_single_and_empty_batches():
    """batch of one sequence, a batch whose every sequence is empty, and total 0."""
    H, D = 2, 16
    q = rnd(6, H, D)
    k = rnd(4, H, D)
    v = rnd(4, H, D)
    out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of([6]), cu_of([4]), 6, 4, causal=True,
                                                        return_attn_probs=True)
    ref_out, ref_lse = varlen_reference(q.double(), k.double(), v.double(), [6], [4], D ** -0.5, True, (-1, -1),
                                        0.0, None)
    check_close(out, ref_out, None, "one sequence", torch.float32)
    check_lse(lse, ref_lse, "one sequence")
    # Every sequence empty.
    q0 = rnd(0, H, D).requires_grad_()
    k0 = rnd(0, H, D).requires_grad_()
    v0 = rnd(0, H, D).requires_grad_()
    out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q0, k0, v0, cu_of([0, 0]), cu_of([0, 0]), 0, 0,
                                                        return_attn_probs=True)
    assert out.shape == (0, H, D) and lse.shape == (H, 0)
    out.sum().backward()
    assert q0.grad.shape == q0.shape
    # Queries but no keys at all.
    out = flash_attn_ext.flash_attn_varlen_func(q, k[:0], v[:0], cu_of([6]), cu_of([0]), 6, 0)
    assert torch.equal(out, torch.zeros_like(out))


def test_varlen_deterministic_is_reproducible():
    lens_q, lens_k = [33, 5, 70], [40, 70, 9]
    q = rnd(sum(lens_q), 4, 32, dtype=torch.bfloat16).requires_grad_()
    k = rnd(sum(lens_k), 2, 32, dtype=torch.bfloat16).requires_grad_()
    v = rnd(sum(lens_k), 2, 32, dtype=torch.bfloat16).requires_grad_()
    dout = torch.randn(sum(lens_q), 4, 32).to(torch.bfloat16)
    results = []
    for _ in range(2):
        out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens_q), cu_of(lens_k), 70, 70, causal=True,
                                                    deterministic=True)
        results.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_varlen_bad_inputs():
    H, D = 2, 16
    lens = [3, 5]
    q, k, v = rnd(8, H, D), rnd(8, H, D), rnd(8, H, D)
    cu = cu_of(lens)
    f = flash_attn_ext.flash_attn_varlen_func
    errors = (RuntimeError, ValueError, TypeError)
    bad = [
        ("int64 cu_seqlens_q", lambda: f(q, k, v, cu.long(), cu, 5, 5)),
        ("int64 cu_seqlens_k", lambda: f(q, k, v, cu, cu.long(), 5, 5)),
        ("float cu_seqlens", lambda: f(q, k, v, cu.float(), cu, 5, 5)),
        ("cu_seqlens_k too short", lambda: f(q, k, v, cu, cu[:-1], 5, 5)),
        ("cu_seqlens_k too long", lambda: f(q, k, v, cu, torch.tensor([0, 3, 5, 8], dtype=torch.int32), 5, 5)),
        ("2-D cu_seqlens", lambda: f(q, k, v, cu[None], cu, 5, 5)),
        ("cu_seqlens_q beyond total_q", lambda: f(q, k, v, torch.tensor([0, 3, 9], dtype=torch.int32), cu, 6, 5)),
        ("cu_seqlens_k beyond total_k", lambda: f(q, k[:7], v[:7], cu, cu, 5, 5)),
        ("decreasing cu_seqlens", lambda: f(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), cu, 5, 5)),
        ("negative first entry", lambda: f(q, k, v, torch.tensor([-1, 3, 8], dtype=torch.int32), cu, 5, 5)),
        ("max_seqlen_q too small", lambda: f(q, k, v, cu, cu, 4, 5)),
        ("max_seqlen_k too small", lambda: f(q, k, v, cu, cu, 5, 4)),
        ("k / v totals differ", lambda: f(q, k, v[:7], cu, cu, 5, 5)),
        ("nheads not divisible", lambda: f(rnd(8, 3, D), k, v, cu, cu, 5, 5)),
        ("head dims differ", lambda: f(q, rnd(8, H, 32), rnd(8, H, 32), cu, cu, 5, 5)),
        ("dtypes differ", lambda: f(q, k.double(), v.double(), cu, cu, 5, 5)),
        ("4-D q", lambda: f(q[None], k, v, cu, cu, 5, 5)),
        ("cu_seqlens on meta", lambda: f(q, k, v, cu.to("meta"), cu, 5, 5)),
        ("alibi wrong shape", lambda: f(q, k, v, cu, cu, 5, 5, alibi_slopes=torch.ones(3))),
        ("seqused_k int64", lambda: f(q, k, v, cu, cu, 5, 5, seqused_k=torch.tensor([1, 2]))),
        ("seqused_k above lengths", lambda: f(q, k, v, cu, cu, 5, 5,
                                              seqused_k=torch.tensor([4, 2], dtype=torch.int32))),
        ("block_table float", lambda: f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, cu, 5, 5,
                                        block_table=torch.zeros(2, 2))),
        ("block_table 1-D", lambda: f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, cu, 5, 5,
                                      block_table=torch.zeros(2, dtype=torch.int32))),
        ("block_table wrong batch", lambda: f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, cu, 5, 5,
                                              block_table=torch.zeros(3, 2, dtype=torch.int32))),
        ("block_table with 3-D k", lambda: f(q, k, v, cu, cu, 5, 5, block_table=torch.zeros(2, 2, dtype=torch.int32))),
        ("block ids out of range", lambda: f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, cu, 5, 5,
                                             block_table=torch.tensor([[0, 1], [1, 7]], dtype=torch.int32))),
        ("pages too few for the keys", lambda: f(q, k.view(4, 2, H, D), v.view(4, 2, H, D), cu, cu, 5, 5,
                                                 block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))),
        ("paged: decreasing cu_seqlens_k", lambda: f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu,
                                                     torch.tensor([0, 5, 3], dtype=torch.int32), 5, 5,
                                                     block_table=torch.tensor([[0, 1], [1, 0]], dtype=torch.int32))),
        ("cu_seqlens_k None", lambda: f(q, k, v, cu, None, 5, 5)),
        ("bad window", lambda: f(q, k, v, cu, cu, 5, 5, window_size=(1,))),
        ("dropout 1", lambda: f(q, k, v, cu, cu, 5, 5, dropout_p=1.0)),
    ]
    for name, fn in bad:
        try:
            fn()
        except errors as e:
            assert "flash_attn_ext" in str(e) or isinstance(e, TypeError), f"{name}: unclear error {e}"
            continue
        pytest.fail(f"{name}: no error raised")
    # The messages name the problem.
    with pytest.raises(RuntimeError, match=r"block_table\[1, 1\] = 7"):
        f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, cu, 5, 5,
          block_table=torch.tensor([[0, 1], [1, 7]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="more than its block_table row addresses"):
        f(q, k.view(4, 2, H, D), v.view(4, 2, H, D), cu, cu, 5, 5,
          block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be non-decreasing"):
        f(q, k.view(2, 4, H, D), v.view(2, 4, H, D), cu, torch.tensor([0, 5, 3], dtype=torch.int32), 5, 5,
          block_table=torch.tensor([[0, 1], [1, 0]], dtype=torch.int32))
    # Entries of a block_table row past the pages a sequence uses are not read
    # (vLLM pads rows with anything): no error.
    out = f(q, k.view(4, 2, H, D), v.view(4, 2, H, D), cu, cu, 5, 5,
            block_table=torch.tensor([[0, 1, -1], [1, 2, 3]], dtype=torch.int32))
    assert not torch.isnan(out).any()


def test_varlen_strided_head_dim_and_shared_pages():
    """q / k / v whose last dimension is strided (flash-attn copies them,
    maybe_contiguous), and two sequences reading the same page (prefix sharing)."""
    H, D = 2, 16
    lens_q, lens_k = [3, 4], [6, 9]
    q = rnd(sum(lens_q), H, D).requires_grad_()
    k = rnd(sum(lens_k), H, D).requires_grad_()
    v = rnd(sum(lens_k), H, D).requires_grad_()
    strided = [x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for x in (q, k, v)]
    assert all(x.stride(-1) != 1 for x in strided)
    out = flash_attn_ext.flash_attn_varlen_func(*strided, cu_of(lens_q), cu_of(lens_k), 4, 9, causal=True)
    ref_out, _ = varlen_reference(q.double(), k.double(), v.double(), lens_q, lens_k, D ** -0.5, True, (-1, -1), 0.0,
                                  None)
    check_close(out, ref_out, None, "strided out", torch.float32)
    grads = torch.autograd.grad(out.sum(), strided)
    ref_grads = torch.autograd.grad(
        flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens_q), cu_of(lens_k), 4, 9, causal=True).sum(),
        (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)

    kc, vc = rnd(2, 8, H, D), rnd(2, 8, H, D)
    table = torch.tensor([[1, 0], [1, 0]], dtype=torch.int32)  # both sequences start with page 1
    qp = rnd(4, H, D)
    out = flash_attn_ext.flash_attn_varlen_func(qp, kc, vc, cu_of([2, 2]), cu_of([8, 11]), 2, 11, causal=True,
                                                block_table=table)
    keys = torch.cat([kc[1], kc[1], kc[0, :3]])
    vals = torch.cat([vc[1], vc[1], vc[0, :3]])
    ref_out, _ = varlen_reference(qp.double(), keys.double(), vals.double(), [2, 2], [8, 11], D ** -0.5, True,
                                  (-1, -1), 0.0, None)
    check_close(out, ref_out, None, "shared pages", torch.float32)


# --------------------------------------------------------------------------
# kvcache
# --------------------------------------------------------------------------

def rotate_ref(x, cos, sin, interleaved):
    """x (n, H, D) rotated row by row by cos/sin (n, rd / 2), fp32, back to x's dtype."""
    rd = 2 * cos.shape[-1]
    xr = x[..., :rd].float()
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.empty_like(xr)
        y[..., 0::2] = x1 * c - x2 * s
        y[..., 1::2] = x1 * s + x2 * c
    else:
        x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
        y = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((y.to(x.dtype), x[..., rd:]), -1)


class KV:
    """A random flash_attn_with_kvcache problem and its expected results."""

    def __init__(self, dtype=torch.float32, batch=3, seqlen_q=1, nheads=4, nheads_k=2, d=32, capacity=40, new=0,
                 page_size=None, batch_idx=False, leftpad=False, rotary_dim=0, lengths=None, int_seqlens=None):
        self.dtype, self.batch, self.sq, self.H, self.Hk, self.d, self.new = (dtype, batch, seqlen_q, nheads,
                                                                             nheads_k, d, new)
        mk = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
        if page_size is None:
            self.capacity = capacity
            rows = batch + (3 if batch_idx else 0)
            self.k_cache, self.v_cache = mk(rows, capacity, nheads_k, d), mk(rows, capacity, nheads_k, d)
            self.table = None
            self.bidx = torch.randperm(rows)[:batch].int() if batch_idx else None
        else:
            nb = -(-capacity // page_size)
            self.capacity = nb * page_size
            num_blocks = batch * nb + 2
            self.k_cache, self.v_cache = mk(num_blocks, page_size, nheads_k, d), mk(num_blocks, page_size, nheads_k, d)
            self.table = torch.randperm(num_blocks)[:batch * nb].view(batch, nb).int()
            self.bidx = None
        if int_seqlens is not None:
            lengths = [int_seqlens] * batch
        elif lengths is None:
            lengths = [random.randint(0, self.capacity - new) for _ in range(batch)]
        self.lengths = lengths
        self.int_seqlens = int_seqlens
        self.leftpad = (torch.tensor([random.randint(0, n) for n in lengths], dtype=torch.int32) if leftpad
                        else None)
        self.q = mk(batch, seqlen_q, nheads, d)
        self.k = mk(batch, new, nheads_k, d) if new else None
        self.v = mk(batch, new, nheads_k, d) if new else None
        self.cos = self.sin = None
        if rotary_dim:
            ang = torch.rand(self.capacity + 5, rotary_dim // 2) * 2 * math.pi
            self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        self.k0, self.v0 = self.k_cache.clone(), self.v_cache.clone()

    def logical(self, cache, b):
        if self.table is None:
            return cache[self.bidx[b].item() if self.bidx is not None else b]
        return cache[self.table[b].long()].flatten(0, 1)

    def run(self, **kw):
        seqlens = self.int_seqlens if self.int_seqlens is not None else torch.tensor(self.lengths, dtype=torch.int32)
        return flash_attn_ext.flash_attn_with_kvcache(
            self.q, self.k_cache, self.v_cache, self.k, self.v, rotary_cos=self.cos, rotary_sin=self.sin,
            cache_seqlens=seqlens, cache_batch_idx=self.bidx, cache_leftpad=self.leftpad, block_table=self.table,
            return_softmax_lse=True, **kw)

    def check(self, out, lse, causal=False, window=(-1, -1), softcap=0.0, alibi=None, softmax_scale=None,
              interleaved=True, q_shift=None):
        """q_shift: whether q is rotated at cache_seqlens + i (True) or all at cache_seqlens (False);
        None: flash-attn's rule, causal or a window narrower than the cache."""
        scale = softmax_scale if softmax_scale is not None else self.d ** -0.5
        if q_shift is None:
            q_shift = causal or 0 <= window[0] < self.capacity or 0 <= window[1] < self.capacity
        assert out.shape == self.q.shape and out.dtype == self.dtype
        assert lse.shape == (self.batch, self.H, self.sq) and lse.dtype == torch.float32
        exp_k, exp_v = self.k0.clone(), self.v0.clone()
        for b in range(self.batch):
            n = self.lengths[b]
            kc, vc = self.logical(exp_k, b).clone(), self.logical(exp_v, b).clone()
            qb = self.q[b]
            if self.new:
                kn = self.k[b]
                if self.cos is not None:
                    pos = torch.arange(n, n + self.new)
                    kn = rotate_ref(kn, self.cos[pos], self.sin[pos], interleaved)
                kc[n:n + self.new], vc[n:n + self.new] = kn, self.v[b]
                if self.cos is not None:
                    qpos = torch.arange(n, n + self.sq) if q_shift else torch.full((self.sq,), n)
                    qb = rotate_ref(qb, self.cos[qpos], self.sin[qpos], interleaved)
            # write back into the expected physical caches
            if self.table is None:
                row = self.bidx[b].item() if self.bidx is not None else b
                exp_k[row], exp_v[row] = kc, vc
            else:
                ps = self.k_cache.shape[1]
                for j, blk in enumerate(self.table[b].tolist()):
                    exp_k[blk], exp_v[blk] = kc[j * ps:(j + 1) * ps], vc[j * ps:(j + 1) * ps]
            lp = self.leftpad[b].item() if self.leftpad is not None else 0
            end = n + self.new
            slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
            args = (qb, kc[lp:end], vc[lp:end], scale, causal, window, softcap, slopes)
            o64, l64 = naive_attention(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                         and a.dim() == 3 else a for a in args])
            olow, _ = naive_attention(*args, lowp=True)
            check_close(out[b], o64, olow, f"out[{b}]", self.dtype)
            check_lse(lse[b], l64, f"lse[{b}]")
        assert torch.equal(self.k_cache, exp_k), "k_cache after the call"
        assert torch.equal(self.v_cache, exp_v), "v_cache after the call"


KV_CASES = [
    pytest.param(dict(), dict(), id="plain"),
    pytest.param(dict(int_seqlens=17), dict(causal=True), id="int-seqlens"),
    pytest.param(dict(int_seqlens=16, new=3, seqlen_q=3), dict(causal=True), id="int-seqlens-append"),
    pytest.param(dict(new=1), dict(), id="append-1"),
    pytest.param(dict(new=4, seqlen_q=6), dict(causal=True), id="chunked-prefill-q-gt-new"),
    pytest.param(dict(new=5, seqlen_q=5, lengths=[0, 2, 35]), dict(causal=True), id="prefill-empty-cache"),
    pytest.param(dict(seqlen_q=7, lengths=[3, 0, 20]), dict(causal=True), id="q-gt-keys-causal"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16), dict(causal=True, interleaved=True), id="rotary-il-causal"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16), dict(interleaved=False), id="rotary-neox-noncausal"),
    pytest.param(dict(new=3, seqlen_q=3, rotary_dim=32), dict(interleaved=False, window=(4, 0)),
                 id="rotary-full-dim-window"),
    pytest.param(dict(new=3, seqlen_q=3, rotary_dim=16), dict(window=(-1, 0)), id="rotary-window-(-1,0)"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16, leftpad=True), dict(causal=True), id="rotary-leftpad"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16, leftpad=True), dict(), id="rotary-leftpad-noncausal"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16, batch_idx=True), dict(causal=True), id="rotary-batch-idx"),
    pytest.param(dict(new=2, seqlen_q=2, rotary_dim=16, page_size=16), dict(causal=True, interleaved=False),
                 id="rotary-paged"),
    pytest.param(dict(new=1, batch_idx=True, leftpad=True), dict(causal=True), id="batch-idx-leftpad"),
    pytest.param(dict(seqlen_q=3, leftpad=True), dict(causal=True, alibi="batch"), id="leftpad-alibi"),
    pytest.param(dict(seqlen_q=2, new=1, nheads=6, nheads_k=2), dict(alibi="head", softcap=2.5, causal=True),
                 id="alibi-softcap-gqa"),
    pytest.param(dict(seqlen_q=1, new=1, nheads=4, nheads_k=1), dict(alibi="head", causal=True), id="alibi-decode"),
    pytest.param(dict(seqlen_q=3, nheads=4, nheads_k=4), dict(window=(5, 2), softmax_scale=0.5), id="window-scale"),
    pytest.param(dict(seqlen_q=3, new=2), dict(window=(0, 0)), id="window-(0,0)"),
    pytest.param(dict(page_size=1, new=2, seqlen_q=2), dict(causal=True), id="paged-1"),
    pytest.param(dict(page_size=16, new=1, capacity=100), dict(num_splits=1), id="paged-16-splits1"),
    pytest.param(dict(page_size=64, new=3, seqlen_q=3, capacity=150), dict(causal=True, num_splits=4),
                 id="paged-64-splits4"),
    pytest.param(dict(page_size=256, new=1, capacity=300, batch=2), dict(causal=True), id="paged-256"),
    pytest.param(dict(new=1, capacity=300, lengths=[299, 150, 0]), dict(num_splits=7), id="long-splits"),
    pytest.param(dict(dtype=torch.bfloat16, new=2, seqlen_q=2, rotary_dim=16, page_size=16),
                 dict(causal=True, alibi="head"), id="bf16-rotary-paged-alibi"),
    pytest.param(dict(dtype=torch.bfloat16, new=1, leftpad=True, rotary_dim=16), dict(softcap=4.0, causal=True),
                 id="bf16-leftpad-rotary-softcap"),
]


@pytest.mark.parametrize("setup,call", KV_CASES)
def test_kvcache_vs_naive(setup, call):
    case = KV(**setup)
    call = dict(call)
    alibi = call.pop("alibi", None)
    slopes = None
    if alibi == "head":
        slopes = torch.rand(case.H) * 0.5 + 0.05
    elif alibi == "batch":
        slopes = torch.rand(case.batch, case.H) * 0.5 + 0.05
    causal = call.pop("causal", False)
    window = call.pop("window", (-1, -1))
    interleaved = call.pop("interleaved", True)
    out, lse = case.run(causal=causal, window_size=window, rotary_interleaved=interleaved, alibi_slopes=slopes,
                        **call)
    case.check(out, lse, causal=causal, window=window, alibi=slopes, interleaved=interleaved,
               softcap=call.get("softcap", 0.0), softmax_scale=call.get("softmax_scale"))


@pytest.mark.parametrize("window", [(-1, 100), (100, -1), (200, 300)])
def test_kvcache_rotary_window_wider_than_cache(window):
    """flash-attn 2.8 turns a window side >= the cache's length into -1 before
    anything else (mha_fwd_kvcache), so such a window is not local: q is then
    rotated at cache_seqlens for every row, as with no window at all."""
    case = KV(new=2, seqlen_q=3, rotary_dim=16, capacity=40)
    out, lse = case.run(window_size=window)
    case.check(out, lse, window=window, q_shift=False)


def test_kvcache_noncontiguous_block_table():
    """flash-attn makes block_table contiguous (maybe_contiguous); a
    transposed view is accepted and read by its values."""
    case = KV(page_size=16, new=1, capacity=48, batch=3)
    case.table = case.table.t().contiguous().t()  # same values, column-major
    assert not case.table.is_contiguous()
    out, lse = case.run(causal=True)
    case.check(out, lse, causal=True)


def test_kvcache_noncontiguous_index_tensors():
    """cache_seqlens / cache_batch_idx / cache_leftpad as strided views."""
    case = KV(new=1, batch_idx=True, leftpad=True, batch=3)
    seqlens = torch.tensor(case.lengths, dtype=torch.int32).repeat_interleave(2)[::2]
    bidx = case.bidx.repeat_interleave(2)[::2]
    lp = case.leftpad.repeat_interleave(2)[::2]
    assert not seqlens.is_contiguous()
    out, lse = flash_attn_ext.flash_attn_with_kvcache(case.q, case.k_cache, case.v_cache, case.k, case.v,
                                                      cache_seqlens=seqlens, cache_batch_idx=bidx, cache_leftpad=lp,
                                                      causal=True, return_softmax_lse=True)
    case.check(out, lse, causal=True)


def test_kvcache_strided_new_kv_and_cache_views():
    """k/v new tokens as slices of a packed tensor, caches as views of a kv-packed buffer."""
    dtype = torch.float32
    B, C, Hk, D, n = 2, 30, 2, 32, 3
    kv = torch.randn(B, C, 2, Hk, D)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    kv0 = kv.clone()
    knew_pack = torch.randn(B, n, 2, Hk, D)
    k, v = knew_pack[:, :, 0], knew_pack[:, :, 1]
    q = torch.randn(B, n, 4, D)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    out, lse = flash_attn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                                      return_softmax_lse=True)
    exp = kv0.clone()
    for b in range(B):
        s = seqlens[b].item()
        exp[b, s:s + n, 0], exp[b, s:s + n, 1] = k[b], v[b]
    assert torch.equal(kv, exp), "the packed buffer after the append"
    for b in range(B):
        L = seqlens[b].item() + n
        o64, l64 = naive_attention(q[b].double(), exp[b, :L, 0].double(), exp[b, :L, 1].double(), D ** -0.5, True)
        check_close(out[b], o64, None, "out", dtype)
        check_lse(lse[b], l64, "lse")


def test_kvcache_no_keys_and_lse():
    """cache_seqlens 0 without new keys: out 0, lse +inf; return_softmax_lse=False returns a tensor."""
    case = KV(lengths=[0, 5, 0], seqlen_q=2)
    out, lse = case.run(causal=True)
    case.check(out, lse, causal=True)
    out2 = flash_attn_ext.flash_attn_with_kvcache(case.q, case.k_cache, case.v_cache,
                                                  cache_seqlens=torch.tensor(case.lengths, dtype=torch.int32),
                                                  causal=True)
    assert isinstance(out2, torch.Tensor) and torch.equal(out, out2)


def test_kvcache_bad_inputs():
    mk = lambda *s: torch.randn(*s)  # noqa: E731
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    q, kc, vc = mk(2, 1, 4, 32), mk(2, 16, 2, 32), mk(2, 16, 2, 32)
    pk, pv = mk(6, 4, 2, 32), mk(6, 4, 2, 32)
    call = flash_attn_ext.flash_attn_with_kvcache
    errors = (RuntimeError, ValueError, TypeError)
    kc0, vc0, pk0 = kc.clone(), vc.clone(), pk.clone()
    bad = [
        ("cache_seqlens int64", lambda: call(q, kc, vc, cache_seqlens=torch.tensor([1, 2]))),
        ("cache_seqlens float", lambda: call(q, kc, vc, cache_seqlens=1.5)),
        ("cache_seqlens wrong length", lambda: call(q, kc, vc, cache_seqlens=i32(1, 2, 3))),
        ("cache_seqlens 2-D", lambda: call(q, kc, vc, cache_seqlens=i32(1, 2)[None])),
        ("cache_seqlens above capacity", lambda: call(q, kc, vc, cache_seqlens=i32(1, 17))),
        ("int cache_seqlens above capacity", lambda: call(q, kc, vc, cache_seqlens=17)),
        ("negative int cache_seqlens", lambda: call(q, kc, vc, cache_seqlens=-1)),
        ("no room for k/v", lambda: call(q, kc, vc, mk(2, 2, 2, 32), mk(2, 2, 2, 32), cache_seqlens=i32(15, 0))),
        ("no room for k/v (int)", lambda: call(q, kc, vc, mk(2, 2, 2, 32), mk(2, 2, 2, 32), cache_seqlens=15)),
        ("k/v more than capacity", lambda: call(q, kc, vc, mk(2, 17, 2, 32), mk(2, 17, 2, 32), cache_seqlens=0)),
        ("k dtype", lambda: call(q, kc, vc, mk(2, 1, 2, 32).double(), mk(2, 1, 2, 32), cache_seqlens=1)),
        ("k batch", lambda: call(q, kc, vc, mk(3, 1, 2, 32), mk(3, 1, 2, 32), cache_seqlens=1)),
        ("k and v seqlens differ", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 2, 2, 32), cache_seqlens=1)),
        ("block_table int64", lambda: call(q, pk, pv, cache_seqlens=1, block_table=torch.zeros(2, 2).long())),
        ("block_table 1-D", lambda: call(q, pk, pv, cache_seqlens=1, block_table=i32(0, 1))),
        ("block_table batch", lambda: call(q, pk, pv, cache_seqlens=1, block_table=i32(0, 1, 2).view(3, 1))),
        ("block id out of range", lambda: call(q, pk, pv, cache_seqlens=i32(3, 7), block_table=i32(0, 1, 2, 6).view(2, 2))),
        ("paged no room", lambda: call(q, pk, pv, mk(2, 1, 2, 32), mk(2, 1, 2, 32), cache_seqlens=i32(8, 1),
                                       block_table=i32(0, 1, 2, 3).view(2, 2))),
        ("cache_batch_idx out of range", lambda: call(q, kc, vc, cache_seqlens=1, cache_batch_idx=i32(0, 2))),
        ("cache_batch_idx wrong length", lambda: call(q, kc, vc, cache_seqlens=1, cache_batch_idx=i32(0))),
        ("cache_leftpad above seqlens", lambda: call(q, kc, vc, cache_seqlens=i32(3, 4), cache_leftpad=i32(4, 0))),
        ("cache_leftpad int64", lambda: call(q, kc, vc, cache_seqlens=i32(3, 4), cache_leftpad=torch.tensor([0, 0]))),
        ("rotary cos shape", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 1, 2, 32), rotary_cos=mk(16, 8),
                                          rotary_sin=mk(16, 4), cache_seqlens=1)),
        ("rotary too long", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 1, 2, 32), rotary_cos=mk(16, 17),
                                         rotary_sin=mk(16, 17), cache_seqlens=1)),
        ("q 3-D", lambda: call(q[0], kc, vc, cache_seqlens=1)),
        ("q dtype", lambda: call(q.double(), kc, vc, cache_seqlens=1)),
        ("v_cache shape", lambda: call(q, kc, vc[:, :, :1], cache_seqlens=1)),
        ("alibi shape", lambda: call(q, kc, vc, cache_seqlens=1, alibi_slopes=torch.ones(2, 3))),
    ]
    for name, fn in bad:
        try:
            fn()
        except errors:
            pass
        else:
            pytest.fail(f"{name}: no error raised")
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0) and torch.equal(pk, pk0), \
            f"{name}: a rejected call changed the cache"


def test_varlen_numpy_max_seqlen():
    """max_seqlen_q / max_seqlen_k as numpy integers (e.g. from seqlens.numpy().max()), as flash-attn takes them."""
    np = pytest.importorskip("numpy")
    lens = [3, 5]
    q, k, v = rnd(8, 2, 16), rnd(8, 2, 16), rnd(8, 2, 16)
    expected = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens), cu_of(lens), 5, 5, causal=True)
    for m in (np.int64(5), np.int32(5)):
        out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens), cu_of(lens), m, m, causal=True)
        assert torch.equal(out, expected)
    with pytest.raises(TypeError):
        flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens), cu_of(lens), 5.0, 5)
