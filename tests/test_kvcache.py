"""flash_attn_with_kvcache (issue 10): against a full recompute with the fp64
reference on each sequence's keys after the append, under the 2x rule;
appends, rotary (both layouts), cache_batch_idx, left padding, paged caches
with random block tables and page sizes 1 to 256, split counts, GQA/MHA,
causal/window, softcap/ALiBi/sinks, seqlen_q 1 and > 1, empty caches; the
cache contents after the append; bad inputs; CUDA graphs; torch.compile.
Shapes are small so that the CPU cases stay quick."""
from __future__ import annotations

import math
import random

import pytest
import torch

import flash_attn_ext
from flash_attn_ext import flash_attn_interface
from conftest import DEVICES, assert_close_to_ref, attention_ref, capture_graph, poison_allocator

CUDA = [d for d in DEVICES if d == "cuda"]


def dtypes(device):
    return [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]


def dev_dtype():
    return [pytest.param(d, t, id=f"{d}-{str(t).split('.')[-1]}") for d in DEVICES for t in dtypes(d)]


def compiled_hdim(device, d):
    """Whether the build has a decode kernel for head dim d (CUDA builds may be restricted)."""
    if device != "cuda":
        return True
    q = torch.zeros(1, 1, 1, d, device=device, dtype=torch.bfloat16)
    try:
        flash_attn_ext.flash_attn_with_kvcache(q, q, q, cache_seqlens=1)
        return True
    except RuntimeError as e:
        if "compiled" in str(e):
            return False
        raise


def rotary_ref(x, cos, sin, interleaved):
    """flash-attn's reference rotary (x * cos + rotate_half(x) * sin), in fp32, rounded to x's dtype.
    x (b, s, h, d); cos/sin (b, s, rotary_dim / 2)."""
    ro = 2 * cos.shape[-1]
    cos, sin = cos.float()[:, :, None], sin.float()[:, :, None]
    if interleaved:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    else:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    xr = x[..., :ro].float()
    if interleaved:
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        half = ro // 2
        rot = torch.cat((-xr[..., half:], xr[..., :half]), -1)
    return torch.cat(((xr * cos + rot * sin).to(x.dtype), x[..., ro:]), -1)


class Case:
    """A random decode problem: cache, lengths, optional append / paging / features."""

    def __init__(self, device, dtype, batch=3, seqlen_q=1, nheads=4, nheads_k=2, d=32, capacity=80, new=0,
                 page_size=None, batch_idx=False, leftpad=False, lengths=None, rotary=None, extra_rows=2):
        self.device, self.dtype = device, dtype
        self.batch, self.seqlen_q, self.nheads, self.nheads_k, self.d = batch, seqlen_q, nheads, nheads_k, d
        self.new, self.page_size = new, page_size
        mk = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
        if page_size is None:
            self.capacity = capacity
            rows = batch + (extra_rows if batch_idx else 0)
            self.k_cache, self.v_cache = mk(rows, capacity, nheads_k, d), mk(rows, capacity, nheads_k, d)
            self.block_table = None
            self.batch_idx = (torch.randperm(rows, device=device)[:batch].int() if batch_idx else None)
        else:
            max_blocks = -(-capacity // page_size)
            self.capacity = max_blocks * page_size
            num_blocks = batch * max_blocks + 3
            self.k_cache, self.v_cache = mk(num_blocks, page_size, nheads_k, d), mk(num_blocks, page_size, nheads_k, d)
            self.block_table = torch.randperm(num_blocks, device=device)[: batch * max_blocks].view(
                batch, max_blocks).int()
            self.batch_idx = None
        if lengths is None:
            lengths = [random.randint(0, self.capacity - new) for _ in range(batch)]
            lengths[0] = 0 if new else lengths[0]  # an empty cache
        self.lengths = lengths
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        self.leftpad = None
        if leftpad:
            self.leftpad = torch.tensor([random.randint(0, n) for n in lengths], dtype=torch.int32, device=device)
        self.q = mk(batch, seqlen_q, nheads, d)
        self.k = mk(batch, new, nheads_k, d) if new else None
        self.v = mk(batch, new, nheads_k, d) if new else None
        self.rotary = rotary
        if rotary is not None:
            rd = rotary
            angles = torch.rand(self.capacity, rd // 2, device=device) * 2 * math.pi
            self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.k_cache0, self.v_cache0 = self.k_cache.clone(), self.v_cache.clone()

    def logical(self, cache, b):
        """Sequence b's cache rows in order, (capacity, nheads_k, d)."""
        if self.block_table is None:
            row = self.batch_idx[b].item() if self.batch_idx is not None else b
            return cache[row]
        return cache[self.block_table[b].long()].flatten(0, 1)

    def run(self, **kw):
        return flash_attn_ext.flash_attn_with_kvcache(
            self.q, self.k_cache, self.v_cache, self.k, self.v,
            rotary_cos=self.cos if self.rotary else None, rotary_sin=self.sin if self.rotary else None,
            cache_seqlens=self.cache_seqlens, cache_batch_idx=self.batch_idx, cache_leftpad=self.leftpad,
            block_table=self.block_table, return_softmax_lse=True, **kw)

    def expected(self, causal=False, window=(-1, -1), interleaved=True, softmax_scale=None, softcap=0.0,
                 alibi_slopes=None, sinks=None):
        """(out fp64, out PyTorch low precision, lse, expected logical caches per sequence)."""
        outs, lowps, lses, caches = [], [], [], []
        for b in range(self.batch):
            n = self.lengths[b]
            kc, vc = self.logical(self.k_cache0, b).clone(), self.logical(self.v_cache0, b).clone()
            q = self.q[b:b + 1]
            if self.new:
                k_new, v_new = self.k[b:b + 1], self.v[b:b + 1]
                if self.rotary:
                    pos = torch.arange(n, n + self.new, device=self.device)
                    k_new = rotary_ref(k_new, self.cos[pos][None], self.sin[pos][None], interleaved)
                    if causal or tuple(window) != (-1, -1):
                        qpos = torch.arange(n, n + self.seqlen_q, device=self.device).clamp(max=self.capacity - 1)
                    else:
                        qpos = torch.full((self.seqlen_q,), n, device=self.device)
                    q = rotary_ref(q, self.cos[qpos][None], self.sin[qpos][None], interleaved)
                kc[n:n + self.new], vc[n:n + self.new] = k_new[0], v_new[0]
            caches.append((kc, vc))
            end = n + self.new
            lp = self.leftpad[b].item() if self.leftpad is not None else 0
            ks, vs = kc[None, lp:end], vc[None, lp:end]
            slopes = None
            if alibi_slopes is not None:
                slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
            kw = dict(causal=causal, window=window, softmax_scale=softmax_scale, softcap=softcap,
                      alibi_slopes=slopes, sinks=sinks)
            o64, l64 = attention_ref(q, ks, vs, **kw)
            olow, _ = attention_ref(q, ks, vs, upcast=False, **kw)
            outs.append(o64), lowps.append(olow), lses.append(l64)
        return torch.cat(outs), torch.cat(lowps), torch.cat(lses), caches

    def check(self, out, lse, causal=False, window=(-1, -1), interleaved=True, name="out", **features):
        o64, olow, l64, caches = self.expected(causal, window, interleaved, **features)
        if self.dtype == torch.float32:
            err = (out.double() - o64).abs().max().item() if out.numel() else 0.0
            assert not torch.isnan(out).any() and err <= 1e-5 * max(1.0, o64.abs().max().item()), f"{name}: {err}"
        else:
            assert_close_to_ref(out, o64, olow, name)
        assert torch.equal(torch.isinf(lse), torch.isinf(l64)), f"{name}: lse +inf (no key) differs"
        finite = ~torch.isinf(l64)
        tol = 1e-5 if self.dtype == torch.float32 else 2e-3
        if finite.any():
            err = (lse.double()[finite] - l64[finite]).abs().max().item()
            assert err <= tol * max(1.0, l64[finite].abs().max().item()), f"{name}: lse error {err}"
        # The caches after the append: each sequence's rows, and nothing else touched.
        for b, (kc, vc) in enumerate(caches):
            assert torch.equal(self.logical(self.k_cache, b), kc), f"k_cache of sequence {b} after the append"
            assert torch.equal(self.logical(self.v_cache, b), vc), f"v_cache of sequence {b} after the append"
        if self.block_table is not None:
            used = torch.zeros(self.k_cache.shape[0], dtype=torch.bool, device=self.device)
            used[self.block_table.long().flatten()] = True
            assert torch.equal(self.k_cache[~used], self.k_cache0[~used]), "an unused block was written"
        elif self.batch_idx is not None:
            used = torch.zeros(self.k_cache.shape[0], dtype=torch.bool, device=self.device)
            used[self.batch_idx.long()] = True
            assert torch.equal(self.k_cache[~used], self.k_cache0[~used]), "an unused cache row was written"


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("page_size", [None, 1, 16, 64, 256])
@pytest.mark.parametrize("seqlen_q,new", [(1, 1), (1, 0), (3, 3), (5, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_append_and_attend(device, dtype, page_size, seqlen_q, new, causal):
    capacity = 300 if page_size == 256 else 90
    case = Case(device, dtype, seqlen_q=seqlen_q, new=new, page_size=page_size, capacity=capacity)
    poison_allocator(device, 1 << 20)
    out, lse = case.run(causal=causal)
    case.check(out, lse, causal=causal)


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("nheads,nheads_k,seqlen_q", [(4, 4, 1), (8, 1, 1), (8, 2, 5), (32, 1, 1), (6, 2, 7)])
@pytest.mark.parametrize("paged", [False, True])
def test_gqa_mha_and_row_chunks(device, dtype, nheads, nheads_k, seqlen_q, paged):
    """MHA, GQA and MQA; seqlen_q * group beyond 16 rows takes several row chunks on CUDA."""
    case = Case(device, dtype, seqlen_q=seqlen_q, nheads=nheads, nheads_k=nheads_k, new=1,
                page_size=16 if paged else None, capacity=100)
    out, lse = case.run(causal=True)
    case.check(out, lse, causal=True)


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 17, 1000])
@pytest.mark.parametrize("page_size", [None, 1, 16])
def test_num_splits(device, dtype, num_splits, page_size):
    """Long caches cut into many splits (CUDA; the CPU ignores num_splits): the combine through the lse."""
    if device == "cpu" and num_splits != 0:
        pytest.skip("the CPU ignores num_splits")
    lengths = [1500, 0, 37, 1200]
    case = Case(device, dtype, batch=4, seqlen_q=2, new=2, page_size=page_size, capacity=1600,
                lengths=lengths, d=64)
    out, lse = case.run(causal=True, num_splits=num_splits)
    case.check(out, lse, causal=True)


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("paged", [False, True])
def test_rotary(device, dtype, interleaved, mask, paged):
    case = Case(device, dtype, seqlen_q=3, new=3, rotary=16, page_size=16 if paged else None, capacity=64)
    causal, window = mask == "causal", ((8, 0) if mask == "window" else (-1, -1))
    out, lse = case.run(causal=causal, window_size=window, rotary_interleaved=interleaved)
    case.check(out, lse, causal=causal, window=window, interleaved=interleaved)


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("batch_idx,leftpad,paged", [(True, False, False), (False, True, False), (True, True, False),
                                                     (False, True, True)])
@pytest.mark.parametrize("new", [0, 2])
def test_batch_idx_and_leftpad(device, dtype, batch_idx, leftpad, paged, new):
    case = Case(device, dtype, batch=4, seqlen_q=2, new=new, batch_idx=batch_idx, leftpad=leftpad,
                page_size=16 if paged else None, capacity=70, rotary=16 if new else None)
    out, lse = case.run(causal=True)
    case.check(out, lse, causal=True)


@pytest.mark.parametrize("device,dtype", dev_dtype())
@pytest.mark.parametrize("feature", ["softcap", "alibi", "alibi_batch", "sinks", "window", "all", "scale"])
@pytest.mark.parametrize("paged", [False, True])
def test_score_features(device, dtype, feature, paged):
    case = Case(device, dtype, batch=3, seqlen_q=2, nheads=4, nheads_k=2, new=1, page_size=16 if paged else None,
                capacity=120, lengths=[100, 0, 40])
    kw, ref = {}, {}
    if feature in ("softcap", "all"):
        kw["softcap"] = ref["softcap"] = 2.0
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = ref["alibi_slopes"] = torch.rand(4, device=device) * 0.3
    if feature == "alibi_batch":
        kw["alibi_slopes"] = ref["alibi_slopes"] = torch.rand(3, 4, device=device) * 0.3
    if feature in ("sinks", "all"):
        sinks = torch.tensor([0.5, -1.0, 3.0, float("-inf")], device=device)
        kw["s_aux"], ref["sinks"] = sinks, sinks
    window = (20, 0) if feature in ("window", "all") else (-1, -1)
    if feature == "scale":
        kw["softmax_scale"] = ref["softmax_scale"] = -0.3
    causal = feature != "window"
    out, lse = case.run(causal=causal, window_size=window, **kw)
    case.check(out, lse, causal=causal, window=window, name=feature, **ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256, 40, 72])
def test_head_dims(device, d):
    """Every compiled head dim; 40 and 72 are padded (CUDA) and 72 is not a multiple of 16."""
    dtype = torch.bfloat16
    if not compiled_hdim(device, d):
        pytest.skip(f"head dim {d} not compiled in this build")
    case = Case(device, dtype, seqlen_q=2, new=1, d=d, capacity=150, page_size=16)
    out, lse = case.run(causal=True, num_splits=3)
    case.check(out, lse, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_cache_and_q(device):
    """A cache that is a slice of a larger buffer (kv packed: (..., 2, nheads_k, d)) and a non-contiguous q."""
    dtype = dtypes(device)[0]
    kv = torch.randn(2, 50, 2, 2, 32, device=device).to(dtype)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    q = torch.randn(2, 4, 3, 32, device=device).to(dtype).transpose(1, 2)  # (2, 3, 4, 32), strided
    seqlens = torch.tensor([20, 49], dtype=torch.int32, device=device)
    out = flash_attn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
    for b in range(2):
        n = seqlens[b].item()
        o64, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True)
        olow, _ = attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True, upcast=False)
        assert_close_to_ref(out[b:b + 1], o64, olow, f"sequence {b}")


@pytest.mark.parametrize("device", DEVICES)
def test_int_and_missing_cache_seqlens(device):
    dtype = dtypes(device)[0]
    kc, vc = (torch.randn(2, 30, 1, 32, device=device).to(dtype) for _ in range(2))
    q = torch.randn(2, 1, 2, 32, device=device).to(dtype)
    out_int = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=30)
    out_none = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc)
    o64, olow = attention_ref(q, kc, vc)[0], attention_ref(q, kc, vc, upcast=False)[0]
    assert_close_to_ref(out_int, o64, olow, "int cache_seqlens")
    assert torch.equal(out_int, out_none)
    # Zero keys everywhere: out 0, lse +inf (or the sink).
    out, lse = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse > 0).all()
    sinks = torch.tensor([1.5, -2.0], device=device)
    out, lse = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, return_softmax_lse=True,
                                                     learnable_sink=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.view(1, 2, 1).expand_as(lse), rtol=1e-6, atol=1e-6)


def test_shim_exports():
    assert flash_attn_interface.flash_attn_with_kvcache is flash_attn_ext.flash_attn_with_kvcache
    assert "flash_attn_with_kvcache" in flash_attn_ext.__all__


@pytest.mark.parametrize("device", DEVICES)
def test_no_backward(device):
    dtype = dtypes(device)[0]
    kc, vc = (torch.randn(1, 8, 1, 32, device=device).to(dtype) for _ in range(2))
    q = torch.randn(1, 1, 1, 32, device=device).to(dtype).requires_grad_()
    out = flash_attn_ext.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=8)
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()


def _bad_calls(device):
    dt = dtypes(device)[0]
    mk = lambda *s, dtype=dt: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    q, kc, vc = mk(2, 1, 4, 32), mk(2, 16, 2, 32), mk(2, 16, 2, 32)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    call = flash_attn_ext.flash_attn_with_kvcache
    return [
        ("cache_seqlens must be int32", lambda: call(q, kc, vc, cache_seqlens=torch.tensor([1, 2], device=device))),
        (r"cache_seqlens must be \(batch,\)", lambda: call(q, kc, vc, cache_seqlens=i32(1, 2, 3))),
        ("cache_batch_idx must be int32", lambda: call(q, kc, vc, cache_seqlens=1,
                                                       cache_batch_idx=torch.zeros(2, device=device))),
        (r"cache_leftpad must be \(batch,\)", lambda: call(q, kc, vc, cache_seqlens=1, cache_leftpad=i32(0))),
        ("block_table must be an int32", lambda: call(q, kc, vc, cache_seqlens=1,
                                                      block_table=torch.zeros(2, 1, device=device))),
        (r"block_table must be \(batch, max_blocks_per_seq\)", lambda: call(q, kc, vc, cache_seqlens=1,
                                                                           block_table=i32(0, 1))),
        ("cannot be combined with a block_table", lambda: call(q, kc, vc, cache_seqlens=1, cache_batch_idx=i32(0, 1),
                                                               block_table=i32(0, 1).view(2, 1))),
        ("nheads .* divisible", lambda: call(mk(2, 1, 3, 32), kc, vc, cache_seqlens=1)),
        ("same head dim", lambda: call(mk(2, 1, 4, 64), kc, vc, cache_seqlens=1)),
        ("same dtype", lambda: call(q.double() if device == "cpu" else q.half() if dt == torch.bfloat16
                                    else q.bfloat16(), kc, vc, cache_seqlens=1)),
        ("k_cache and v_cache must have one shape", lambda: call(q, kc, vc[:, :8], cache_seqlens=1)),
        ("pass k and v together", lambda: call(q, kc, vc, mk(2, 1, 2, 32), cache_seqlens=1)),
        (r"k must be \(batch, seqlen_new", lambda: call(q, kc, vc, mk(2, 1, 3, 32), mk(2, 1, 3, 32), cache_seqlens=1)),
        ("more than the cache holds", lambda: call(q, kc, vc, mk(2, 17, 2, 32), mk(2, 17, 2, 32), cache_seqlens=0)),
        ("need cache_seqlens", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 1, 2, 32))),
        ("rotary_cos/rotary_sin need k and v", lambda: call(q, kc, vc, rotary_cos=mk(16, 8), rotary_sin=mk(16, 8),
                                                            cache_seqlens=1)),
        ("rotary_cos/rotary_sin have 8 positions", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 1, 2, 32),
                                                                rotary_cos=mk(8, 8), rotary_sin=mk(8, 8),
                                                                cache_seqlens=1)),
        ("rotary_dim", lambda: call(q, kc, vc, mk(2, 1, 2, 32), mk(2, 1, 2, 32), rotary_cos=mk(16, 20),
                                    rotary_sin=mk(16, 20), cache_seqlens=1)),
        ("num_splits", lambda: call(q, kc, vc, cache_seqlens=1, num_splits=-1)),
        ("softcap", lambda: call(q, kc, vc, cache_seqlens=1, softcap=-1.0)),
        (r"alibi_slopes must be \(nheads,\)", lambda: call(q, kc, vc, cache_seqlens=1,
                                                          alibi_slopes=torch.ones(3, device=device))),
        ("s_aux or as learnable_sink", lambda: call(q, kc, vc, cache_seqlens=1, s_aux=torch.ones(4, device=device),
                                                    learnable_sink=torch.ones(4, device=device))),
        ("k_cache and v_cache must be 4-D", lambda: call(q, kc[0], vc[0], cache_seqlens=1)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for pattern, fn in _bad_calls(device):
        with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
            fn()


def _bad_values(device):
    dt = dtypes(device)[0]
    mk = lambda *s: torch.randn(*s, device=device).to(dt)  # noqa: E731
    q, kc, vc = mk(2, 1, 4, 32), mk(3, 16, 2, 32), mk(3, 16, 2, 32)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    call = flash_attn_ext.flash_attn_with_kvcache
    pk, pv = mk(6, 4, 2, 32), mk(6, 4, 2, 32)
    table = i32(0, 1, 2, 3, 4, 5).view(2, 3)
    return [
        (r"cache_seqlens\[1\] = 17", lambda: call(q, kc, vc, cache_seqlens=i32(3, 17))),
        (r"cache_seqlens\[0\] = -1", lambda: call(q, kc, vc, cache_seqlens=i32(-1, 3))),
        (r"cache_seqlens\[0\] = 15 .* room", lambda: call(q, kc, vc, mk(2, 2, 2, 32), mk(2, 2, 2, 32),
                                                        cache_seqlens=i32(15, 3))),
        (r"cache_leftpad\[1\] = 5", lambda: call(q, kc, vc, cache_seqlens=i32(3, 4), cache_leftpad=i32(0, 5))),
        (r"cache_batch_idx\[0\] = 3", lambda: call(q, kc, vc, cache_seqlens=i32(3, 4), cache_batch_idx=i32(3, 0))),
        (r"block_table\[1, 2\] = 9", lambda: call(q, pk, pv, cache_seqlens=i32(3, 12),
                                                 block_table=i32(0, 1, 2, 3, 4, 9).view(2, 3))),
        (r"block_table\[0, 0\] = -1", lambda: call(q, pk, pv, cache_seqlens=i32(3, 12),
                                                  block_table=torch.where(table == 0, -1, table).int())),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_values_checked(device, monkeypatch):
    """Index values: always checked on the CPU, on CUDA under FLASH_ATTN_EXT_DEBUG_CHECKS=1."""
    monkeypatch.setenv("FLASH_ATTN_EXT_DEBUG_CHECKS", "1")
    for pattern, fn in _bad_values(device):
        with pytest.raises(ValueError, match=pattern):
            fn()


def test_bad_values_checked_by_cpu_op():
    """The CPU op itself raises on values it would otherwise clamp (callers of the raw op)."""
    q, kc = torch.randn(1, 1, 2, 32), torch.randn(1, 8, 1, 32)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    op = torch.ops.flash_attn_ext.fwd_kvcache
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 9"):
        op(q, kc, kc, i32(9), None, None, None, 1.0, False, -1, -1)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = 1"):
        op(q, kc, kc, i32(9), None, None, i32(0, 1).view(1, 2), 1.0, False, -1, -1)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_out_of_range_values_are_clamped_cuda(monkeypatch):
    """Without the debug switch, bad index values give clamped (wrong but finite) results and never a
    memory error (a paged, split case like these ran clean under compute-sanitizer memcheck)."""
    monkeypatch.setenv("FLASH_ATTN_EXT_DEBUG_CHECKS", "0")
    for _, fn in _bad_values("cuda"):
        out = fn()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_decode_step(paged):
    """A decode step (append + attend) captured once and replayed with new tokens and new lengths."""
    dtype, dev = torch.bfloat16, "cuda"
    B, H, Hk, D, cap = 3, 8, 2, 64, 512
    case = Case(dev, dtype, batch=B, nheads=H, nheads_k=Hk, d=D, new=1, capacity=cap,
                page_size=16 if paged else None, lengths=[10, 200, 0])
    static_q, static_k, static_v = case.q.clone(), case.k.clone(), case.v.clone()
    static_len = case.cache_seqlens.clone()

    def step():
        return flash_attn_ext.flash_attn_with_kvcache(static_q, case.k_cache, case.v_cache, static_k, static_v,
                                                      cache_seqlens=static_len, block_table=case.block_table,
                                                      causal=True, return_softmax_lse=True)

    k0, v0 = case.k_cache.clone(), case.v_cache.clone()
    graph, (g_out, g_lse) = capture_graph(step)
    for lengths in ([11, 201, 1], [300, 5, 511]):
        case.k_cache.copy_(k0), case.v_cache.copy_(v0)
        case.k_cache0, case.v_cache0 = k0, v0
        case.lengths = lengths
        case.q, case.k, case.v = (torch.randn_like(t) for t in (static_q, static_k, static_v))
        static_q.copy_(case.q), static_k.copy_(case.k), static_v.copy_(case.v)
        static_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        case.check(g_out.clone(), g_lse.clone(), causal=True, name=f"replay {lengths}")


# Every configuration of the CUDA decode kernel (FLASH_ATTN_EXT_DECODE_CONFIG, developer-only; the
# table is csrc/cuda/flash_decode_launch.cuh) at head dim 128, the one that instantiates them all:
# cp.async and bulk loads, pipeline depths, programmatic dependent launch, the combine.
DECODE_CONFIGS = flash_attn_ext.kvcache._decode_configs() if CUDA else []
CONFIG_CASES = {
    "contiguous": (dict(new=1, capacity=700), {}),
    "splits5": (dict(new=1, capacity=700, lengths=[650, 300, 0]), dict(num_splits=5)),
    "splits1": (dict(new=1, capacity=700, lengths=[650, 1, 64]), dict(num_splits=1)),
    "splits40": (dict(batch=1, nheads=4, nheads_k=4, capacity=2600, lengths=[2600]), dict(num_splits=40)),
    "paged1": (dict(new=1, capacity=150, page_size=1), {}),
    "paged16": (dict(new=1, capacity=700, page_size=16, leftpad=True), dict(num_splits=3)),
    "paged256": (dict(new=1, capacity=700, page_size=256), {}),
    "paged24": (dict(new=1, capacity=700, page_size=24), dict(num_splits=4)),  # boxes of 8 rows, tiles across pages
    "paged64": (dict(batch=2, capacity=1300, page_size=64, lengths=[1300, 777]), {}),
    "batch_idx_leftpad": (dict(new=2, capacity=300, batch_idx=True, leftpad=True), {}),
    "row_chunks": (dict(seqlen_q=5, new=5, capacity=300), {}),
    "features": (dict(seqlen_q=2, nheads=4, new=1, capacity=400, lengths=[350, 0, 40]), "features"),
    "d120": (dict(d=120, new=1, capacity=300, page_size=16), dict(num_splits=2)),
    "fp16": (dict(new=1, capacity=700, dtype=torch.float16), {}),
}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS)
@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_decode_configs(config, name, monkeypatch):
    if not compiled_hdim("cuda", 128):
        pytest.skip("head dim 128 not compiled in this build")
    monkeypatch.setenv("FLASH_ATTN_EXT_DECODE_CONFIG", config)
    shape, kw = CONFIG_CASES[name]
    shape = dict(dict(batch=3, nheads=8, nheads_k=2, d=128), **shape)
    dtype = shape.pop("dtype", torch.bfloat16)
    case = Case("cuda", dtype, **shape)
    poison_allocator("cuda", 1 << 22)
    causal, window, ref = True, (-1, -1), {}
    if kw == "features":
        kw = dict(softcap=2.0, alibi_slopes=torch.rand(4, device="cuda") * 0.3,
                  s_aux=torch.tensor([0.5, -1.0, 3.0, float("-inf")], device="cuda"), window_size=(200, 0))
        ref = dict(softcap=2.0, alibi_slopes=kw["alibi_slopes"], sinks=kw["s_aux"])
        window = (200, 0)
    try:
        out, lse = case.run(causal=causal, **kw)
    except RuntimeError as e:
        if "not compiled in this build" in str(e):
            pytest.skip(str(e).splitlines()[0])
        raise
    case.check(out, lse, causal=causal, window=window, name=f"{config}/{name}", **ref)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "leftpad", "paged8", "paged16", "paged24", "paged16_leftpad"])
def test_decode_nonfinite_outside_sequences(config, layout, monkeypatch):
    """Cache rows that no sequence owns (past its length, before its left padding, pages no table
    names) hold +-inf. A kernel that loads whole tiles must keep them out of the output: a key
    masked to P = 0 still gives 0 * inf = NaN in P V if its V row reaches the product."""
    if not compiled_hdim("cuda", 128):
        pytest.skip("head dim 128 not compiled in this build")
    monkeypatch.setenv("FLASH_ATTN_EXT_DECODE_CONFIG", config)
    page = {"paged8": 8, "paged16": 16, "paged24": 24, "paged16_leftpad": 16}.get(layout)
    case = Case("cuda", torch.bfloat16, batch=3, nheads=8, nheads_k=2, d=128, capacity=700, page_size=page,
                leftpad="leftpad" in layout, lengths=[650, 70, 129])
    cap = case.capacity
    pos = torch.arange(cap, device="cuda")
    for b in range(case.batch):
        lp = case.leftpad[b].item() if case.leftpad is not None else 0
        outside = (pos < lp) | (pos >= case.lengths[b])
        sign = torch.where(pos % 2 == 0, 1.0, -1.0)[:, None, None]
        for cache in (case.k_cache, case.v_cache):
            if case.block_table is None:
                cache[b][outside] = (sign * float("inf")).expand(cap, 2, 128)[outside].to(cache.dtype)
            else:
                rows = case.block_table[b].long().repeat_interleave(page)[outside]
                cache[rows, pos[outside] % page] = float("inf")
    if case.block_table is not None:  # the blocks no table names
        used = torch.zeros(case.k_cache.shape[0], dtype=torch.bool, device="cuda")
        used[case.block_table.long().flatten()] = True
        case.k_cache[~used], case.v_cache[~used] = float("-inf"), float("inf")
    case.k_cache0, case.v_cache0 = case.k_cache.clone(), case.v_cache.clone()
    for splits in (1, 3):
        out, lse = case.run(causal=True, num_splits=splits)
        assert torch.isfinite(out).all(), f"{config}/{layout}/splits {splits}: a non-finite output"
        case.check(out, lse, causal=True, name=f"{config}/{layout}/splits {splits}")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("config", DECODE_CONFIGS)
@pytest.mark.parametrize("paged", [False, True])
def test_decode_configs_cuda_graph(config, paged, monkeypatch):
    """Each configuration captured in a CUDA graph (programmatic launches become graph edges) and
    replayed twice with new lengths, split and unsplit."""
    if not compiled_hdim("cuda", 128):
        pytest.skip("head dim 128 not compiled in this build")
    monkeypatch.setenv("FLASH_ATTN_EXT_DECODE_CONFIG", config)
    case = Case("cuda", torch.bfloat16, batch=2, nheads=8, nheads_k=2, d=128, new=1, capacity=1024,
                page_size=16 if paged else None, lengths=[10, 900])
    static_q, static_k, static_v = case.q.clone(), case.k.clone(), case.v.clone()
    static_len = case.cache_seqlens.clone()
    k0, v0 = case.k_cache.clone(), case.v_cache.clone()

    def step(splits):
        return flash_attn_ext.flash_attn_with_kvcache(static_q, case.k_cache, case.v_cache, static_k, static_v,
                                                      cache_seqlens=static_len, block_table=case.block_table,
                                                      causal=True, return_softmax_lse=True, num_splits=splits)

    for splits in (0, 1):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(splits)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out, g_lse = step(splits)
        for lengths in ([11, 901], [1000, 0]):
            case.k_cache.copy_(k0), case.v_cache.copy_(v0)
            case.k_cache0, case.v_cache0 = k0, v0
            case.lengths = lengths
            case.q, case.k, case.v = (torch.randn_like(t) for t in (static_q, static_k, static_v))
            static_q.copy_(case.q), static_k.copy_(case.k), static_v.copy_(case.v)
            static_len.copy_(torch.tensor(lengths, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            case.check(g_out.clone(), g_lse.clone(), causal=True, name=f"{config} splits={splits} {lengths}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_decode_step(device):
    """torch.compile(fullgraph=True) of a decode step: the append and the op in one graph."""
    dtype = dtypes(device)[0]
    case = Case(device, dtype, batch=2, new=1, capacity=64, page_size=16, lengths=[5, 40])

    def step(q, k_cache, v_cache, k, v, seqlens, table):
        return flash_attn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                      block_table=table, causal=True, return_softmax_lse=True)

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    out, lse = compiled(case.q, case.k_cache, case.v_cache, case.k, case.v, case.cache_seqlens, case.block_table)
    case.check(out, lse, causal=True, name="compiled")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_index_tensors(device):
    """Index tensors that are views with a stride (a column of another tensor)
    give the same result as contiguous copies through flash_attn_with_kvcache,
    and the raw op, which reads them as contiguous vectors, refuses them by name."""
    dt = dtypes(device)[0]
    q = torch.randn(2, 1, 2, 32, device=device).to(dt)
    kc, vc = (torch.randn(3, 16, 2, 32, device=device).to(dt) for _ in range(2))
    both = torch.tensor([[5, 1], [9, 0]], dtype=torch.int32, device=device)
    seqlens, batch_idx = both[:, 0], torch.tensor([[2, 7], [0, 7]], dtype=torch.int32, device=device)[:, 0]
    assert not seqlens.is_contiguous() and not batch_idx.is_contiguous()
    call = flash_attn_ext.flash_attn_with_kvcache
    strided = call(q, kc, vc, cache_seqlens=seqlens, cache_batch_idx=batch_idx)
    dense = call(q, kc, vc, cache_seqlens=seqlens.contiguous(), cache_batch_idx=batch_idx.contiguous())
    torch.testing.assert_close(strided, dense, atol=0, rtol=0)
    op = torch.ops.flash_attn_ext.fwd_kvcache
    with pytest.raises(RuntimeError, match="cache_seqlens must be contiguous"):
        op(q, kc, vc, seqlens, None, None, None, 1.0, False, -1, -1)
    with pytest.raises(RuntimeError, match="cache_batch_idx must be contiguous"):
        op(q, kc, vc, seqlens.contiguous(), batch_idx, None, None, 1.0, False, -1, -1)
