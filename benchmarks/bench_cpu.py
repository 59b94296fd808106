"""CPU benchmark: flash_attn_ext against PyTorch's CPU SDPA backends (MATH and FLASH_ATTENTION).

    python benchmarks/bench_cpu.py            # fp32 + bf16, seqlen 512..8k (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick    # fp32, seqlen 512..2k (under a minute)
    python benchmarks/bench_cpu.py --dtypes fp32 --seqlens 1k,4k --causal both

Shapes: batch 1, 8 heads, head dim 64 (flags change them), q/k/v (B, S, H, D);
SDPA gets transposed views of tensors of the same shape.

Method:
  * Every measurement (dtype, seqlen, causal, implementation, direction) runs
    in a process forked from this one for it alone (this process itself runs
    no attention), so allocator state from one measurement never hides memory
    in another and a measurement killed for memory does not end the sweep.
  * Time: wall time (time.perf_counter) of each call: a call at seqlen 64
    warms the code path and thread pool, then one untimed full-size call,
    then the median of up to --reps calls or as many as fit in --budget
    seconds (at least one). A call longer than 2 s is timed from its first
    run (one-time setup is a small share of it; warming it up would double
    the sweep). fwd runs under torch.no_grad(); fwd+bwd is forward then
    torch.autograd.grad(out, (q, k, v), dout).
  * Peak memory: growth of the resident set during the first full-size call:
    /proc/self/clear_refs <- 5 resets VmHWM (peak RSS) to the current RSS,
    VmRSS is read, the call runs, VmHWM - VmRSS_before is the peak. The
    forked process has freed nothing its call could reuse unseen, so every
    byte the call allocates (outputs and gradients included) is counted.
  * SDPA MATH materialises (S, S) score matrices; where its estimate exceeds
    half of MemAvailable it is skipped (recorded as such).
  * To keep the default sweep within minutes on 2 cores, a measurement whose
    single call is predicted to exceed --max-call-s (its time at the previous
    seqlen times (S/S_prev)^2) is skipped and recorded as such (PyTorch's CPU
    flash backward in bf16 is the usual case).

Output: JSON (default benchmarks/results/cpu_<cpu>_<date>.json) and a markdown
table (for the README) naming the CPU model and core count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
IMPLS = ("ours", "math", "flash")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--seqlens", default="512,1k,2k,4k,8k")
    p.add_argument("--causal", default="0", help="0, 1 or both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=8)
    p.add_argument("--hdim", type=int, default=64)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--directions", default="fwd,fwdbwd")
    p.add_argument("--reps", type=int, default=5, help="timed calls at most")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per measurement (min 1 call)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-call-s", type=float, default=20.0,
                   help="skip a measurement whose one call is predicted (time at the previous seqlen x "
                        "(S/S_prev)^2) to take longer than this; 0: never skip")
    p.add_argument("--quick", action="store_true", help="fp32, seqlen 512,1k,2k")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        if "--dtypes" not in given:
            args.dtypes = "fp32"
        if "--seqlens" not in given:
            args.seqlens = "512,1k,2k"
    args.dtype_list = common.parse_list(args.dtypes)
    bad = [d for d in args.dtype_list if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: {bad} not in {list(DTYPES)}")
    args.seqlen_list = sorted(common.parse_list(args.seqlens, int))
    args.causal_list = common.parse_causal(args.causal)
    args.impl_list = common.parse_list(args.impls)
    bad = [i for i in args.impl_list if i not in IMPLS]
    if bad:
        p.error(f"--impls: {bad} not in {list(IMPLS)}")
    args.direction_list = common.parse_list(args.directions)
    return args


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(args, name, direction, dtype, S, causal, last):
    prev = last.get((name, direction, causal))
    if prev and args.max_call_s:
        S_prev, ms_prev = prev
        predicted = ms_prev * (S / S_prev) ** 2 / 1e3
        if predicted > args.max_call_s:
            return f"predicted {predicted:.0f} s per call > --max-call-s {args.max_call_s:g}"
    if name == "math":
        # About 3 (S, S) fp32-sized buffers are live at the backward's peak (400 MiB measured at S=2k,
        # 8 heads); estimate 4, and 2 for the forward.
        need = (4 if direction == "fwdbwd" else 2) * args.batch * args.nheads * S * S * max(4, dtype.itemsize)
        avail = mem_available_bytes()
        if avail is not None and need > 0.5 * avail:
            return f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def run_sweep(args, payload, json_path):
    for dtype_name in args.dtype_list:
        dtype = DTYPES[dtype_name]
        last = {}  # (impl, direction, causal) -> (S, ms) of the last measurement, for the skip prediction
        for S in args.seqlen_list:
            t0 = time.perf_counter()
            summary = []
            for causal in args.causal_list:
                for name in args.impl_list:
                    for direction in args.direction_list:
                        res = {"dtype": dtype_name, "S": S, "B": args.batch, "H": args.nheads, "d": args.hdim,
                               "causal": causal, "impl": name, "direction": direction, "ms": None,
                               "peak_extra_MiB": None}
                        reason = skip_reason(args, name, direction, dtype, S, causal, last)
                        if reason:
                            res["skipped"] = reason
                        else:
                            try:
                                out = common.run_in_fork(lambda: common.cpu_measure(
                                    name, args.batch, S, args.nheads, args.hdim, dtype, causal, direction,
                                    reps=args.reps, budget_s=args.budget, threads=args.threads))
                                res.update(ms=out["ms"], reps=out["reps"], threads=out["threads"],
                                           peak_extra_MiB=common.mib(out["peak_extra_bytes"]))
                                flops = common.attention_flops(args.batch, args.nheads, S, S, args.hdim, causal,
                                                               direction)
                                res["gflops"] = flops / (out["ms"] * 1e-3) / 1e9
                                last[(name, direction, causal)] = (S, out["ms"])
                            except RuntimeError as exc:
                                res["error"] = str(exc)[:200]
                        payload["results"].append(res)
                        common.write_json(json_path, payload)
                        summary.append(f"{name}{'/c' if causal else ''} {direction} "
                                       f"{common.fmt(res['ms'])}" + (" (skip)" if "skipped" in res else "")
                                       + (f" ({res['error'][:60]})" if "error" in res else ""))
            print(f"{dtype_name} S={S} ({time.perf_counter() - t0:.0f} s): " + ", ".join(summary), flush=True)


def markdown(payload, args):
    res = payload["results"]
    lookup = {(r["dtype"], r["causal"], r["S"], r["impl"], r["direction"]): r for r in res}
    impls, dirs = args.impl_list, args.direction_list
    label = {"ours": "ours", "math": "SDPA math", "flash": "SDPA flash"}
    dlabel = {"fwd": "fwd", "fwdbwd": "fwd+bwd", "bwd": "bwd"}
    headers = ["dtype", "causal", "seqlen"]
    headers += [f"{dlabel[d]} ms {label[i]}" for d in dirs for i in impls]
    mem_dir = "fwdbwd" if "fwdbwd" in dirs else dirs[0]
    headers += [f"{dlabel[mem_dir]} peak MiB {label[i]}" for i in impls]

    def cell(r, key, digits=1):
        if r.get(key) is not None:
            return common.fmt(r[key], digits)
        return "skip" if r.get("skipped") else ("err" if r.get("error") else "-")

    body = []
    for dtype_name in args.dtype_list:
        for causal in args.causal_list:
            for S in args.seqlen_list:
                cells = [dtype_name, "yes" if causal else "no", S]
                cells += [cell(lookup.get((dtype_name, causal, S, i, d), {}), "ms") for d in dirs for i in impls]
                cells += [cell(lookup.get((dtype_name, causal, S, i, mem_dir), {}), "peak_extra_MiB")
                          for i in impls]
                body.append(cells)
    title = (f"CPU: {payload['cpu_model']}, {payload['cpu_cores']} cores ({payload['torch_threads']} torch threads), "
             f"torch {payload['torch']}; batch {args.batch}, {args.nheads} heads, head dim {args.hdim}. "
             f"Median wall time (ms) of a call and peak RSS growth (MiB) during one; "
             f"skip: not run (predicted over {args.max_call_s:g} s a call, or too much memory).")
    return title + "\n\n" + common.markdown_table(headers, body)


def main(argv=None):
    args = parse_args(argv)
    env = common.environment("cpu")
    if args.threads:
        env["torch_threads"] = args.threads
    json_path = args.json or os.path.join(common.ROOT, common.default_json_path(env, prefix="cpu_"))
    payload = {**env, "args": {k: v for k, v in vars(args).items()},
               "method": {"time": "median wall time after a warm-up call (calls > 2 s: from the first); "
                                  "one forked process per measurement",
                          "memory": "VmHWM - VmRSS around the first full-size call in the forked process, "
                                    "VmHWM reset via /proc/self/clear_refs",
                          "flops": "fwd 4*B*H*S*S*D (/2 causal), fwdbwd 3.5x"},
               "results": []}
    if not common.cpu_memory_probe_available():
        print("note: /proc/self/clear_refs or VmHWM unavailable: memory not measured")
    print(f"# {env['cpu_model']}, {env['cpu_cores']} cores, torch {env['torch']}, {env['date']}", flush=True)
    t0 = time.perf_counter()
    run_sweep(args, payload, json_path)
    payload["total_s"] = round(time.perf_counter() - t0, 1)
    common.write_json(json_path, payload)
    print(f"\nJSON: {json_path} (sweep took {payload['total_s']} s)\n")
    print(markdown(payload, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
