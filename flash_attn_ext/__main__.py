"""`python -m flash_attn_ext`: check this install and compare it with PyTorch's own attention.

What it does, in order (run `python -m flash_attn_ext --help` for the short version):

1. Detects the device (CUDA when available, else CPU) and prints versions.
2. Parity: our output and gradients against a float64 reference on a few
   shapes, causal and not (GQA and seqlen_q != seqlen_k included). A result
   passes when its max abs error against float64 is at most 2x PyTorch's own
   error in the same dtype (attention written in PyTorch: matmuls in that
   dtype, softmax in fp32) plus 1e-5 x max(1, |ref|max): the rule tests/ use.
   Our output's distance to SDPA's math backend, and that backend's own
   error, are printed beside (on CPU that backend computes low precision in
   fp32, so its error is the final rounding alone).
3. Speed and memory beside SDPA for a few sequence lengths: on CPU against
   the MATH and FLASH_ATTENTION backends (fp32, batch 1, 8 heads, head dim
   64); on CUDA against FLASH, CUDNN and EFFICIENT (bf16, head dim 128,
   16 heads, batch x seqlen = 16k tokens). Time is a median (on CPU the
   faster of two rounds in which ours and the backends alternate); memory
   is the peak extra memory of forward+backward (CUDA: max_memory_allocated
   growth; CPU: peak RSS growth in a forked process, see _bench_utils). Each PyTorch
   row also shows the speed-up of ours over it: its time / our time at the
   same size (above 1: ours is faster).
4. A one-line verdict: parity PASS or FAIL, and the range of those speed-ups.

Exits with status 1 when a parity check fails. Takes about 20 s on a 2-core
CPU (--quick: fewer sequence lengths).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _bench_utils as bu
from .reference import attention_ref

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim): square, GQA with Sq < Sk, odd sizes.
MAX_CALL_S = 4.0  # CPU speed table: skip a measurement predicted to take longer a call
CPU_ROUNDS = 2  # CPU speed table: ours and the backends alternate this many times (see speed_cpu)
PARITY_SHAPES = [(2, 128, 128, 4, 4, 64), (1, 200, 333, 4, 2, 80), (2, 77, 77, 2, 2, 128)]


DESCRIPTION = """\
Check that flash_attn_ext works on this machine and see how it compares with
PyTorch's own attention (torch.nn.functional.scaled_dot_product_attention), on
the GPU when there is one, else on the CPU:

  1. correctness: our outputs and gradients on a few shapes (causal or not,
     grouped-query, unequal query and key lengths) against a float64
     reference, next to PyTorch's error in the same dtype;
  2. speed and memory: time of a forward and of a forward+backward pass, and
     the peak extra memory of forward+backward, for ours and each PyTorch
     backend, with the speed-up of ours over each (its time / ours);
  3. a one-line verdict.

Takes about 20 s on a 2-core CPU. Exit status 1 when a correctness check fails."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m flash_attn_ext", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sequence lengths in the speed table")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def sdpa_math(q, k, v, causal):
    """PyTorch's SDPA math backend in the inputs' dtype, bottom-right causal mask, GQA by repeating k/v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        rows = torch.arange(sq, device=q.device).view(-1, 1)
        mask = torch.arange(sk, device=q.device).view(1, -1) <= rows + (sk - sq)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def parity(device, dtypes):
    """Rows of parity results and whether all passed."""
    rows, all_ok = [], True
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for dtype in dtypes:
        for causal in (False, True):
            for shape in PARITY_SHAPES:
                B, Sq, Sk, H, Hk, D = shape
                make = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
                q, k, v = make(B, Sq, H, D), make(B, Sk, Hk, D), make(B, Sk, Hk, D)
                dout = make(B, Sq, H, D)
                row = {"dtype": str(dtype).split(".")[-1], "causal": causal, "shape": "x".join(map(str, shape))}
                leaves = lambda dt: [t.detach().to(dt).requires_grad_() for t in (q, k, v)]  # noqa: E731
                # Reference (float64) and PyTorch's own attempt in this dtype.
                ref_in = leaves(torch.float64)
                ref_out, _ = attention_ref(*ref_in, causal=causal)
                ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
                pt_in = leaves(dtype)
                pt_out, _ = attention_ref(*pt_in, causal=causal, upcast=False)
                pt_grads = torch.autograd.grad(pt_out, pt_in, dout)
                with torch.no_grad():
                    sdpa_out = sdpa_math(q, k, v, causal)
                try:
                    our_in = leaves(dtype)
                    our_out = bu.ours_attention(*our_in, causal=causal)
                    our_grads = torch.autograd.grad(our_out, our_in, dout)
                except Exception as exc:  # noqa: BLE001  (reported as a failure)
                    row.update(ok=False, error=bu.short_error(exc))
                    rows.append(row)
                    all_ok = False
                    continue
                row["out_vs_sdpa_math"] = bu.max_abs_err(our_out, sdpa_out)
                row["sdpa_math_out_err"] = bu.max_abs_err(sdpa_out, ref_out)
                ok_all = True
                for name, ours, pt, ref in zip(("out", "dq", "dk", "dv"), (our_out, *our_grads), (pt_out, *pt_grads),
                                               (ref_out, *ref_grads)):
                    ok, err_ours, err_pt, _ = bu.passes_2x_rule(ours, pt, ref, dtype)
                    row[f"{name}_err"], row[f"{name}_torch_err"], row[f"{name}_ok"] = err_ours, err_pt, ok
                    ok_all &= ok
                row["ok"] = ok_all
                all_ok &= ok_all
                rows.append(row)
    return rows, all_ok


def parity_table(rows):
    headers = ["dtype", "causal", "B x Sq x Sk x H x Hk x D", "|out - sdpa math|", "sdpa math err",
               "out err (torch)", "dq err (torch)", "dk err (torch)", "dv err (torch)", "pass"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["dtype"], "y" if r["causal"] else "n", r["shape"], "-", "-", "-", "-", "-", "-",
                         "FAIL: " + r["error"][:60]])
            continue
        pair = lambda n: f"{r[n + '_err']:.1e} ({r[n + '_torch_err']:.1e})" + ("" if r[n + "_ok"] else " !")  # noqa: E731
        body.append([r["dtype"], "y" if r["causal"] else "n", r["shape"], f"{r['out_vs_sdpa_math']:.1e}",
                     f"{r['sdpa_math_out_err']:.1e}", pair("out"), pair("dq"), pair("dk"), pair("dv"), "ok" if r["ok"] else "FAIL"])
    return bu.markdown_table(headers, body)


def speed_cpu(seqlens, rounds=CPU_ROUNDS):
    """fp32, B=1, H=8, D=64: each measurement in a forked process (clean heap for the memory probe).

    A shared 2-core VM changes speed by up to 2x from one second to the next,
    and one measurement lasts about a second: measured once each, ours and a
    backend can land in different spells and their ratio is off by as much.
    So the implementations alternate for `rounds` rounds and each keeps its
    fastest median; the peak memory is the first round's.
    """
    rows, last = [], {}
    B, H, D, dtype = 1, 8, 64, torch.float32
    for S in seqlens:
        by_impl = {name: {"S": S, "impl": name} for name in ("ours", "math", "flash")}
        for round_ in range(rounds):
            for name, row in by_impl.items():
                for direction in ("fwd", "fwdbwd"):
                    if f"{direction}_error" in row:  # skipped or failed in an earlier round
                        continue
                    prev = last.get((name, direction))
                    predicted = prev[1] * (S / prev[0]) ** 2 / 1e3 if prev and prev[0] < S else 0.0
                    if predicted > MAX_CALL_S:  # keeps the job short on a slow or busy machine
                        row[f"{direction}_error"] = f"skipped: predicted {predicted:.0f} s a call"
                        continue
                    try:
                        res = bu.run_in_fork(lambda: bu.cpu_measure(name, B, S, H, D, dtype, False, direction, reps=3,
                                                                    budget_s=0.5, long_call_s=1.0))
                    except RuntimeError as exc:
                        row[f"{direction}_error"] = str(exc)[:120]
                        row.pop(f"{direction}_ms", None)
                        continue
                    row[f"{direction}_ms"] = min(res["ms"], row.get(f"{direction}_ms", float("inf")))
                    last[(name, direction)] = (S, row[f"{direction}_ms"])
                    if direction == "fwdbwd" and round_ == 0:
                        row["peak_MiB"] = bu.mib(res["peak_extra_bytes"])
            print(f"  measured S={S}, round {round_ + 1} of {rounds}", file=sys.stderr, flush=True)
        rows.extend(by_impl.values())
    return rows, f"fp32, batch 1, 8 heads, head dim 64, non-causal; best of {rounds} alternating rounds"


def speed_cuda(seqlens):
    """bf16, hd128, H=16, B*S = 16k tokens; ours vs SDPA FLASH/CUDNN/EFFICIENT."""
    rows = []
    H, D, dtype = 16, 128, torch.bfloat16
    impls = bu.implementations("cuda")
    for S in seqlens:
        B = max(1, 16384 // S)
        q, k, v = bu.make_inputs(B, S, S, H, H, D, dtype, "cuda", seed=S)
        dout = torch.randn_like(q)
        for name, (ctx_factory, fn) in impls.items():
            row = {"S": S, "B": B, "impl": name}
            g = dout if name == "ours" else dout.transpose(1, 2)
            with ctx_factory():
                for direction in ("fwd", "fwdbwd"):
                    try:
                        run = (bu.fwd_closure(fn, q, k, v, False) if direction == "fwd"
                               else bu.fwdbwd_closure(fn, q, k, v, False, g))
                        ms = bu.time_cuda_ms(run, warmup_ms=10, rep_ms=40)
                        row[f"{direction}_ms"] = ms
                        row[f"{direction}_tflops"] = bu.tflops(bu.attention_flops(B, H, S, S, D, False, direction), ms)
                        if direction == "fwdbwd":
                            row["peak_MiB"] = bu.mib(bu.cuda_peak_extra_bytes(run))
                    except Exception as exc:  # noqa: BLE001  (a refusing backend is data)
                        torch.cuda.synchronize()
                        row[f"{direction}_error"] = bu.short_error(exc)
            rows.append(row)
        del q, k, v, dout
    return rows, "bf16, head dim 128, 16 heads, batch x seqlen = 16k tokens, non-causal"


def add_speedups(rows):
    """Give each PyTorch row the speed-up of ours over it: its time / ours at the same size."""
    ours = {r["S"]: r for r in rows if r["impl"] == "ours"}
    for r in rows:
        base = ours.get(r["S"])
        if r["impl"] == "ours" or base is None:
            continue
        for direction in ("fwd", "fwdbwd"):
            theirs, mine = r.get(f"{direction}_ms"), base.get(f"{direction}_ms")
            if theirs and mine:
                r[f"{direction}_speedup"] = theirs / mine


def speedup_text(x):
    return "-" if x is None else (f"{x:.2f}x" if x < 10 else f"{x:.1f}x")


def impl_label(name):
    return name if name == "ours" else f"sdpa {name}"


def speed_table(rows, device):
    gpu = device == "cuda"
    headers = ["seqlen", "impl", "fwd ms", "fwd+bwd ms"] + (["fwd TFLOP/s", "fwd+bwd TFLOP/s"] if gpu else []) + [
        "fwd+bwd peak MiB", "speed-up of ours, fwd", "speed-up of ours, fwd+bwd", "note"]
    body = []
    for r in rows:
        note = r.get("fwd_error") or r.get("fwdbwd_error") or ""
        cells = [r["S"], impl_label(r["impl"]), bu.fmt(r.get("fwd_ms"), 2), bu.fmt(r.get("fwdbwd_ms"), 2)]
        if gpu:
            cells += [bu.fmt(r.get("fwd_tflops"), 0), bu.fmt(r.get("fwdbwd_tflops"), 0)]
        cells += [bu.fmt(r.get("peak_MiB"), 1)]
        if r["impl"] == "ours":
            cells += ["(ref)", "(ref)"]
        else:
            cells += [speedup_text(r.get("fwd_speedup")), speedup_text(r.get("fwdbwd_speedup"))]
        body.append(cells + [note[:60]])
    return bu.markdown_table(headers, body)


def verdict(ok, parity_rows, speed_rows):
    """One line: parity, then the range of ours' speed-ups over each PyTorch backend."""
    passed = sum(bool(r.get("ok")) for r in parity_rows)
    line = (f"verdict: {'PASS' if ok else 'FAIL'}: outputs and gradients "
            f"{'match' if ok else 'do NOT all match'} PyTorch's ({passed}/{len(parity_rows)} parity checks)")
    seqlens = sorted({r["S"] for r in speed_rows if "fwd_speedup" in r or "fwdbwd_speedup" in r})
    backends = [name for name in dict.fromkeys(r["impl"] for r in speed_rows) if name != "ours"]
    parts = []
    for direction, label in (("fwdbwd", "fwd+bwd"), ("fwd", "fwd")):
        ranges = []
        for name in backends:
            values = [r[f"{direction}_speedup"] for r in speed_rows
                      if r["impl"] == name and f"{direction}_speedup" in r]
            if values:
                low, high = speedup_text(min(values)), speedup_text(max(values))
                ranges.append(f"{name} {low}" if low == high else f"{name} {low[:-1]}-{high}")
        if ranges:
            parts.append(f"{label} " + ", ".join(ranges))
    if parts and seqlens:
        span = f"{seqlens[0]}" if len(seqlens) == 1 else f"{seqlens[0]}-{seqlens[-1]}"
        line += f"; speed-up of ours over PyTorch SDPA (its time / ours, seqlen {span}): " + "; ".join(parts)
    return line


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        import flash_attn_ext

        version = getattr(flash_attn_ext, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        print(f"flash_attn_ext does not import: {bu.short_error(exc)}", file=sys.stderr)
        return 1
    env = bu.environment(device)
    print(f"flash_attn_ext {version}  torch {env['torch']}  python {env['python']}")
    if device == "cuda":
        print(f"device: {env['device']} (sm {env['capability']}, {env['sm_count']} SMs, "
              f"{env['gpu_memory_GiB']} GiB), CUDA {env['cuda']}")
    else:
        print(f"device: CPU {env['cpu_model']}, {env['cpu_cores']} cores, {env['torch_threads']} torch threads")

    # CPU speed runs first, in forked processes: fork must precede any OpenMP work in this process.
    if device == "cpu":
        seqlens = [512, 1024] if args.quick else [512, 1024, 2048]
        print("measuring speed and memory (forked processes)...", file=sys.stderr, flush=True)
        speed_rows, speed_desc = speed_cpu(seqlens)
    dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]
    parity_rows, ok = parity(device, dtypes)
    print("\nParity: max abs error against a float64 reference, ours (PyTorch's own in the same dtype: "
          "matmuls in that dtype, softmax in fp32); pass = ours <= 2 x PyTorch's + 1e-5 x max(1, |ref|max) "
          "for out, dq, dk, dv. Also shown: our output against SDPA's math backend, and that backend's error.")
    print(parity_table(parity_rows))
    print(f"parity: {'PASS' if ok else 'FAIL'} ({sum(r.get('ok', False) for r in parity_rows)}/{len(parity_rows)})")
    if device == "cuda":
        seqlens = [1024, 4096] if args.quick else [1024, 4096, 16384]
        speed_rows, speed_desc = speed_cuda(seqlens)
    add_speedups(speed_rows)
    print(f"\nSpeed and peak extra memory of forward+backward ({speed_desc}); speed-up of ours = "
          "that backend's time / ours (above 1: ours is faster):")
    print(speed_table(speed_rows, device))
    elapsed = time.perf_counter() - t0
    print(f"\ndone in {elapsed:.1f} s")
    summary = verdict(ok, parity_rows, speed_rows)
    print(summary)
    if args.json:
        bu.write_json(args.json, {**env, "version": version, "parity_ok": ok, "parity": parity_rows,
                                  "speed": speed_rows, "speed_config": speed_desc, "elapsed_s": elapsed,
                                  "verdict": summary})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
