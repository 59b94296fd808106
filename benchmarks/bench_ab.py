"""Two builds of this project timed against each other on one GPU (an A/B).

Two builds of one package cannot load into one process (they register the
same op namespace), so an A/B runs one process per build and round, A, B,
A, B, ..., each timing the same shapes beside SDPA's cuDNN backend; the
report takes medians over the rounds. A GPU whose clock drifts during the
run then slows both builds alike. tools/gpu_ab.sh builds both and drives
the rounds on the device machine.

    python benchmarks/bench_ab.py time LABEL [--dirs fwd,bwd] [--hdims 64,128] [--seqlens 1k,4k,16k]
                                            [--causal both] [--dtype bf16]   >> ab.jsonl
    python benchmarks/bench_ab.py report ab.jsonl [--a A --b B]

`time` imports whichever flash_attn_ext the interpreter finds first (set
PYTHONPATH, or run from the build's checkout); each row records the
package's path, and `report` refuses rows of one label from two paths.
Shapes: batch x seqlen = 16k tokens, heads x head dim = 2048, as
bench_attention.py's sweep. Timing: triton's do_bench median (25 ms
warm-up, 150 ms of repetitions); the backward alone (one forward outside,
autograd.grad per call). TFLOP/s by FlashAttention's FLOP convention.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys


def parse_ints(text: str) -> list[int]:
    """'1k,4k,512' -> [1024, 4096, 512]. (common.parse_list does the same, but importing common puts
    this checkout's package first on the path, which would time B under A's label.)"""
    return [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in (p.strip() for p in text.split(",")) if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="time one build: one JSON line per shape on stdout")
    t.add_argument("label")
    t.add_argument("--dirs", default="bwd", help="comma list of fwd, bwd")
    t.add_argument("--hdims", default="64,128")
    t.add_argument("--seqlens", default="1k,4k,16k")
    t.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    r = sub.add_parser("report", help="medians over the rounds of a JSON-lines file, as a markdown table")
    r.add_argument("path")
    r.add_argument("--a", default=None, help="the baseline's label (default: the first label in the file)")
    r.add_argument("--b", default=None, help="the candidate's label (default: the other one)")
    args = p.parse_args(argv)
    if args.command == "time":
        args.dirs = [d for d in args.dirs.split(",") if d]
        bad = [d for d in args.dirs if d not in ("fwd", "bwd")]
        if bad or not args.dirs:
            p.error(f"--dirs takes fwd and/or bwd, got {args.dirs}")
        try:
            args.hdims, args.seqlens = parse_ints(args.hdims), parse_ints(args.seqlens)
        except ValueError as exc:
            p.error(f"--hdims and --seqlens take comma lists of integers (a k suffix is 1024): {exc}")
        if not args.hdims or not args.seqlens or min(args.hdims + args.seqlens) <= 0:
            p.error("--hdims and --seqlens take positive integers")
        args.causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    return args


def time_build(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_ab.py time: needs a CUDA GPU (it times against SDPA's cuDNN backend)")
    import flash_attn_ext
    from flash_attn_ext._bench_utils import (
        attention_flops,
        bwd_closure,
        fwd_closure,
        make_inputs,
        ours_attention,
        sdpa_attention,
        sdpa_backends,
        sdpa_context,
        time_cuda_ms,
    )

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cudnn = sdpa_backends("cuda")["cudnn"]

    def cudnn_attention(q, k, v, causal):  # (B, S, H, D) in and out
        return sdpa_attention(q, k, v, causal).transpose(1, 2)

    for hd in args.hdims:
        for causal in args.causal:
            for s in args.seqlens:
                b, h = max(1, 16384 // s), max(1, 2048 // hd)
                q, k, v = make_inputs(b, s, s, h, h, hd, dtype, "cuda", seed=1)
                dout = torch.randn(b, s, h, hd, dtype=dtype, device="cuda")
                row = {"label": args.label, "package": flash_attn_ext.__file__, "dtype": args.dtype, "hd": hd,
                       "causal": causal, "s": s, "batch": b, "heads": h,
                       "flops_fwd": attention_flops(b, h, s, s, hd, causal)}
                for d in args.dirs:
                    with sdpa_context(cudnn):
                        if d == "fwd":
                            row["ours_fwd_ms"] = time_cuda_ms(fwd_closure(ours_attention, q, k, v, causal), 25, 150)
                            row["cudnn_fwd_ms"] = time_cuda_ms(fwd_closure(cudnn_attention, q, k, v, causal), 25, 150)
                        else:
                            ours, _ = bwd_closure(ours_attention, q, k, v, causal, dout)
                            theirs, _ = bwd_closure(cudnn_attention, q, k, v, causal, dout)
                            row["ours_bwd_ms"] = time_cuda_ms(ours, 25, 150)
                            row["cudnn_bwd_ms"] = time_cuda_ms(theirs, 25, 150)
                print(json.dumps(row), flush=True)


def report(path: str, a: str | None, b: str | None) -> str:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    if not rows:
        raise SystemExit(f"bench_ab.py report: no rows in {path}")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    a = a or labels[0]
    b = b or next((x for x in labels if x != a), None)
    if b is None or a not in labels or b not in labels:
        raise SystemExit(f"bench_ab.py report: need rows of two labels, found {labels} (asked for {a!r} and {b!r})")
    for label in (a, b):
        paths = {r["package"] for r in rows if r["label"] == label}
        if len(paths) > 1:
            raise SystemExit(f"bench_ab.py report: label {label!r} timed two packages: {sorted(paths)}")
    if {r["package"] for r in rows if r["label"] == a} == {r["package"] for r in rows if r["label"] == b}:
        raise SystemExit(f"bench_ab.py report: {a!r} and {b!r} timed the same package")
    times = collections.defaultdict(list)  # (shape, label, field) -> [ms per round]
    flops = {}
    for r in rows:
        shape = (r["dtype"], r["hd"], r["causal"], r["s"])
        flops[shape] = r["flops_fwd"]
        for field in ("ours_fwd_ms", "cudnn_fwd_ms", "ours_bwd_ms", "cudnn_bwd_ms"):
            if field in r:
                times[(shape, r["label"], field)].append(r[field])
    out = [
        (f"A = {a}, B = {b}: medians over rounds, TFLOP/s; A/B = A's time / B's (above 1: B is faster), "
         "with its range over the rounds; vs cuDNN = cuDNN's time / ours (cuDNN from both labels' processes)")
    ]
    for d, mult in (("fwd", 1.0), ("bwd", 2.5)):
        lines, ratios = [], []
        for shape in sorted(flops):
            ta, tb = times.get((shape, a, f"ours_{d}_ms")), times.get((shape, b, f"ours_{d}_ms"))
            if not ta or not tb:
                continue
            tc = times.get((shape, a, f"cudnn_{d}_ms"), []) + times.get((shape, b, f"cudnn_{d}_ms"), [])
            ma, mb = statistics.median(ta), statistics.median(tb)
            mc = statistics.median(tc) if tc else float("nan")
            per_round = [x / y for x, y in zip(ta, tb)]
            ratios.append(ma / mb)
            work = flops[shape] * mult / 1e9  # TFLOP/s = work / ms
            dtype, hd, causal, s = shape
            lines.append(f"| {d} | {dtype} | {hd} | {'yes' if causal else 'no'} | {s} | {work / ma:.0f} | "
                         f"{work / mb:.0f} | {work / mc:.0f} | {ma / mb:.3f} ({min(per_round):.3f}-{max(per_round):.3f}) | "
                         f"{mc / ma:.2f} | {mc / mb:.2f} |")
        if lines:
            out.append("")
            out.append("| dir | dtype | hd | causal | seqlen | A | B | cuDNN | A/B | A vs cuDNN | B vs cuDNN |")
            out.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
            out.extend(lines)
            out.append(f"{d}: geometric mean of A/B {statistics.geometric_mean(ratios):.3f} over {len(ratios)} shapes, "
                       f"{min(len(times[k]) for k in times if k[1] in (a, b) and k[2] == f'ours_{d}_ms')} rounds")
    return "\n".join(out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "time":
        time_build(args)
    else:
        print(report(args.path, args.a, args.b))


if __name__ == "__main__":
    main()
