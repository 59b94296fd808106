"""FP8 inputs (flash_attn_ext/fp8.py): float8_e4m3fn q, k and v with
FlashAttention-3's descale factors through flash_attn_func,
flash_attn_varlen_func (paged keys included) and flash_attn_with_kvcache's
FP8 caches (every cache layout, the bytes after the append, CUDA-graph
replay, a fullgraph trace), on every device. The output (bfloat16) against
the float64 reference on the inputs' real values (FP8 value x descale) under
the 2x rule, with PyTorch's bfloat16 attention on the same values as the
baseline; per-(batch, kv head), single-value and absent descales, GQA,
causal masks, windows, zero-length sequences; and the errors that name a bad
argument (mixed dtypes, e5m2, descales without FP8, wrong shape, dtype or
device, a gradient, what the kv-cache route cannot do, the SDPA function).
On an H100/H200 the native kernel, dense, varlen and through the kv-cache
function."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import DEVICES, assert_close_to_ref, attention_ref, capture_graph, poison_allocator
from flash_attn_ext.reference import visible_mask
from test_kvcache import Case

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


def check_dense(out, q8, k8, v8, ds, hk, causal=False, window=(-1, -1), lse=None, name="out", bf16_inputs=False,
                **features):
    """The dequantizing path's out (and lse) against the float64 reference on the real values under the 2x
    rule, PyTorch's bfloat16 attention on the same values being the baseline. features: attention_ref's
    softmax_scale, softcap, alibi_slopes, sinks. bf16_inputs: the reference takes the real values rounded
    to bfloat16, which is what the dequantizing path computes from on CUDA (fp8.py: "exact to the inputs'
    FP8 values up to one bfloat16 rounding of each dequantized element"); PyTorch's baseline starts from
    the same rounded values, so the rule then compares the attention alone (with a query or two per
    sequence, the rounding's own effect on lse is as large as PyTorch's whole error and made the bare
    rule fail on some draws)."""
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any(), f"{name}: NaN or wrong dtype"
    qr, kr, vr = (real(x, d, hk) for x, d in zip((q8, k8, v8), ds))
    if bf16_inputs:
        qr, kr, vr = (x.to(torch.bfloat16).to(torch.float64) for x in (qr, kr, vr))
    ref, ref_lse = attention_ref(qr, kr, vr, causal, window, **features)
    low, low_lse = attention_ref(*(x.to(torch.bfloat16) for x in (qr, kr, vr)), causal, window, upcast=False,
                                 **features)
    assert_close_to_ref(out, ref, low, name)
    if lse is None:
        return
    # lse under the 2x rule too (the dequantizing path rounds value x descale to bf16 on CUDA, which moves
    # the scores by up to 2^-9 relative); rows without keys (nor sink) have lse +inf.
    assert lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), f"{name}: rows without keys must have lse +inf"
    if finite.any():
        base = (low_lse.double() - ref_lse)[finite].abs().max().item()
        err = (lse.double() - ref_lse)[finite].abs().max().item()
        bound = 2 * base + 1e-5 * max(1.0, ref_lse[finite].abs().max().item())
        assert err <= bound, f"{name}: lse error {err:.3e} > {bound:.3e}"


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
    check_dense(out, q8, k8, v8, ds, hk, window=(20, 5), lse=lse)


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
    # The SDPA-compatible function takes no descales: FP8 is refused by name.
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        flash_attn_ext.scaled_dot_product_attention(q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2))


# ---------------------------------------------------------------- FP8 caches: flash_attn_with_kvcache
#
# The kv-cache function routes FP8 calls through flash_attn_varlen_func (kvcache._fp8_attention). Each
# sequence is checked against the float64 reference on its own real keys after the append (cache
# positions cache_leftpad[b] to cache_seqlens[b] + seqlen_new of its row or pages, value x the descales of
# batch index b), and the cache's bytes after the append against the expected ones, exactly. The cache
# slots outside every sequence hold NaN bytes: a kernel or a gather that reads them shows as NaN.

class Fp8KvCase(Case):
    """test_kvcache's Case (random lengths, block tables, batch rows, left padding) with e4m3 q, caches
    and new keys (random values x 3) and descales of `kind`; every cache slot outside the sequences' keys
    before the append holds NaN (e4m3 0x7f), the slots the append fills included."""

    def __init__(self, device, kind="batch-head", **shape):
        super().__init__(device, torch.float32, **shape)
        to8 = lambda t: None if t is None else (t * 3).to(E4M3)  # noqa: E731
        self.q, self.k, self.v = to8(self.q), to8(self.k), to8(self.v)
        self.descales = descales(kind, self.batch, self.nheads_k, device)
        for name in ("k_cache", "v_cache"):
            values = to8(getattr(self, name)).view(torch.uint8)
            cache = torch.full_like(values, 0x7F)
            for b in range(self.batch):
                keys = tuple(i[self.pad(b):self.lengths[b]] for i in self.slots(b))
                cache[keys] = values[keys]
            setattr(self, name, cache.view(E4M3))
        self.k_cache0, self.v_cache0 = self.k_cache.clone(), self.v_cache.clone()

    def pad(self, b):
        return int(self.leftpad[b]) if self.leftpad is not None else 0

    def slots(self, b):
        """Where sequence b's cache positions 0 .. capacity - 1 are: (cache rows or blocks, slots)."""
        pos = torch.arange(self.capacity, device=self.device)
        if self.block_table is None:
            return torch.full_like(pos, int(self.batch_idx[b]) if self.batch_idx is not None else b), pos
        return self.block_table[b].long()[pos // self.page_size], pos % self.page_size

    def run(self, **kw):
        ds = self.descales
        return super().run(q_descale=ds[0], k_descale=ds[1], v_descale=ds[2], **kw)

    def check(self, out, lse, causal=False, window=(-1, -1), native=False, name="out", **features):
        b_, sq, h, d = self.q.shape
        assert out.shape == (b_, sq, h, d) and lse.shape == (b_, h, sq) and lse.dtype == torch.float32
        # The caches' bytes: the new keys at their slots, nothing else changed.
        expected = {"k": self.k_cache0.view(torch.uint8).clone(), "v": self.v_cache0.view(torch.uint8).clone()}
        for b in range(self.batch):
            if self.new:
                at = tuple(i[self.lengths[b]:self.lengths[b] + self.new] for i in self.slots(b))
                expected["k"][at], expected["v"][at] = self.k[b].view(torch.uint8), self.v[b].view(torch.uint8)
        assert torch.equal(self.k_cache.view(torch.uint8), expected["k"]), f"{name}: k_cache bytes after the append"
        assert torch.equal(self.v_cache.view(torch.uint8), expected["v"]), f"{name}: v_cache bytes after the append"
        for b in range(self.batch):
            keys = tuple(i[self.pad(b):self.lengths[b] + self.new] for i in self.slots(b))
            k8, v8 = (expected[x][keys][None].view(E4M3) for x in ("k", "v"))
            one = [x if x is None or x.numel() == 1 else x[b:b + 1] for x in self.descales]
            kw = dict(features)
            if kw.get("alibi_slopes") is not None and kw["alibi_slopes"].dim() == 2:
                kw["alibi_slopes"] = kw["alibi_slopes"][b:b + 1]
            where = f"{name}, sequence {b}"
            if native and k8.shape[1] == 0:
                assert (out[b] == 0).all() and torch.isinf(lse[b]).all(), f"{where}: no keys"
            elif native:
                check_native(out[b:b + 1], lse[b:b + 1], self.q[b:b + 1], k8, v8, one, self.nheads_k, causal,
                             window, kw.get("softmax_scale"), name=where)
            else:
                check_dense(out[b:b + 1], self.q[b:b + 1], k8, v8, one, self.nheads_k, causal, window,
                            lse=lse[b:b + 1], name=where, bf16_inputs=out.device.type == "cuda", **kw)


FP8_LAYOUTS = {
    "contiguous": {},
    "batch_idx": dict(batch_idx=True),
    "leftpad": dict(leftpad=True),
    "batch_idx_leftpad": dict(batch_idx=True, leftpad=True),
    "paged1": dict(page_size=1),
    "paged16": dict(page_size=16),
    "paged7": dict(page_size=7),
    "paged16_leftpad": dict(page_size=16, leftpad=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
@pytest.mark.parametrize("kind", ["batch-head", "tensor"])
@pytest.mark.parametrize("seqlen_q,new", [(1, 1), (1, 0), (4, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_kvcache(monkeypatch, device, layout, kind, seqlen_q, new, causal):
    """Every cache layout, GQA 4/2, per-(batch, kv head) and per-tensor descales, with and without an
    append, one and several queries; the dequantizing route (FLASH_ATTN_EXT_FP8_FWD=dequant: what
    every device runs, checked by the 2x rule; the native kernel's own bound is test_fp8_native_kvcache's)."""
    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "dequant")
    case = Fp8KvCase(device, kind, batch=3, seqlen_q=seqlen_q, new=new, capacity=70, **FP8_LAYOUTS[layout])
    poison_allocator(device, 1 << 20)
    out, lse = case.run(causal=causal)
    case.check(out, lse, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", ["window", "softcap", "alibi", "alibi_batch", "sinks", "scale", "mqa", "mha",
                                     "no_descales"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fp8_kvcache_features(monkeypatch, device, feature, paged):
    """Windows and the score features (dequantized by the varlen function), a negative softmax_scale,
    MQA and MHA, and FP8 caches without descales; causal unless windowed. The dequantizing route, as
    test_fp8_kvcache."""
    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "dequant")
    heads = {"mqa": (8, 1), "mha": (4, 4)}.get(feature, (4, 2))
    case = Fp8KvCase(device, "none" if feature == "no_descales" else "batch-head", batch=3, seqlen_q=2, new=1,
                     nheads=heads[0], nheads_k=heads[1], capacity=90, lengths=[70, 0, 33],
                     page_size=16 if paged else None)
    kw, ref = {}, {}
    if feature == "softcap":
        kw["softcap"] = ref["softcap"] = 2.0
    if feature == "alibi":
        kw["alibi_slopes"] = ref["alibi_slopes"] = torch.rand(4, device=device) * 0.3
    if feature == "alibi_batch":
        kw["alibi_slopes"] = ref["alibi_slopes"] = torch.rand(3, 4, device=device) * 0.3
    if feature == "sinks":
        kw["s_aux"] = ref["sinks"] = torch.tensor([0.5, -1.0, 3.0, float("-inf")], device=device)
    if feature == "scale":
        kw["softmax_scale"] = ref["softmax_scale"] = -0.05
    window = (10, 0) if feature == "window" else (-1, -1)
    causal = feature != "window"
    out, lse = case.run(causal=causal, window_size=window, **kw)
    case.check(out, lse, causal=causal, window=window, name=feature, **ref)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_kvcache_descales_by_sequence(device):
    """The check fails with a wrong descale: the descales of batch index b are sequence b's (FlashAttention-3's
    convention), not those of the cache row cache_batch_idx[b] picks, nor a neighbour's, and a v_descale
    10% off is outside the tolerance."""
    case = Fp8KvCase(device, "batch-head", batch=3, seqlen_q=2, new=1, capacity=60, lengths=[40, 25, 50],
                     batch_idx=True, leftpad=True)
    out, lse = case.run(causal=True)
    case.check(out, lse, causal=True)
    right = case.descales
    wrong_seq = tuple(x.roll(1, dims=0) for x in right)
    wrong_v = (right[0], right[1], right[2] * 1.1)
    for wrong in (wrong_seq, wrong_v):
        case.descales = wrong
        with pytest.raises(AssertionError):
            case.check(out, lse, causal=True)
    case.descales = right


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_kvcache_num_splits_and_layouts_agree(device):
    """num_splits 0 and 1 give one result; a paged cache holding a contiguous cache's rows gives that
    cache's result; a strided q and a cache that is a slice of a packed buffer work."""
    case = Fp8KvCase(device, "batch-head", batch=2, seqlen_q=3, nheads=4, nheads_k=2, capacity=48,
                     lengths=[30, 48], page_size=16)
    out0, lse0 = case.run(causal=True, num_splits=0)
    out1, lse1 = case.run(causal=True, num_splits=1)
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    # The sequences' rows as a contiguous cache, k and v slices of one buffer (batch, capacity, 2, nheads_k,
    # d); put together as bytes.
    rows = [torch.stack([c.view(torch.uint8)[case.slots(b)] for b in range(case.batch)])
            for c in (case.k_cache, case.v_cache)]
    packed = torch.stack(rows, dim=2).view(E4M3)
    q = case.q.view(torch.uint8).transpose(1, 2).contiguous().transpose(1, 2).view(E4M3)  # strided
    assert not q.is_contiguous()
    ds = case.descales
    out2, lse2 = flash_attn_ext.flash_attn_with_kvcache(q, packed[:, :, 0], packed[:, :, 1],
                                                        cache_seqlens=case.cache_seqlens, causal=True,
                                                        return_softmax_lse=True, q_descale=ds[0], k_descale=ds[1],
                                                        v_descale=ds[2])
    torch.testing.assert_close(out2, out0, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse0, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_kvcache_errors(device):
    """What the FP8 route cannot honour raises naming it, before the append touches the cache."""
    q8, k8, v8 = fp8_qkv(2, 1, 16, 4, 2, 32, device)
    kn, vn = (x[:, :1].clone() for x in (k8, v8))
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    call = flash_attn_ext.flash_attn_with_kvcache
    k0 = k8.view(torch.uint8).clone()
    angles = torch.rand(16, 8, device=device)
    cases = [
        (NotImplementedError, "rotary_cos", dict(k=kn, v=vn, rotary_cos=angles.cos(), rotary_sin=angles.sin())),
        (NotImplementedError, "num_splits = 2", dict(k=kn, v=vn, num_splits=2)),
        (ValueError, r"k_descale must be \(batch, nheads_k\) = \(2, 2\) or one value, got shape \(2, 4\)",
         dict(k=kn, v=vn, k_descale=torch.ones(2, 4, device=device))),
        (TypeError, "q_descale must be float32", dict(k=kn, v=vn, q_descale=torch.ones(2, 2, device=device).half())),
        (RuntimeError, "k must have the dtype of the cache", dict(k=kn.to(torch.bfloat16), v=vn)),
        (NotImplementedError, "FP8 inputs have no backward",
         dict(k=kn.float().to(E4M3).requires_grad_(), v=vn)),
    ]
    for error, pattern, kw in cases:
        with pytest.raises(error, match=pattern):
            call(q8, k8, v8, cache_seqlens=i32(3, 7), **kw)
        assert torch.equal(k8.view(torch.uint8), k0), f"{pattern}: the cache was written before the error"
    qb, kb = q8.to(torch.bfloat16), k8.to(torch.bfloat16)
    with pytest.raises(TypeError, match="q, k_cache and v_cache must all be float8_e4m3fn or none of them, got q "
                                        "torch.float8_e4m3fn, k_cache torch.bfloat16"):
        call(q8, kb, kb, cache_seqlens=3)
    with pytest.raises(TypeError, match="must all be float8_e4m3fn or none of them, got q torch.bfloat16"):
        call(qb, k8, v8, cache_seqlens=3)
    with pytest.raises(ValueError, match="k_descale apply to float8_e4m3fn inputs only"):
        call(qb, kb, kb, cache_seqlens=3, k_descale=torch.ones(2, 2, device=device))
    with pytest.raises(TypeError, match="float8_e4m3fn .FlashAttention-3's., got k_cache torch.float8_e5m2"):
        call(q8, k8.to(torch.float8_e5m2), v8, cache_seqlens=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["batch_idx_leftpad", "paged16"])
def test_fp8_kvcache_compile_fullgraph(device, layout):
    """torch.compile(fullgraph=True) traces an FP8 decode step whole: the route reads no tensor value on
    the host (a .item() or a value-sized allocation would break the graph)."""
    case = Fp8KvCase(device, "batch-head", batch=2, new=1, capacity=64, lengths=[5, 40], **FP8_LAYOUTS[layout])

    def step(q, k_cache, v_cache, k, v, seqlens, batch_idx, leftpad, table, q_descale, k_descale, v_descale):
        return flash_attn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                      cache_batch_idx=batch_idx, cache_leftpad=leftpad,
                                                      block_table=table, causal=True, return_softmax_lse=True,
                                                      q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, lse = compiled(case.q, case.k_cache, case.v_cache, case.k, case.v, case.cache_seqlens, case.batch_idx,
                        case.leftpad, case.block_table, *case.descales)
    case.check(out, lse, causal=True, name="compiled")


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("path", ["dequant", "native"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx_leftpad", "paged16", "paged16_leftpad"])
def test_fp8_kvcache_cuda_graph(path, layout, monkeypatch):
    """An FP8 decode step (append + attend) captured in a CUDA graph and replayed with new tokens, lengths,
    layouts and descales copied into its buffers: the FP8 route never synchronises with the host and sizes
    nothing from values. Both paths: dequantizing, and the native kernel where it runs (paged keys
    without left padding never take it)."""
    if path == "native" and (_native_available() is not None or layout == "paged16"):
        pytest.skip(_native_available() or "paged keys take the dequantizing path")
    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "native_strict" if path == "native" else "dequant")
    shape = dict(batch=3, nheads=8, nheads_k=2, d=128, new=1, capacity=256, **FP8_LAYOUTS[layout])
    first = Fp8KvCase("cuda", "batch-head", lengths=[10, 200, 0], **shape)
    names = ("q", "k", "v", "k_cache", "v_cache", "cache_seqlens", "batch_idx", "leftpad", "block_table")
    static = {n: getattr(first, n).clone() for n in names if getattr(first, n) is not None}
    static_ds = [x.clone() for x in first.descales]

    def step():
        return flash_attn_ext.flash_attn_with_kvcache(
            static["q"], static["k_cache"], static["v_cache"], static["k"], static["v"],
            cache_seqlens=static["cache_seqlens"], cache_batch_idx=static.get("batch_idx"),
            cache_leftpad=static.get("leftpad"), block_table=static.get("block_table"), causal=True,
            return_softmax_lse=True, q_descale=static_ds[0], k_descale=static_ds[1], v_descale=static_ds[2])

    graph, (g_out, g_lse) = capture_graph(step)
    for lengths in ([11, 201, 1], [254, 5, 100]):
        case = Fp8KvCase("cuda", "batch-head", lengths=lengths, **shape)
        for n, t in static.items():  # FP8 tensors as bytes (copies of FP8 need no kernel of that dtype)
            src = getattr(case, n)
            (t.view(torch.uint8) if t.dtype == E4M3 else t).copy_(src.view(torch.uint8) if src.dtype == E4M3 else src)
        for t, src in zip(static_ds, case.descales):
            t.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        case.k_cache, case.v_cache = static["k_cache"], static["v_cache"]
        case.check(g_out.clone(), g_lse.clone(), causal=True, native=path == "native", name=f"replay {lengths}")


# ---------------------------------------------------------------- native FP8 forward (Hopper)
#
# The FP8 tensor-core forward (fwd_fp8 op) for the calls fp8.native_fp8_reason
# accepts, under FLASH_ATTN_EXT_FP8_FWD=native_strict, which raises rather
# than dequantize: a passing test ran the native kernel (test_fp8_native_kernel_names
# also sees it in the profiler).
#
# Tolerance. The native kernel rounds P = exp(s - max) (times 2^8) to e4m3
# before P V (3 mantissa bits: a relative error up to 2^-4 per probability,
# 2^-9 absolute in the shifted units below e4m3's normal range), accumulates
# in fp32 on the tensor cores and rounds out to bf16; the row sums use the
# unrounded P, as FlashAttention-3's. That is far coarser than the bf16
# path, so the project's 2x rule is applied to a model of these roundings
# instead of PyTorch's bf16 attention: `fp8_model` computes in float64 from
# the same real inputs with P rounded to e4m3 at the row's final max (the
# kernel rounds at its running max, which differs only by a factor applied
# after the rounding: the same error distribution, not the same errors) and
# the output rounded to bf16. Ours must stay within 2x the model's max error
# plus half a bf16 ulp of the largest output. The dequantizing path's error
# (bf16 P) is computed alongside and must be smaller than the model's (it
# is the reference for what FP8 P costs); inputs with fp8 values x 3 and
# descales in [0.25, 1.25] give peaked rows (score spreads of ~10), so a
# wrong key order of P against V^T would show as errors of order |v|, far
# above the bound.

def _native_available():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return "the native FP8 forward runs on compute capability 9.0 (H100/H200)"
    from flash_attn_ext import fp8
    if not fp8._compiled_head_dims():
        return "this build has no native FP8 forward (e4m3 not in FLASH_ATTN_EXT_DTYPES)"
    return None


needs_native = pytest.mark.skipif(_native_available() is not None, reason=str(_native_available()))


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "native_strict")
    monkeypatch.delenv("FLASH_ATTN_EXT_DISABLE_SM90", raising=False)


def fp8_model(qr, kr, vr, scale, causal=False, window=(-1, -1)):
    """float64 attention of (b, s, h, d) real inputs with the native kernel's
    roundings: P x 2^8 to e4m3, out to bf16 (see the tolerance above)."""
    h, hk = qr.shape[2], kr.shape[2]
    qd, kd, vd = (x.transpose(1, 2) for x in (qr, kr, vr))  # (b, h, s, d)
    kd, vd = (x.repeat_interleave(h // hk, dim=1) for x in (kd, vd))
    s = (qd @ kd.transpose(-1, -2)) * scale
    vis = visible_mask(qr.shape[1], kr.shape[1], causal, window, device=qr.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows without keys: P = 0
    p = torch.exp(s - m) * 256.0
    rowsum = p.sum(-1, keepdim=True)
    p8 = p.to(torch.float32).to(E4M3).to(torch.float64)
    o = torch.where(rowsum > 0, (p8 @ vd) / rowsum.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
    return o.transpose(1, 2).to(torch.bfloat16).to(torch.float64)


def check_native(out, lse, q8, k8, v8, ds, hk, causal=False, window=(-1, -1), scale=None, name="out"):
    """The native output against the float64 reference (bound: the tolerance above) and its lse."""
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any(), f"{name}: NaN or wrong dtype"
    qr, kr, vr = (real(x, d, hk) for x, d in zip((q8, k8, v8), ds))
    scale = q8.shape[-1] ** -0.5 if scale is None else scale
    ref, ref_lse = attention_ref(qr, kr, vr, causal, window, softmax_scale=scale)
    model = fp8_model(qr, kr, vr, scale, causal, window)
    err = (out.double() - ref).abs().max().item()
    model_err = (model - ref).abs().max().item()
    top = max(1.0, ref.abs().max().item())
    bound = 2 * model_err + 2.0 ** -9 * top
    assert err <= bound, f"{name}: error {err:.3e} > 2 x the FP8 model's {model_err:.3e} + slack"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), f"{name}: rows without keys must have lse +inf"
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    # Hopper's FP8 wgmma accumulates Q K^T with about 14 significant bits, not fp32's 24 (DeepSeek-V3's
    # report measured this on H800): a score's error scales with the sum of |q_i k_i| it adds up, which the
    # bound carries at 2^-12 besides the 1e-3 relative allowance for the softmax's own fp32 roundings.
    hq = qr.shape[2] // kr.shape[2]
    mags = (qr.abs().transpose(1, 2) @ kr.abs().repeat_interleave(hq, dim=2).permute(0, 2, 3, 1)).amax().item()
    lse_bound = 1e-3 * max(1.0, ref_lse[finite].abs().max().item() if finite.any() else 1.0) + 2.0 ** -12 * scale * mags
    assert lse_err <= lse_bound, f"{name}: lse error {lse_err:.3e} > {lse_bound:.3e}"
    return err, model_err


@needs_native
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("kind", ["batch-head", "tensor", "none"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 300, 300, 4, 2), (1, 129, 1000, 2, 1), (2, 700, 129, 4, 4), (1, 1, 1, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp8_native_dense(native, d, kind, causal, shape):
    """GQA/MQA, Sq != Sk both ways (rows without keys when causal with Sq > Sk),
    partial query and key tiles, every descale form; poisoned output memory."""
    b, sq, sk, h, hk = shape
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, "cuda")
    ds = descales(kind, b, hk, "cuda")
    poison_allocator("cuda", b * sq * h * d * 2)
    out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=causal, q_descale=ds[0], k_descale=ds[1],
                                                 v_descale=ds[2], return_attn_probs=True)
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    check_native(out, lse, q8, k8, v8, ds, hk, causal)
    # The dequantizing path on the same call, under its own rule (the 2x rule against PyTorch's bf16
    # attention on the same real values).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASH_ATTN_EXT_FP8_FWD", "dequant")
        deq = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=causal, q_descale=ds[0], k_descale=ds[1],
                                             v_descale=ds[2])
    check_dense(deq, q8, k8, v8, ds, hk, causal)


@needs_native
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("window", [(20, 5), (0, 0), (200, -1), (-1, 64)], ids=str)
def test_fp8_native_windows_and_scale(native, d, window):
    b, sq, sk, h, hk = 1, 333, 400, 4, 2
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, "cuda")
    ds = descales("batch-head", b, hk, "cuda")
    out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, window_size=window, softmax_scale=0.05,
                                                 return_attn_probs=True, q_descale=ds[0], k_descale=ds[1],
                                                 v_descale=ds[2])
    check_native(out, lse, q8, k8, v8, ds, hk, window=window, scale=0.05)


@needs_native
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("used", [False, True], ids=["all-keys", "seqused_k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_native_varlen(native, d, used, causal):
    """Per-sequence descales over a length mix (an empty query sequence, a key
    sequence of 4, partial tiles, one over two key blocks), seqused_k, and
    NaN in the rows of k and v no sequence uses: each sequence against its
    own dense reference; rows outside every sequence stay 0 / +inf."""
    lens_q, lens_k = [5, 0, 300, 129, 64], [9, 4, 300, 700, 64]
    h, hk = 4, 2
    b = len(lens_q)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")  # noqa: E731
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q8 = (torch.randn(sum(lens_q) + 3, h, d) * 3).to(device="cuda", dtype=E4M3)  # 3 rows in no sequence
    k8 = (torch.randn(sum(lens_k), hk, d) * 3).to(device="cuda", dtype=E4M3)
    v8 = (torch.randn(sum(lens_k), hk, d) * 3).to(device="cuda", dtype=E4M3)
    seqused = None
    if used:
        seqused = torch.tensor([9, 2, 250, 513, 0], dtype=torch.int32, device="cuda")
        for i in range(b):  # NaN (0x7f in e4m3) in the keys past each sequence's used ones
            lo, hi = int(cu_k[i]) + int(seqused[i]), int(cu_k[i + 1])
            k8.view(torch.uint8)[lo:hi] = 0x7F
            v8.view(torch.uint8)[lo:hi] = 0x7F
    ds = descales("batch-head", b, hk, "cuda")
    poison_allocator("cuda", (sum(lens_q) + 3) * h * d * 2)
    out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q8, k8, v8, cu_q, cu_k, max(lens_q), max(lens_k),
                                                        causal=causal, seqused_k=seqused, return_attn_probs=True,
                                                        q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    assert out.shape == q8.shape and lse.shape == (h, q8.shape[0])
    assert (out[-3:] == 0).all() and torch.isinf(lse[:, -3:]).all()
    for i in range(b):
        qs = slice(int(cu_q[i]), int(cu_q[i + 1]))
        nk = int(seqused[i]) if used else lens_k[i]
        ks = slice(int(cu_k[i]), int(cu_k[i]) + nk)
        if qs.stop == qs.start:
            continue
        one = [dd[i : i + 1] for dd in ds]
        if nk == 0:
            assert (out[qs] == 0).all() and torch.isinf(lse[:, qs]).all(), f"sequence {i}: no keys"
            continue
        check_native(out[qs][None], lse[:, qs][None], q8[qs][None], k8[ks][None], v8[ks][None], one, hk, causal,
                     name=f"sequence {i}")


@needs_native
def test_fp8_native_strided_inputs(native):
    """Inputs whose strides or offsets TMA cannot take are copied first (fp8._aligned)."""
    b, s, h, d = 2, 200, 2, 128
    qkv = (torch.randn(b, s, 3 * h * d + 16) * 3).to(device="cuda", dtype=E4M3)
    q8, k8, v8 = (qkv[..., 1 + i * h * d: 1 + (i + 1) * h * d].unflatten(-1, (h, d)) for i in range(3))  # odd offset
    ds = descales("tensor", b, h, "cuda")
    out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=True, return_attn_probs=True,
                                                 q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    check_native(out, lse, q8, k8, v8, ds, h, causal=True)


@needs_native
def test_fp8_native_strict_refusals(native):
    """native_strict names what the native kernel does not take; auto dequantizes those calls."""
    q8, k8, v8 = fp8_qkv(1, 64, 64, 2, 2, 128, "cuda")
    cases = [(dict(softcap=5.0), "softcap"), (dict(alibi_slopes=torch.ones(2, device="cuda")), "alibi_slopes"),
             (dict(dropout_p=0.1), "dropout"), (dict(softmax_scale=-0.1), "softmax_scale")]
    for kwargs, word in cases:
        with pytest.raises(RuntimeError, match=f"native_strict.*{word}"):
            flash_attn_ext.flash_attn_func(q8, k8, v8, **kwargs)
    q64, k64, v64 = fp8_qkv(1, 64, 64, 2, 2, 64, "cuda")
    with pytest.raises(RuntimeError, match="native_strict.*head dims q 64"):
        flash_attn_ext.flash_attn_func(q64, k64, v64)
    # Paged keys (a 4-D k with a block_table) are refused by name too, not dequantized unseen.
    cu = torch.tensor([0, 64], dtype=torch.int32, device="cuda")
    table = torch.arange(4, dtype=torch.int32, device="cuda")[None]
    with pytest.raises(RuntimeError, match="native_strict.*paged keys"):
        flash_attn_ext.flash_attn_varlen_func(q8[0], k8.view(4, 16, 2, 128), v8.view(4, 16, 2, 128), cu, cu, 64, 64,
                                              block_table=table)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASH_ATTN_EXT_FP8_FWD", "auto")
        out = flash_attn_ext.flash_attn_func(q8, k8, v8, softcap=5.0)  # the dequantizing path
        assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
        mp.setenv("FLASH_ATTN_EXT_FP8_FWD", "bogus")
        with pytest.raises(RuntimeError, match="FLASH_ATTN_EXT_FP8_FWD must be"):
            flash_attn_ext.flash_attn_func(q8, k8, v8)


@needs_native
def test_fp8_native_kernel_names(monkeypatch):
    """The profiler sees the e4m3 instance of the warp-specialized kernel (and the V transpose) under auto,
    and no FP8 kernel under dequant."""
    from torch.profiler import ProfilerActivity, profile

    q8, k8, v8 = fp8_qkv(1, 256, 256, 2, 2, 128, "cuda")

    def names():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            flash_attn_ext.flash_attn_func(q8, k8, v8, causal=True)
            torch.cuda.synchronize()
        return {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash::" in e.name}

    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "auto")
    auto = names()
    assert any("flash_fwd_sm90_ws_kernel" in n and "fp8_e4m3" in n for n in auto), auto
    assert any("fp8_transpose_v_kernel" in n for n in auto), auto
    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "dequant")
    deq = names()
    assert not any("fp8" in n for n in deq), deq


@needs_native
def test_fp8_native_compile_and_graph(native):
    """torch.compile runs the native call (fwd_fp8's fake kernel gives the shapes), and a CUDA graph replays it."""
    q8, k8, v8 = fp8_qkv(2, 130, 130, 2, 1, 128, "cuda")
    ds = descales("batch-head", 2, 1, "cuda")
    fn = lambda q, k, v: flash_attn_ext.flash_attn_func(q, k, v, causal=True, q_descale=ds[0],  # noqa: E731
                                                        k_descale=ds[1], v_descale=ds[2])
    eager = fn(q8, k8, v8)
    compiled = torch.compile(fn)(q8, k8, v8)
    assert torch.equal(eager, compiled)
    static = [x.clone() for x in (q8, k8, v8)]
    fn(*static)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = fn(*static)
    fresh = fp8_qkv(2, 130, 130, 2, 1, 128, "cuda")
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(graphed, fn(*fresh))


@needs_native
def test_fp8_native_opcheck():
    """fwd_fp8 as PyTorch sees it: schema, fake kernel against the real one (dense and varlen)."""
    q8, k8, v8 = fp8_qkv(2, 70, 150, 4, 2, 128, "cuda")
    ds = [d.expand(2, 2) for d in descales("tensor", 2, 2, "cuda")]
    # Not opcheck's test_schema: its mutation check multiplies the inputs, which PyTorch does not
    # implement for float8_e4m3fn ("mul_cuda" not implemented); the schema declares no mutation or alias.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.flash_attn_ext.fwd_fp8.default,
                          (q8, k8, v8, *ds, None, None, None, 0, 0, 0.1, True, -1, -1), test_utils=utils)
    cu_q = torch.tensor([0, 30, 70], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 100, 150], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.flash_attn_ext.fwd_fp8.default,
                          (q8[0], k8[0], v8[0], *ds, cu_q, cu_k, None, 40, 100, 0.1, False, 16, -1),
                          test_utils=utils)


@needs_native
def test_fp8_native_zero_descale(native):
    """A q_descale of 0 (an all-zero q quantized with descale 0): every visible key weighs the same, masked
    keys stay out (no 0 x -inf = NaN)."""
    b, sq, sk, h, hk, d = 2, 150, 150, 2, 1, 128
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, "cuda")
    ds = list(descales("batch-head", b, hk, "cuda"))
    ds[0] = torch.zeros_like(ds[0])
    out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=True, return_attn_probs=True,
                                                 q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    check_native(out, lse, q8, k8, v8, ds, hk, causal=True)


@needs_native
def test_fp8_native_nan_key_propagates(native):
    """A NaN key (e4m3 0x7f) inside the sequence makes every row that sees it NaN, as PyTorch does; rows of
    the other kv head stay finite."""
    b, sq, sk, h, hk, d = 1, 70, 200, 4, 2, 128
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, d, "cuda")
    k8.view(torch.uint8)[0, 30, 0, 5] = 0x7F
    out = flash_attn_ext.flash_attn_func(q8, k8, v8)
    assert torch.isnan(out[:, :, :2]).all(), "rows seeing the NaN key must be NaN"
    assert torch.isfinite(out[:, :, 2:]).all(), "rows of the other kv head must stay finite"



@needs_native
@pytest.mark.parametrize("headdim", [128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_native_persistent_grid(native, monkeypatch, headdim, causal):
    """More query blocks than the GPU has SMs: the persistent grid (FLASH_ATTN_EXT_SM90_FWD_PERSISTENT,
    the default; head dim 128, while 256 runs one block per query block either way) runs several per
    block and agrees bit for bit with one block per query block; rows below seqlen_q - seqlen_k see no
    key under the causal mask."""
    b, sq, sk, h, hk = 2, 1500, 1300, 16, 4
    q8, k8, v8 = fp8_qkv(b, sq, sk, h, hk, headdim, "cuda")
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("FLASH_ATTN_EXT_SM90_FWD_PERSISTENT", setting)
        out, lse, _ = flash_attn_ext.flash_attn_func(q8, k8, v8, causal=causal, return_attn_probs=True)
        results[setting] = (out, lse)
    assert torch.equal(results["1"][0], results["0"][0]) and torch.equal(results["1"][1], results["0"][1])
    check_native(*results["1"], q8, k8, v8, (None, None, None), hk, causal=causal)


@needs_native
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "leftpad", "batch_idx_leftpad", "paged16_leftpad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp8_native_kvcache(native, d, layout, causal):
    """flash_attn_with_kvcache's FP8 route on the native kernel (every layout it gives the kernel as
    contiguous rows): long and empty caches, several queries, an append; the NaN bytes outside the
    sequences sit in rows the kernel's boxes reach."""
    case = Fp8KvCase("cuda", "batch-head", batch=3, seqlen_q=4, nheads=8, nheads_k=2, d=d, new=2, capacity=300,
                     lengths=[0, 290, 131], **FP8_LAYOUTS[layout])
    poison_allocator("cuda", 1 << 22)
    out, lse = case.run(causal=causal)
    case.check(out, lse, causal=causal, native=True)


@needs_native
def test_fp8_native_kvcache_paged_dequantizes(monkeypatch):
    """A paged FP8 cache without left padding goes to the varlen function with its block table, where FP8
    paged keys take the dequantizing path: no FP8 kernel runs, and that path's rule holds."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("FLASH_ATTN_EXT_FP8_FWD", "auto")
    case = Fp8KvCase("cuda", "batch-head", batch=2, seqlen_q=1, nheads=8, nheads_k=2, d=128, new=1, capacity=160,
                     lengths=[100, 7], page_size=16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out, lse = case.run(causal=True)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash::" in e.name}
    assert names and not any("fp8" in n for n in names), names
    case.check(out, lse, causal=True)
