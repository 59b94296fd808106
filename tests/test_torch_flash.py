"""flash_attn_ext as PyTorch's flash-attention implementation
(flash_attn_ext/integrations/torch_flash.py).

With the implementation active, unchanged PyTorch code runs our kernels:
SDPA on the FLASH backend (CPU: its own aten op, top-left is_causal; CUDA:
the flash-attn 2 level ops), torch.nn.attention.varlen.varlen_attn, and their
backward, checked against the float64 reference by the 2x rule, with the
implementation's call counter showing that our kernels ran (and not
PyTorch's). Calls we cannot do exactly go to PyTorch's own kernel; dropout's
random state travels from forward to backward; deactivation gives PyTorch's
kernels back; a torch without the registry still imports the package. CUDA
cases run where a GPU is present.
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flash_attn_ext
from flash_attn_ext import _ops
from flash_attn_ext.integrations import torch_flash
from conftest import DEVICES, assert_close_to_ref, attention_ref, op_supports, sdpa_default

if not torch_flash.registry_available():
    pytest.skip(f"torch {torch.__version__} has no flash-attention registry", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

CPU_DTYPES = [torch.float32, torch.bfloat16]
CUDA_DTYPES = [torch.float16, torch.bfloat16]


def device_dtypes():
    return [pytest.param(d, t, id=f"{d}-{str(t).split('.')[-1]}") for d in DEVICES
            for t in (CPU_DTYPES if d == "cpu" else CUDA_DTYPES)]


@pytest.fixture
def active():
    torch_flash.activate()
    torch_flash.counts.clear()
    yield torch_flash.counts
    torch_flash.deactivate()


def skip_unless_built(device, dtype):
    if not op_supports(device, dtype):
        pytest.skip(f"this build has no {device} kernel for {dtype}")


def random_bhsd(batch, nheads, seqlen, headdim, dtype, device):
    return torch.randn(batch, nheads, seqlen, headdim, device=device).to(dtype).requires_grad_()


def top_left_bias(seqlen_q, seqlen_k, device):
    """SDPA's is_causal (query i sees keys j <= i) as an additive bias."""
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril()
    return torch.zeros(seqlen_q, seqlen_k, dtype=torch.float64, device=device).masked_fill(~keep, float("-inf"))


def ref_and_grads(q, k, v, dout, upcast, **kwargs):
    """attention_ref's output and gradients on (B, S, H, D) copies of q, k, v
    (float64 with upcast, else computed in their dtype: PyTorch's own error)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if upcast:
        leaves = [x.detach().double().requires_grad_() for x in leaves]
    out, _ = attention_ref(*leaves, upcast=upcast, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out, *grads)


def sdpa_default_and_grads(q, k, v, dout, window):
    """PyTorch's default SDPA backend's output and gradients (the rule's second
    baseline), with PyTorch's own kernels: our implementation, when active,
    is set aside for the call."""
    was_active = torch_flash.is_active()
    if was_active:
        torch_flash.deactivate()
    try:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = sdpa_default(*leaves, window=window)
        return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))
    finally:
        if was_active:
            torch_flash.activate()


def check_against_reference(ours, q, k, v, dout, name, **kwargs):
    """ours: (out, dq, dk, dv) in (B, S, H, D); reference kwargs as attention_ref's.
    PyTorch's error is the worse of its math path in the dtype and, where the
    call is a plain or windowed one that SDPA can express (window only), its
    default backend: the project's rule (conftest.py)."""
    ref = ref_and_grads(q, k, v, dout, True, **kwargs)
    lowp = ref_and_grads(q, k, v, dout, False, **kwargs)
    sdpa = [None] * 4
    if set(kwargs) <= {"window"} and q.dtype != torch.float32:
        sdpa = sdpa_default_and_grads(q, k, v, dout, kwargs.get("window", (-1, -1)))
    for what, o, r, lp, sd in zip(("out", "dq", "dk", "dv"), ours, ref, lowp, sdpa):
        assert_close_to_ref(o, r, (lp, sd), f"{name} {what}")


# ---------------------------------------------------------------------------
# Registration


def test_registered_on_import_not_active():
    from torch.nn.attention import current_flash_attention_impl, list_flash_attention_impls

    assert torch_flash.IMPL_NAME in list_flash_attention_impls()
    assert current_flash_attention_impl() != torch_flash.IMPL_NAME
    assert not torch_flash.is_active()


def test_activate_deactivate_through_pytorch_api():
    from torch.nn.attention import (activate_flash_attention_impl, current_flash_attention_impl,
                                    restore_flash_attention_impl)

    activate_flash_attention_impl("flash_attn_ext")
    try:
        assert current_flash_attention_impl() == "flash_attn_ext" and torch_flash.is_active()
    finally:
        restore_flash_attention_impl()
    assert current_flash_attention_impl() is None and not torch_flash.is_active()


# ---------------------------------------------------------------------------
# SDPA's FLASH backend


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(33, 33), (17, 40), (40, 17)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_flash_backend(active, device, dtype, seqlen_q, seqlen_k, is_causal):
    skip_unless_built(device, dtype)
    if device == "cuda" and is_causal and seqlen_q != seqlen_k:
        pytest.skip("SDPA's FLASH backend on CUDA refuses non-square causal")
    batch, nheads, nheads_k, headdim = 2, 4, 2, 64 if device == "cuda" else 16
    q = random_bhsd(batch, nheads, seqlen_q, headdim, dtype, device)
    k = random_bhsd(batch, nheads_k, seqlen_k, headdim, dtype, device)
    v = random_bhsd(batch, nheads_k, seqlen_k, headdim, dtype, device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    op = "_scaled_dot_product_flash_attention_for_cpu" if device == "cpu" else "_scaled_dot_product_flash_attention"
    assert active[op] == 1 and active[op + "_backward"] == 1, dict(active)
    assert not any(name.endswith(":declined") for name in active), dict(active)

    bias = top_left_bias(seqlen_q, seqlen_k, device) if is_causal else None
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, H, S, D) -> (B, S, H, D)
    check_against_reference([t(out), t(dq), t(dk), t(dv)], t(q), t(k), t(v), t(dout), "sdpa flash", bias=bias)


def test_sdpa_float64_cpu(active):
    # float64: the CPU op's logsumexp is float64, carrying our residual.
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    assert active["_scaled_dot_product_flash_attention_for_cpu_backward"] == 1
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_sdpa_with_mask_declines_to_pytorch_cpu(active):
    # The CPU op's attn_mask is not ours to compute: PyTorch's kernel runs it.
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(8, 8)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert active["_scaled_dot_product_flash_attention_for_cpu:declined"] == 1
    assert active["_scaled_dot_product_flash_attention_for_cpu"] == 0
    torch_flash.deactivate()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# varlen_attn (flash-attn level: _flash_attention_forward / _backward)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (4, 0)])
def test_varlen_attn(active, device, dtype, window):
    from torch.nn.attention.varlen import varlen_attn

    skip_unless_built(device, dtype)
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    nheads, nheads_k, headdim = 4, (2 if gqa else 4), 64 if device == "cuda" else 16
    lens_q, lens_k = [5, 17, 1], [9, 17, 6]
    cu_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 26, 32], dtype=torch.int32, device=device)
    mk = lambda n, h: torch.randn(n, h, headdim, device=device).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(23, nheads), mk(32, nheads_k), mk(32, nheads_k)
    kwargs = {"enable_gqa": True} if gqa else {}
    out = varlen_attn(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=window, **kwargs)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert active["_flash_attention_forward"] == 1 and active["_flash_attention_backward"] == 1, dict(active)

    # Per sequence, flash-attn's bottom-right masks: window (-1, 0) is causal.
    for b in range(len(lens_q)):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        ours = [x[None] for x in (out[sq], dq[sq], dk[sk], dv[sk])]
        check_against_reference(ours, q[sq][None], k[sk][None], v[sk][None], dout[sq][None], f"varlen seq {b}",
                                window=window)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(active, device):
    # inductor calls the aten ops as extern kernels and asserts the strides
    # their meta functions give: our results must be laid out as PyTorch's.
    from torch.nn.attention.varlen import varlen_attn

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    skip_unless_built(device, dtype)
    headdim = 64 if device == "cuda" else 16

    def sdpa(q):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    cu = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)

    def varlen(x):
        return varlen_attn(x, x, x, cu, cu, 6, 6, window_size=(-1, 0))

    torch._dynamo.reset()
    for fn, x in ((sdpa, random_bhsd(1, 2, 9, headdim, dtype, device)),
                  (varlen, torch.randn(9, 2, headdim, device=device).to(dtype).requires_grad_())):
        out = torch.compile(fn, backend="inductor", fullgraph=True)(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        expected = fn(x)
        (expected_grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # The CUDA backward accumulates dq with fp32 atomics (not
        # deterministic): its last bits may differ between any two runs,
        # compiled or not; the CPU backward is deterministic.
        exact = dict(rtol=0, atol=0) if device == "cpu" else {}
        torch.testing.assert_close(grad, expected_grad, **exact)
    assert not any(name.endswith(":declined") for name in active), dict(active)
    fwd_op = "_scaled_dot_product_flash_attention_for_cpu" if device == "cpu" else "_scaled_dot_product_flash_attention"
    assert active[fwd_op] == 2 and active["_flash_attention_forward"] == 2, dict(active)


# ---------------------------------------------------------------------------
# Dropout: our [seed, offset] from forward to backward


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_op_dropout(active, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    skip_unless_built(device, dtype)
    p = 0.25
    q, k, v = (random_bhsd(2, 3, 24, 64 if device == "cuda" else 16, dtype, device) for _ in range(3))
    if device == "cuda":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        rng_state = None
    else:  # no PyTorch CPU kernel, and the CPU SDPA refuses dropout: call the op itself
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, True)
        out, rng_state = res[0], res[6]
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert active["_scaled_dot_product_flash_attention"] == 1
    assert active["_scaled_dot_product_flash_attention_backward"] == 1
    if rng_state is None:
        return  # the CUDA mask is checked through the op on the CPU path and in test_dropout.py
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,)
    mask = _ops.dropout_mask(rng_state.view(torch.int64), 2, 3, 24, 24, p)
    assert 0 < mask.float().mean() < 1
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    check_against_reference([t(out), t(dq), t(dk), t(dv)], t(q), t(k), t(v), t(dout), "sdpa dropout", causal=True,
                            dropout_mask=mask, dropout_p=p)


def test_backward_with_unknown_rng_state_raises(active):
    q = torch.randn(1, 2, 8, 16)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False)
    foreign = torch.tensor([1, 2], dtype=torch.int64).view(torch.uint64)
    with pytest.raises(RuntimeError, match="rng_state"):
        torch.ops.aten._scaled_dot_product_flash_attention_backward(
            torch.ones_like(res[0]), q, q, q, res[0], res[1], None, None, 8, 8, 0.5, False, foreign, res[7])


def test_unsupported_without_pytorch_kernel_names_reason(active):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="return_debug_mask"):
        torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.5, False, True)
    assert active["_scaled_dot_product_flash_attention:declined"] == 1


# ---------------------------------------------------------------------------
# Deactivation, and torch without the registry


def test_deactivation_restores_pytorch_kernels():
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    torch_flash.activate()
    try:
        torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 6, 6, 0.0, False, False)  # ours: runs on the CPU
    finally:
        torch_flash.deactivate()
    torch_flash.counts.clear()
    with pytest.raises(NotImplementedError, match="Could not run"):  # PyTorch has no CPU kernel
        torch.ops.aten._flash_attention_forward(q, q, q, cu, cu, 6, 6, 0.0, False, False)
    x = torch.randn(1, 2, 8, 16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(x, x, x)
    assert not torch_flash.counts


def test_without_registry_imports_and_activate_names_version():
    code = (
        "import torch.nn.attention as a\n"
        "del a.register_flash_attention_impl\n"
        "import torch, flash_attn_ext\n"
        "from flash_attn_ext.integrations import torch_flash\n"
        "assert not torch_flash.registry_available()\n"
        "q = torch.randn(1, 8, 2, 16)\n"
        "flash_attn_ext.flash_attn_func(q, q, q, causal=True)\n"
        "try:\n"
        "    torch_flash.activate()\n"
        "except RuntimeError as e:\n"
        "    assert 'torch >= 2.10' in str(e), e\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
