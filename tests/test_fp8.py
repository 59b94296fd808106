"""FP8 inputs (flash_attn_ext/fp8.py): float8_e4m3fn q, k and v with
FlashAttention-3's descale factors through flash_attn_func and
flash_attn_varlen_func (paged keys included), on every device. The output
(bfloat16) against the float64 reference on the inputs' real values (FP8
value x descale) under the 2x rule, with PyTorch's bfloat16 attention on the
same values as the baseline; per-(batch, kv head), single-value and absent
descales, GQA, causal masks, windows, zero-length sequences; and the errors
that name a bad argument (mixed dtypes, e5m2, descales without FP8, wrong
shape, dtype or device, a gradient, the kv-cache and SDPA functions)."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import DEVICES, assert_close_to_ref, attention_ref, poison_allocator

E4M3 = torch.float8_e4m3fn


def fp8_qkv(b, sq, sk, h, hk, d, device):
    """FP8 q, k, v (random values times a spread of magnitudes) and their descales."""
    q, k, v = (torch.randn(b, s, n, d) * 3 for s, n in ((sq, h), (sk, hk), (sk, hk)))
    return tuple(x.to(device=device, dtype=E4M3) for x in (q, k, v))


def real(x8, descale, nheads_k, rows_batch=None):
    """The real values of x8 in float64: value x descale of its (batch, kv head)."""
    x = x8.to(torch.float64)
    if descale is None:
        return x
    table = descale.to(torch.float64)
    if table.numel() == 1:
        return x * table.reshape(())
    table = table.repeat_interleave(x.shape[-2] // nheads_k, dim=1)
    return x * (table[:, None, :, None] if rows_batch is None else table[rows_batch][:, :, None])


def descales(kind, b, hk, device):
    if kind == "none":
        return None, None, None
    if kind == "tensor":
        return tuple(torch.rand(1, device=device) + 0.25 for _ in range(3))
    return tuple(torch.rand(b, hk, device=device) + 0.25 for _ in range(3))


def check_dense(out, q8, k8, v8, ds, hk, causal=False, window=(-1, -1)):
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    qr, kr, vr = (real(x, d, hk) for x, d in zip((q8, k8, v8), ds))
    ref, _ = attention_ref(qr, kr, vr, causal, window)
    low, _ = attention_ref(*(x.to(torch.bfloat16) for x in (qr, kr, vr)), causal, window, upcast=False)
    assert_close_to_ref(out, ref, low, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["batch-head", "tensor", "none"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 65, 65, 4, 2, 64), (1, 30, 130, 2, 1, 128), (2, 1, 17, 3, 3, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp8_flash_attn_func(device, kind, causal, shape):
    b, sq, sk, h, hk, d = shape
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, device)
    ds = descales(kind, b, hk, device)
    poison_allocator(q8.device, b * sq * h * d * 2)
    out = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=causal, q_descale=ds[0], k_descale=ds[1],
                                         v_descale=ds[2])
    check_dense(out, q8, k8, v8, ds, hk, causal)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_window_and_lse(device):
    b, sq, sk, h, hk, d = 1, 90, 90, 4, 2, 64
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, device)
    ds = descales("batch-head", b, hk, device)
    out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, window_size=(20, 5), return_attn_probs=True,
                                                 q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    check_dense(out, q8, k8, v8, ds, hk, window=(20, 5))
    _, ref_lse = attention_ref(*(real(x, dd, hk) for x, dd in zip((q8, k8, v8), ds)), False, (20, 5))
    assert lse.dtype == torch.float32
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3 * max(1.0, ref_lse.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fp8_varlen(device, paged):
    """Per-sequence descales across a length mix with an empty sequence,
    against each sequence's own dense reference."""
    lens_q, lens_k = [5, 0, 70, 33], [9, 4, 70, 100]
    h, hk, d = 4, 2, 64
    b = len(lens_q)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa: E731
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q8 = (torch.randn(sum(lens_q), h, d) * 3).to(device=device, dtype=E4M3)
    k8 = (torch.randn(sum(lens_k), hk, d) * 3).to(device=device, dtype=E4M3)
    v8 = (torch.randn(sum(lens_k), hk, d) * 3).to(device=device, dtype=E4M3)
    ds = descales("batch-head", b, hk, device)
    kw = dict(q_descale=ds[0], k_descale=ds[1], v_descale=ds[2], causal=True)
    if paged:
        page = 16
        pages_per = [-(-n // page) for n in lens_k]
        num_blocks = sum(pages_per) + 3
        perm = torch.randperm(num_blocks)
        table = torch.zeros(b, max(pages_per), dtype=torch.int32)
        kc = torch.zeros(num_blocks, page, hk, d, dtype=E4M3).to(device)
        vc = torch.zeros(num_blocks, page, hk, d, dtype=E4M3).to(device)
        used = 0
        for i, n in enumerate(lens_k):
            for p in range(pages_per[i]):
                blk = int(perm[used]); used += 1
                table[i, p] = blk
                rows = slice(int(cu_k[i]) + p * page, int(cu_k[i]) + min(n, (p + 1) * page))
                kc[blk, : rows.stop - rows.start] = k8[rows]
                vc[blk, : rows.stop - rows.start] = v8[rows]
        out = flash_attn_ext.flash_attn_varlen_func(q8, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k),
                                                    block_table=table.to(device), **kw)
    else:
        out = flash_attn_ext.flash_attn_varlen_func(q8, k8, v8, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(lens_q), h, d) and not torch.isnan(out).any()
    for i in range(b):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        if qs.stop == qs.start:
            continue
        one = [dd[i : i + 1] for dd in ds]
        qr, kr, vr = (real(x[None], dd, hk) for x, dd in zip((q8[qs], k8[ks], v8[ks]), one))
        ref, _ = attention_ref(qr, kr, vr, True)
        low, _ = attention_ref(*(x.to(torch.bfloat16) for x in (qr, kr, vr)), True, upcast=False)
        assert_close_to_ref(out[qs][None], ref, low, f"sequence {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_errors(device):
    q8, k8, v8 = fp8_qkv(1, 8, 8, 2, 2, 32, device)
    qb = q8.to(torch.bfloat16)
    good = torch.ones(1, 2, device=device)
    with pytest.raises(TypeError, match="all be float8_e4m3fn or none"):
        flash_attn_ext.flash_attn_func(qb, k8, v8)
    with pytest.raises(TypeError, match="float8_e4m3fn .FlashAttention-3's., got q torch.float8_e5m2"):
        flash_attn_ext.flash_attn_func(q8.to(torch.float8_e5m2), k8, v8)
    with pytest.raises(ValueError, match="k_descale apply to float8_e4m3fn inputs only"):
        flash_attn_ext.flash_attn_func(qb, qb, qb, k_descale=good)
    with pytest.raises(ValueError, match=r"q_descale must be \(batch, nheads_k\) = \(1, 2\) or one value"):
        flash_attn_ext.flash_attn_func(q8, k8, v8, q_descale=torch.ones(2, 1, device=device))
    with pytest.raises(TypeError, match="v_descale must be float32"):
        flash_attn_ext.flash_attn_func(q8, k8, v8, v_descale=good.double())
    if device == "cuda":
        with pytest.raises(ValueError, match="k_descale is on cpu"):
            flash_attn_ext.flash_attn_func(q8, k8, v8, k_descale=good.cpu())
    with pytest.raises(NotImplementedError, match="FP8 inputs have no backward"):
        flash_attn_ext.flash_attn_func(q8.float().to(E4M3).requires_grad_(), k8, v8)
    with pytest.raises(NotImplementedError, match="FP8 caches .k_descale. are not supported"):
        flash_attn_ext.flash_attn_with_kvcache(qb, qb, qb, k_descale=good)
    with pytest.raises(NotImplementedError, match="FP8 caches"):
        flash_attn_ext.flash_attn_with_kvcache(q8, k8, v8)
    # The SDPA-compatible function takes no descales: FP8 is refused by name.
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        flash_attn_ext.scaled_dot_product_attention(q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2))
