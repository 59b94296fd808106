"""Context parallelism over N processes (issue 12): correctness, strong and
weak scaling of flash_attn_ext.distributed, beside PyTorch's own context
parallelism, one JSON per N; and the report over several N (table + plot).

    torchrun --standalone --nproc-per-node N benchmarks/bench_context_parallel.py [--quick] [--out PATH]
    python benchmarks/bench_context_parallel.py --quick              # one process, N = 1
    python benchmarks/bench_context_parallel.py --report a.json b.json ... [--plot out.png]

Backend from the device: NCCL with one GPU per rank (LOCAL_RANK) when CUDA is
present, gloo on CPU. The NCCL environment the machine sets is left as it is
(and recorded in the JSON). Every phase below runs for each mask: causal with
the zigzag layout (balanced causal work) and non-causal with the contiguous
one (nothing to balance).

Correctness (at --check-seqlen, small enough for the float64 reference):
rank 0 draws q, k, v and dout from a fixed seed and broadcasts them; every
rank runs ring_flash_attn_func and all_gather_flash_attn_func on its shard
and its backward; out, dq, dk, dv are gathered to the full sequence and
judged on rank 0 against the float64 reference by the project's 2x rule
(flash_attn_ext.reference.two_x_rule: PyTorch's error in the dtype is the
worse of its math path and its default SDPA on the same inputs), with the
block-rounding slack of distributed._block_rounding_slack, the same judgement
as tests/test_distributed.py. The single-device flash_attn_func on the same
inputs is judged alike and its difference from the distributed result
reported. A failure makes the run exit 1 (after writing the JSON). PyTorch's
context_parallel is checked the same way (reported, not gating).

Timing (per step, median of --reps after --warmup): barrier, device sync,
time.perf_counter around the forward, then again around the backward
(torch.autograd.grad with a fixed dout); each rank's time, the max over
ranks taken per rep. The calls pass check_args=False (no argument exchange:
what a training loop does once its shapes are settled).
  strong: the whole sequence --seqlen (default 128k) split over N ranks;
  weak:   --tokens-per-rank (default 32k) per rank, N times that in all.
Variants: ring (ring_flash_attn_func), all_gather (all_gather_flash_attn_func),
torch_cp (torch.distributed.tensor.experimental.context_parallel around
F.scaled_dot_product_attention with PyTorch's default CUDA kernel choice,
head-tail load balancing = our zigzag, its default all-gather rotation; GQA
by repeating the K/V heads, as torchtitan does, unless --torch-cp-gqa
native; it is skipped, with the reason in the JSON, where PyTorch has no
such path, e.g. on CPU), torch_cp_faext (the same context_parallel with
flash_attn_ext activated as PyTorch's flash-attention implementation and SDPA's
FLASH backend forced: PyTorch's ring and merge around our kernels; the
implementation's call counter must show that every flash call ran ours, none
handed back to PyTorch's; CUDA only), and at N = 1 the single-device
baselines on the whole sequence: flash_attn_func, sdpa (PyTorch's default
choice among its fused CUDA kernels, math left out, on the inputs torch_cp
gets; GPU only) and sdpa_faext (SDPA's FLASH backend with our implementation
active, on the same inputs; beside torch_cp_faext).

Communication hidden behind compute (ring only, forward and backward apart):
  T_ring     the ring step as above;
  T_compute  the same ring code with a ring that does not communicate
             (`exchange` hands back the block it was given): every op call
             and lse merge of the step on blocks of the same shapes;
  T_comm     the step's transfers alone, in the ring's order and waits:
             forward N-1 K/V block exchanges; backward N-1 K/V exchanges and
             N fp32 dK/dV exchanges;
  hidden = 1 - (T_ring - T_compute) / T_comm
(1: all transfer time overlapped; 0: none; reported as measured, so noise can
put it slightly outside [0, 1]; none at N = 1, which transfers nothing).

Efficiency (report): per-rank throughput at N over that at N = 1,
(W_N / (N * T_N)) / (W_1 / T_1) with W the attention FLOPs of the whole
problem: T_1 / (N * T_N) for strong scaling, N * T_1 / T_N for weak scaling
(N times the tokens: N^2 the work, N times per rank). T_1 is the
single-device baseline of the N = 1 JSON (flash_attn_func for ours, sdpa for
torch_cp, sdpa_faext for torch_cp_faext), so the ring's own bookkeeping at
N = 1 counts against it; the times are forward + backward.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the checkout first on the path)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flash_attn_ext  # noqa: E402
from flash_attn_ext import distributed as cp  # noqa: E402
from flash_attn_ext.reference import attention_ref, sdpa_default, two_x_rule  # noqa: E402

# (causal, layout) of the two masks measured.
MASKS = {True: "zigzag", False: "contiguous"}
METHODS = {"ring": cp.ring_flash_attn_func, "all_gather": cp.all_gather_flash_attn_func}
# PyTorch's context_parallel: with its own kernels, and with ours in its flash slot.
TORCH_CP = ("torch_cp", "torch_cp_faext")
VARIANTS = (*METHODS, *TORCH_CP)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# --quick: shapes for a CPU dry-run (seconds); explicit flags still win.
# Head dim 64: a GPU build restricted to FLASH_ATTN_EXT_HDIMS=64,128 runs it too.
QUICK = dict(seqlen=256, tokens_per_rank=128, nheads=4, nheads_k=2, headdim=64, check_seqlen=64, reps=1, warmup=1)
FULL = dict(seqlen=128 * 1024, tokens_per_rank=32 * 1024, nheads=32, nheads_k=8, headdim=128, check_seqlen=4096,
            reps=5, warmup=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes for a CPU dry-run: " + str(QUICK))
    p.add_argument("--seqlen", type=str, default=None, help="strong scaling: whole sequence (default 128k)")
    p.add_argument("--tokens-per-rank", type=str, default=None, help="weak scaling: tokens per rank (default 32k)")
    p.add_argument("--check-seqlen", type=str, default=None, help="correctness: whole sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=None, help="query heads (default 32)")
    p.add_argument("--nheads-k", type=int, default=None, help="key/value heads (default 8: GQA 32/8)")
    p.add_argument("--headdim", type=int, default=None, help="default 128")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--causal", default="both", help="1, 0 or both (default)")
    p.add_argument("--parts", default="correctness,strong,weak", help="which of correctness,strong,weak to run")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"of {','.join(VARIANTS)} (the N = 1 baselines come with them)")
    p.add_argument("--torch-cp-gqa", choices=["repeat", "native"], default="repeat",
                   help="GQA in PyTorch's CP: repeat the K/V heads (default) or SDPA's enable_gqa")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is present")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cp_<device>_n<N>_<date>.json)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="no run: table and plot from these JSONs")
    p.add_argument("--plot", default=None, help="PNG path for --report (default next to the first JSON)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("seqlen", "tokens_per_rank", "check_seqlen"):
        value = getattr(args, key)
        setattr(args, key, value if isinstance(value, int) else common.parse_list(value, int)[0])
    args.causal_list = [True, False] if args.causal == "both" else common.parse_causal(args.causal)
    args.parts = [x for x in args.parts.split(",") if x]
    args.variants = [x for x in args.variants.split(",") if x]
    for name in args.parts:
        if name not in ("correctness", "strong", "weak"):
            p.error(f"--parts: unknown part {name!r}")
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"--variants: unknown variant {name!r}")
    return args


# ---------------------------------------------------------------------------
# The process group.

class Run:
    """Rank, world size, device and backend of this process."""

    def __init__(self, args):
        self.own_group = not dist.is_initialized()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.own_group:
            if "RANK" not in os.environ:  # plain `python bench_context_parallel.py`: a group of one
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            use_cuda = torch.cuda.is_available() and not args.cpu
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            # NCCL's own variables (multicast, NVLS, ...) are read from the
            # environment by NCCL itself; nothing here sets or clears them.
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=20))
        self.backend = dist.get_backend()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(max(1, common.cpu_cores() // max(1, local)))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self):
        self.sync()
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index] if self.backend == "nccl" else None)

    def max_over_ranks(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def from_rank0(self, obj):
        box = [obj]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self):
        if self.own_group:
            dist.destroy_process_group()


def log(run, *msg):
    if run.rank == 0:
        print(*msg, flush=True)


# ---------------------------------------------------------------------------
# Timing.

def time_steps(run, forward, backward, reps, warmup):
    """Median (max over ranks) ms of forward() and of backward(forward's
    result), each between barriers and device syncs."""
    times = []
    for i in range(warmup + reps):
        run.barrier()
        t0 = time.perf_counter()
        state = forward()
        run.sync()
        t1 = time.perf_counter()
        run.barrier()
        t2 = time.perf_counter()
        backward(state)
        run.sync()
        t3 = time.perf_counter()
        del state
        if i >= warmup:
            times.append(((t1 - t0) * 1e3, (t3 - t2) * 1e3))
    flat = run.max_over_ranks([x for pair in times for x in pair])
    fwd, bwd = flat[0::2], flat[1::2]
    return statistics.median(fwd), statistics.median(bwd)


def grad_closures(fn, leaves, dout):
    return (lambda: fn(*leaves)), (lambda out: torch.autograd.grad(out, leaves, dout))


class _SilentRing(cp._Ring):
    """A ring that does not communicate: `exchange` hands back the block it
    was given, so the ring's step runs every op call and merge on blocks of
    the right shapes, and nothing else (T_compute)."""

    def exchange(self, tensor):
        return tensor, []


def ring_compute_only(q, k, v, causal, layout):
    geo = cp._Geometry(_SilentRing(None), q, k, causal, (-1, -1), layout)
    return cp._RingAttention.apply(q, k, v, geo, q.shape[-1] ** -0.5, 0.0, False)[0]


def ring_comm_only(run, k, v):
    """The ring step's transfers alone, in its order and with its waits
    (T_comm): forward and backward closures."""
    ring, world = cp._Ring(None), run.world
    kv0 = torch.stack((k.detach(), v.detach()))

    def forward():
        kv = kv0
        for _ in range(world - 1):
            kv, requests = ring.exchange(kv)
            cp._wait(requests)

    def backward(_):
        kv, dkv_in, dkv_requests = kv0, None, []
        for step in range(world):
            if step + 1 < world:
                next_kv, kv_requests = ring.exchange(kv)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            if step > 0:
                cp._wait(dkv_requests)
                dkv += dkv_in
            if world > 1:
                dkv_in, dkv_requests = ring.exchange(dkv)
            if step + 1 < world:
                cp._wait(kv_requests)
                kv = next_kv
        if world > 1:
            cp._wait(dkv_requests)

    return forward, backward


# ---------------------------------------------------------------------------
# PyTorch's own context parallelism.

def sdpa_buffers(q, k, v, gqa):
    """Full (B, S, H, D) tensors -> the (B, H, S, D) tensors SDPA takes, K/V
    heads repeated to the query heads unless gqa == "native"."""
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if gqa == "repeat" and k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return q, k, v


def sdpa_fn(causal):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return fn


def faext_flash_unsupported(run):
    """None where flash_attn_ext can run SDPA's FLASH backend here as PyTorch's
    flash-attention implementation (torch_flash), else the reason."""
    from flash_attn_ext import _ops
    from flash_attn_ext.integrations import torch_flash

    if run.device.type != "cuda":
        return f"SDPA's FLASH backend through our implementation is measured on CUDA only, not on {run.device.type}"
    if not torch_flash.registry_available():
        return (f"torch {torch.__version__} has no flash-attention registry "
                f"(torch.nn.attention.register_flash_attention_impl needs torch >= {torch_flash.MIN_TORCH})")
    if not _ops.HAS_CUDA_KERNELS:
        return "this build of flash_attn_ext has no CUDA kernels"
    return None


def torch_cp_unsupported(run, variant="torch_cp"):
    """None where torch.distributed.tensor.experimental.context_parallel can
    run `variant` here, else the reason."""
    if run.device.type != "cuda":
        if variant == "torch_cp_faext":
            # With our implementation active the ring itself runs on the CPU
            # too, but only for callers of the aten op (tests/test_distributed.py).
            return ("PyTorch's context_parallel intercepts only the CUDA SDPA ops: on the CPU, "
                    "F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu, "
                    f"which it cannot shard; not on {run.device.type} / {run.backend}")
        return ("PyTorch's context_parallel replaces only the CUDA SDPA kernels (flash, efficient, cuDNN); "
                f"not on {run.device.type} / {run.backend}")
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no context_parallel ({common.short_error(e)})"
    return faext_flash_unsupported(run) if variant == "torch_cp_faext" else None


@contextlib.contextmanager
def faext_flash():
    """flash_attn_ext activated as PyTorch's flash-attention implementation
    (flash_attn_ext.integrations.torch_flash) and SDPA's FLASH backend forced,
    for the duration. On leaving, the implementation's call counter must show
    that SDPA's flash forward and backward ran our kernels and that no call
    was handed back to PyTorch's (a shape or dtype our build lacks): else
    RuntimeError, so that no PyTorch time is reported as ours."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flash_attn_ext.integrations import torch_flash

    torch_flash.activate()
    torch_flash.counts.clear()
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            yield
    finally:
        torch_flash.deactivate()
    counts = dict(torch_flash.counts)
    declined = sorted(name for name in counts if name.endswith(":declined"))
    ran = [counts.get(f"_scaled_dot_product_flash_attention{x}", 0) for x in ("", "_backward")]
    if declined or not all(ran):
        raise RuntimeError(f"flash_attn_ext's kernels did not run every flash call (counts {counts})")


@contextlib.contextmanager
def load_balance(enabled):
    """PyTorch's context parallelism balances causal work by zigzag sharding
    and refuses non-causal attention while that is on ("Load balancing
    requires is_causal=True"): on for causal runs, off for the others."""
    try:
        from torch.distributed.tensor.experimental._attention import _cp_options
    except ImportError:  # a torch whose option lives elsewhere: its default
        yield
        return
    saved = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = enabled
    try:
        yield
    finally:
        _cp_options.enable_load_balance = saved


class TorchCP:
    """F.scaled_dot_product_attention under context_parallel on a 1-D mesh of
    the whole (default) process group: with PyTorch's default kernel choice,
    or (ours=True, torch_cp_faext) with SDPA's FLASH backend running our
    kernels (faext_flash), activated only around this variant's calls."""

    def __init__(self, run, gqa, ours=False):
        from torch.distributed.device_mesh import init_device_mesh

        self.run, self.gqa, self.ours = run, gqa, ours
        if getattr(run, "cp_mesh", None) is None:  # one mesh for both variants
            run.cp_mesh = init_device_mesh(run.device.type, (run.world,))
        self.mesh = run.cp_mesh

    def kernels(self):
        return faext_flash() if self.ours else contextlib.nullcontext()

    def _bhsd(self, q, k, v):
        return sdpa_buffers(q, k, v, self.gqa)

    def sdpa(self, causal):
        return sdpa_fn(causal)

    @contextlib.contextmanager
    def context(self, buffers):
        """context_parallel, giving F.scaled_dot_product_attention back even
        when the body raises: torch 2.11's restores it only on a normal exit,
        which would leave the next variant's SDPA calls inside PyTorch's ring."""
        from torch.distributed.tensor.experimental import context_parallel

        sdpa = F.scaled_dot_product_attention
        try:
            with context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[2] * len(buffers),
                                  no_restore_buffers=set(buffers)):
                yield
        finally:
            F.scaled_dot_product_attention = sdpa

    def time(self, q, k, v, dout, causal, reps, warmup):
        """q, k, v, dout: full (B, S, H, D) tensors (every rank the same shapes)."""
        bufs = list(self._bhsd(q, k, v)) + [dout.transpose(1, 2).contiguous()]
        with self.kernels(), load_balance(causal), self.context(bufs):
            leaves = [b.detach().requires_grad_() for b in bufs[:3]]
            fwd, bwd = grad_closures(self.sdpa(causal), leaves, bufs[3])
            times = time_steps(self.run, fwd, bwd, reps, warmup)
        return times

    def results(self, q, k, v, dout, causal):
        """Full out, dq, dk, dv (B, S, H, D) on every rank, K/V heads summed back
        when they were repeated."""
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard

        bufs = list(self._bhsd(q, k, v)) + [dout.transpose(1, 2).contiguous()]
        with self.kernels(), load_balance(causal), self.context(bufs):
            leaves = [b.detach().requires_grad_() for b in bufs[:3]]
            out = self.sdpa(causal)(*leaves)
            grads = torch.autograd.grad(out, leaves, bufs[3])
            full = context_parallel_unshard(self.mesh, [out, *grads], [2] * 4)
        out, dq, dk, dv = (x.transpose(1, 2) for x in full)
        if dk.shape[2] != k.shape[2]:
            dk, dv = (x.unflatten(2, (k.shape[2], -1)).sum(3) for x in (dk, dv))
        return out, dq, dk, dv


# ---------------------------------------------------------------------------
# Correctness.

def full_inputs(run, args, seqlen, dtype):
    """q, k, v, dout for the whole sequence: drawn on rank 0 from the seed,
    broadcast to the others."""
    shapes = [(args.batch, seqlen, args.nheads, args.headdim), (args.batch, seqlen, args.nheads_k, args.headdim),
              (args.batch, seqlen, args.nheads_k, args.headdim), (args.batch, seqlen, args.nheads, args.headdim)]
    g = torch.Generator().manual_seed(args.seed)
    tensors = []
    for shape in shapes:
        if run.rank == 0:
            t = torch.randn(shape, generator=g).to(device=run.device, dtype=dtype)
        else:
            t = torch.empty(shape, device=run.device, dtype=dtype)
        if run.world > 1:
            dist.broadcast(t, src=0)
        tensors.append(t)
    return tensors


def references(q, k, v, dout, causal):
    """Rank 0: out, dq, dk, dv of flash_attn_func on one device, the float64
    reference, PyTorch's math attention in the dtype and its default SDPA."""
    refs = {}
    for kind in ("single", "ref64", "math", "sdpa"):
        leaves = [x.detach().to(torch.float64 if kind == "ref64" else x.dtype).requires_grad_() for x in (q, k, v)]
        if kind == "single":
            out = flash_attn_ext.flash_attn_func(*leaves, causal=causal)
        elif kind == "sdpa":
            out = sdpa_default(*leaves, causal=causal)
        else:
            out = attention_ref(*leaves, causal=causal, upcast=kind == "ref64")[0]
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        refs[kind] = [t.detach() for t in (out, *grads)]
        del out, grads, leaves
    return refs


def judge(name, got, refs, slack):
    """Per quantity: the 2x-rule verdict and the difference from flash_attn_func."""
    report = {"name": name, "ok": True, "quantities": {}}
    for i, label in enumerate(("out", "dq", "dk", "dv")):
        v = two_x_rule(got[i], refs["ref64"][i], (refs["math"][i], refs["sdpa"][i]), slack)
        report["quantities"][label] = {
            "ok": v.ok, "err": v.err, "torch_err": v.torch_err, "bound": v.bound, "reason": v.reason,
            "vs_flash_attn_func": common.max_abs_err(got[i], refs["single"][i])}
        report["ok"] = report["ok"] and v.ok
    return report


def check_correctness(run, args, dtype, torch_cps):
    results = []
    q, k, v, dout = full_inputs(run, args, args.check_seqlen, dtype)
    slack = 1e-5 + cp._block_rounding_slack(dtype, run.world)
    for causal in args.causal_list:
        layout = MASKS[causal]
        refs = references(q, k, v, dout, causal) if run.rank == 0 else None
        if run.rank == 0:
            single = two_x_rule(refs["single"][0], refs["ref64"][0], (refs["math"][0], refs["sdpa"][0]))
            results.append({"name": f"flash_attn_func causal={causal}", "ok": single.ok, "gating": False,
                            "quantities": {"out": single._asdict()}})
        for method in [m for m in args.variants if m in METHODS]:
            leaves = [cp.shard(x, run.rank, run.world, layout).detach().clone().requires_grad_() for x in (q, k, v)]
            out = METHODS[method](*leaves, causal=causal, layout=layout)
            grads = torch.autograd.grad(out, leaves, cp.shard(dout, run.rank, run.world, layout))
            got = [cp.gather(t.detach(), layout=layout) for t in (out, *grads)]
            if run.rank == 0:
                report = judge(f"{method} {layout} causal={causal}", got, refs, slack)
                report["gating"] = True
                results.append(report)
            del out, grads, got, leaves
        for variant, torch_cp in torch_cps.items():
            if isinstance(torch_cp, str):  # skipped, with this reason
                continue
            try:
                got = torch_cp.results(q, k, v, dout, causal)
                if run.rank == 0:
                    # Ours through PyTorch's ring: one dtype rounding per block, as in ours.
                    report = judge(f"{variant} causal={causal}", got, refs, slack if torch_cp.ours else 1e-5)
                    report["gating"] = False
                    results.append(report)
            except Exception as e:  # reported, not fatal: PyTorch's ring, beside ours
                if run.rank == 0:
                    results.append({"name": f"{variant} causal={causal}", "ok": False, "gating": False,
                                    "error": common.short_error(e)})
        del refs
    results = run.from_rank0(results)
    for r in results:
        worst = max((x.get("err", 0.0) / x["bound"] if x.get("bound") else 0.0
                     for x in r.get("quantities", {}).values()), default=0.0)
        log(run, f"  correctness {r['name']:<34} {'ok' if r['ok'] else 'FAILED'}"
                 f"{'' if r.get('gating', True) else ' (not gating)'}  worst err/bound {worst:.2f}"
                 f"{'  ' + r['error'] if 'error' in r else ''}")
    return results


# ---------------------------------------------------------------------------
# Scaling.

def local_inputs(run, args, seqlen, dtype):
    """This rank's shard of a random whole sequence (every rank draws its own
    shard: the values do not matter for timing)."""
    n = seqlen // run.world
    g = torch.Generator().manual_seed(args.seed + 1 + run.rank)

    def mk(h):
        return torch.randn(args.batch, n, h, args.headdim, generator=g).to(device=run.device, dtype=dtype)

    return mk(args.nheads), mk(args.nheads_k), mk(args.nheads_k), mk(args.nheads)


def scaling_rows(run, args, dtype, scaling, seqlen, torch_cps):
    rows = []
    for causal in args.causal_list:
        layout = MASKS[causal]
        base = dict(scaling=scaling, causal=causal, layout=layout, seqlen=seqlen, world_size=run.world,
                    batch=args.batch, nheads=args.nheads, nheads_k=args.nheads_k, headdim=args.headdim,
                    dtype=args.dtype, flops_fwdbwd=common.attention_flops(args.batch, args.nheads, seqlen, seqlen,
                                                                           args.headdim, causal, "fwdbwd"))
        if seqlen % (2 * run.world):
            log(run, f"  {scaling} causal={causal}: seqlen {seqlen} not divisible by {2 * run.world}; skipped")
            continue
        q, k, v, dout = local_inputs(run, args, seqlen, dtype)
        leaves = [x.requires_grad_() for x in (q, k, v)]

        def record(variant, fwd_ms, bwd_ms, **extra):
            row = dict(base, variant=variant, fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwdbwd_ms=fwd_ms + bwd_ms, **extra)
            rows.append(row)
            log(run, f"  {scaling:6} causal={int(causal)} S={seqlen:>7} N={run.world} {variant:<16} fwd "
                     f"{fwd_ms:9.2f} ms  bwd {bwd_ms:9.2f} ms" + "".join(
                         f"  {key.replace('_ms', '')} {common.fmt(val, 2)}" for key, val in extra.items()))

        for method in [m for m in args.variants if m in METHODS]:
            fn = METHODS[method]

            def attention(q, k, v, fn=fn):
                return fn(q, k, v, causal=causal, layout=layout, check_args=False)

            fwd_ms, bwd_ms = time_steps(run, *grad_closures(attention, leaves, dout), args.reps, args.warmup)
            extra = {}
            if method == "ring":
                def compute(q, k, v):
                    return ring_compute_only(q, k, v, causal, layout)

                c_fwd, c_bwd = time_steps(run, *grad_closures(compute, leaves, dout), args.reps, args.warmup)
                m_fwd, m_bwd = time_steps(run, *ring_comm_only(run, k, v), args.reps, args.warmup)
                extra = dict(compute_fwd_ms=c_fwd, compute_bwd_ms=c_bwd, comm_fwd_ms=m_fwd, comm_bwd_ms=m_bwd,
                             hidden_fwd=hidden_fraction(fwd_ms, c_fwd, m_fwd, run.world),
                             hidden_bwd=hidden_fraction(bwd_ms, c_bwd, m_bwd, run.world))
            record(method, fwd_ms, bwd_ms, **extra)

        if run.world == 1:  # the single-device baselines of the efficiency
            single = [x.detach().requires_grad_() for x in (q, k, v)]
            fwd_ms, bwd_ms = time_steps(run, *grad_closures(
                lambda q, k, v: flash_attn_ext.flash_attn_func(q, k, v, causal=causal), single, dout),
                args.reps, args.warmup)
            record("flash_attn_func", fwd_ms, bwd_ms)
            if run.device.type == "cuda":
                # PyTorch's default choice among its fused kernels; the math
                # path (which would materialise S x S scores) is left out so
                # that an unsupported shape fails here instead of taking the GPU.
                from torch.nn.attention import SDPBackend, sdpa_kernel

                # Same inputs as torch_cp gets: (B, H, S, D), K/V heads as --torch-cp-gqa says.
                fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                try:
                    bufs = [x.detach().requires_grad_() for x in sdpa_buffers(q, k, v, args.torch_cp_gqa)]
                    with sdpa_kernel(fused):
                        fwd_ms, bwd_ms = time_steps(run, *grad_closures(sdpa_fn(causal), bufs, dout.transpose(1, 2)),
                                                    args.reps, args.warmup)
                    del bufs
                    record("sdpa", fwd_ms, bwd_ms)
                except Exception as e:
                    rows.append(dict(base, variant="sdpa", skipped=common.short_error(e)))
                    log(run, f"  sdpa failed: {common.short_error(e)}")
            if not isinstance(torch_cps.get("torch_cp_faext", "not asked for"), str):
                # torch_cp_faext's baseline: SDPA's FLASH backend running our
                # kernels through PyTorch's slot, on the inputs torch_cp_faext gets.
                try:
                    bufs = [x.detach().requires_grad_() for x in sdpa_buffers(q, k, v, args.torch_cp_gqa)]
                    with faext_flash():
                        fwd_ms, bwd_ms = time_steps(run, *grad_closures(sdpa_fn(causal), bufs, dout.transpose(1, 2)),
                                                    args.reps, args.warmup)
                    del bufs
                    record("sdpa_faext", fwd_ms, bwd_ms)
                except Exception as e:
                    rows.append(dict(base, variant="sdpa_faext", skipped=common.short_error(e)))
                    log(run, f"  sdpa_faext failed: {common.short_error(e)}")
        del q, k, v, leaves

        for variant, torch_cp in torch_cps.items():
            if isinstance(torch_cp, str):
                rows.append(dict(base, variant=variant, skipped=torch_cp))
                continue
            # Its buffers are the whole sequence on every rank (context_parallel shards them).
            g = torch.Generator().manual_seed(args.seed + 2)
            full = [torch.randn(args.batch, seqlen, h, args.headdim, generator=g).to(run.device, dtype)
                    for h in (args.nheads, args.nheads_k, args.nheads_k, args.nheads)]
            try:
                fwd_ms, bwd_ms = torch_cp.time(*full, causal, args.reps, args.warmup)
                record(variant, fwd_ms, bwd_ms)
            except Exception as e:
                rows.append(dict(base, variant=variant, skipped=common.short_error(e)))
                log(run, f"  {variant} failed: {common.short_error(e)}")
            del full
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def hidden_fraction(t_ring, t_compute, t_comm, world):
    if world == 1 or t_comm <= 0:
        return None
    return 1.0 - (t_ring - t_compute) / t_comm


# ---------------------------------------------------------------------------
# Main.

def default_json(env, world):
    return os.path.join(common.ROOT, "benchmarks", "results",
                        f"cp_{common.slug(env['device'])}_n{world}_{env['date'][:10]}.json")


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report, args.plot)
    run = Run(args)
    try:
        return _bench(run, args)
    finally:
        run.close()


def _bench(run, args):
    dtype = DTYPES[args.dtype]
    if run.device.type == "cuda" and dtype == torch.float32:
        raise SystemExit("--dtype fp32: the CUDA kernels take fp16 / bf16")
    env = common.environment(run.device.type)
    env.update(backend=run.backend, world_size=run.world,
               nccl_env={key: val for key, val in sorted(os.environ.items()) if key.startswith("NCCL_")})
    log(run, f"context parallelism over {run.world} rank(s), {run.backend} on {env['device']}; "
             f"B={args.batch} H={args.nheads}/{args.nheads_k} D={args.headdim} {args.dtype}")
    # variant -> TorchCP, or the reason it is skipped.
    torch_cps = {}
    for variant in [x for x in TORCH_CP if x in args.variants]:
        torch_cps[variant] = torch_cp_unsupported(run, variant)
        if torch_cps[variant] is None:
            try:
                torch_cps[variant] = TorchCP(run, args.torch_cp_gqa, ours=variant == "torch_cp_faext")
            except Exception as e:
                torch_cps[variant] = common.short_error(e)
        if isinstance(torch_cps[variant], str):
            log(run, f"  {variant} skipped: {torch_cps[variant]}")
    skipped = {variant: why for variant, why in torch_cps.items() if isinstance(why, str)}

    payload = dict(env=env, args={k: v for k, v in vars(args).items() if k not in ("report", "plot")},
                   torch_cp_skipped=skipped.get("torch_cp"), torch_cp_faext_skipped=skipped.get("torch_cp_faext"),
                   correctness=[], rows=[])
    if "correctness" in args.parts:
        payload["correctness"] = check_correctness(run, args, dtype, torch_cps)
    if "strong" in args.parts:
        payload["rows"] += scaling_rows(run, args, dtype, "strong", args.seqlen, torch_cps)
    if "weak" in args.parts:
        payload["rows"] += scaling_rows(run, args, dtype, "weak", args.tokens_per_rank * run.world, torch_cps)
    correct = all(r["ok"] for r in payload["correctness"] if r.get("gating", True))
    payload["correct"] = correct
    if run.rank == 0:
        path = args.out or default_json(env, run.world)
        common.write_json(path, payload)
        print(f"wrote {path}; correct: {correct}", flush=True)
    return 0 if correct else 1


# ---------------------------------------------------------------------------
# Report over several N.

BASELINE = {"ring": "flash_attn_func", "all_gather": "flash_attn_func", "torch_cp": "sdpa",
            "torch_cp_faext": "sdpa_faext"}


def efficiency(row, baselines):
    """Per-rank throughput at N over the single-device baseline's at N = 1."""
    base = baselines.get((row["scaling"], row["causal"], BASELINE.get(row["variant"], row["variant"])))
    if base is None or not row.get("fwdbwd_ms"):
        return None
    per_rank = row["flops_fwdbwd"] / (row["world_size"] * row["fwdbwd_ms"])
    return per_rank / (base["flops_fwdbwd"] / base["fwdbwd_ms"])


def report(paths, plot_path=None):
    rows, skipped, failed = [], [], []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        for r in payload["rows"]:
            (skipped if "skipped" in r else rows).append(r)
        failed += [f"N={payload['env']['world_size']}: {r['name']}" for r in payload.get("correctness", [])
                   if r.get("gating", True) and not r["ok"]]
    baselines = {(r["scaling"], r["causal"], r["variant"]): r for r in rows if r["world_size"] == 1}
    torch_at = {(r["scaling"], r["causal"], r["world_size"]): r for r in rows if r["variant"] == "torch_cp"}
    order = {"ring": 0, "all_gather": 1, "torch_cp": 2, "torch_cp_faext": 3, "flash_attn_func": 4, "sdpa": 5,
             "sdpa_faext": 6}
    rows.sort(key=lambda r: (r["scaling"] != "strong", not r["causal"], order.get(r["variant"], 9), r["world_size"]))
    table = []
    for r in rows:
        eff = efficiency(r, baselines)
        other = torch_at.get((r["scaling"], r["causal"], r["world_size"]))
        ours = r["variant"] in METHODS or r["variant"] == "torch_cp_faext"
        vs_torch = other["fwdbwd_ms"] / r["fwdbwd_ms"] if other and ours else None
        table.append([r["scaling"], "causal" if r["causal"] else "non-causal", r["variant"], str(r["world_size"]),
                      f"{r['seqlen'] // 1024}k" if r["seqlen"] % 1024 == 0 else str(r["seqlen"]),
                      common.fmt(r["fwd_ms"], 1), common.fmt(r["bwd_ms"], 1), common.fmt(r["fwdbwd_ms"], 1),
                      common.fmt(eff, 2), common.fmt(vs_torch, 2),
                      common.fmt(r.get("hidden_fwd"), 2), common.fmt(r.get("hidden_bwd"), 2)])
    headers = ["scaling", "mask", "variant", "N", "seqlen", "fwd ms", "bwd ms", "fwd+bwd ms", "efficiency",
               "torch_cp / ours", "hidden fwd", "hidden bwd"]
    print(common.markdown_table(headers, table))
    print("- times: median per step, max over ranks; efficiency: per-GPU throughput at N over the one-device "
          "baseline of the N = 1 run (flash_attn_func for ours, sdpa for torch_cp, sdpa_faext for "
          "torch_cp_faext), T1 / (N * TN) for strong scaling, N * T1 / TN for weak; torch_cp / ours: PyTorch's "
          "fwd+bwd time over ours (ring, all_gather, or torch_cp_faext: PyTorch's ring around our kernels; "
          "> 1: ours faster); "
          "hidden: share of the ring's transfer time hidden behind compute, 1 - (T_ring - T_compute) / T_comm")
    reasons = {}
    for r in skipped:
        reasons.setdefault((r["variant"], r["skipped"]), set()).add(r["world_size"])
    for (variant, reason), sizes in sorted(reasons.items()):
        print(f"- {variant} skipped at N = {', '.join(map(str, sorted(sizes)))}: {reason}")
    print("- correctness: " + ("every gating check passed" if not failed else "FAILED: " + "; ".join(failed)))
    if plot_path is None:
        name = re.sub(r"_n\d+(?=[_.])", "_scaling", os.path.basename(paths[0]))
        plot_path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), os.path.splitext(name)[0] + ".png")
    written = plot(rows, baselines, plot_path)
    print(f"plot: {written}" if written else "plot: skipped (matplotlib is not installed)")
    return 0


def plot(rows, baselines, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"ring": "tab:red", "all_gather": "tab:orange", "torch_cp": "tab:blue", "torch_cp_faext": "tab:green"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for si, scaling in enumerate(("strong", "weak")):
        for variant, color in colors.items():
            for causal in (True, False):
                pts = sorted((r["world_size"], r["fwdbwd_ms"], efficiency(r, baselines)) for r in rows
                             if r["scaling"] == scaling and r["variant"] == variant and r["causal"] == causal)
                if not pts:
                    continue
                style = dict(color=color, marker="o", linestyle="-" if causal else "--",
                             label=f"{variant} {'causal' if causal else 'non-causal'}")
                axes[si][0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
                eff = [(p[0], p[2]) for p in pts if p[2] is not None]
                if eff:
                    axes[si][1].plot([p[0] for p in eff], [p[1] for p in eff], **style)
        sizes = sorted({r["world_size"] for r in rows if r["scaling"] == scaling}) or [1]
        base = baselines.get((scaling, True, "flash_attn_func"))
        if base is not None:  # perfect scaling from one device: T1 / N (strong), N * T1 (weak)
            ideal = [base["fwdbwd_ms"] / n if scaling == "strong" else base["fwdbwd_ms"] * n for n in sizes]
            axes[si][0].plot(sizes, ideal, color="gray", linestyle=":", label="ideal from flash_attn_func causal")
        for ax, ylabel in zip(axes[si], ("fwd+bwd ms per step", "efficiency")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(n) for n in sizes])
            ax.set_xlabel("N (ranks)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{scaling} scaling", fontsize=10)
            ax.grid(True, alpha=0.3)
        axes[si][1].axhline(1.0, color="gray", linewidth=0.8)
        axes[si][1].set_ylim(bottom=0)
        axes[si][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
