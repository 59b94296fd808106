"""The warp-specialized Hopper forward (csrc/cuda/hopper/flash_fwd_sm90_ws_kernel.cuh:
TMA producer warp, mbarrier K/V ring, setmaxnreg, ping-pong consumer
warpgroups), selected by FLASH_ATTN_EXT_SM90_FWD. Most tests run with
`ws_strict`, under which a call the kernel cannot take raises instead of
falling back to the classic kernel: a test that passes ran the
warp-specialized kernel (and one test also checks the kernel names with the
profiler). Against the float64 reference under the project's 2x rule: head
dims 64/128/256, fp16 and bf16, causal or not, sliding windows, GQA/MQA,
seqlen_q != seqlen_k, lengths that are no multiple of the tiles (1, 77, 1000,
4097), and the score features (bias, softcap, ALiBi, sinks); dropout against
the reference with the call's mask, and the mask read back exactly from the
output (V = identity) next to the classic kernel's. Then variable-length
batches (lengths 0, 1, below and above the tiles; windows, features, sinks;
non-finite values in a neighbouring sequence; seqused_k over NaN keys), a
bad switch value, strided inputs and CUDA-graph capture.

Forward only: the backward is the same kernel whichever forward ran.
Skipped without CUDA, on a GPU other than compute capability 9.0, and for
head dims or dtypes a restricted build left out.
"""
from __future__ import annotations

import itertools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the warp-specialized forward runs on compute capability 9.0 (H100/H200) only",
                allow_module_level=True)

import flash_attn_ext  # noqa: E402
from flash_attn_ext import _ops  # noqa: E402
from conftest import assert_close_to_ref, attention_ref, poison_allocator, sdpa_default  # noqa: E402

ENV = "FLASH_ATTN_EXT_SM90_FWD"
TILES_ENV = "FLASH_ATTN_EXT_SM90_FWD_TILES"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
HEADDIMS = [64, 128, 256]
# A restricted build (csrc/cuda/dispatch.h), or a build without sm_90a code
# (flash_launch.h under ws_strict): nothing to test here.
_MISSING = ("not compiled in this build", "no CUDA kernel compiled", "has no Hopper forward")


@pytest.fixture
def ws(monkeypatch):
    monkeypatch.setenv(ENV, "ws_strict")


def fwd(q, k, v, causal=False, window=(-1, -1), bias=None, softcap=0.0, alibi=None, sinks=None, dropout_p=0.0,
        rng_state=None, scale=None):
    """The forward op (out, lse), skipping when the build lacks the kernel."""
    left, right = window
    if causal:
        right = 0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    try:
        with torch.no_grad():
            out, lse, _ = _ops.call_fwd(q, k, v, bias, scale, causal, left, right, False, softcap, alibi, sinks,
                                        dropout_p, rng_state)
    except RuntimeError as exc:
        if any(m in str(exc) for m in _MISSING):
            pytest.skip(f"kernel not in this build: {str(exc).splitlines()[0][:200]}")
        raise
    return out, lse


def randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=torch.float32).to(dtype)


def check(q, k, v, name, causal=False, window=(-1, -1), bias=None, softcap=0.0, alibi=None, sinks=None,
          dropout_p=0.0, rng_state=None, mask=None):
    """out (2x rule) and lse of the forward against the float64 reference."""
    poison_allocator(q.device, q.numel() * q.element_size())
    out, lse = fwd(q, k, v, causal, window, bias, softcap, alibi, sinks, dropout_p, rng_state)
    assert out.shape == q.shape and not torch.isnan(out).any(), f"{name}: NaN in out"
    left, right = window
    if causal:
        right = 0
    kw = dict(bias=bias, softcap=softcap, alibi_slopes=alibi, sinks=sinks, dropout_mask=mask, dropout_p=dropout_p)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal, (left, right),
                                     **{**kw, "bias": None if bias is None else bias.double()})
    low_out, _ = attention_ref(q, k, v, causal, (left, right), upcast=False, **kw)
    baselines = [low_out]
    if bias is None and softcap == 0 and alibi is None and sinks is None and dropout_p == 0:
        baselines.append(sdpa_default(q, k, v, causal=causal, window=(left, right)))
    assert_close_to_ref(out, ref_out, tuple(baselines), name)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{name}: lse +inf rows differ"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        err = (lse[finite].double() - ref_lse[finite]).abs().max().item()
        assert err <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), f"{name}: lse error {err:.3e}"
    return out


# (batch, seqlen_q, seqlen_k, nheads, nheads_k)
SHAPES = [
    (2, 1, 1, 4, 4),
    (1, 77, 77, 4, 2),
    (2, 128, 256, 2, 1),
    (1, 1000, 1000, 3, 3),
    (1, 77, 1000, 4, 1),
    (2, 1000, 77, 2, 2),
    (1, 4097, 4097, 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim,tiles", [(64, "auto"), (128, "auto"), (256, "auto"), (256, "narrow")],
                         ids=["64", "128", "256", "256-narrow"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ws_against_reference(ws, monkeypatch, dtype, headdim, tiles, causal, shape):
    """Plain calls: at head dim 256 the 80-key blocks by default, the 64-key ones (every other
    call's) under FLASH_ATTN_EXT_SM90_FWD_TILES=narrow."""
    monkeypatch.setenv(TILES_ENV, tiles)
    batch, seqlen_q, seqlen_k, nheads, nheads_k = shape
    q = randn(batch, seqlen_q, nheads, headdim, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    check(q, k, v, f"hd{headdim} {shape}", causal=causal)


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("window", [(24, 8), (100, -1), (-1, 0), (0, 0), (300, 300)])
def test_ws_windows(ws, headdim, window):
    q = randn(2, 300, 4, headdim, dtype=torch.bfloat16)
    k = randn(2, 517, 2, headdim, dtype=torch.bfloat16)
    v = randn(2, 517, 2, headdim, dtype=torch.bfloat16)
    check(q, k, v, f"hd{headdim} window {window}", window=window)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(193, 193), (1024, 1024), (383, 383), (1024, 300), (300, 1024)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 0)], ids=["full", "causal", "window64"])
def test_ws_hd64_tiles_aligned_to_the_end(ws, seqlen_q, seqlen_k, window):
    """Head dim 64 plain calls run 192-row tiles aligned to the sequence's end (WsFwdTraits::kAlignEnd):
    the first tile then starts before row 0 (1, 64 or 191 real rows of 192 here), with rows that see
    no key under a causal mask when seqlen_q > seqlen_k; none of those rows may reach out or lse."""
    q = randn(2, seqlen_q, 4, 64, dtype=torch.bfloat16)
    k = randn(2, seqlen_k, 2, 64, dtype=torch.bfloat16)
    v = randn(2, seqlen_k, 2, 64, dtype=torch.bfloat16)
    check(q, k, v, f"hd64 Sq={seqlen_q} Sk={seqlen_k} window {window}", window=window)


def test_ws_query_blocks_without_keys(ws):
    """Causal with seqlen_q > seqlen_k: the first query blocks see no key (out 0, lse +inf or the sink)."""
    q = randn(1, 700, 2, 128, dtype=torch.bfloat16)
    k = randn(1, 100, 2, 128, dtype=torch.bfloat16)
    v = randn(1, 100, 2, 128, dtype=torch.bfloat16)
    out = check(q, k, v, "no keys", causal=True)
    assert (out[:, :600] == 0).all()
    sinks = torch.tensor([0.5, -1.0], device="cuda")
    check(q, k, v, "no keys, sinks", causal=True, sinks=sinks)


FEATURES = [
    pytest.param(dict(bias=True), id="bias"),
    pytest.param(dict(softcap=5.0), id="softcap"),
    pytest.param(dict(alibi="head"), id="alibi-head"),
    pytest.param(dict(alibi="batch"), id="alibi-batch"),
    pytest.param(dict(sinks=True), id="sinks"),
    pytest.param(dict(bias=True, softcap=4.0, alibi="head", sinks=True), id="all"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("case", FEATURES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 9))],
                         ids=["full", "causal", "window"])
def test_ws_score_features(ws, dtype, headdim, case, causal, window):
    batch, seqlen_q, seqlen_k, nheads, nheads_k = 2, 200, 333, 4, 2
    q = randn(batch, seqlen_q, nheads, headdim, dtype=dtype) * 3  # large enough for the cap and slopes to matter
    k = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    bias = (randn(batch, nheads, seqlen_q, seqlen_k, dtype=torch.float32) * 2).to(dtype) if case.get("bias") else None
    alibi = None
    if case.get("alibi") == "head":
        alibi = torch.rand(nheads, device="cuda") * 0.3 + 0.01
    elif case.get("alibi") == "batch":
        alibi = torch.rand(batch, nheads, device="cuda") * 0.3 + 0.01
    sinks = torch.randn(nheads, device="cuda") * 2 if case.get("sinks") else None
    check(q, k, v, f"hd{headdim} {case}", causal=causal, window=window, bias=bias, softcap=case.get("softcap", 0.0),
          alibi=alibi, sinks=sinks)


def test_ws_broadcast_bias(ws):
    """A (1, 1, seqlen_q, seqlen_k) bias expanded over batch and heads (stride 0)."""
    q = randn(2, 150, 4, 128, dtype=torch.bfloat16)
    k = randn(2, 260, 4, 128, dtype=torch.bfloat16)
    v = randn(2, 260, 4, 128, dtype=torch.bfloat16)
    bias = randn(1, 1, 150, 260, dtype=torch.bfloat16).expand(2, 4, 150, 260)
    check(q, k, v, "broadcast bias", bias=bias, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(window=(50, 10), softcap=5.0, alibi=True),
                                  dict(causal=True, sinks=True, bias=True)],
                         ids=["plain", "causal", "window-softcap-alibi", "causal-sinks-bias"])
def test_ws_dropout_against_reference(ws, dtype, headdim, case):
    batch, seqlen_q, seqlen_k, nheads, nheads_k = 2, 190, 301, 4, 2
    p = 0.3
    q = randn(batch, seqlen_q, nheads, headdim, dtype=dtype)
    k = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    v = randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype)
    rng_state = _ops.draw_rng_state("cuda")
    mask = _ops.dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, p)
    bias = randn(batch, nheads, seqlen_q, seqlen_k, dtype=dtype) if case.get("bias") else None
    alibi = torch.rand(nheads, device="cuda") * 0.3 + 0.01 if case.get("alibi") else None
    sinks = torch.randn(nheads, device="cuda") if case.get("sinks") else None
    check(q, k, v, f"dropout hd{headdim} {case}", causal=case.get("causal", False), window=case.get("window", (-1, -1)),
          bias=bias, softcap=case.get("softcap", 0.0), alibi=alibi, sinks=sinks, dropout_p=p, rng_state=rng_state,
          mask=mask)


@pytest.mark.parametrize("headdim", [128, 256])
def test_ws_dropout_mask_is_the_classic_kernels(monkeypatch, headdim):
    """With V = identity each output column is one key's dropped probability, so
    out == 0 exactly where dropout dropped the key: the mask, read back bit for
    bit, must be the one _ops.dropout_mask gives and the classic kernel uses."""
    batch, seqlen_q, nheads = 2, 300, 3
    seqlen_k = headdim  # one output column per key
    p = 0.5
    q = randn(batch, seqlen_q, nheads, headdim, dtype=torch.bfloat16) * 0.2
    k = randn(batch, seqlen_k, nheads, headdim, dtype=torch.bfloat16) * 0.2
    v = torch.eye(seqlen_k, headdim, device="cuda", dtype=torch.bfloat16)[None, :, None, :].expand(
        batch, seqlen_k, nheads, headdim).contiguous()
    rng_state = _ops.draw_rng_state("cuda")
    expected = _ops.dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, p)  # (b, h, sq, sk)
    kept = {}
    for kernel in ("ws_strict", "classic"):
        monkeypatch.setenv(ENV, kernel)
        out, _ = fwd(q, k, v, dropout_p=p, rng_state=rng_state)
        assert not torch.isnan(out).any()
        kept[kernel] = (out[..., :seqlen_k] != 0).permute(0, 2, 1, 3)  # (b, h, sq, sk)
    assert torch.equal(kept["ws_strict"], expected), "the warp-specialized kernel's dropout mask"
    assert torch.equal(kept["classic"], expected), "the classic kernel's dropout mask"


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_matches_classic(monkeypatch, headdim):
    """Same tiles in key order and the same arithmetic per row: the two kernels agree to rounding."""
    q = randn(2, 515, 4, headdim, dtype=torch.bfloat16)
    k = randn(2, 515, 2, headdim, dtype=torch.bfloat16)
    v = randn(2, 515, 2, headdim, dtype=torch.bfloat16)
    results = {}
    for kernel in ("ws_strict", "classic"):
        monkeypatch.setenv(ENV, kernel)
        results[kernel] = fwd(q, k, v, causal=True)
    (o_ws, l_ws), (o_cl, l_cl) = results["ws_strict"], results["classic"]
    assert (o_ws.float() - o_cl.float()).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(l_ws, l_cl, rtol=1e-6, atol=1e-6)


def test_ws_kernel_names(monkeypatch):
    """The profiler sees the warp-specialized kernel under ws and the classic one under classic."""
    from torch.profiler import ProfilerActivity, profile

    q = randn(1, 256, 2, 128, dtype=torch.bfloat16)

    def names():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd(q, q, q, causal=True)
            torch.cuda.synchronize()
        return {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash::" in e.name}

    monkeypatch.setenv(ENV, "ws")
    ws_names = names()
    assert any("flash_fwd_sm90_ws_kernel" in n for n in ws_names), ws_names
    monkeypatch.setenv(ENV, "classic")
    classic_names = names()
    assert any("flash_fwd_sm90_kernel" in n for n in classic_names), classic_names
    assert not any("ws_kernel" in n for n in classic_names), classic_names


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash_fwd_sm90_ws_kernel" in e.name}


def _has_key_block(names, headdim, block_n):
    """Whether a kernel of WsFwdTraits<..., headdim, block_n, ...> is among the (demangled or mangled) names."""
    return any(f", {headdim}, {block_n}," in n or f"Li{headdim}ELi{block_n}E" in n for n in names)


def test_ws_wide_tiles_only_for_plain_calls(ws, monkeypatch):
    """Head dim 256: the 80-key blocks run for plain dense calls (windows included) unless the switch
    says narrow; calls with a score feature or a bias, and variable-length calls, keep 64-key blocks."""
    headdim, wide, narrow = 256, 80, 64
    q = randn(1, 300, 2, headdim, dtype=torch.bfloat16)
    bias = randn(1, 2, 300, 300, dtype=torch.bfloat16)
    cases = {
        "plain": (lambda: fwd(q, q, q, causal=True), wide),
        "window": (lambda: fwd(q, q, q, window=(40, 7)), wide),
        "softcap": (lambda: fwd(q, q, q, softcap=20.0), narrow),
        "bias": (lambda: fwd(q, q, q, bias=bias), narrow),
        "varlen": (lambda: varlen_fwd(q[0], q[0], q[0], [100, 200], [100, 200]), narrow),
    }
    for tiles in ("auto", "wide", "narrow"):
        monkeypatch.setenv(TILES_ENV, tiles)
        for name, (call, expected) in cases.items():
            block_n = narrow if tiles == "narrow" else expected
            names = _kernel_names(call)
            assert _has_key_block(names, headdim, block_n), (tiles, name, names)
            other = wide if block_n == narrow else narrow
            assert not _has_key_block(names, headdim, other), (tiles, name, names)


def _has_consumers(names, headdim, consumers):
    """Whether a kernel of WsFwdTraits<..., headdim, 128, 4, consumers> (head dim 64's stages) is among the names."""
    return any(f", {headdim}, 128, 4, {consumers}>" in n or f"Li{headdim}ELi128ELi4ELi{consumers}EE" in n
               for n in names)


def test_ws_hd64_tiles_by_length(ws, monkeypatch):
    """Head dim 64 without a bias or score features: dense calls run the three-consumer 192-row tiles;
    variable-length calls only where their sequences average 384 query rows or more
    (launch_ws.cuh, sm90_fwd_takes_hd64_plain_tiles), else the two-consumer 128-row tiles; a score
    feature keeps the 128-row tiles. Each call also against the float64 reference."""
    monkeypatch.delenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB", raising=False)  # the device's own tiles
    q = randn(1, 300, 2, 64, dtype=torch.bfloat16)
    names = _kernel_names(lambda: fwd(q, q, q, causal=True))
    assert _has_consumers(names, 64, 3) and not _has_consumers(names, 64, 2), names
    # (seqlens, whether the 192-row tiles run): averages 424, 384, 71, 256.
    for seqlens, three in (([1000, 17, 256], True), ([384, 384, 384], True), ([5, 130, 77], False),
                           ([256, 256], False)):
        q, k, v = (randn(sum(seqlens), 4, 64, dtype=torch.bfloat16) for _ in range(3))
        names = _kernel_names(lambda: varlen_fwd(q, k, v, seqlens, seqlens, causal=True))
        assert _has_consumers(names, 64, 3) == three and _has_consumers(names, 64, 2) != three, (seqlens, names)
        check_varlen(q, k, v, seqlens, seqlens, f"hd64 {seqlens}", causal=True)
    seqlens = [1000, 17, 256]
    q, k, v = (randn(sum(seqlens), 4, 64, dtype=torch.bfloat16) for _ in range(3))
    names = _kernel_names(lambda: varlen_fwd(q, k, v, seqlens, seqlens, softcap=20.0))
    assert _has_consumers(names, 64, 2) and not _has_consumers(names, 64, 3), names


def test_bad_tiles_value(ws, monkeypatch):
    monkeypatch.setenv(TILES_ENV, "huge")
    q = randn(1, 16, 2, 256, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=TILES_ENV):
        fwd(q, q, q)


def varlen_fwd(q, k, v, seqlens_q, seqlens_k, causal=False, window=(-1, -1), seqused_k=None, **kw):
    """flash_attn_varlen_func's (out, lse) for sequences of the given lengths."""
    cu_q = torch.tensor([0, *itertools.accumulate(seqlens_q)], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(seqlens_k)], device="cuda", dtype=torch.int32)
    try:
        with torch.no_grad():
            out, lse, _ = flash_attn_ext.flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max(seqlens_q), max(seqlens_k), causal=causal, window_size=window,
                return_attn_probs=True, seqused_k=seqused_k, **kw)
    except RuntimeError as exc:
        if any(m in str(exc) for m in _MISSING):
            pytest.skip(f"kernel not in this build: {str(exc).splitlines()[0][:200]}")
        raise
    return out, lse


def check_varlen(q, k, v, seqlens_q, seqlens_k, name, causal=False, window=(-1, -1), used=None, **kw):
    """Each sequence's out (2x rule) and lse against the float64 reference on that sequence alone,
    keys limited to used[b] when given (seqused_k)."""
    poison_allocator(q.device, q.numel() * q.element_size())
    seqused_k = None if used is None else torch.tensor(used, device="cuda", dtype=torch.int32)
    out, lse = varlen_fwd(q, k, v, seqlens_q, seqlens_k, causal, window, seqused_k, **kw)
    left, right = window
    if causal:
        right = 0
    ref_kw = {("sinks" if name == "s_aux" else name): value for name, value in kw.items()}
    rows_q = [0, *itertools.accumulate(seqlens_q)]
    rows_k = [0, *itertools.accumulate(seqlens_k)]
    for b, (sq, sk) in enumerate(zip(seqlens_q, seqlens_k)):
        if sq == 0:
            continue
        sk = sk if used is None else min(sk, used[b])
        o = out[rows_q[b]:rows_q[b] + sq]
        assert not torch.isnan(o).any(), f"{name}: NaN in sequence {b}"
        if sk == 0:  # no key (and no sink in these tests): out 0, lse +inf
            assert (o == 0).all() and torch.isinf(lse[:, rows_q[b]:rows_q[b] + sq]).all(), f"{name}: seq {b}"
            continue
        qs = q[rows_q[b]:rows_q[b] + sq][None]
        ks, vs = (t[rows_k[b]:rows_k[b] + sk][None] for t in (k, v))
        ref_out, ref_lse = attention_ref(qs.double(), ks.double(), vs.double(), causal, (left, right), **ref_kw)
        low_out, _ = attention_ref(qs, ks, vs, causal, (left, right), upcast=False, **ref_kw)
        assert_close_to_ref(o[None], ref_out, (low_out,), f"{name} sequence {b}")
        got_lse = lse[:, rows_q[b]:rows_q[b] + sq].double()
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isinf(got_lse), ~finite), f"{name}: lse +inf rows of sequence {b}"
        if finite.any():
            err = (got_lse[finite] - ref_lse[0][finite]).abs().max().item()
            assert err <= 1e-3 * max(1.0, ref_lse[0][finite].abs().max().item()), f"{name}: lse error {err:.3e}"


# (seqlens_q, seqlens_k): empty sequences, one token, lengths below and above
# the tiles (64/128 rows, 64/128 keys), seqlen_q != seqlen_k.
VARLEN_MIXES = [
    ([5, 130, 77], [5, 130, 77]),
    ([0, 1, 300, 64, 129], [3, 0, 300, 129, 128]),
    ([1000, 17, 256], [1000, 257, 1]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mix", range(len(VARLEN_MIXES)))
def test_ws_varlen(ws, dtype, headdim, causal, mix):
    """Variable-length batches through the warp-specialized kernel (ws_strict: it ran), GQA 4/2."""
    seqlens_q, seqlens_k = VARLEN_MIXES[mix]
    q = randn(sum(seqlens_q), 4, headdim, dtype=dtype)
    k = randn(sum(seqlens_k), 2, headdim, dtype=dtype)
    v = randn(sum(seqlens_k), 2, headdim, dtype=dtype)
    check_varlen(q, k, v, seqlens_q, seqlens_k, f"hd{headdim} mix {mix}", causal=causal)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_varlen_features(ws, headdim):
    """Windows and the score features on varlen calls."""
    seqlens_q, seqlens_k = [200, 1, 333], [150, 64, 400]
    q = randn(sum(seqlens_q), 4, headdim, dtype=torch.bfloat16)
    k = randn(sum(seqlens_k), 4, headdim, dtype=torch.bfloat16)
    v = randn(sum(seqlens_k), 4, headdim, dtype=torch.bfloat16)
    check_varlen(q, k, v, seqlens_q, seqlens_k, "window", window=(40, 10))
    check_varlen(q, k, v, seqlens_q, seqlens_k, "softcap alibi", causal=True, softcap=20.0,
                 alibi_slopes=torch.rand(4, device="cuda") * 0.5)
    check_varlen(q, k, v, seqlens_q, seqlens_k, "sinks", s_aux=torch.randn(4, device="cuda"))


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ws_varlen_neighbours_do_not_leak(ws, headdim, causal):
    """A tile that runs past its sequence reads the next sequence's rows (TMA boxes over all rows):
    non-finite values there (q, k and v) must not reach this sequence's output."""
    seqlens = [77, 200, 33]
    rows = [0, *itertools.accumulate(seqlens)]
    q, k, v = (randn(sum(seqlens), 2, headdim, dtype=torch.bfloat16) for _ in range(3))
    for t, bad in ((q, float("nan")), (k, float("inf")), (v, float("nan"))):
        t[rows[1]:rows[2]] = bad  # the middle sequence: its own output is NaN, the others' must not be
    out, _ = varlen_fwd(q, k, v, seqlens, seqlens, causal)
    for b in (0, 2):
        assert torch.isfinite(out[rows[b]:rows[b + 1]]).all(), f"sequence {b} saw its neighbour's values"
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[rows[1]:rows[2]] = 1.0
    check_varlen(q2, k2, v2, seqlens, seqlens, "finite neighbours", causal=causal)
    out2, _ = varlen_fwd(q2, k2, v2, seqlens, seqlens, causal)
    for b in (0, 2):
        assert torch.equal(out[rows[b]:rows[b + 1]], out2[rows[b]:rows[b + 1]]), f"sequence {b}"


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_seqused_k(ws, headdim):
    """seqused_k: keys past each sequence's used length hold NaN (unused cache memory) and must not matter."""
    seqlens_q, seqlens_k, used = [64, 100, 7], [300, 256, 129], [77, 256, 0]
    q = randn(sum(seqlens_q), 4, headdim, dtype=torch.float16)
    k = randn(sum(seqlens_k), 1, headdim, dtype=torch.float16)
    v = randn(sum(seqlens_k), 1, headdim, dtype=torch.float16)
    rows_k = [0, *itertools.accumulate(seqlens_k)]
    for b, u in enumerate(used):
        k[rows_k[b] + u:rows_k[b + 1]] = float("nan")
        v[rows_k[b] + u:rows_k[b + 1]] = float("nan")
    for causal in (False, True):
        check_varlen(q, k, v, seqlens_q, seqlens_k, f"seqused_k causal={causal}", causal=causal, used=used)


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("rate", [0.05, 0.5, 8.0], ids=["slow", "medium", "fast"])
def test_ws_growing_max(ws, headdim, rate):
    """Row maxima that grow block after block (keys are visited from last to first, and earlier keys
    score higher here), by less and by more than the 8 (log2 units) by which the kernel lets a row's
    max lag behind before it rescales O: out and lse stay exact, plain (exact max at head dim 128 and
    256) and with softcap and ALiBi (the lagging max)."""
    seqlen = 1500
    q = randn(1, 200, 2, headdim, dtype=torch.bfloat16)
    k = randn(1, seqlen, 2, headdim, dtype=torch.bfloat16)
    v = randn(1, seqlen, 2, headdim, dtype=torch.bfloat16)
    direction = q.float().mean(dim=(0, 1))  # (heads, dim): scores along it grow with the weight
    weight = rate * torch.arange(seqlen, 0, -1, device="cuda", dtype=torch.float32) / 128 * headdim ** 0.5
    k = (k.float() + weight[None, :, None, None] * direction[None, None] / direction.norm(dim=-1)[None, None, :, None]
         ).to(torch.bfloat16)
    check(q, k, v, f"growing max x{rate}")
    check(q, k, v, f"growing max x{rate}, softcap", softcap=50.0)
    check(q, k, v, f"growing max x{rate}, ALiBi", alibi=torch.rand(2, device="cuda") * 0.01)


def test_bad_switch_value(monkeypatch):
    monkeypatch.setenv(ENV, "fast")
    q = randn(1, 16, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=ENV):
        fwd(q, q, q)


def test_ws_strided_inputs(ws):
    """q, k, v as slices of one packed (batch, seqlen, 3, heads, dim) tensor: row stride 3 * heads * dim."""
    qkv = randn(2, 333, 3, 4, 128, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    check(q, k, v, "packed qkv", causal=True)
    # (batch, heads, seqlen, dim) storage seen as (batch, seqlen, heads, dim): head stride > row stride.
    qt, kt, vt = (randn(2, 4, 200, 64, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    check(qt, kt, vt, "transposed views")


def captured(call):
    """call() captured in a CUDA graph on a side stream, after one warm-up call outside the capture
    (allocations, attribute setting): the graph and the outputs the replays write."""
    call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        outputs = call()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, outputs


def test_ws_cuda_graph(ws):
    """The tensor maps are kernel parameters: a captured forward replays on new values of the same buffers."""
    shape = (2, 400, 4, 128)
    q, k, v = (randn(*shape, dtype=torch.bfloat16) for _ in range(3))
    graph, (out, _) = captured(lambda: fwd(q, k, v, causal=True))
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn(shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = attention_ref(q.double(), k.double(), v.double(), True)
        low, _ = attention_ref(q, k, v, True, upcast=False)
        assert_close_to_ref(out, ref, low, "graph replay")


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_long_sequence(ws, headdim):
    """Many key blocks: every stage of the ring is reused many times (phase parities wrap)."""
    q = randn(1, 256, 2, headdim, dtype=torch.bfloat16)
    k = randn(1, 8192 + 5, 2, headdim, dtype=torch.bfloat16)
    v = randn(1, 8192 + 5, 2, headdim, dtype=torch.bfloat16)
    check(q, k, v, f"long hd{headdim}")


# ----------------------------------------------------------------------------
# The persistent grid (FLASH_ATTN_EXT_SM90_FWD_PERSISTENT, on by default): one
# block per SM takes query blocks from a counter, its producer loading the next
# block's Q and K / V while the consumers finish the current one. The shapes
# below have several times more query blocks than an H200 has SMs, so at head
# dims 64 and 128 every block runs many tiles (head dim 256 runs one block per
# query block either way, and the switch must change nothing there): the K/V ring's and Q's barrier phases carry across
# tiles, tiles with no visible key (seqlen_q > seqlen_k, causal) and tiles past
# a shorter sequence (varlen) are handed over and skipped. Each tile's
# arithmetic is that of a grid of one block per query block, so the two agree
# bit for bit; the persistent result is also checked against the reference.

PERSISTENT_ENV = "FLASH_ATTN_EXT_SM90_FWD_PERSISTENT"

PERSISTENT_CASES = {
    # name: (batch, seqlen_q, seqlen_k, nheads, nheads_k, fwd keyword arguments)
    "causal-gqa": (3, 1500, 1500, 8, 2, dict(causal=True)),
    "full": (2, 1100, 900, 12, 12, dict()),
    "empty-rows": (2, 1200, 300, 8, 4, dict(causal=True)),  # rows below 900 see no key
    "window": (2, 1300, 1300, 8, 8, dict(window=(200, 0))),
    "features": (2, 1000, 1000, 8, 4, dict(causal=True, softcap=15.0, sinks="sinks", alibi="alibi")),
}


def _persistent_pair(monkeypatch, call):
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(PERSISTENT_ENV, setting)
        results[setting] = call()
    return results["1"], results["0"]


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("case", list(PERSISTENT_CASES))
def test_ws_persistent_matches_one_block_per_tile(ws, monkeypatch, headdim, case):
    b, sq, sk, h, hk, kw = PERSISTENT_CASES[case]
    kw = dict(kw)
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.randn(h, device="cuda")
    if kw.get("alibi") == "alibi":
        kw["alibi"] = torch.rand(h, device="cuda") * 0.3
    q = randn(b, sq, h, headdim, dtype=torch.bfloat16)
    k = randn(b, sk, hk, headdim, dtype=torch.bfloat16)
    v = randn(b, sk, hk, headdim, dtype=torch.bfloat16)
    (o_p, l_p), (o_1, l_1) = _persistent_pair(monkeypatch, lambda: fwd(q, k, v, **kw))
    assert torch.equal(o_p, o_1), f"{case}: out differs between the persistent grid and one block per tile"
    assert torch.equal(l_p, l_1), f"{case}: lse differs between the persistent grid and one block per tile"
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    check(q, k, v, f"persistent {case} hd{headdim}", **kw)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_persistent_dropout(ws, monkeypatch, headdim):
    """The dropout mask is a function of (batch, head, row, column) and the seed, not of which block ran
    the tile."""
    q, k, v = (randn(2, 1000, 8, headdim, dtype=torch.bfloat16) for _ in range(3))
    rng = _ops.draw_rng_state("cuda")
    (o_p, l_p), (o_1, l_1) = _persistent_pair(
        monkeypatch, lambda: fwd(q, k, v, causal=True, dropout_p=0.2, rng_state=rng))
    assert torch.equal(o_p, o_1) and torch.equal(l_p, l_1)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_persistent_varlen(ws, monkeypatch, headdim):
    """Many sequences of mixed lengths (0 and 1 included): most query blocks of the grid lie past their
    sequence and are skipped."""
    gen = torch.Generator().manual_seed(7)
    seqlens = [int(x) for x in torch.randint(0, 1500, (40,), generator=gen)] + [0, 1, 1500]
    q = randn(sum(seqlens), 8, headdim, dtype=torch.bfloat16)
    k = randn(sum(seqlens), 2, headdim, dtype=torch.bfloat16)
    v = randn(sum(seqlens), 2, headdim, dtype=torch.bfloat16)
    for causal in (False, True):
        (o_p, l_p), (o_1, l_1) = _persistent_pair(monkeypatch, lambda: varlen_fwd(q, k, v, seqlens, seqlens, causal))
        assert torch.equal(o_p, o_1) and torch.equal(l_p, l_1), f"causal={causal}"
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    check_varlen(q, k, v, seqlens, seqlens, "persistent varlen", causal=True)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_persistent_varlen_tile_list(ws, monkeypatch, headdim):
    """The list of query blocks that hold rows (varlen_tile_list_kernel): more sequences than the list
    kernel takes at a time (1024), empty ones among them, a few long ones (many blocks a head), query
    and key lengths that differ per sequence, GQA, windows. A block missing from the list leaves its
    rows at zero (lse +inf), so the grids agree only if the list holds every block."""
    gen = torch.Generator().manual_seed(11)
    n = 1100
    seqlens_q = [int(x) for x in torch.randint(0, 300, (n,), generator=gen)]
    seqlens_k = [int(x) for x in torch.randint(0, 300, (n,), generator=gen)]
    for i, (lq, lk) in zip((5, 517, 1030, n - 1), ((2100, 1900), (0, 700), (1500, 0), (3000, 3000))):
        seqlens_q[i], seqlens_k[i] = lq, lk
    q = randn(sum(seqlens_q), 4, headdim, dtype=torch.bfloat16)
    k = randn(sum(seqlens_k), 2, headdim, dtype=torch.bfloat16)
    v = randn(sum(seqlens_k), 2, headdim, dtype=torch.bfloat16)
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (300, 40))):
        (o_p, l_p), (o_1, l_1) = _persistent_pair(
            monkeypatch, lambda: varlen_fwd(q, k, v, seqlens_q, seqlens_k, causal, window))
        assert not o_p.isnan().any()
        assert torch.equal(o_p, o_1) and torch.equal(l_p, l_1), f"causal={causal} window={window}"


def test_ws_persistent_varlen_cuda_graph(ws, monkeypatch):
    """The tile list is built inside the captured work: a replay with new sequence lengths (the same
    total and largest length) lists that replay's blocks."""
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    total, longest, h = 4000, 1500, 8
    q, k, v = (randn(total, h, 128, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.zeros(6, dtype=torch.int32, device="cuda")

    def set_lengths(lengths):
        assert sum(lengths) == total and max(lengths) == longest
        cu.copy_(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32))

    def call():
        with torch.no_grad():
            out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True,
                                                                return_attn_probs=True)
        return out, lse

    set_lengths([1500, 100, 900, 1500, 0])
    graph, (out, lse) = captured(call)
    for lengths in ([0, 1500, 1, 1000, 1499], [1500, 1500, 1000, 0, 0], [700, 700, 1500, 600, 500]):
        set_lengths(lengths)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_lse = call()
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse), f"lengths {lengths}"


def test_ws_persistent_cuda_graph(ws, monkeypatch):
    """The counter is zeroed inside the captured work: every replay runs every query block once."""
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    shape = (4, 1500, 8, 128)
    q, k, v = (randn(*shape, dtype=torch.bfloat16) for _ in range(3))
    graph, (out, lse) = captured(lambda: fwd(q, k, v, causal=True))
    for _ in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn(shape, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_lse = fwd(q, k, v, causal=True)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


GROUPS_ENV = "FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS"


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("persistent", ["1", "0"], ids=["persistent", "per-tile"])
def test_ws_causal_groups(ws, monkeypatch, headdim, persistent):
    """FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS=1: a causal call's (batch, head)s in groups a wave wide, each
    group's tiles block-major (the last group narrower when the heads do not divide): the same tiles in
    another order, so the same bits as each (batch, head) in turn -- on the persistent grid, whose
    counter walks the order, and on one block per tile (head dim 256's), whose block index does. A tile
    taken twice or never would leave NaN (the poisoned output) or another head's rows."""
    monkeypatch.setenv(PERSISTENT_ENV, persistent)
    for (b, sq, sk, h, hk), causal in (((3, 700, 900, 5, 1), True), ((7, 1000, 600, 3, 3), True),
                                       ((1, 2100, 2100, 4, 2), True), ((2, 500, 500, 4, 2), False)):
        q = randn(b, sq, h, headdim, dtype=torch.bfloat16)
        k, v = (randn(b, sk, hk, headdim, dtype=torch.bfloat16) for _ in range(2))
        results = {}
        for groups in ("1", "0"):
            monkeypatch.setenv(GROUPS_ENV, groups)
            poison_allocator(q.device, q.numel() * q.element_size())
            results[groups] = fwd(q, k, v, causal=causal)
        (o_1, l_1), (o_0, l_0) = results["1"], results["0"]
        assert not o_1.isnan().any(), f"{(b, sq, sk, h, hk)}"
        assert torch.equal(o_1, o_0) and torch.equal(l_1, l_0), f"{(b, sq, sk, h, hk)} causal={causal}"
    monkeypatch.setenv(GROUPS_ENV, "1")
    check(q, k, v, "causal groups", causal=True)


def test_bad_groups_value(ws, monkeypatch):
    monkeypatch.setenv(GROUPS_ENV, "yes")
    q = randn(1, 300, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=GROUPS_ENV + " must be 0 or 1"):
        fwd(q, q, q, causal=True)


def test_bad_persistent_value(ws, monkeypatch):
    monkeypatch.setenv(PERSISTENT_ENV, "yes")
    q = randn(1, 16, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=PERSISTENT_ENV):
        fwd(q, q, q)
