"""flash_attn_ext.distributed (context parallelism) and the flash-attn-shaped
low-level functions (flash_attn_ext.flash_attn_interface).

Multi-rank cases run in 2 and 4 gloo processes on this machine
(torch.multiprocessing, spawn): the parent makes the full inputs, every rank
gets its shard, runs the attention and its backward and sends its shard of
out, lse and the gradients back; the parent puts them together and checks
them against flash_attn_func on the whole sequence and the float64
reference, by the project's rule (conftest.py). All cases of one world size
share one set of processes (starting them costs seconds); groups have short
timeouts so that a broken case fails instead of hanging. Single-rank groups
(in this process) run on every device present: on CUDA through NCCL.
"""
from __future__ import annotations

import datetime
import importlib.util
import io
import os
import queue
import sys
import tempfile
import time
import traceback
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flash_attn_ext
from flash_attn_ext import distributed as cp
from flash_attn_ext import flash_attn_interface as fai
from conftest import (
    DEVICES,
    assert_close_to_ref,
    assert_fp32_close,
    attention_ref,
    op_supports,
    sdpa_default,
    visible_mask,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

_TIMEOUT = datetime.timedelta(seconds=60)


# ---------------------------------------------------------------------------
# Running functions in gloo processes.

def _init(rank, world_size, init_file, timeout):
    torch.set_num_threads(1)  # several processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timeout)


def _put(results, rank, value):
    """Sends a rank's result to the parent as bytes: a tensor sent as itself
    would live in the rank's shared memory, gone once the rank exits."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    results.put((rank, buffer.getvalue()))


def _spawn(target, world_size, args, limit_s=120.0):
    """Runs target(rank, world_size, init_file, results, *args) in world_size
    processes; returns {rank: what the rank sent with _put}. Processes still
    running after limit_s are killed and the test fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=target, args=(r, world_size, init_file, results, *args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline, got = time.monotonic() + limit_s, {}
        try:
            while len(got) < world_size:
                rank, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
                got[rank] = torch.load(io.BytesIO(value))
        except queue.Empty:  # a rank died or hung
            pass
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
    assert not alive, f"{len(alive)} rank(s) still running after {limit_s} s (killed); results: {sorted(got)}"
    assert len(got) == world_size, f"only ranks {sorted(got)} reported; exit codes {[p.exitcode for p in procs]}"
    return got


# ---------------------------------------------------------------------------
# The multi-rank cases. Each: the function, its options, the problem shape.

_FUNCS = {"ring": cp.ring_flash_attn_func, "all_gather": cp.all_gather_flash_attn_func}

# name: (method, layout, dict of options, (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim), dtype, lse loss)
_CASES = {
    "ring-zigzag-causal": ("ring", "zigzag", dict(causal=True), (2, 16, 16, 2, 2, 16), torch.float32, False),
    "ring-zigzag-noncausal": ("ring", "zigzag", dict(), (1, 16, 16, 2, 2, 8), torch.float32, False),
    "ring-zigzag-causal-gqa": ("ring", "zigzag", dict(causal=True), (1, 16, 16, 4, 1, 8), torch.float32, False),
    "ring-zigzag-window": ("ring", "zigzag", dict(window_size=(3, 2)), (1, 24, 24, 2, 1, 8), torch.float32, False),
    "ring-zigzag-causal-window": ("ring", "zigzag", dict(causal=True, window_size=(5, -1)), (1, 24, 24, 2, 2, 8),
                                  torch.float32, False),
    "ring-contiguous-causal": ("ring", "contiguous", dict(causal=True), (1, 16, 16, 2, 2, 8), torch.float32, False),
    "ring-contiguous-window": ("ring", "contiguous", dict(window_size=(2, 6)), (1, 16, 16, 2, 2, 8), torch.float32,
                               False),
    "ring-zigzag-causal-sq<sk": ("ring", "zigzag", dict(causal=True), (1, 8, 16, 2, 2, 8), torch.float32, False),
    "ring-zigzag-window-sq>sk": ("ring", "zigzag", dict(window_size=(4, 0)), (1, 24, 8, 2, 2, 8), torch.float32,
                                 False),
    "ring-zigzag-causal-lse-grad": ("ring", "zigzag", dict(causal=True), (1, 16, 16, 2, 2, 8), torch.float32, True),
    "ring-zigzag-causal-fp64": ("ring", "zigzag", dict(causal=True), (1, 16, 16, 2, 2, 8), torch.float64, True),
    "ring-zigzag-causal-bf16": ("ring", "zigzag", dict(causal=True), (1, 32, 32, 2, 2, 16), torch.bfloat16, False),
    "all_gather-zigzag-causal-gqa": ("all_gather", "zigzag", dict(causal=True), (2, 16, 16, 4, 2, 8), torch.float32,
                                     True),
    "all_gather-contiguous-window": ("all_gather", "contiguous", dict(window_size=(3, 1)), (1, 16, 16, 2, 2, 8),
                                     torch.float32, False),
    "all_gather-zigzag-causal-window-sq<sk": ("all_gather", "zigzag", dict(causal=True, window_size=(6, -1)),
                                              (1, 8, 24, 2, 2, 8), torch.float32, False),
    "all_gather-zigzag-causal-fp64": ("all_gather", "zigzag", dict(causal=True), (1, 16, 16, 2, 1, 8), torch.float64,
                                      False),
    # softcap: every block caps its scores as the whole call does (scores up to ~6, cap 2).
    "ring-zigzag-causal-softcap": ("ring", "zigzag", dict(causal=True, softcap=2.0), (1, 16, 16, 4, 2, 8),
                                   torch.float32, True),
    "all_gather-contiguous-window-softcap": ("all_gather", "contiguous", dict(window_size=(3, 2), softcap=1.5),
                                             (1, 16, 16, 2, 2, 8), torch.float32, False),
}


def _case_inputs(name, world_size, seed):
    method, layout, opts, (b, sq, sk, h, hk, d), dtype, lse_loss = _CASES[name]
    g = torch.Generator().manual_seed(seed)
    # Sequence lengths per case are for 2 ranks; 4 ranks get twice as long ones.
    sq, sk = sq * world_size // 2, sk * world_size // 2

    def mk(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v, dout = mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d), mk(b, sq, h, d)
    dlse = torch.randn(b, h, sq, generator=g) if lse_loss else None
    return q, k, v, dout, dlse


def _case_worker(rank, world_size, init_file, results, cases):
    """Every case on this rank's shards; then the error cases. Puts
    {case: (out, lse, dq, dk, dv) or a traceback string}."""
    _init(rank, world_size, init_file, _TIMEOUT)
    report = {}
    for name, (q, k, v, dout, dlse) in cases.items():
        method, layout, opts = _CASES[name][:3]
        try:
            q, k, v = (cp.shard(x, rank, world_size, layout).clone().requires_grad_() for x in (q, k, v))
            out, lse, _ = _FUNCS[method](q, k, v, layout=layout, return_attn_probs=True, **opts)
            loss = (out.float() * cp.shard(dout, rank, world_size, layout).float()).sum()
            if dlse is not None:
                finite = torch.isfinite(lse)
                loss = loss + (lse.masked_fill(~finite, 0) * cp.shard(dlse, rank, world_size, layout, dim=2)).sum()
            loss.backward()
            report[name] = tuple(t.detach() for t in (out, lse, q.grad, k.grad, v.grad))
        except Exception:
            report[name] = traceback.format_exc()
    report["errors"] = _error_cases(rank, world_size)
    _put(results, rank, report)
    dist.destroy_process_group()


def _error_cases(rank, world_size):
    """Arguments wrong on one rank, or differing between ranks: every rank must
    raise (after the argument exchange), none may wait for the others."""
    def attempt(**kw):
        q = kw.pop("q", torch.randn(1, 8, 2, 8))
        try:
            cp.ring_flash_attn_func(q, q, q, **kw)
            return None
        except Exception as e:
            return type(e).__name__, str(e)

    return {
        "shape": attempt(q=torch.randn(1, 8 if rank == 0 else 12, 2, 8), causal=True),
        "dropout": attempt(dropout_p=0.1 if rank == 0 else 0.0),
        "odd": attempt(q=torch.randn(1, 7, 2, 8)),
        "causal": attempt(causal=rank == 0),
        "softcap": attempt(softcap=2.0 if rank == 0 else 0.0),
        # After the errors, the group still works.
        "ok": attempt(causal=True),
    }


_RESULTS = {}


def _results(world_size):
    if world_size not in _RESULTS:
        seeds = {name: torch.randint(0, 2**31 - 1, (1,)).item() for name in _CASES}
        cases = {name: _case_inputs(name, world_size, seeds[name]) for name in _CASES}
        _RESULTS[world_size] = (seeds, cases, _spawn(_case_worker, world_size, (cases,)))
    return _RESULTS[world_size]


def _reference(name, q, k, v, dout, dlse):
    """flash_attn_func on the whole sequence and the float64 reference (and,
    for low precision, PyTorch's own results in the dtype): dict of
    quantity -> (single-process, float64, [PyTorch's])."""
    opts = _CASES[name][2]
    causal, window = opts.get("causal", False), opts.get("window_size", (-1, -1))
    softcap = opts.get("softcap", 0.0)
    refs = {}
    for kind in ("ours", "ref64", "lowp_math", "lowp_sdpa"):
        if kind in ("lowp_math", "lowp_sdpa") and q.dtype not in (torch.float16, torch.bfloat16):
            continue
        qq, kk, vv = (x.clone().to(torch.float64 if kind == "ref64" else x.dtype).requires_grad_() for x in (q, k, v))
        if kind == "ours":
            out, lse, _ = flash_attn_ext.flash_attn_func(qq, kk, vv, return_attn_probs=True, **opts)
        elif kind == "ref64":
            out, lse = attention_ref(qq, kk, vv, causal=causal, window=window, softcap=softcap)
        elif kind == "lowp_math":
            out, lse = attention_ref(qq, kk, vv, causal=causal, window=window, softcap=softcap, upcast=False)
        elif softcap:  # SDPA has no softcap: the math path is PyTorch's error alone
            continue
        else:
            out, lse = sdpa_default(qq, kk, vv, causal=causal, window=window), None
        loss = (out.double() * dout.double()).sum()
        if dlse is not None and lse is not None:
            loss = loss + (lse.masked_fill(~torch.isfinite(lse), 0).double() * dlse.double()).sum()
        loss.backward()
        refs[kind] = (out.detach(), None if lse is None else lse.detach(), qq.grad, kk.grad, vv.grad)
    return refs


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("world_size", [2, 4])
def test_multi_rank_matches_single_process(world_size, name):
    seeds, cases, got = _results(world_size)
    method, layout = _CASES[name][:2]
    dtype = _CASES[name][4]
    parts = []
    for rank in range(world_size):
        value = got[rank][name]
        assert not isinstance(value, str), f"rank {rank} raised (seed {seeds[name]}):\n{value}"
        parts.append(value)
    ours = [cp.unshard([p[i] for p in parts], layout, dim=2 if i == 1 else 1) for i in range(5)]
    refs = _reference(name, *cases[name])
    labels = ["out", "lse", "dq", "dk", "dv"]
    for i, label in enumerate(labels):
        what = f"{name}, {world_size} ranks, {label} (seed {seeds[name]})"
        single, ref64 = refs["ours"][i], refs["ref64"][i]
        if label == "lse":
            finite = torch.isfinite(ref64)
            assert torch.equal(torch.isfinite(ours[i]), finite) and (ours[i][~finite] == float("inf")).all(), what
            ours_i, single, ref64 = (t.masked_fill(~finite, 0) for t in (ours[i], single, ref64))
            assert_fp32_close(ours_i, ref64, what)
            continue
        if dtype == torch.float64:
            assert_fp32_close(ours[i], ref64, what, rtol=1e-10)
        elif dtype == torch.float32:
            assert_fp32_close(ours[i], ref64, what)
            assert_fp32_close(ours[i], single.double(), what + " vs flash_attn_func")
        else:
            lowps = tuple(refs[k][i] for k in ("lowp_math", "lowp_sdpa") if k in refs)
            # One dtype rounding per contributing block, beside flash_attn_func's one.
            block_roundings = cp._block_rounding_slack(dtype, world_size)
            assert_close_to_ref(ours[i], ref64, lowps, what, slack=1e-5 + block_roundings)
            assert_close_to_ref(single, ref64, lowps, what + " (flash_attn_func itself)")


@pytest.mark.parametrize("world_size", [2, 4])
def test_errors_raise_on_every_rank(world_size):
    _, _, got = _results(world_size)
    for rank in range(world_size):
        errors = got[rank]["errors"]
        assert errors["shape"] is not None and errors["shape"][0] == "ValueError", errors["shape"]
        assert "disagree on q.shape" in errors["shape"][1]
        if rank == 0:
            assert errors["dropout"][0] == "NotImplementedError" and "dropout_p" in errors["dropout"][1]
        else:
            assert errors["dropout"][0] == "RuntimeError" and "rank(s) [0]" in errors["dropout"][1]
        assert errors["odd"][0] == "ValueError" and "even" in errors["odd"][1]
        assert errors["causal"][0] == "ValueError" and "disagree on causal" in errors["causal"][1]
        assert errors["softcap"][0] == "ValueError" and "disagree on softcap" in errors["softcap"][1]
        assert errors["ok"] is None, errors["ok"]


def _stalling_worker(rank, world_size, init_file, results, stop):
    """Rank 1 fails before the attention (and stays alive, holding its
    connections); rank 0 must get an error from the group's timeout."""
    # The short timeout on a group of its own: on the default group it would
    # also bound the start-up rendezvous, which a loaded machine can exceed.
    _init(rank, world_size, init_file, _TIMEOUT)
    dist.barrier()
    groups = [dist.new_group(timeout=datetime.timedelta(seconds=2)) for _ in range(2)]
    if rank == 1:
        try:
            raise RuntimeError("a failure on rank 1 before the attention")
        except RuntimeError:
            stop.wait(60)
        _put(results, rank, None)
        return
    outcome = []
    q = torch.randn(1, 8, 2, 8)
    # The argument exchange, then (on a fresh group) the ring's point-to-point ops.
    for check_args, group in zip((True, False), groups):
        start = time.monotonic()
        try:
            cp.ring_flash_attn_func(q, q, q, causal=True, check_args=check_args, group=group)
            outcome.append(("no error", time.monotonic() - start))
        except Exception as e:
            outcome.append((type(e).__name__, time.monotonic() - start))
    stop.set()
    _put(results, rank, outcome)


def test_failing_rank_does_not_hang_the_others():
    stop = mp.get_context("spawn").Event()
    got = _spawn(_stalling_worker, 2, (stop,), limit_s=60)
    for kind, seconds in got[0]:
        # gloo's timeout error (a RuntimeError), after about the 2 s timeout.
        assert kind in ("RuntimeError", "DistBackendError") and 1.0 < seconds < 30, got[0]


# ---------------------------------------------------------------------------
# PyTorch's own context parallelism (torch.distributed.tensor.experimental.
# context_parallel) with flash_attn_ext active as PyTorch's flash-attention
# implementation (flash_attn_ext.integrations.torch_flash): PyTorch shards the
# sequence, rotates K/V and merges the partial outputs through the lse; every
# local attention call is aten._scaled_dot_product_flash_attention (and its
# backward), which our implementation overrides. On CUDA, F.scaled_dot_product_attention
# on SDPA's FLASH backend reaches that op (one GPU here: a single-rank NCCL
# group). On the CPU, F.scaled_dot_product_attention runs
# _scaled_dot_product_flash_attention_for_cpu instead, which context_parallel
# cannot shard ("does not have a sharding strategy"), and PyTorch has no CPU
# kernel for the CUDA op; with our implementation active the ring runs there
# too when the aten op itself is called on the sequence-sharded DTensors that
# context_parallel's F.scaled_dot_product_attention wrapper would make, which
# is how the CPU case (2 gloo ranks) reaches it.

def _torch_cp_skip_reason(device):
    from flash_attn_ext.integrations import torch_flash

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if device == "cuda" and not dist.is_nccl_available():
        return "torch.distributed without NCCL"
    if not torch_flash.registry_available():
        return (f"torch {torch.__version__} has no flash-attention registry "
                f"(torch.nn.attention.register_flash_attention_impl, torch >= {torch_flash.MIN_TORCH})")
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.tensor import DTensor, Shard  # noqa: F401
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
        from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no context_parallel ({e})"
    return None


def _torch_cp_attention(leaves, causal, device, mesh):
    """The attention a model runs inside context_parallel, on this rank's
    (B, H, S/N, D) shards: F.scaled_dot_product_attention on SDPA's FLASH
    backend (CUDA), or the aten op it reaches there (CPU, see above)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    sharded = [DTensor.from_local(x, mesh, [Shard(2)], run_check=False) for x in leaves]
    return torch.ops.aten._scaled_dot_product_flash_attention(*sharded, 0.0, causal)[0].to_local()


def _torch_cp_worker(rank, world_size, init_file, results, device, cases):
    """Every case through context_parallel on this rank. Puts {case: ([out,
    dq, dk, dv] unsharded to the whole sequence, the implementation's call
    counts)}, or a traceback string."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard

        from flash_attn_ext.integrations import torch_flash

        if device == "cuda":
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                    timeout=_TIMEOUT)
        else:
            _init(rank, world_size, init_file, _TIMEOUT)
        mesh = init_device_mesh(device, (world_size,))
        report = {}
        torch_flash.activate()
        saved_balance = _cp_options.enable_load_balance
        try:
            for name, (causal, *tensors) in cases.items():
                torch_flash.counts.clear()
                # PyTorch balances causal work by head-tail (zigzag) sharding
                # and refuses non-causal attention while that is on.
                _cp_options.enable_load_balance = causal
                # q, k, v, dout: (B, H, S, D), the whole sequence. Copies: context_parallel shards its
                # buffers in place, and these tensors share memory with the parent's.
                bufs = [x.to(device, copy=True) for x in tensors]
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs)):
                    leaves = [b.detach().requires_grad_() for b in bufs[:3]]
                    out = _torch_cp_attention(leaves, causal, device, mesh)
                    grads = torch.autograd.grad(out, leaves, bufs[3])
                    full = context_parallel_unshard(mesh, [out, *grads], [2] * 4)
                report[name] = ([t.detach().cpu() for t in full], dict(torch_flash.counts))
        finally:
            _cp_options.enable_load_balance = saved_balance
            torch_flash.deactivate()
        dist.destroy_process_group()
    except Exception:
        report = traceback.format_exc()
    _put(results, rank, report)


@pytest.mark.parametrize("device,world_size", [("cpu", 2), ("cuda", 1)])
def test_torch_context_parallel_runs_our_kernels(device, world_size):
    """Causal (load-balanced) and non-causal attention through PyTorch's
    context_parallel: out, dq, dk, dv against the float64 reference by the
    project's rule, and every local call of PyTorch's ring ran our kernels
    (one forward and one backward per ring step, none declined)."""
    reason = _torch_cp_skip_reason(device)
    if reason:
        pytest.skip(reason)
    dtypes = [t for t in ([torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16])
              if op_supports(device, t)]
    if not dtypes:
        pytest.skip(f"this build has no {device} kernel for the dtypes tested")
    # (B, H, S, D): S divisible by 2 * world_size (head-tail sharding); head dim 64 on CUDA
    # (a build restricted to FLASH_ATTN_EXT_HDIMS=64,128 has it).
    batch, nheads, seqlen, headdim = (1, 2, 32, 16) if device == "cpu" else (2, 4, 256, 64)
    cases = {}
    for dtype in dtypes:
        for causal in (True, False):
            tensors = [torch.randn(batch, nheads, seqlen, headdim).to(dtype) for _ in range(4)]
            cases[f"{str(dtype).split('.')[-1]} causal={causal}"] = (causal, *tensors)
    got = _spawn(_torch_cp_worker, world_size, (device, cases), limit_s=120)
    for rank in range(world_size):
        assert not isinstance(got[rank], str), f"rank {rank} raised:\n{got[rank]}"

    op = "_scaled_dot_product_flash_attention"
    for name, (causal, q, k, v, dout) in cases.items():
        for rank in range(world_size):
            counts = got[rank][name][1]
            # With load balancing no ring step is skipped; without, non-causal skips none either.
            assert counts.get(op) == world_size and counts.get(op + "_backward") == world_size, (name, rank, counts)
            assert not any(key.endswith(":declined") for key in counts), (name, rank, counts)
        t = lambda x: x.transpose(1, 2).to(device)  # noqa: E731  (B, H, S, D) -> (B, S, H, D)
        ours = [t(x) for x in got[0][name][0]]
        refs = {}
        for kind in ("ref64", "math", "sdpa"):
            if kind != "ref64" and q.dtype not in (torch.float16, torch.bfloat16):
                continue
            leaves = [t(x).to(torch.float64 if kind == "ref64" else x.dtype).requires_grad_() for x in (q, k, v)]
            if kind == "sdpa":
                out = sdpa_default(*leaves, causal=causal)
            else:
                out = attention_ref(*leaves, causal=causal, upcast=kind == "ref64")[0]
            refs[kind] = [out.detach(), *torch.autograd.grad(out, leaves, t(dout).to(out.dtype))]
        for i, label in enumerate(("out", "dq", "dk", "dv")):
            what = f"context_parallel on {device}, {world_size} rank(s), {name}: {label}"
            if q.dtype == torch.float32:
                assert_fp32_close(ours[i], refs["ref64"][i], what)
            else:
                # One dtype rounding per ring block before PyTorch's fp32 merge, as in ours.
                slack = 1e-5 + cp._block_rounding_slack(q.dtype, world_size)
                assert_close_to_ref(ours[i], refs["ref64"][i], (refs["math"][i], refs["sdpa"][i]), what, slack=slack)


# ---------------------------------------------------------------------------
# Single process: the planning, the merge, single-rank groups.

@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_plan_covers_every_visible_pair_once(layout):
    """For every rank and every K/V block, the op calls of the plan, each with
    its bottom-right aligned window, cover exactly the visible (query, key)
    pairs of the full-sequence mask, each once."""
    windows = [(-1, -1), (0, 0), (3, 2), (7, -1), (-1, 5), (1, 0)]
    for world_size in (1, 2, 3):
        for sq, sk in ((12 * world_size, 12 * world_size), (6 * world_size, 12 * world_size),
                       (12 * world_size, 4 * world_size)):
            lq, lk = sq // world_size, sk // world_size
            for causal in (False, True):
                for window in windows:
                    full = visible_mask(sq, sk, causal, window).int()
                    for rank in range(world_size):
                        ring = types.SimpleNamespace(rank=rank, world_size=world_size)
                        geo = cp._Geometry(ring, torch.empty(1, lq), torch.empty(1, lk), causal, window, layout)
                        qpos = cp.shard(torch.arange(sq), rank, world_size, layout, dim=0)
                        for src in range(world_size):
                            kpos = cp.shard(torch.arange(sk), src, world_size, layout, dim=0)
                            covered = torch.zeros(sq, sk, dtype=torch.int)
                            for b in geo.ring_blocks(src):
                                part = visible_mask(b.q_hi - b.q_lo, b.k_hi - b.k_lo, False,
                                                    (b.window_left, b.window_right))
                                qi, ki = qpos[b.q_lo:b.q_hi], kpos[b.k_lo:b.k_hi]
                                covered[qi[:, None], ki[None, :]] += part.int()
                            want = torch.zeros_like(covered)
                            want[qpos[:, None], kpos[None, :]] = full[qpos[:, None], kpos[None, :]]
                            assert torch.equal(covered, want), (layout, world_size, sq, sk, causal, window, rank, src)


def test_shard_unshard_round_trip():
    x = torch.arange(2 * 24).reshape(2, 24)
    for layout in cp.LAYOUTS:
        for world_size in (1, 2, 3):
            parts = [cp.shard(x, r, world_size, layout) for r in range(world_size)]
            assert torch.equal(cp.unshard(parts, layout), x)
    assert cp.shard(x, 1, 3, "zigzag")[0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="divisible by 10"):
        cp.shard(x, 0, 5, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        cp.shard(x, 0, 2, "striped")


@pytest.mark.parametrize("device", DEVICES)
def test_merge_attention_equals_attention_over_all_keys(device):
    """Attention over keys [0, s) and [s, n) merged through the lse equals the
    attention over all keys, including rows that see no key in one half or in
    either (+inf lse)."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = torch.randn(2, 12, 2, 16, device=device, dtype=dtype)
    k = torch.randn(2, 8, 2, 16, device=device, dtype=dtype)
    v = torch.randn(2, 8, 2, 16, device=device, dtype=dtype)
    window = (2, 0)  # with seqlen_q > seqlen_k: the first 4 rows see no key at all
    full_out, full_lse, _ = flash_attn_ext.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
    halves = []
    for lo, hi in ((0, 6), (6, 8)):
        # The same global mask on a slice of the keys: bottom-right alignment
        # moves with the slice, so the window sides shift by the cut.
        shift = 8 - hi
        halves.append(flash_attn_ext.flash_attn_func(q, k[:, lo:hi], v[:, lo:hi], window_size=(window[0] - shift,
                                                     window[1] + shift), return_attn_probs=True)[:2])
    assert torch.isinf(halves[0][1]).any() and torch.isinf(halves[1][1]).any()
    out, lse = cp.merge_attention(*halves[0], *halves[1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(full_lse)) and (lse[torch.isinf(lse)] > 0).all()
    assert (out[:, :4] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, full_out.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(full_lse)
    torch.testing.assert_close(lse[finite], full_lse[finite], atol=1e-5, rtol=1e-5)
    # Both sides empty: out 0, lse +inf.
    empty = torch.full_like(full_lse, float("inf"))
    out, lse = cp.merge_attention(torch.zeros_like(full_out), empty, torch.zeros_like(full_out), empty)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    q = torch.randn(1, 8, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ring_flash_attn_func(q, q, q)


@pytest.fixture(scope="module")
def single_rank_group():
    """A one-rank process group in this process (gloo for CPU tensors, NCCL
    for CUDA ones), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1, timeout=_TIMEOUT)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ring", "all_gather"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (3, 2)), (True, (4, -1))])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_single_rank_group_matches_flash_attn_func(single_rank_group, device, method, causal, window, softcap):
    """One rank: zigzag still cuts the rank's sequence in two pieces, so
    windows run the planned calls and the lse merge against the dense kernel."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 32, 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 32, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 32, 2, 32, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    out, lse, _ = _FUNCS[method](q, k, v, causal=causal, window_size=window, softcap=softcap,
                                 return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse, _ = flash_attn_ext.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                         softcap=softcap, return_attn_probs=True)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_single_rank_group_rejects_unsupported(single_rank_group):
    q = torch.randn(1, 8, 2, 8)
    for kw, name in ((dict(dropout_p=0.1), "dropout_p"), (dict(alibi_slopes=torch.zeros(2)), "alibi_slopes")):
        with pytest.raises(NotImplementedError, match=name):
            cp.ring_flash_attn_func(q, q, q, **kw)
    for bad, error in ((-1.0, ValueError), (float("inf"), ValueError), ("2", TypeError)):
        with pytest.raises(error, match="softcap"):
            cp.ring_flash_attn_func(q, q, q, softcap=bad)
    with pytest.raises(ValueError, match="layout"):
        cp.all_gather_flash_attn_func(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="same shape"):
        cp.ring_flash_attn_func(q, q, q[:, :4])
    with pytest.raises(TypeError, match="window_size"):
        cp.ring_flash_attn_func(q, q, q, window_size=3)


# ---------------------------------------------------------------------------
# flash-attn's low-level functions.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 1))])
def test_flash_attn_forward_backward_match_flash_attn_func(device, causal, window):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = torch.randn(2, 20, 4, 32, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 24, 2, 32, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 24, 2, 32, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    scale = 0.3
    # deterministic on both sides: the CUDA backward is otherwise free to
    # accumulate dq in a different order each run, and the check is bitwise.
    ref_out, ref_lse, _ = flash_attn_ext.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                                         window_size=window, deterministic=True,
                                                         return_attn_probs=True)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, (q, k, v), dout)
    out, lse, s_dmask, rng_state = fai._flash_attn_forward(q.detach(), k.detach(), v.detach(), 0.0, scale, causal,
                                                           window[0], window[1], 0.0, None, False)
    assert not out.requires_grad and s_dmask.numel() == 0 and rng_state.shape == (2,)
    assert rng_state.dtype == torch.int64
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    # As ring libraries do: gradients written into slices of larger buffers.
    bufs = [torch.full((2, 32) + t.shape[2:], float("nan"), device=device, dtype=dtype) for t in (q, k, v)]
    dq, dk, dv = bufs[0][:, :20], bufs[1][:, :24], bufs[2][:, :24]
    softmax_d = fai._flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, dq, dk, dv, 0.0, scale,
                                         causal, window[0], window[1], 0.0, None, True)
    for ours, ref in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert torch.isnan(bufs[0][:, 20:]).all()  # nothing written past the slice
    assert softmax_d.shape == (2, 4, 128) and softmax_d.dtype == torch.float32
    torch.testing.assert_close(softmax_d[:, :, :20], (dout.float() * out.float()).sum(-1).transpose(1, 2))
    assert (softmax_d[:, :, 20:] == 0).all()


def test_flash_attn_interface_signatures_are_flash_attn_2_8s():
    import inspect

    assert list(inspect.signature(fai._flash_attn_forward).parameters) == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
        "alibi_slopes", "return_softmax"]
    assert list(inspect.signature(fai._flash_attn_backward).parameters) == [
        "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale", "causal",
        "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic", "rng_state"]
    assert list(inspect.signature(fai._flash_attn_varlen_forward).parameters) == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale",
        "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "return_softmax", "block_table",
        "leftpad_k", "seqused_k", "zero_tensors"]
    assert list(inspect.signature(fai._flash_attn_varlen_backward).parameters) == [
        "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
        "max_seqlen_k", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
        "alibi_slopes", "deterministic", "rng_state", "zero_tensors"]


def test_flash_attn_interface_rejects_unsupported():
    q = torch.randn(1, 8, 2, 8)
    args = dict(dropout_p=0.0, softmax_scale=1.0, causal=False, window_size_left=-1, window_size_right=-1,
                softcap=0.0, alibi_slopes=None, return_softmax=False)
    with pytest.raises(NotImplementedError, match="return_softmax"):  # needs dropout, as in flash-attn
        fai._flash_attn_forward(q, q, q, **{**args, "return_softmax": True})
    with pytest.raises(ValueError, match="dropout_p"):
        fai._flash_attn_forward(q, q, q, **{**args, "dropout_p": 1.0})
    out, lse, _, _ = fai._flash_attn_forward(q, q, q, **args)
    with pytest.raises(ValueError, match="rng_state"):  # dropout's backward needs its forward's rng_state
        fai._flash_attn_backward(q, q, q, q, out, lse, None, None, None, 0.5, 1.0, False, -1, -1, 0.0, None, False)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    pages = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="leftpad_k together with block_table"):  # as flash-attn
        fai._flash_attn_varlen_forward(q[0], q[None, 0], q[None, 0], cu, cu, 8, 8, 0.0, 1.0, False,
                                       block_table=pages, leftpad_k=torch.zeros(1, dtype=torch.int32))
    for bad, error, match in ((torch.zeros(2, dtype=torch.int32), ValueError, r"int32 \(1,\)"),
                              (torch.zeros(1, dtype=torch.int64), ValueError, "int32"),
                              (torch.tensor([9], dtype=torch.int32), RuntimeError, r"leftpad_k\[0\] = 9"),
                              (torch.tensor([-1], dtype=torch.int32), RuntimeError, "outside")):
        with pytest.raises(error, match=match):
            fai._flash_attn_varlen_forward(q[0], q[0], q[0], cu, cu, 8, 8, 0.0, 1.0, False, leftpad_k=bad)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_varlen_leftpad_k(device):
    """leftpad_k: sequence i's keys start leftpad_k[i] rows into its rows (and, with seqused_k, number
    seqused_k[i] - leftpad_k[i], as flash-attn counts them): the same as flash_attn_func on those keys."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k, pad = [3, 5, 2, 4], [9, 6, 4, 7], [2, 0, 4, 3]
    cu_q = torch.tensor([0, 3, 8, 10, 14], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 15, 19, 26], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), 4, 16, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, 16, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), 2, 16, device=device, dtype=dtype)
    leftpad = torch.tensor(pad, dtype=torch.int32, device=device)
    for used in (None, [8, 6, 4, 5]):
        seqused = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
        out, lse, _, _ = fai._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 5, 9, 0.0, 0.25, True,
                                                        leftpad_k=leftpad, seqused_k=seqused)
        for i in range(4):
            q0, q1, k0 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item()
            k1 = cu_k[i + 1].item() if used is None else k0 + used[i]
            k0 += pad[i]
            if k0 == k1:  # no key left: out 0, lse +inf
                assert (out[q0:q1] == 0).all() and torch.isinf(lse[:, q0:q1]).all()
                continue
            ref, ref_lse, _ = flash_attn_ext.flash_attn_func(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                                             softmax_scale=0.25, causal=True, return_attn_probs=True)
            torch.testing.assert_close(out[q0:q1], ref[0], atol=0, rtol=0)
            torch.testing.assert_close(lse[:, q0:q1], ref_lse[0], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_varlen_matches_per_sequence(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 9, 0]
    cu_q = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 11, 20, 20], dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), 4, 16, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, 16, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), 2, 16, device=device, dtype=dtype)
    dout = torch.randn_like(q)
    out, lse, _, _ = fai._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 9, 9, 0.0, 0.25, True)
    assert lse.shape == (4, sum(lens_q))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = fai._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 9, 9, 0.0, 0.25, True,
                                                -1, -1, 0.0, None, True)
    assert softmax_d.shape == (4, sum(lens_q) + 128 * 4)
    for i in range(4):
        q0, q1, k0, k1 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
        if q0 == q1:
            continue
        if k0 == k1:
            assert (out[q0:q1] == 0).all() and torch.isinf(lse[:, q0:q1]).all() and (dq[q0:q1] == 0).all()
            continue
        qi, ki, vi = (x[None, a:b].detach().clone().requires_grad_() for x, a, b in ((q, q0, q1), (k, k0, k1),
                                                                                     (v, k0, k1)))
        ref, ref_lse, _ = flash_attn_ext.flash_attn_func(qi, ki, vi, softmax_scale=0.25, causal=True,
                                                         deterministic=True, return_attn_probs=True)
        ref_grads = torch.autograd.grad(ref, (qi, ki, vi), dout[None, q0:q1])
        torch.testing.assert_close(out[q0:q1], ref[0], atol=0, rtol=0)
        torch.testing.assert_close(lse[:, q0:q1], ref_lse[0], atol=0, rtol=0)
        for ours, r in zip((dq[q0:q1], dk[k0:k1], dv[k0:k1]), ref_grads):
            torch.testing.assert_close(ours, r[0], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_interface_softcap_alibi(device):
    """softcap and alibi_slopes reach the kernels through flash-attn's low-level
    functions, dense and varlen: the same results as flash_attn_func."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(2, 24, 4, 32, device=device, dtype=dtype) * 2 for _ in range(3))
    slopes = torch.rand(2, 4, device=device)
    dout = torch.randn_like(q)
    out, lse, _, _ = fai._flash_attn_forward(q, k, v, 0.0, 0.2, True, -1, -1, 5.0, slopes, False)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fai._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, 0.2, True, -1, -1, 5.0, slopes, True)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref, ref_lse, _ = flash_attn_ext.flash_attn_func(*leaves, softmax_scale=0.2, causal=True, softcap=5.0,
                                                     alibi_slopes=slopes, deterministic=True, return_attn_probs=True)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    for ours, r in zip((dq, dk, dv), ref_grads):
        torch.testing.assert_close(ours, r, atol=0, rtol=0)
    # varlen: two sequences of 24, per-sequence slopes.
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=device)
    vout, vlse, _, _ = fai._flash_attn_varlen_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 24,
                                                      24, 0.0, 0.2, True, softcap=5.0, alibi_slopes=slopes)
    torch.testing.assert_close(vout.view_as(out), out, atol=0, rtol=0)
    torch.testing.assert_close(vlse, lse.transpose(0, 1).flatten(1), atol=0, rtol=0)


def test_install_as_flash_attn():
    saved = {name: sys.modules.get(name) for name in ("flash_attn", "flash_attn.flash_attn_interface")}
    if saved["flash_attn"] is not None or importlib.util.find_spec("flash_attn") is not None:
        with pytest.raises(RuntimeError, match="force=True"):
            fai.install_as_flash_attn()
        return
    try:
        package = fai.install_as_flash_attn()
        assert fai.install_as_flash_attn() is package
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

        assert flash_attn.__version__ == fai.FLASH_ATTN_VERSION
        assert flash_attn.flash_attn_func is flash_attn_ext.flash_attn_func
        assert _flash_attn_forward is fai._flash_attn_forward and _flash_attn_backward is fai._flash_attn_backward
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ---------------------------------------------------------------------------
# A ring-attention library on top of the low-level functions, unchanged.

def _ring_flash_attn_modules():
    """ring-flash-attention's ring and zigzag modules, loaded without the
    package's __init__ (which also imports its Hugging Face adapter, and so
    transformers)."""
    fai.install_as_flash_attn()
    root = os.path.dirname(importlib.util.find_spec("ring_flash_attn").origin)
    package = types.ModuleType("ring_flash_attn")
    package.__path__ = [root]
    sys.modules["ring_flash_attn"] = package
    modules = {}
    for name in ("utils", "ring_flash_attn", "zigzag_ring_flash_attn"):
        spec = importlib.util.spec_from_file_location(f"ring_flash_attn.{name}", os.path.join(root, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def _ring_library_worker(rank, world_size, init_file, results, inputs):
    _init(rank, world_size, init_file, _TIMEOUT)
    try:
        modules = _ring_flash_attn_modules()
        report = {}
        for fname, layout in (("ring_flash_attn", "contiguous"), ("zigzag_ring_flash_attn", "zigzag")):
            q, k, v = (cp.shard(x, rank, world_size, layout).clone().requires_grad_() for x in inputs[:3])
            out = getattr(modules[fname], f"{fname}_func")(q, k, v, causal=True)
            out.backward(cp.shard(inputs[3], rank, world_size, layout))
            report[fname] = tuple(t.detach() for t in (out, q.grad, k.grad, v.grad))
    except Exception:
        report = traceback.format_exc()
    _put(results, rank, report)
    dist.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("ring_flash_attn") is None or importlib.util.find_spec("flash_attn")
                    is not None, reason="needs ring-flash-attn installed (pip install --no-deps ring-flash-attn) "
                    "and no flash-attn")
def test_ring_flash_attn_library_runs_on_our_functions():
    """ring-flash-attention's own ring and zigzag attention, on 2 gloo ranks,
    over _flash_attn_forward / _flash_attn_backward. In bf16: the library
    returns dq in bf16 whatever the input, and with fp32 inputs it sends a
    gradient buffer it then overwrites (its `.to(torch.float32)` does not copy
    an fp32 tensor), so fp32 is not a dtype it supports."""
    inputs = [torch.randn(1, 32, 2, 16).bfloat16() for _ in range(4)]
    got = _spawn(_ring_library_worker, 2, (inputs,))
    q, k, v, dout = (x.clone().requires_grad_() for x in inputs)
    ref = flash_attn_ext.flash_attn_func(q, k, v, causal=True)
    ref.backward(dout.detach())
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in inputs[:3])
    ref64 = attention_ref(q64, k64, v64, causal=True)[0]
    ref64.backward(inputs[3].double())
    lowp = attention_ref(*(x.detach().clone().requires_grad_() for x in inputs[:3]), causal=True, upcast=False)[0]
    for rank in range(2):
        assert not isinstance(got[rank], str), got[rank]
    for fname, layout in (("ring_flash_attn", "contiguous"), ("zigzag_ring_flash_attn", "zigzag")):
        parts = [cp.unshard([got[r][fname][i] for r in range(2)], layout) for i in range(4)]
        assert_close_to_ref(parts[0], ref64, (ref.detach(), lowp.detach()), f"{fname} out")
        for ours, ref_grad, ref_grad64, name in zip(parts[1:], (q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad),
                                                    ("dq", "dk", "dv")):
            # Against flash_attn_func's own bf16 gradients, with the library's
            # extra bf16 roundings (its dq, and every partial output) as slack.
            err = (ours.double() - ref_grad64).abs().max().item()
            ref_err = (ref_grad.double() - ref_grad64).abs().max().item()
            assert err <= 4 * ref_err + 2e-2, f"{fname} {name}: {err:.3e} vs flash_attn_func's {ref_err:.3e}"


def test_readme_example_runs_under_torchrun():
    """examples/context_parallel.py, as the README launches it (2 gloo ranks)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "examples", "context_parallel.py"), "--seqlen", "256"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ring attention over 2 ranks" in result.stdout


def test_context_parallel_benchmark_runs_under_torchrun(tmp_path, capsys):
    """benchmarks/bench_context_parallel.py --quick in 2 gloo ranks as the
    README launches it: the correctness part (ring and all-gather, causal
    zigzag and non-causal, against the float64 reference by the 2x rule)
    passes, the JSON holds the strong and weak rows with the ring's
    communication measurements, and --report makes the table from it."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_context_parallel.py")
    out = tmp_path / "cp_n2.json"
    # --cpu: gloo even on a machine with a GPU (two ranks cannot share one device there).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, "--quick",
           "--cpu", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["correct"] and payload["env"]["backend"] == "gloo" and payload["env"]["world_size"] == 2
    checked = {r["name"] for r in payload["correctness"] if r["gating"]}
    assert checked == {"ring zigzag causal=True", "all_gather zigzag causal=True", "ring contiguous causal=False",
                       "all_gather contiguous causal=False"}, checked
    timed = {(r["scaling"], r["causal"], r["variant"]) for r in payload["rows"] if "skipped" not in r}
    assert timed == {(s, c, m) for s in ("strong", "weak") for c in (True, False) for m in ("ring", "all_gather")}
    ring = [r for r in payload["rows"] if r["variant"] == "ring"]
    assert all(r["comm_bwd_ms"] > 0 and r["compute_fwd_ms"] > 0 and r["hidden_bwd"] is not None for r in ring)
    # PyTorch's context_parallel has no CPU path for F.scaled_dot_product_attention, with its kernels or
    # ours (test_torch_context_parallel_runs_our_kernels reaches its ring through the aten op): skipped
    # with the reason, every row.
    for variant in ("torch_cp", "torch_cp_faext"):
        rows = [r for r in payload["rows"] if r["variant"] == variant]
        assert len(rows) == 4 and all("CUDA" in r["skipped"] for r in rows), rows
    assert "CUDA" in payload["torch_cp_faext_skipped"]

    spec = importlib.util.spec_from_file_location("bench_context_parallel", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    capsys.readouterr()
    assert bench.main(["--report", str(out), "--plot", str(tmp_path / "cp.png")]) == 0
    table = capsys.readouterr().out
    assert "| scaling |" in table and "every gating check passed" in table
