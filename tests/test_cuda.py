"""GPU-only behaviour of the CUDA kernels: sizes and launch situations that
the device-parametrized parity tests (test_flash_attn.py) do not reach.

Long sequences (32k), batch x heads beyond the 65535 grid limit, strided
inputs (packed qkv, transposed (B, H, S, D) views), a non-default stream,
CUDA-graph capture and replay, random (seqlen_q, seqlen_k) pairs, bit-exact
repeats with deterministic=True (GQA too), head dims that are no compiled
size (padded), which kernels run (Hopper wgmma or mma.sync, and the
mma.sync ones checked on Hopper too), and a second GPU. The whole module is skipped without CUDA.

Accuracy rule (tests/conftest.py): our max abs error against a float64
reference is at most 2x PyTorch's own error in the same dtype plus a small
slack. A build that lacks a kernel (FLASH_ATTN_EXT_HDIMS/DTYPES/DIRECTIONS
restricted) makes the affected test skip, naming what is missing.
"""
from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available", allow_module_level=True)

import flash_attn_ext  # noqa: E402
from flash_attn_ext import _ops  # noqa: E402
from conftest import assert_close_to_ref, attention_ref, poison_allocator, sdpa_default  # noqa: E402

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# Messages of a restricted build (csrc/cuda/dispatch.h) or of an op without a CUDA kernel.
_MISSING_KERNEL = ("not compiled in this build", "no CUDA kernel compiled", "Could not run 'flash_attn_ext::")


def call(fn, *args, **kwargs):
    """fn(*args, **kwargs), turning 'this build has no such kernel' into a skip."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        if any(m in str(exc) for m in _MISSING_KERNEL):
            pytest.skip(f"kernel not in this build: {str(exc).splitlines()[0][:200]}")
        raise


def attn(q, k, v, **kwargs):
    return call(flash_attn_ext.flash_attn_func, q, k, v, **kwargs)


def randn(*shape, dtype=torch.bfloat16, device="cuda"):
    return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)


def check_fwd_bwd(leaves, to_qkv, causal=False, dout=None, name="", deterministic=False):
    """Ours vs a float64 reference vs PyTorch in the same dtype, out and the gradients of `leaves`.

    `to_qkv(*leaves)` builds (q, k, v) from the leaf tensors (e.g. slices of a
    packed tensor, or transposed views), so the gradients checked are those
    flowing back through the same views.
    """
    dtype = leaves[0].dtype
    ours_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out_bytes = ours_leaves[0].numel() * ours_leaves[0].element_size()
    poison_allocator(leaves[0].device, out_bytes)
    out = attn(*to_qkv(*ours_leaves), causal=causal, deterministic=deterministic)
    assert not torch.isnan(out).any(), f"{name}: NaN in out"
    if dout is None:
        dout = torch.randn_like(out)
    poison_allocator(leaves[0].device, 3 * out_bytes)
    grads = call(torch.autograd.grad, out, ours_leaves, dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, _ = attention_ref(*to_qkv(*ref_leaves), causal=causal)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    low_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    low_out, _ = attention_ref(*to_qkv(*low_leaves), causal=causal, upcast=False)
    low_grads = torch.autograd.grad(low_out, low_leaves, dout)
    sdpa_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    sdpa_out = sdpa_default(*to_qkv(*sdpa_leaves), causal=causal)
    sdpa_grads = torch.autograd.grad(sdpa_out, sdpa_leaves, dout)

    assert out.shape == ref_out.shape and out.dtype == dtype
    assert_close_to_ref(out, ref_out, (low_out, sdpa_out), f"{name} out")
    for i, (g, r, lo, sg) in enumerate(zip(grads, ref_grads, low_grads, sdpa_grads)):
        assert g.shape == r.shape
        assert_close_to_ref(g, r, (lo, sg), f"{name} grad[{i}]")
    return out, grads


def plain(q, k, v):
    return q, k, v


# --------------------------------------------------------------------------
# Sizes


def test_seqlen_32k():
    """One long case: out against SDPA's flash backend and a float32 reference computed in
    query chunks (the 32k x 32k score matrix is never formed); lse against a chunked logsumexp."""
    B, S, H, D = 1, 32768, 4, 128
    q, k, v = (randn(B, S, H, D) for _ in range(3))
    scale = D ** -0.5
    poison_allocator("cuda", q.numel() * q.element_size())
    out, lse, _ = call(_ops.fwd, q, k, v, None, scale, False, -1, -1, False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa_out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # (B, H, S, D)
    err_ours = err_sdpa = err_lse = 0.0
    ref_scale = 0.0
    for start in range(0, S, 2048):
        qc = q[:, start:start + 2048].float().transpose(1, 2)
        scores = (qc @ kf.transpose(-1, -2)) * scale  # (B, H, 2048, S) fp32
        ref_lse = torch.logsumexp(scores, dim=-1)
        ref = (torch.softmax(scores, dim=-1) @ vf).transpose(1, 2)  # (B, 2048, H, D)
        del scores
        err_ours = max(err_ours, (out[:, start:start + 2048].float() - ref).abs().max().item())
        err_sdpa = max(err_sdpa, (sdpa_out[:, start:start + 2048].float() - ref).abs().max().item())
        err_lse = max(err_lse, (lse[:, :, start:start + 2048] - ref_lse).abs().max().item())
        ref_scale = max(ref_scale, ref.abs().max().item())
    assert err_ours <= 2 * err_sdpa + 1e-5 * max(1.0, ref_scale), (
        f"out error {err_ours:.3e} > 2 x SDPA flash's {err_sdpa:.3e}")
    assert err_lse <= 1e-3, f"lse error {err_lse:.3e}"


def test_batch_times_heads_over_65535():
    """B*H = 70400 exceeds a grid's y/z limit: every (batch, head) must still be computed."""
    B, S, H, D = 1100, 16, 64, 32
    leaves = [randn(B, S, H, D) for _ in range(3)]
    check_fwd_bwd(leaves, plain, name="B*H>65535")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pair_index", range(15))
def test_random_seqlen_pairs(pair_index, causal):
    rng = random.Random(20261122 + pair_index)  # fixed pairs, reproducible
    seqlen_q, seqlen_k = rng.randint(1, 2048), rng.randint(1, 2048)
    dtype = (torch.float16, torch.bfloat16)[pair_index % 2]
    nheads_k = (1, 2)[pair_index % 2]
    leaves = [randn(1, seqlen_q, 2, 64, dtype=dtype), randn(1, seqlen_k, nheads_k, 64, dtype=dtype),
              randn(1, seqlen_k, nheads_k, 64, dtype=dtype)]
    check_fwd_bwd(leaves, plain, causal=causal, name=f"Sq={seqlen_q} Sk={seqlen_k}")


@pytest.mark.parametrize("headdim", [40, 80, 100, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_uncompiled_head_dims(headdim, dtype):
    """Head dims between compiled sizes run padded up to the next one; out keeps the true head dim."""
    leaves = [randn(2, 200, 4, headdim, dtype=dtype), randn(2, 300, 2, headdim, dtype=dtype),
              randn(2, 300, 2, headdim, dtype=dtype)]
    out, grads = check_fwd_bwd(leaves, plain, causal=True, name=f"hd{headdim}")
    assert out.shape[-1] == headdim and all(g.shape[-1] == headdim for g in grads)


# --------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_qkv_slices(dtype):
    """q, k, v as slices of one (B, S, 3, H, D) tensor: row stride 3*H*D, gradients into the packed tensor."""
    qkv = randn(2, 333, 3, 4, 64, dtype=dtype)
    check_fwd_bwd([qkv], lambda t: t.unbind(2), causal=True, name="packed qkv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_bhsd_views(dtype):
    """q, k, v as transposes of contiguous (B, H, S, D) tensors (head stride S*D, row stride D)."""
    leaves = [randn(2, 4, 250, 64, dtype=dtype), randn(2, 2, 310, 64, dtype=dtype),
              randn(2, 2, 310, 64, dtype=dtype)]
    check_fwd_bwd(leaves, lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                  name="transposed")


# --------------------------------------------------------------------------
# Streams, graphs, determinism, devices


def test_non_default_stream():
    """Work must be queued on the current stream, without synchronising the host.

    On a side stream: a long sleep, then new values copied into q (and later
    dout), then our forward (and backward). A kernel launched on another
    stream would run before the copy and read the old values; a host sync
    inside the op would wait for the sleep, and the stream would be idle
    when the op returns.
    """
    B, S, H, D = 2, 512, 4, 64
    q, k, v = (randn(B, S, H, D) for _ in range(3))
    new_q, new_dout = randn(B, S, H, D), randn(B, S, H, D)
    dout = torch.zeros_like(q)
    qg = q.clone().requires_grad_()
    call(lambda: torch.autograd.grad(attn(qg, k, v), (qg,), dout))  # warm-up: load kernels eagerly
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
        with torch.no_grad():
            qg.copy_(new_q)
        out = attn(qg, k, v)
        assert not side.query(), "the op synchronised with the GPU (or the sleep was too short)"
        torch.cuda._sleep(200_000_000)
        dout.copy_(new_dout)
        (dq,) = torch.autograd.grad(out, (qg,), dout)
        assert not side.query(), "the backward synchronised with the GPU"
    side.synchronize()

    ref_leaves = [t.double().requires_grad_() for t in (new_q, k, v)]
    ref_out, _ = attention_ref(*ref_leaves)
    (ref_dq,) = torch.autograd.grad(ref_out, ref_leaves[:1], new_dout.double())
    low_leaves = [t.clone().requires_grad_() for t in (new_q, k, v)]
    low_out, _ = attention_ref(*low_leaves, upcast=False)
    (low_dq,) = torch.autograd.grad(low_out, low_leaves[:1], new_dout)
    assert_close_to_ref(out, ref_out, low_out, "stream out")
    assert_close_to_ref(dq, ref_dq, low_dq, "stream dq")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_capture_and_replay(dtype):
    """Capture forward and forward+backward in CUDA graphs; replay after changing the static
    inputs; the results must match eager calls on the new values."""
    B, S, H, Hk, D = 2, 384, 4, 2, 64
    static = [randn(B, S, H, D, dtype=dtype), randn(B, S, Hk, D, dtype=dtype), randn(B, S, Hk, D, dtype=dtype)]
    static = [t.requires_grad_() for t in static]
    static_dout = randn(B, S, H, D, dtype=dtype)

    def step():
        out = flash_attn_ext.flash_attn_func(*static, causal=True)
        return (out,) + torch.autograd.grad(out, static, static_dout)

    side = torch.cuda.Stream()  # warm-up off the capturing stream, as torch.cuda.graphs requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call(step)
            with torch.no_grad():
                call(flash_attn_ext.flash_attn_func, *static, causal=True)
    torch.cuda.current_stream().wait_stream(side)

    fwd_graph, train_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(fwd_graph):
        with torch.no_grad():
            fwd_out = flash_attn_ext.flash_attn_func(*static, causal=True)
    with torch.cuda.graph(train_graph):
        train_results = step()

    for trial in range(2):
        new = [randn(*t.shape, dtype=dtype) for t in static] + [randn(B, S, H, D, dtype=dtype)]
        with torch.no_grad():
            for t, n in zip(static + [static_dout], new):
                t.copy_(n)
        fwd_graph.replay()
        train_graph.replay()
        torch.cuda.synchronize()
        leaves = [n.clone().requires_grad_() for n in new[:3]]
        eager_out = flash_attn_ext.flash_attn_func(*leaves, causal=True)
        eager_grads = torch.autograd.grad(eager_out, leaves, new[3])
        assert torch.equal(fwd_out, eager_out), f"trial {trial}: replayed forward differs from eager"
        assert torch.equal(train_results[0], eager_out), f"trial {trial}: replayed fwd+bwd out differs"
        ref_leaves = [n.double().requires_grad_() for n in new[:3]]
        ref_out, _ = attention_ref(*ref_leaves, causal=True)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, new[3].double())
        low_leaves = [n.clone().requires_grad_() for n in new[:3]]
        low_out, _ = attention_ref(*low_leaves, causal=True, upcast=False)
        low_grads = torch.autograd.grad(low_out, low_leaves, new[3])
        for name, g, e, r, lo in zip(("dq", "dk", "dv"), train_results[1:], eager_grads, ref_grads, low_grads):
            assert_close_to_ref(g, r, lo, f"graph {name}")
            assert_close_to_ref(e, r, lo, f"eager {name}")


# --------------------------------------------------------------------------
# Kernel selection: on compute capability 9.0 the Hopper (wgmma) kernels run
# for head dims 64/128/256; FLASH_ATTN_EXT_DISABLE_SM90=1 selects the
# mma.sync kernels that Ampere and Ada GPUs run, so an H100 tests both.

IS_SM90 = torch.cuda.get_device_capability() == (9, 0)


def cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA" and "flash::" in e.name}


@pytest.mark.parametrize("disable", [False, True], ids=["default", "sm90-disabled"])
def test_kernel_selection(monkeypatch, disable):
    monkeypatch.delenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB", raising=False)  # the device's own choice
    monkeypatch.delenv("FLASH_ATTN_EXT_SM90_FWD", raising=False)
    monkeypatch.delenv("FLASH_ATTN_EXT_SM90_BWD", raising=False)
    if disable:
        monkeypatch.setenv("FLASH_ATTN_EXT_DISABLE_SM90", "1")
    q, k, v = (randn(1, 256, 2, 128).requires_grad_() for _ in range(3))

    def fwd_bwd():
        out = attn(q, k, v, causal=True)
        out.backward(torch.randn_like(out))

    names = cuda_kernel_names(fwd_bwd)
    hopper = sorted(n for n in names if "sm90" in n)
    if IS_SM90 and not disable:
        # The warp-specialized kernels by default (FLASH_ATTN_EXT_SM90_FWD / _BWD unset).
        assert any("flash_fwd_sm90_ws_kernel" in n for n in hopper), names
        assert any("flash_bwd_sm90_ws_kernel" in n for n in hopper), names
    else:
        assert not hopper, hopper
        assert any("flash_fwd_kernel" in n for n in names), names
        assert any("flash_bwd_dkdv_kernel" in n for n in names), names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mma_sync_kernels_with_sm90_disabled(monkeypatch, dtype, headdim, causal):
    """The mma.sync kernels stay exact for the head dims the Hopper kernels take over on an H100."""
    monkeypatch.setenv("FLASH_ATTN_EXT_DISABLE_SM90", "1")
    q = randn(2, 300, 4, headdim, dtype=dtype)
    k = randn(2, 257, 2, headdim, dtype=dtype)
    v = randn(2, 257, 2, headdim, dtype=dtype)
    check_fwd_bwd([q, k, v], plain, causal=causal, name=f"mma.sync hd{headdim}")


# --------------------------------------------------------------------------
# Shared-memory budget: sm86/sm89/sm120 GPUs give a block at most 99 KB, A100
# 163 KB. FLASH_ATTN_EXT_SMEM_BUDGET_KB makes this GPU pick tiles (and kernel
# family) as those would; the whole suite can run that way too
# (tools/gpu_check.sh, GPU_CHECK_SMEM_BUDGETS).

@pytest.mark.parametrize("budget_kb", [99, 163])
@pytest.mark.parametrize("headdim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_smem_budget_tiles(monkeypatch, budget_kb, headdim, deterministic):
    monkeypatch.setenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB", str(budget_kb))
    q = randn(2, 203, 4, headdim)
    k = randn(2, 331, 2, headdim)
    v = randn(2, 331, 2, headdim)
    names = cuda_kernel_names(lambda: attn(q, k, v, causal=True))
    if budget_kb == 99 and headdim != 64:  # the Hopper kernels for 128 and 256 need more
        assert not any("sm90" in n for n in names), names
    check_fwd_bwd([q, k, v], plain, causal=True, name=f"budget {budget_kb} KB hd{headdim}",
                  deterministic=deterministic)


def test_smem_budget_too_small_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB", "16")
    q = randn(1, 64, 2, 128)
    with pytest.raises(RuntimeError, match="bytes of shared memory per block; this GPU allows 16384"):
        attn(q, q, q)
    monkeypatch.setenv("FLASH_ATTN_EXT_SMEM_BUDGET_KB", "lots")
    with pytest.raises(RuntimeError, match="FLASH_ATTN_EXT_SMEM_BUDGET_KB must be a positive whole number"):
        attn(q, q, q)


@pytest.mark.parametrize("nheads_k", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_deterministic_bit_identical(nheads_k, causal):
    """deterministic=True: out, dq, dk, dv identical across 5 runs (dk/dv sum over the GQA group too)."""
    B, S, H, D = 2, 1031, 8, 128
    q = randn(B, S, H, D).requires_grad_()
    k, v = (randn(B, S, nheads_k, D).requires_grad_() for _ in range(2))
    dout = randn(B, S, H, D)
    first = None
    for run in range(5):
        out = attn(q, k, v, causal=causal, deterministic=True)
        results = (out,) + call(torch.autograd.grad, out, (q, k, v), dout)
        assert not any(torch.isnan(t).any() for t in results)
        if first is None:
            first = results
            continue
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, results):
            assert torch.equal(a, b), f"run {run}: {name} differs from run 0 (max diff {(a - b).abs().max():.3e})"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: kernels must run on the inputs' device."""
    assert torch.cuda.current_device() == 0
    leaves = [randn(2, 300, 4, 64, device="cuda:1") for _ in range(3)]
    out, grads = check_fwd_bwd(leaves, plain, causal=True, name="cuda:1")
    assert out.device == torch.device("cuda:1") and all(g.device == torch.device("cuda:1") for g in grads)
    assert torch.cuda.current_device() == 0
