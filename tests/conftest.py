"""Shared test helpers: devices, a float64 reference, the tolerance rule, poisoning.

Tolerance rule (flash-attn's): in a low-precision dtype, our error against
the float64 reference may be at most twice PyTorch's own error in that dtype,
plus a small absolute slack; PyTorch's own error is the worse of its math
attention in the dtype (attention_ref(upcast=False)) and its default SDPA
backend (sdpa_default). The rule, sdpa_default and the reason for taking
both live in flash_attn_ext/reference.py (two_x_rule), shared with the main
job and the benchmarks; assert_close_to_ref is its assertion form.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import flash_attn_ext  # noqa: F401  (registers the ops)
from flash_attn_ext.reference import (  # noqa: F401  (the shared reference and rule)
    alibi_bias,
    attention_ref,
    sdpa_default,
    two_x_rule,
    visible_mask,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes_for(device: str):
    """Dtypes the kernels support on a device (CUDA: fp16/bf16 only)."""
    if device == "cuda":
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


@functools.lru_cache(maxsize=None)
def op_supports(device: str, dtype: torch.dtype) -> bool:
    """Whether this build has a kernel for the device and dtype (CUDA: fp16/bf16,
    and only what a restricted build compiled)."""
    q = torch.randn(1, 4, 1, 32, device=device).to(dtype)
    try:
        torch.ops.flash_attn_ext.fwd(q, q, q, None, 1.0, False, -1, -1, False)
        return True
    except RuntimeError:
        return False


def device_dtype_params():
    return [pytest.param(d, t, id=f"{d}-{str(t).split('.')[-1]}") for d in DEVICES for t in dtypes_for(d)]


def assert_close_to_ref(ours, ref64, pytorch_lowp, name, slack=1e-5):
    """ours against the float64 reference by the 2x rule (flash_attn_ext.reference.two_x_rule).
    pytorch_lowp: PyTorch's result in the same dtype, or a tuple of them (math path, default SDPA
    backend), of which the worse sets the bar; results with NaN are skipped."""
    verdict = two_x_rule(ours, ref64, pytorch_lowp, slack)
    assert verdict.ok, f"{name}: {verdict.reason}"


def sinks_grad_from(sinks, dout, out, lse, dlse=None):
    """The sinks' gradient -sum_i exp(sink - lse_i) D_i, D_i = rowsum(dout_i *
    out_i) - dlse_i formed here in fp32 (fp64 for fp64 out) from `out` as
    given, the sinks' probabilities in fp64: a baseline for the 2x rule.
    out (batch, seqlen_q, nheads, d), lse and dlse (batch, nheads, seqlen_q).
    Like dq, dk and dv of every FlashAttention backward, the sinks' gradient
    takes D from the output rounded to the dtype; dsinks is a sum over a
    head's rows, so one draw of that rounding can land anywhere, and
    PyTorch's composite (which never rounds the output before D) is no
    stable yardstick alone: the tests add this formula on PyTorch's rounded
    output and on the exact output rounded to the dtype as baselines. Written
    out rather than taken from flash_attn_ext._ops.sinks_grad, so that a
    mistake there cannot move the baseline along with our result."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    d = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)
    if dlse is not None:
        d = d - dlse.to(acc)
    p_sink = torch.exp(sinks.double()[None, :, None] - lse.double())  # lse as given, not rounded to fp32
    return -(p_sink * d).sum(dim=(0, 2)).float()


def assert_fp32_close(ours, ref64, name, rtol=1e-5):
    """fp32 results: relative error (in max norm) within rtol."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in our result"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    scale = max(ref64.abs().max().item(), 1.0) if ours.numel() else 1.0
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.0e} x {scale:.3e}"


def poison_allocator(device, nbytes):
    """Fill freed memory with NaN so an output element the kernel forgets to
    write shows up as NaN: the caching allocator (CUDA) and malloc (CPU)
    hand recently freed blocks of the same size to the next allocation."""
    n = max(1, nbytes // 4)
    t = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    del t


def capture_graph(step):
    """Warms `step` up on a side stream (allocator pools, lazy init), then
    captures one call of it in a CUDA graph; returns (graph, its outputs),
    which each graph.replay() rewrites in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(torch.randint(0, 2**31 - 1, (1,)).item())
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    q = mk(batch, seqlen_q, nheads, headdim).requires_grad_(requires_grad)
    k = mk(batch, seqlen_k, nheads_k, headdim).requires_grad_(requires_grad)
    v = mk(batch, seqlen_k, nheads_k, headdim).requires_grad_(requires_grad)
    return q, k, v


def _cuda_kernels_restricted() -> bool:
    try:
        from flash_attn_ext._build_config import CUDA_KERNELS_RESTRICTED
    except ImportError:  # no build record, or one from before it recorded this
        return False
    return bool(CUDA_KERNELS_RESTRICTED)


# What the ops raise for a kernel the build does not have.
MISSING_KERNEL = ("not compiled in this build", "no CUDA kernel compiled", "Could not run 'flash_attn_ext::")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A build restricted by FLASH_ATTN_EXT_HDIMS / _DTYPES / _DIRECTIONS
    (setup.py; for iterating on a GPU) lacks kernels that tests call: a test
    that fails only for that is reported as skipped, naming the kernel. A full
    build (CI's wheel, tools/gpu_check.sh) has every kernel, so there such an
    error stays a failure: it would mean a call dispatched to a kernel that
    no build instantiates."""
    outcome = yield
    report = outcome.get_result()
    if (call.when == "call" and report.failed and call.excinfo is not None
            and call.excinfo.errisinstance(RuntimeError)
            and any(m in str(call.excinfo.value) for m in MISSING_KERNEL) and _cuda_kernels_restricted()):
        report.outcome = "skipped"
        reason = str(call.excinfo.value).splitlines()[0][:200]
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: not in this restricted build: {reason}")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reported seed per test: inputs are fresh random numbers
    # every run, and a failure can still be reproduced.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
