"""The warp-specialized Hopper backward (csrc/cuda/hopper/flash_bwd_sm90_ws_kernel.cuh:
TMA producer warp with a Q/dO ring, two consumer warpgroups meeting only for
dS, dQ added into dq_accum by TMA reductions), selected by
FLASH_ATTN_EXT_SM90_BWD. The tests run with `ws_strict`, under which a call
the kernel cannot take raises instead of falling back to the classic kernel:
a test that passes ran the warp-specialized backward. Out and every gradient
against the float64 reference under the project's 2x rule
(test_score_features.check_features): head dims 64, 128 and 256 (its
64-key blocks with the head dim split between the consumers), fp16 and bf16,
causal or not, windows, GQA/MQA, seqlen_q != seqlen_k, lengths that are no
multiple of the tiles, the deterministic backward (no dQ in this kernel),
softcap, ALiBi, sinks, dropout (against the reference with the call's own
mask) and a bias with its gradient. Variable-length calls (the kernel's
kVarlen variant) against the per-sequence float64 reference of
test_varlen.check_varlen: length mixes with 0, 1, and lengths below, at and
above the 64-query / 128-key tiles, Sq != Sk per sequence, causal and
windows, GQA/MQA, the score features, seqused_k, rows past the last
sequence, the deterministic backward; NaN/inf in a neighbouring sequence
and in the padding past the last one reach no other gradient; the classic
kernel's varlen gradients, with and without dropout. Then the fallback
(head dim 256's variable-length calls run the classic kernel; ws_strict
names why), and the kernel
names under the profiler.

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
    pytest.skip("the warp-specialized backward runs on compute capability 9.0 (H100/H200) only",
                allow_module_level=True)

import flash_attn_ext  # noqa: E402
from flash_attn_ext import _ops  # noqa: E402
from conftest import assert_close_to_ref, attention_ref, capture_graph, poison_allocator, random_qkv  # noqa: E402
from test_score_features import check_features, random_features  # noqa: E402
from test_varlen import check_varlen, cu_of  # noqa: E402

ENV = "FLASH_ATTN_EXT_SM90_BWD"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
HEADDIMS = [64, 128, 256]
VARLEN_HEADDIMS = [64, 128]  # head dim 256's variable-length calls run the classic kernel
_MISSING = ("not compiled in this build", "no CUDA kernel compiled", "has no Hopper")


@pytest.fixture
def ws(monkeypatch):
    monkeypatch.setenv(ENV, "ws_strict")


def run_or_skip(fn):
    try:
        return fn()
    except RuntimeError as exc:
        if any(m in str(exc) for m in _MISSING):
            pytest.skip(f"kernel not in this build: {str(exc).splitlines()[0][:200]}")
        raise


# (batch, seqlen_q, seqlen_k, nheads, nheads_k): single rows, lengths below,
# at and above the 64/128-row tiles, GQA and MQA, seqlen_q != seqlen_k both ways.
SHAPES = [
    (2, 1, 1, 2, 2),
    (1, 77, 77, 4, 2),
    (2, 128, 128, 2, 1),
    (1, 200, 333, 4, 4),
    (1, 1000, 260, 6, 2),
    (1, 257, 1100, 2, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ws_bwd_against_reference(ws, dtype, headdim, causal, deterministic, shape):
    b, sq, sk, h, hk = shape
    q, k, v = random_qkv(b, sq, sk, h, hk, headdim, dtype, "cuda")
    run_or_skip(lambda: check_features(q, k, v, causal=causal, deterministic=deterministic))


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("window", [(24, 8), (100, -1), (-1, 0), (0, 0), (300, 300)])
def test_ws_bwd_windows(ws, headdim, window):
    q, k, v = random_qkv(2, 390, 517, 4, 2, headdim, torch.bfloat16, "cuda")
    run_or_skip(lambda: check_features(q, k, v, window=window))


FEATURES = [
    pytest.param(dict(softcap=5.0), id="softcap"),
    pytest.param(dict(alibi="head"), id="alibi"),
    pytest.param(dict(sinks=True), id="sinks"),
    pytest.param(dict(softcap=8.0, alibi="batch"), id="softcap-alibi"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("case", FEATURES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 9))],
                         ids=["full", "causal", "window"])
def test_ws_bwd_score_features(ws, dtype, headdim, case, causal, window):
    q, k, v = random_qkv(2, 150, 300, 4, 2, headdim, dtype, "cuda")
    f = random_features(2, 4, "cuda", **case)
    run_or_skip(lambda: check_features(q, k, v, causal=causal, window=window, lse_grad=True, **f))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ws_bwd_dropout_against_reference(ws, dtype, headdim, causal):
    """The gradients of a dropout call equal the reference's with the keep-mask
    the call itself returns (return_attn_probs: flash-attn's S_dmask, negated
    where dropped)."""
    torch.manual_seed(1234)
    q, k, v = random_qkv(1, 130, 200, 2, 1, headdim, dtype, "cuda")
    p = 0.17

    def call():
        return flash_attn_ext.flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_attn_probs=True)

    out, _, s_dmask = run_or_skip(call)
    s_dmask = s_dmask.detach()
    dout = torch.randn_like(out)
    poison_allocator(q.device, 3 * q.numel() * q.element_size())
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    low_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, _ = attention_ref(*ref_in, causal, dropout_mask=s_dmask, dropout_p=p)
    low_out, _ = attention_ref(*low_in, causal, dropout_mask=s_dmask, dropout_p=p, upcast=False)
    assert_close_to_ref(out, ref_out, low_out, "out")
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    low_grads = torch.autograd.grad(low_out, low_in, dout)
    for name, ours, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert not torch.isnan(ours).any(), name
        assert_close_to_ref(ours, ref, low, name)


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_bwd_bias_grad(monkeypatch, headdim):
    """A float attention bias with requires_grad (through the SDPA-compatible
    function): dbias, dq, dk and dv against the float64 reference (PyTorch's
    math path and its default backend set the bar), and dk, dv and dbias
    equal to the classic kernel's, which sums the same products in the same
    order (dq differs by the order of its fp32 reductions)."""
    b, h, sq, sk = 2, 3, 140, 270
    q = torch.randn(b, h, sq, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, h, sk, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, h, sk, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = (torch.randn(b, h, sq, sk, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    leaves = (q, k, v, bias)
    dout = torch.randn(b, h, sq, headdim, device="cuda", dtype=torch.bfloat16)

    def ours(kernel):
        monkeypatch.setenv(ENV, kernel)
        poison_allocator(q.device, 4 * bias.numel() * bias.element_size())
        out = run_or_skip(lambda: flash_attn_ext.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        return out, torch.autograd.grad(out, leaves, dout)

    out, grads = ours("ws_strict")
    _, classic = ours("classic")
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    ref_out = torch.nn.functional.scaled_dot_product_attention(*ref_in[:3], attn_mask=ref_in[3])
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    baselines = []
    for backend in (torch.nn.attention.SDPBackend.MATH, None):
        low_in = [x.detach().clone().requires_grad_() for x in leaves]
        if backend is None:
            low_out = torch.nn.functional.scaled_dot_product_attention(*low_in[:3], attn_mask=low_in[3])
        else:
            with torch.nn.attention.sdpa_kernel(backend):
                low_out = torch.nn.functional.scaled_dot_product_attention(*low_in[:3], attn_mask=low_in[3])
        baselines.append((low_out, torch.autograd.grad(low_out, low_in, dout)))
    assert_close_to_ref(out, ref_out, tuple(o for o, _ in baselines), "out")
    for i, name in enumerate(("dq", "dk", "dv", "dbias")):
        assert not torch.isnan(grads[i]).any(), name
        assert_close_to_ref(grads[i], ref_grads[i], tuple(g[i] for _, g in baselines), name)
    for i, name in ((1, "dk"), (2, "dv"), (3, "dbias")):
        scale = classic[i].float().abs().max().item()
        diff = (grads[i].float() - classic[i].float()).abs().max().item()
        assert diff <= torch.finfo(torch.bfloat16).eps * scale, f"{name}: ws and classic differ by {diff}"


def _random_mix(seed, n):
    """n (seqlen_q, seqlen_k) pairs drawn from lengths that matter to the
    tiles: 0, 1, below / at / above 64 and 128, and longer; Sq != Sk."""
    g = torch.Generator().manual_seed(seed)
    pool = [0, 1, 2, 37, 63, 64, 65, 127, 128, 129, 191, 200, 257, 300]
    pick = lambda: pool[torch.randint(len(pool), (1,), generator=g).item()]  # noqa: E731
    return [pick() for _ in range(n)], [pick() for _ in range(n)]


# (lens_q, lens_k): empty sequences, single rows, partial tiles on both
# sides, Sq != Sk either way, a long query run against few keys, random mixes.
VARLEN_MIXES = [
    pytest.param(([3, 0, 70, 1, 129], [5, 0, 70, 9, 129]), id="mixed"),
    pytest.param(([200, 64, 65, 128], [64, 300, 127, 129]), id="tiles"),
    pytest.param(([1, 1, 1, 1], [40, 7, 130, 1]), id="decode-like"),
    pytest.param(([17, 33, 0], [0, 33, 12]), id="no-keys"),
    pytest.param(_random_mix(11, 7), id="random-a"),
    pytest.param(_random_mix(12, 9), id="random-b"),
]
VARLEN_MASKS = [(False, (-1, -1)), (True, (-1, -1)), (False, (16, 4)), (False, (100, 0))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", VARLEN_HEADDIMS)
@pytest.mark.parametrize("causal,window", VARLEN_MASKS, ids=["full", "causal", "window", "window-causal"])
@pytest.mark.parametrize("lens", VARLEN_MIXES)
def test_ws_bwd_varlen(ws, dtype, headdim, causal, window, lens):
    lens_q, lens_k = lens
    run_or_skip(lambda: check_varlen(lens_q, lens_k, 4, 2, headdim, dtype, "cuda", causal=causal, window=window))


VARLEN_CASES = [
    pytest.param(dict(deterministic=True), id="deterministic"),
    pytest.param(dict(deterministic=True, causal=True, extra_q_rows=5), id="deterministic-causal-outside"),
    pytest.param(dict(softcap=5.0, alibi="batch", causal=True), id="softcap-alibi"),
    pytest.param(dict(sinks=True, window=(24, 0), lse_grad=True), id="sinks-window-dlse"),
    pytest.param(dict(used_k=[10, 0, 100, 129], causal=True), id="seqused_k"),
    pytest.param(dict(extra_q_rows=5, lse_grad=True), id="rows-outside"),
    pytest.param(dict(nheads_k=1, causal=True), id="mqa"),
]


@pytest.mark.parametrize("headdim", VARLEN_HEADDIMS)
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_ws_bwd_varlen_features(ws, headdim, case):
    case = dict(case)
    nheads_k = case.pop("nheads_k", 2)
    run_or_skip(lambda: check_varlen([20, 64, 130, 1], [30, 5, 140, 200], 4, nheads_k, headdim, torch.bfloat16,
                                     "cuda", **case))


def _varlen_grads(q, k, v, dout, cu_q, cu_k, max_q, max_k, **kw):
    out = run_or_skip(lambda: flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw))
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("headdim", VARLEN_HEADDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ws_bwd_varlen_neighbours_do_not_leak(ws, headdim, causal, deterministic):
    """NaN / inf in one sequence's q, k, v and dout, and in the padding rows
    past the last sequence (read by the boxes that run past a sequence, not
    by any sequence), change no other sequence's gradients: dk and dv equal
    (bitwise: each key block sums its query blocks in a fixed order) those
    of a call where the same rows are finite, dq within the rounding of its
    fp32 reductions (exactly without atomics); the padding rows' gradients
    are 0."""
    lens_q, lens_k = [70, 1, 129, 45, 64, 0, 100], [90, 30, 129, 200, 63, 17, 5]
    bad = 3  # the poisoned sequence, between partial tiles on both sides
    pad_q, pad_k = 37, 61
    total_q, total_k = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    cu_q, cu_k = cu_of(lens_q, "cuda"), cu_of(lens_k, "cuda")
    rows_q, rows_k = cu_q.tolist(), cu_k.tolist()
    torch.manual_seed(5)
    dtype = torch.bfloat16
    q0 = torch.randn(total_q, 4, headdim, device="cuda", dtype=dtype)
    k0 = torch.randn(total_k, 2, headdim, device="cuda", dtype=dtype)
    v0 = torch.randn(total_k, 2, headdim, device="cuda", dtype=dtype)
    dout0 = torch.randn(total_q, 4, headdim, device="cuda", dtype=dtype)
    q1, k1, v1, dout1 = (t.clone() for t in (q0, k0, v0, dout0))
    for t, val, rows in ((q1, float("nan"), rows_q), (dout1, float("inf"), rows_q), (k1, float("inf"), rows_k),
                         (v1, float("nan"), rows_k)):
        t[rows[bad]:rows[bad + 1]] = val
        t[rows[-1]:] = -val if val == float("inf") else val
    kw = dict(causal=causal, deterministic=deterministic)
    max_q, max_k = max(lens_q), max(lens_k)
    clean = _varlen_grads(*(t.requires_grad_() for t in (q0, k0, v0)), dout0, cu_q, cu_k, max_q, max_k, **kw)
    poisoned = _varlen_grads(*(t.requires_grad_() for t in (q1, k1, v1)), dout1, cu_q, cu_k, max_q, max_k, **kw)
    for name, a, b, rows in zip(("dq", "dk", "dv"), poisoned, clean, (rows_q, rows_k, rows_k)):
        assert (a[rows[-1]:] == 0).all(), f"{name}: padding rows past the last sequence"
        for s in range(len(lens_q)):
            if s == bad or rows[s] == rows[s + 1]:
                continue
            x, y = a[rows[s]:rows[s + 1]].float(), b[rows[s]:rows[s + 1]].float()
            assert torch.isfinite(x).all(), f"{name}: non-finite in sequence {s}"
            if name == "dq" and not deterministic:
                tol = 4 * torch.finfo(dtype).eps * max(y.abs().max().item(), 1e-6)
                assert (x - y).abs().max().item() <= tol, f"{name}: sequence {s} differs"
            else:
                assert torch.equal(x, y), f"{name}: sequence {s} differs"


@pytest.mark.parametrize("headdim", VARLEN_HEADDIMS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["plain", "dropout"])
def test_ws_bwd_varlen_matches_classic(monkeypatch, headdim, dropout_p):
    """The varlen gradients of the two backward kernels (the same products
    per key block, the same dropout draws) agree to rounding, GQA included."""
    lens_q, lens_k = [130, 0, 1, 77, 256, 63], [100, 5, 129, 77, 300, 0]
    cu_q, cu_k = cu_of(lens_q, "cuda"), cu_of(lens_k, "cuda")
    torch.manual_seed(9)
    q = torch.randn(sum(lens_q), 4, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    results = {}
    for kernel in ("ws_strict", "classic"):
        monkeypatch.setenv(ENV, kernel)
        torch.manual_seed(3)  # the same dropout draws for both
        results[kernel] = _varlen_grads(q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                        dropout_p=dropout_p)
    for name, a, b in zip(("dq", "dk", "dv"), results["ws_strict"], results["classic"]):
        assert torch.isfinite(a).all(), name
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4 * torch.finfo(torch.bfloat16).eps * scale, name


ORDER_ENV = "FLASH_ATTN_EXT_SM90_BWD_ORDER"


def _assert_same_grads(new, old, deterministic, what):
    """The same key blocks in another order or grid: dk and dv bitwise (each key block sums its query
    blocks in a fixed order, whichever SM runs it), dq bitwise without atomics, else within the
    rounding of its fp32 reductions' order."""
    for name, a, b in zip(("dq", "dk", "dv"), new, old):
        assert torch.isfinite(a).all(), f"{what}: {name}"
        if name == "dq" and not deterministic:
            tol = 4 * torch.finfo(a.dtype).eps * max(b.float().abs().max().item(), 1e-6)
            assert (a.float() - b.float()).abs().max().item() <= tol, f"{what}: {name}"
        else:
            assert torch.equal(a, b), f"{what}: {name}"


@pytest.mark.parametrize("headdim", VARLEN_HEADDIMS)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (200, 30))],
                         ids=["full", "causal", "window"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ws_bwd_varlen_key_tile_list(ws, monkeypatch, headdim, causal, window, deterministic):
    """Variable-length calls run one block per entry of the list of key blocks that hold rows
    (cuda/tile_list.cuh): more sequences than the list kernel takes at a time
    (1024), empty ones (no queries, no keys, neither), a few long ones (many key blocks a head, several
    levels), Sq != Sk per sequence, GQA. Against the grid over the largest sequence's key blocks
    (ORDER=grid): a key block missing from the list leaves its dK / dV rows at zero, one listed twice
    doubles them. dk and dv bitwise (each key block sums its query blocks in a fixed order, whichever
    SM runs it); dq bitwise without atomics, else within the rounding of its fp32 reductions' order."""
    g = torch.Generator().manual_seed(21)
    n = 1100
    lens_q = [int(x) for x in torch.randint(0, 300, (n,), generator=g)]
    lens_k = [int(x) for x in torch.randint(0, 300, (n,), generator=g)]
    for i, (lq, lk) in zip((3, 400, 1027, 1050, n - 1), ((1900, 2100), (0, 900), (700, 0), (0, 0), (2500, 2500))):
        lens_q[i], lens_k[i] = lq, lk
    cu_q, cu_k = cu_of(lens_q, "cuda"), cu_of(lens_k, "cuda")
    torch.manual_seed(4)
    q = torch.randn(sum(lens_q), 4, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, headdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    kw = dict(causal=causal, window_size=window, deterministic=deterministic)
    grads = {}
    for order in ("grid", "list"):
        monkeypatch.setenv(ORDER_ENV, order)
        poison_allocator(q.device, 8 * q.numel() * q.element_size())
        grads[order] = _varlen_grads(q, k, v, dout, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    _assert_same_grads(grads["list"], grads["grid"], deterministic, f"causal={causal} window={window}")
    rows_k = cu_k.tolist()
    assert grads["list"][1][rows_k[n - 1]:rows_k[n]].abs().amax() > 0, "the longest sequence's dk is zero"


def test_ws_bwd_varlen_key_tile_list_cuda_graph(ws, monkeypatch):
    """The key-block list is built inside the captured work: a replay with new sequence lengths (the
    same total and largest length) lists that replay's blocks and matches an eager call."""
    monkeypatch.setenv(ORDER_ENV, "list")
    total, longest, h, d = 3000, 1200, 4, 128
    torch.manual_seed(8)
    q, k, v, dout = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.zeros(5, dtype=torch.int32, device="cuda")
    scale = d ** -0.5

    def set_lengths(lengths):
        assert sum(lengths) == total and max(lengths) == longest
        cu.copy_(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32))

    def call():
        out, lse, _ = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True,
                                                            return_attn_probs=True)
        empty = lse.new_empty((0,))
        dq, dk, dv, _ = run_or_skip(lambda: _ops.varlen_bwd(dout, q, k, v, out, lse, empty, None, cu, cu, None,
                                                            longest, longest, scale, True, -1, 0, False))
        return dq, dk, dv

    set_lengths([1200, 100, 500, 1200])
    graph, grads = capture_graph(call)
    for lengths in ([0, 1200, 600, 1200], [599, 1200, 1, 1200], [1200, 1200, 600, 0]):
        set_lengths(lengths)
        for t in grads:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = call()
        for name, a, b in zip(("dq", "dk", "dv"), grads, expected):
            assert torch.isfinite(a).all(), f"{lengths}: {name}"
            tol = 4 * torch.finfo(a.dtype).eps * max(b.float().abs().max().item(), 1e-6)
            assert (a.float() - b.float()).abs().max().item() <= tol, f"{lengths}: {name}"


def test_ws_bwd_bad_order_value(monkeypatch):
    lens = [100, 300]
    cu = cu_of(lens, "cuda")
    q, k, v = (torch.randn(sum(lens), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = run_or_skip(lambda: flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=True))
    monkeypatch.setenv(ORDER_ENV, "lpt")
    with pytest.raises(RuntimeError, match=ORDER_ENV + " must be list or grid"):
        out.sum().backward()


GROUPS_ENV = "FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS"


@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ws_bwd_causal_groups(ws, monkeypatch, headdim, deterministic):
    """FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS=1: a causal call's key blocks in groups of (batch, head)s a wave
    wide, block-major within a group: the same blocks as each (batch, head)'s in turn, so dk and dv
    bitwise, dq bitwise without atomics (else to the rounding of its reductions' order). A block run
    twice would double its dK / dV, one never run leave the poisoned allocator's NaN."""
    for (b, sq, sk, h, hk) in ((3, 700, 900, 5, 1), (7, 1000, 600, 3, 3), (1, 1100, 1100, 4, 2)):
        q, k, v = random_qkv(b, sq, sk, h, hk, headdim, torch.bfloat16, "cuda")
        dout = torch.randn(b, sq, h, headdim, device="cuda", dtype=torch.bfloat16)
        grads = {}
        for groups in ("1", "0"):
            monkeypatch.setenv(GROUPS_ENV, groups)
            poison_allocator(q.device, 4 * q.numel() * q.element_size())
            out = run_or_skip(lambda: flash_attn_ext.flash_attn_func(q, k, v, causal=True,
                                                                     deterministic=deterministic))
            grads[groups] = torch.autograd.grad(out, (q, k, v), dout)
        _assert_same_grads(grads["1"], grads["0"], deterministic, f"{(b, sq, sk, h, hk)}")
    monkeypatch.setenv(GROUPS_ENV, "1")
    run_or_skip(lambda: check_features(q, k, v, causal=True, deterministic=deterministic))


def test_ws_bwd_strict_names_what_it_cannot_take(monkeypatch):
    """Variable-length calls at head dim 256 run the classic backward; under ws_strict they raise
    saying why (dense calls at 256 run the warp-specialized one)."""
    lens = [70, 0, 130]
    q, k, v = (torch.randn(sum(lens), 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cu = cu_of(lens, "cuda")

    def call():
        return flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)

    out = run_or_skip(call)
    monkeypatch.setenv(ENV, "ws_strict")
    with pytest.raises(RuntimeError, match="variable-length calls have head dims 64 and 128 only"):
        out.sum().backward()
    monkeypatch.setenv(ENV, "ws")
    out = call()
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_ws_bwd_bad_switch(monkeypatch):
    q, k, v = random_qkv(1, 64, 64, 2, 2, 128, torch.bfloat16, "cuda")
    out = run_or_skip(lambda: flash_attn_ext.flash_attn_func(q, k, v))
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(RuntimeError, match="FLASH_ATTN_EXT_SM90_BWD must be classic, ws or ws_strict"):
        out.sum().backward()


@pytest.mark.parametrize("headdim", HEADDIMS)
def test_ws_bwd_matches_classic(monkeypatch, headdim):
    """The two backward kernels compute the same products per key block: they agree to rounding."""
    q, k, v = random_qkv(2, 515, 515, 4, 2, headdim, torch.bfloat16, "cuda")
    dout = torch.randn(2, 515, 4, headdim, device="cuda", dtype=torch.bfloat16)
    results = {}
    for kernel in ("ws_strict", "classic"):
        monkeypatch.setenv(ENV, kernel)
        out = run_or_skip(lambda: flash_attn_ext.flash_attn_func(q, k, v, causal=True))
        results[kernel] = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip(("dq", "dk", "dv"), results["ws_strict"], results["classic"]):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4 * torch.finfo(torch.bfloat16).eps * scale, name


def test_ws_bwd_kernel_names(monkeypatch):
    """The profiler sees the warp-specialized backward under ws and the classic one under classic."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = random_qkv(1, 256, 256, 2, 2, 128, torch.bfloat16, "cuda")

    def names():
        out = run_or_skip(lambda: flash_attn_ext.flash_attn_func(q, k, v, causal=True))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out.sum().backward()
            torch.cuda.synchronize()
        return {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash::" in e.name}

    monkeypatch.setenv(ENV, "ws")
    ws_names = names()
    assert any("flash_bwd_sm90_ws_kernel" in n for n in ws_names), ws_names
    monkeypatch.setenv(ENV, "classic")
    classic_names = names()
    assert any("flash_bwd_sm90_kernel" in n for n in classic_names), classic_names
    assert not any("ws_kernel" in n for n in classic_names), classic_names
