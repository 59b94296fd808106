"""flash_attn_varlen_func and its packed variants (issue 10, section 1), on
every device: random mixes of sequence lengths (0, 1, below and above the
tile sizes, seqlen_q != seqlen_k), against the float64 reference run on each
sequence alone, under the 2x rule, out, lse and every gradient; causal and
windows (aligned per sequence), GQA, the score features, seqused_k, paged
keys (block_table) with several page sizes; the errors that name a bad
argument; the ops under opcheck and torch.compile."""
from __future__ import annotations

import pytest
import torch

import flash_attn_ext
from conftest import (DEVICES, assert_close_to_ref, attention_ref, device_dtype_params, poison_allocator, sdpa_default,
                      sinks_grad_from)


def cu_of(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)


def random_rows(total, nheads, headdim, dtype, device):
    return torch.randn(total, nheads, headdim, device=device).to(dtype).requires_grad_()


def per_sequence_ref(q, k, v, lens_q, lens_k, used_k, causal, window, upcast, softmax_scale=None, softcap=0.0,
                     alibi_slopes=None, sinks=None, sdpa=False):
    """attention_ref on each sequence alone, concatenated: out (total_q, H, D)
    and lse (H, total_q). Rows of q past the last sequence get 0 / +inf.
    sdpa: PyTorch's default SDPA backend in the dtype instead (no score
    features; lse is then None), the second baseline of the 2x rule."""
    outs, lses = [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        lu = lk if used_k is None else used_k[b]
        qs, ks, vs = q[q0:q0 + lq][None], k[k0:k0 + lu][None], v[k0:k0 + lu][None]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b:b + 1] if alibi_slopes.dim() == 2 else alibi_slopes
        if sdpa:
            o, lse = sdpa_default(qs, ks, vs, causal, window, softmax_scale), None
        else:
            o, lse = attention_ref(qs, ks, vs, causal, window, softmax_scale=softmax_scale, upcast=upcast,
                                   softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        outs.append(o[0])
        lses.append(lse[0] if lse is not None else torch.zeros(q.shape[1], lq, device=q.device))
        q0 += lq
        k0 += lk
    if q0 < q.shape[0]:  # rows outside every sequence
        outs.append(torch.zeros_like(q[q0:]).to(outs[0].dtype if outs else q.dtype))
        lses.append(torch.full((q.shape[1], q.shape[0] - q0), float("inf"), dtype=torch.float64, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def check_varlen(lens_q, lens_k, nheads, nheads_k, headdim, dtype, device, causal=False, window=(-1, -1),
                 used_k=None, softcap=0.0, alibi=None, sinks=False, extra_q_rows=0, deterministic=False,
                 page_size=None, lse_grad=False):
    """lse_grad: the loss also weighs lse (random weights on its finite
    entries): every backward, the sinks' included, then takes dlse."""
    total_q, total_k = sum(lens_q) + extra_q_rows, sum(lens_k)
    q = random_rows(total_q, nheads, headdim, dtype, device)
    k = random_rows(total_k, nheads_k, headdim, dtype, device)
    v = random_rows(total_k, nheads_k, headdim, dtype, device)
    with torch.no_grad():
        q.mul_(2)  # scores large enough for softcap and the slopes to matter
    batch = len(lens_q)
    slopes = None
    if alibi == "head":
        slopes = torch.rand(nheads, device=device) * 0.3 + 0.01
    elif alibi == "batch":
        slopes = torch.rand(batch, nheads, device=device) * 0.3 + 0.01
    sink = (torch.randn(nheads, device=device) * 2).requires_grad_() if sinks else None
    cu_q, cu_k = cu_of(lens_q, device), cu_of(lens_k, device)
    seqused = torch.tensor(used_k, dtype=torch.int32, device=device) if used_k is not None else None
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)

    k_in, v_in, block_table, cu_k_in = k, v, None, cu_k
    if page_size is not None:
        # The same keys in a paged cache: every sequence's pages at random
        # places of a pool, with spare blocks in between.
        pages = [-(-lk // page_size) for lk in lens_k]
        width = max(max(pages, default=1), 1)
        num_blocks = sum(pages) + 3
        perm = torch.randperm(num_blocks).tolist()
        block_table = torch.zeros(batch, width, dtype=torch.int32)
        k_cache = torch.randn(num_blocks, page_size, nheads_k, headdim, device=device).to(dtype)
        v_cache = torch.randn_like(k_cache)
        k0, used = 0, 0
        for b, lk in enumerate(lens_k):
            for j in range(pages[b]):
                blk = perm[used]
                used += 1
                block_table[b, j] = blk
                n = min(page_size, lk - j * page_size)
                k_cache[blk, :n] = k.detach()[k0 + j * page_size:k0 + j * page_size + n]
                v_cache[blk, :n] = v.detach()[k0 + j * page_size:k0 + j * page_size + n]
            k0 += lk
        k_in, v_in = k_cache.requires_grad_(), v_cache.requires_grad_()
        block_table = block_table.to(device)

    poison_allocator(device, 4 * q.numel() * q.element_size())
    out, lse, _ = flash_attn_ext.flash_attn_varlen_func(
        q, k_in, v_in, cu_q, cu_k_in, max_q, max_k, causal=causal, window_size=window, softcap=softcap,
        alibi_slopes=slopes, deterministic=deterministic, return_attn_probs=True, block_table=block_table,
        seqused_k=seqused, s_aux=sink)
    assert out.shape == q.shape and lse.shape == (nheads, total_q)
    assert not torch.isnan(out).any()

    leaves = [q, k, v] + ([sink] if sinks else [])
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    low_in = [x.detach().clone().requires_grad_() for x in leaves]

    def ref(xs, upcast):
        return per_sequence_ref(xs[0], xs[1], xs[2], lens_q, lens_k, used_k, causal, window, upcast,
                                softcap=softcap, alibi_slopes=slopes, sinks=xs[3] if sinks else None)

    ref_out, ref_lse = ref(ref_in, True)
    low_out, low_lse = ref(low_in, False)
    # The rule's second baseline, PyTorch's default SDPA backend, where it
    # computes the same thing (no score features, dropout or sinks).
    plain = not (softcap or alibi or sinks or lse_grad)
    sdpa_in = [x.detach().clone().requires_grad_() for x in leaves[:3]]
    sdpa_out = (per_sequence_ref(*sdpa_in, lens_q, lens_k, used_k, causal, window, False, sdpa=True)[0]
                if plain else None)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf rows differ"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        err = (lse[finite].double() - ref_lse[finite]).abs().max().item()
        assert err <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {err}"
    assert_close_to_ref(out, ref_out, (low_out, sdpa_out), "out")

    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(~torch.isfinite(lse), 0.0)
    outs, ref_outs, low_outs = (out, lse), (ref_out, ref_lse), (low_out, low_lse)
    douts, ref_douts, low_douts = (dout, dlse), (dout.double(), dlse.double()), (dout, dlse.to(low_lse.dtype))
    n = 2 if lse_grad else 1
    poison_allocator(device, 4 * q.numel() * q.element_size())
    our_leaves = [q, k_in, v_in] + ([sink] if sinks else [])
    grads = list(torch.autograd.grad(outs[:n], our_leaves, douts[:n]))
    if page_size is not None:
        # Gradients of the paged caches back in the sequences' key order.
        for i in (1, 2):
            g, rows, k0 = grads[i], [], 0
            for b, lk in enumerate(lens_k):
                for j in range(0, lk, page_size):
                    n = min(page_size, lk - j)
                    rows.append(g[block_table[b, j // page_size], :n])
            grads[i] = torch.cat(rows, 0) if rows else g.new_zeros(0, nheads_k, headdim)
    ref_grads = torch.autograd.grad(ref_outs[:n], ref_in, ref_douts[:n], allow_unused=True)
    low_grads = torch.autograd.grad(low_outs[:n], low_in, low_douts[:n], allow_unused=True)
    sdpa_grads = (torch.autograd.grad(sdpa_out, sdpa_in, dout, allow_unused=True) if sdpa_out is not None
                  and sdpa_out.requires_grad else (None,) * 3)
    for name, ours, r, low, low2 in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, low_grads,
                                        sdpa_grads + (None,)):
        r = torch.zeros_like(ref_in[0 if name == "dq" else 1]) if r is None else r
        low = torch.zeros_like(r, dtype=ours.dtype) if low is None else low
        assert ours.shape == r.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(r.shape)}"
        baselines = (low, low2)
        if name == "dsinks":
            # D from the output rounded to the dtype (sinks_grad_from, conftest.py):
            # the formula on PyTorch's rounded output and on the exact one, as
            # baselines beside PyTorch's composite. (Without them, about one draw
            # in 400 of sinks-window in fp16 on the CPU failed: the error was all
            # the output's rounding, 3.2x the composite's on that draw.)
            def grad_of(o, lse_of):
                return sinks_grad_from(sink.detach(), dout[None], o.detach().to(dtype)[None], lse_of.detach()[None],
                                       dlse[None] if lse_grad else None)

            baselines = (low, grad_of(low_out, low_lse), grad_of(ref_out, ref_lse))
        slack = max(1e-5, torch.finfo(dtype).eps) if name == "dsinks" else 1e-5
        assert_close_to_ref(ours, r, baselines, name, slack=slack)


# Length mixes: empty sequences, single rows, lengths below and above the
# CPU / CUDA tile sizes (64 / 128 rows).
MIXES = [
    pytest.param(([3, 0, 70, 1, 129], [5, 0, 70, 9, 129]), id="mixed"),
    pytest.param(([200], [64]), id="one-long-q"),
    pytest.param(([1, 1, 1, 1], [40, 7, 130, 1]), id="decode-like"),
    pytest.param(([17, 33, 0], [0, 33, 12]), id="no-keys"),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("lens", MIXES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (16, 4))],
                         ids=["full", "causal", "window"])
def test_varlen_matches_reference(device, dtype, lens, causal, window):
    lens_q, lens_k = lens
    check_varlen(lens_q, lens_k, 4, 2, 64, dtype, device, causal=causal, window=window)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("headdim", [32, 96, 128, 256])
def test_varlen_head_dims(device, dtype, headdim):
    check_varlen([40, 130], [90, 130], 2, 1, headdim, dtype, device, causal=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", [
    pytest.param(dict(softcap=5.0, alibi="batch"), id="softcap-alibi"),
    pytest.param(dict(sinks=True, window=(24, 0)), id="sinks-window"),
    pytest.param(dict(used_k=[10, 0, 100], causal=True), id="seqused_k"),
    pytest.param(dict(extra_q_rows=5), id="rows-outside"),
    pytest.param(dict(deterministic=True, causal=True), id="deterministic"),
    pytest.param(dict(sinks=True, lse_grad=True, extra_q_rows=5), id="sinks-lse-grad"),
    pytest.param(dict(sinks=True, lse_grad=True, deterministic=True, causal=True), id="sinks-lse-grad-deterministic"),
])
def test_varlen_features(device, dtype, case):
    check_varlen([20, 64, 130], [30, 5, 140], 4, 1, 64, dtype, device, **case)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_varlen_sinks_without_keys(device, dtype, deterministic):
    """Sinks where a sequence has no key (its rows: out 0, lse = the sink, and
    a sinks' gradient of dlse), rows outside every sequence and a gradient
    into lse: the sinks' gradient from the backward's D of every row."""
    check_varlen([17, 33, 0, 9], [0, 33, 12, 40], 4, 2, 64, dtype, device, causal=True, sinks=True, lse_grad=True,
                 extra_q_rows=3, deterministic=deterministic)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
def test_varlen_paged(device, dtype, page_size):
    check_varlen([9, 1, 70], [33, 300, 70], 4, 2, 64, dtype, device, causal=True, page_size=page_size)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_packed_variants(device):
    dtype = torch.bfloat16
    lens = [7, 66, 0, 3]
    cu = cu_of(lens, device)
    total = sum(lens)
    qkv = torch.randn(total, 3, 4, 64, device=device, dtype=dtype)
    out = flash_attn_ext.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    expected = flash_attn_ext.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max(lens), max(lens),
                                                     causal=True)
    assert torch.equal(out, expected)
    out_kv = flash_attn_ext.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, max(lens), max(lens),
                                                            causal=True)
    assert torch.equal(out_kv, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_dense_per_sequence(device):
    """Each sequence of a varlen call gives exactly what the dense path gives
    for it alone (the same kernels, the same tiles)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens_q, lens_k = [33, 100], [50, 100]
    q = torch.randn(sum(lens_q), 4, 64, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, 64, device=device, dtype=dtype)
    v = torch.randn_like(k)
    out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_of(lens_q, device), cu_of(lens_k, device), 100, 100,
                                                causal=True)
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        dense = flash_attn_ext.flash_attn_func(q[None, q0:q0 + lq], k[None, k0:k0 + lk], v[None, k0:k0 + lk],
                                               causal=True)
        torch.testing.assert_close(out[q0:q0 + lq], dense[0], atol=0, rtol=0)
        q0, k0 = q0 + lq, k0 + lk


def _args(device, lens=(3, 5)):
    cu = cu_of(list(lens), device)
    q = torch.randn(sum(lens), 2, 32, device=device)
    return q, q.clone(), q.clone(), cu


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_bad_input(device):
    q, k, v, cu = _args(device)
    f = flash_attn_ext.flash_attn_varlen_func
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        f(q, k, v, cu.long(), cu, 5, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be 1-D"):
        f(q, k, v, cu, cu[:-1], 5, 5)
    with pytest.raises(RuntimeError, match="varlen q must be 3-D"):
        f(q[None], k, v, cu, cu, 5, 5)
    with pytest.raises(RuntimeError, match="seqused_k must be 1-D"):
        f(q, k, v, cu, cu, 5, 5, seqused_k=torch.ones(3, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        f(q, k, v, cu, cu, 5.0, 5)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        f(q, k[None], v[None], cu, cu, 5, 5, block_table=torch.zeros(2, 1, device=device))
    with pytest.raises(RuntimeError, match="same device|device of q"):
        f(q, k, v, cu.cpu() if device != "cpu" else cu.to("meta"), cu, 5, 5)
    if device == "cpu":  # values are checked where reading them costs no synchronisation
        with pytest.raises(RuntimeError, match="more than max_seqlen_q"):
            f(q, k, v, cu, cu, 4, 5)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            f(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), cu, 5, 5)
        with pytest.raises(RuntimeError, match="exceeds the number of rows"):
            f(q, k, v, torch.tensor([0, 3, 9], dtype=torch.int32), cu, 9, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: values on the device")
def test_varlen_bad_values_cuda(monkeypatch):
    """Out-of-range lengths on the device: clamped by the kernels (no fault,
    no NaN), and named when FLASH_ATTN_EXT_DEBUG_CHECKS=1."""
    q, k, v, _ = _args("cuda")
    q, k, v = (t.bfloat16() for t in (q, k, v))
    bad = torch.tensor([0, 6, 100], dtype=torch.int32, device="cuda")
    out = flash_attn_ext.flash_attn_varlen_func(q, k, v, bad, bad, 1000, 1000)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    monkeypatch.setenv("FLASH_ATTN_EXT_DEBUG_CHECKS", "1")
    with pytest.raises(RuntimeError, match="exceeds the number of rows"):
        flash_attn_ext.flash_attn_varlen_func(q, k, v, bad, bad, 1000, 1000)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_opcheck(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [3, 0, 20]
    cu = cu_of(lens, device)
    q = torch.randn(sum(lens), 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens), 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens), 2, 32, device=device, dtype=dtype, requires_grad=True)
    args = (q, k, v, cu, cu, None, 20, 20, 0.2, True, -1, -1, False)
    torch.library.opcheck(torch.ops.flash_attn_ext.varlen_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse, residual = torch.ops.flash_attn_ext.varlen_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                residual.detach(), torch.randn_like(lse), cu, cu, None, 20, 20, 0.2, True, -1, -1, False)
    for return_softmax_d in (False, True):
        torch.library.opcheck(torch.ops.flash_attn_ext.varlen_bwd.default,
                              bwd_args + (0.0, None, 0.0, None, return_softmax_d),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_compile_fullgraph(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [5, 17]
    cu = cu_of(lens, device)
    q = torch.randn(sum(lens), 2, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens), 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens), 2, 32, device=device, dtype=dtype, requires_grad=True)

    def step(q, k, v):
        return flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, step(q, k, v), atol=0, rtol=0)
    out.sum().backward()
    assert q.grad is not None and not torch.isnan(q.grad).any()


def test_varlen_gradcheck_fp64():
    lens_q, lens_k = [3, 0, 4], [2, 3, 5]
    q = torch.randn(sum(lens_q), 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), 1, 8, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = cu_of(lens_q, "cpu"), cu_of(lens_k, "cpu")
    sink = torch.randn(2, dtype=torch.float32, requires_grad=False)

    def f(q, k, v):
        return flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True, s_aux=sink)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dropout(device):
    """Dropout through the varlen op: the same seed gives the same bits, the
    keep rate is 1 - p, and each sequence's rows are a convex mix of its own
    values only (dropped entries leave the rest unscaled by other sequences)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [40, 0, 130]
    cu = cu_of(lens, device)
    q = torch.randn(sum(lens), 4, 64, device=device, dtype=dtype)
    k = torch.randn_like(q)
    v = torch.ones_like(q)  # out = sum of kept probabilities / (1 - p): mean 1
    torch.manual_seed(7)
    a = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 130, 130, dropout_p=0.25)
    torch.manual_seed(7)
    b = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 130, 130, dropout_p=0.25)
    assert torch.equal(a, b)
    c = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, 130, 130, dropout_p=0.25)
    assert not torch.equal(a, c)
    mean = a.float().mean().item()
    assert abs(mean - 1.0) < 0.05, f"mean of dropped-and-rescaled weights {mean}, expected 1"


def test_varlen_dropout_gradcheck_fp64():
    """Forward and backward regenerate one mask: gradcheck with a fixed rng_state."""
    lens_q, lens_k = [3, 0, 4], [2, 3, 5]
    q = torch.randn(sum(lens_q), 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), 1, 8, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = cu_of(lens_q, "cpu"), cu_of(lens_k, "cpu")
    rng = torch.tensor([1234, 5], dtype=torch.int64)

    def f(q, k, v):
        return torch.ops.flash_attn_ext.varlen_fwd(q, k, v, cu_q, cu_k, None, 4, 5, 0.3, True, -1, -1, False, 0.0,
                                                   None, None, 0.4, rng)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_dropout_probs(device):
    """return_attn_probs with dropout gives flash-attn's S_dmask per sequence
    (batch, nheads, max_seqlen_q, max_seqlen_k), and the output equals the
    reference that applies exactly that mask, sequence by sequence."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    lens_q, lens_k = [5, 0, 33], [9, 4, 40]
    cu_q, cu_k = cu_of(lens_q, device), cu_of(lens_k, device)
    q = torch.randn(sum(lens_q), 4, 32, device=device).to(dtype)
    k = torch.randn(sum(lens_k), 2, 32, device=device).to(dtype)
    v = torch.randn(sum(lens_k), 2, 32, device=device).to(dtype)
    p = 0.3
    out, lse, s_dmask = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, dropout_p=p, causal=True,
                                                              return_attn_probs=True)
    assert s_dmask.shape == (3, 4, 33, 40)
    dropped = (s_dmask < 0).sum().item()
    assert dropped > 0, "no entry dropped at p = 0.3"
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq:
            ref, _ = attention_ref(q[None, q0:q0 + lq], k[None, k0:k0 + lk], v[None, k0:k0 + lk], True,
                                   dropout_mask=s_dmask[b:b + 1, :, :lq, :lk], dropout_p=p)
            tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(out[q0:q0 + lq].double(), ref[0].double(), **tol)
        assert not s_dmask[b, :, lq:].any() and not s_dmask[b, :, :, lk:].any(), "outside the sequence: 0"
        q0, k0 = q0 + lq, k0 + lk
