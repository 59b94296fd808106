"""Measurement helpers shared by the main job (`python -m flash_attn_ext`), the
benchmark scripts in benchmarks/ (through benchmarks/common.py).

It lives inside the package because the main job ships with it and
benchmarks/ does not. Nothing here is public API.

What is measured, and how:
  * FLOPs (flash-attn's convention): forward 4*B*H*Sq*Sk*D, halved when causal;
    backward 2.5x forward; forward+backward 3.5x forward.
  * GPU time: median of triton.testing.do_bench (it flushes L2 between calls);
    CUDA-event timing with the same flush when triton is missing.
  * CPU time: median wall time (time.perf_counter) of repeated calls after one
    warm-up call.
  * GPU memory: bytes allocated at the peak of a call minus those allocated
    before it (torch.cuda.max_memory_allocated after reset_peak_memory_stats).
  * CPU memory: the peak resident set size during a call (VmHWM, reset through
    /proc/self/clear_refs just before it) minus the resident size before it,
    measured on the first full-size call of a process forked for this one
    measurement (`run_in_fork`, `cpu_measure`): the fork's heap holds no
    blocks freed by earlier calls that the measured call could reuse unseen,
    so every byte it allocates shows up as new resident memory. (Pinning
    glibc's mmap threshold with mallopt instead was tried and rejected: it
    turns per-thread scratch allocations into mmap/munmap pairs, and our CPU
    forward at seqlen 512 went from 0.16 s to 4.5 s: the timing would lie.)
  * Accuracy: a result passes when its max abs error against a float64 (or
    float32) reference is at most twice PyTorch's own error in the same dtype
    plus a small slack (`passes_2x_rule`, through reference.two_x_rule).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import two_x_rule

# ----------------------------------------------------------------------------
# FLOPs


def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool,
                    direction: str = "fwd") -> float:
    """FLOPs of one attention call: two matmuls of 2*Sq*Sk*D each per head."""
    flops = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    if causal:
        flops /= 2
    factor = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[direction]
    return flops * factor


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------
# The implementations compared. Every callable takes q, k, v in our layout
# (batch, seqlen, nheads, headdim) and returns the output (in whatever layout
# the implementation produces; the caller only feeds it to autograd).


def ours_attention(q, k, v, causal: bool = False, deterministic: bool = False):
    """Our kernel through the public API, or the raw op while the public API is missing."""
    try:
        from flash_attn_ext import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None:
        return flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
    from flash_attn_ext import _ops

    out, _, _ = _ops.fwd(q, k, v, None, q.shape[-1] ** -0.5, causal, -1, -1, deterministic)
    return out


def sdpa_backends(device: str) -> Dict[str, "torch.nn.attention.SDPBackend"]:
    """The SDPA backends compared against on `device`, by short name."""
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_context(backend):
    """A context that restricts SDPA to `backend` (entered outside timed regions)."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def sdpa_attention(q, k, v, causal: bool = False):
    """torch SDPA on (B, S, H, D) tensors: it takes (B, H, S, D), so pass transposed views.

    Only for seqlen_q == seqlen_k when causal (SDPA's is_causal is top-left aligned,
    ours bottom-right; they agree on square problems).
    """
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)


def implementations(device: str):
    """name -> (context factory, fn(q, k, v, causal)) for ours and each SDPA backend on `device`."""
    impls = {"ours": (contextlib.nullcontext, ours_attention)}
    for name, backend in sdpa_backends(device).items():
        impls[name] = (lambda b=backend: sdpa_context(b), sdpa_attention)
    return impls


def short_error(exc: BaseException) -> str:
    """The first line of an exception message, without PyTorch's C++ trace."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:200]


# ----------------------------------------------------------------------------
# GPU timing and memory


def _cuda_event_median_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """do_bench's method with CUDA events: flush L2, time each call, take the median."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_rep = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cuda_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of fn() in milliseconds (triton.testing.do_bench, else CUDA events)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is None:
        return _cuda_event_median_ms(fn, warmup_ms, rep_ms)
    try:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of fn() beyond what was allocated before it.

    fn's results are kept alive until the peak is read, so returned tensors
    (out, grads) count.
    """
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


# ----------------------------------------------------------------------------
# CPU timing and memory


def time_cpu_ms(fn: Callable[[], object], max_reps: int = 5, budget_s: float = 1.5, long_call_s: float = 2.0,
                on_call: Optional[Callable[[], None]] = None, after_call: Optional[Callable[[], None]] = None):
    """Median wall time of fn() in ms and the number of timed calls.

    One untimed warm-up call, then timed calls until `max_reps` of them or,
    once at least one was timed, `budget_s` seconds spent. A warm-up call
    longer than `long_call_s` is itself kept as a timed sample: for such calls
    one-time setup is a small share, and a second call would double the
    sweep's runtime. `on_call`/`after_call` run around every call, the
    warm-up included (the memory probe uses them; they are outside the timed
    region).
    """
    samples: List[float] = []
    spent = 0.0
    first = True
    while len(samples) < max_reps and not (samples and spent >= budget_s):
        if on_call is not None:
            on_call()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if after_call is not None:
            after_call()
        spent += dt
        if not first or dt > long_call_s:
            samples.append(dt * 1e3)
        first = False
    return statistics.median(samples), len(samples)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_probe_available() -> bool:
    try:
        _proc_status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, RuntimeError):
        return False


class CpuPeakMemory:
    """Peak RSS growth of a call: start() before it, stop() after it (.last_bytes, .max_bytes)."""

    def __init__(self):
        self.last_bytes: Optional[int] = None
        self.max_bytes: Optional[int] = None
        self._before_kb = 0

    def start(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self._before_kb = _proc_status_kb("VmRSS")

    def stop(self):
        self.last_bytes = (_proc_status_kb("VmHWM") - self._before_kb) * 1024
        self.max_bytes = self.last_bytes if self.max_bytes is None else max(self.max_bytes, self.last_bytes)


# ----------------------------------------------------------------------------
# Forward / forward+backward closures (for timing and memory)


def make_inputs(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device, requires_grad=True, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, headdim, dtype=dtype, device=device, generator=gen)
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device, generator=gen)
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, dtype=dtype, device=device, generator=gen)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def fwd_closure(fn, q, k, v, causal):
    def run():
        with torch.no_grad():
            return fn(q, k, v, causal)

    return run


def fwdbwd_closure(fn, q, k, v, causal, dout):
    """Forward then backward; dout must have the shape of fn's output."""

    def run():
        out = fn(q, k, v, causal)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    return run


def bwd_closure(fn, q, k, v, causal, dout):
    """Backward alone: one forward outside, then autograd.grad(retain_graph=True) per call.

    autograd.grad returns fresh gradients (no accumulation into .grad), so
    each call runs exactly the backward kernels of `fn` and nothing else.
    """
    out = fn(q, k, v, causal)

    def run():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    return run, out


def run_in_fork(fn: Callable[[], object]):
    """Run fn() in a forked child and return its (JSON-able) result.

    The parent must not have run a parallel (OpenMP) region before forking:
    GNU OpenMP's thread pool does not survive fork. A child that dies (killed
    for memory, crashed) raises RuntimeError here; an exception in fn is
    re-raised as RuntimeError with its first line. Without fork (not Linux),
    fn runs in this process.
    """
    if not hasattr(os, "fork"):
        return fn()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            payload = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            payload = {"error": short_error(exc)}
        try:
            with os.fdopen(write_fd, "w") as f:
                json.dump(payload, f, default=str)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"measurement process died ({_describe_status(status)}; killed for memory?)")
    payload = json.loads(data)
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["ok"]


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def cpu_measure(impl: str, batch: int, seqlen: int, nheads: int, headdim: int, dtype: torch.dtype, causal: bool,
                direction: str, reps: int = 5, budget_s: float = 1.5, long_call_s: float = 2.0,
                threads: int = 0) -> dict:
    """Time and peak memory of one CPU configuration; meant to run in a fork (run_in_fork).

    A call at seqlen 64 first warms the code path and the thread pool; the
    first full-size call is then the memory sample, and the timing follows
    `time_cpu_ms`'s rules (that first call is its untimed warm-up).
    """
    if threads:
        torch.set_num_threads(threads)
    ctx_factory, fn = implementations("cpu")[impl]

    def closure(S):
        q, k, v = make_inputs(batch, S, S, nheads, nheads, headdim, dtype, "cpu", seed=S)
        dout = torch.randn(q.shape, dtype=dtype)
        g = dout if impl == "ours" else dout.transpose(1, 2)
        return fwd_closure(fn, q, k, v, causal) if direction == "fwd" else fwdbwd_closure(fn, q, k, v, causal, g)

    probe = cpu_memory_probe_available()
    mem = CpuPeakMemory()
    calls = [0]

    def on_call():
        if probe and calls[0] == 0:
            mem.start()

    def after_call():
        if probe and calls[0] == 0:
            mem.stop()
        calls[0] += 1

    with ctx_factory():
        closure(64)()
        run = closure(seqlen)
        ms, n = time_cpu_ms(run, max_reps=reps, budget_s=budget_s, long_call_s=long_call_s, on_call=on_call,
                            after_call=after_call)
    return {"ms": ms, "reps": n, "peak_extra_bytes": mem.last_bytes, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------
# References and the accuracy rule


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float((x.detach().double() - ref.detach().double()).abs().max())


def passes_2x_rule(ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    """(passed, our error, PyTorch's error, bound): the project's rule
    (flash_attn_ext.reference.two_x_rule, the one the tests use), ours within
    2x PyTorch's own error + slack. dtype: kept for the callers, unused."""
    verdict = two_x_rule(ours.detach(), ref.detach(), torch_same_dtype.detach())
    return verdict.ok, verdict.err, verdict.torch_err, verdict.bound


# ----------------------------------------------------------------------------
# Environment, tables, JSON


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(device: str) -> dict:
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_type": device,
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", gpu_memory_GiB=round(props.total_memory / 2**30, 1))
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info["device"] = info["cpu_model"]
    return info


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "device"


def default_json_path(env: dict, folder: str = os.path.join("benchmarks", "results"), prefix: str = "") -> str:
    return os.path.join(folder, f"{prefix}{slug(env['device'])}_{env['date'][:10]}.json")


def write_json(path: str, payload: dict) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    rows = [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out: List[str] = [line(headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20
