"""GPU benchmark: flash_attn_ext against torch SDPA's FLASH, CUDNN and EFFICIENT backends and
compiled FlexAttention (`--impls ...,flex`: torch.compile(flex_attention), a causal block mask).

    python benchmarks/bench_attention.py                 # full sweep (~5 min on an H100)
    python benchmarks/bench_attention.py --quick         # bf16, hd 64/128, seqlen 1k/4k/16k, memory at 16k/32k
    python benchmarks/bench_attention.py --dtypes bf16 --hdims 128 --seqlens 4k,16k --causal 0
    python benchmarks/bench_attention.py --quick --sm90 classic,ws --directions fwd,bwd   # Hopper kernels side by side

Sweep (the issue's spec): bf16 and fp16; head dim 64, 128, 256; causal and not;
seqlen 512 ... 16k with batch * seqlen = 16k tokens and nheads * headdim = 2048.
Every implementation runs in this one process on the same inputs.

Method:
  * Time: median of triton.testing.do_bench(warmup=25 ms, rep=100 ms), which
    flushes L2 before each call (CUDA events with the same flush without triton).
  * fwd: the forward under torch.no_grad().
  * bwd: the backward alone: one forward outside the timed region, then each
    timed call is torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
    i.e. every kernel the backward launches (dO.O row sums, dq conversion, ...)
    and nothing else. grad() returns fresh tensors, so no accumulation into .grad.
  * fwdbwd: forward + autograd.grad, timed as one call (not fwd + bwd summed).
  * TFLOP/s: forward 4*B*H*S*S*D (halved when causal), backward 2.5x, fwd+bwd 3.5x.
  * SDPA receives q/k/v as transposed views of the same (B, S, H, D) tensors ours gets.
  * A backend (or our op, e.g. a build without that head dim or direction)
    that refuses a configuration is recorded as None with its error; the run goes on.
  * Each row also records max |ours - backend| of the forward output (a sanity
    check that the timed kernel computes attention; tests do the real checking).
  * --sm90 classic,ws (or its older name --sm90-fwd) replaces "ours" by one
    implementation per Hopper kernel family, "ours:classic" and "ours:ws"
    (FLASH_ATTN_EXT_SM90_FWD and FLASH_ATTN_EXT_SM90_BWD set around each; ws
    runs as ws_strict, so a call it cannot take is an error row, not a silent
    classic measurement), with a ws/classic ratio column.
  * Memory: forward+backward at seqlen 16k/32k/64k (bf16, hd128, B=1, H=16):
    torch.cuda.max_memory_allocated during the call minus memory allocated
    before it, q, k, v and dout already allocated; the floor is the bytes of
    out + dq + dk + dv + lse, and ratio = peak / floor. SDPA's MATH backend is
    measured at 16k only, and skipped where its estimated need (16 bytes per
    score) exceeds the free GPU memory.

Output: a JSON file (device, torch version, date, all rows; default
benchmarks/results/<device>_<date>.json, rewritten after every row so an
interrupted run keeps what it measured), a PNG plot beside it, and a table on
stdout, last, with ours/flash and ours/cudnn ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (  # noqa: E402
    attention_flops,
    bwd_closure,
    cuda_peak_extra_bytes,
    fwd_closure,
    fwdbwd_closure,
    implementations,
    make_inputs,
    markdown_table,
    mib,
    short_error,
    tflops,
    time_cuda_ms,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DIRECTIONS = ("fwd", "bwd", "fwdbwd")
# --sm90: the Hopper kernel switches per variant of ours (ws strict: a call the
# warp-specialized kernels cannot take fails instead of timing the classic
# kernel under its name; narrow / wide: the warp-specialized forward's key
# blocks for plain calls at head dim 256, FLASH_ATTN_EXT_SM90_FWD_TILES;
# persistent / per-tile: the warp-specialized forward's persistent grid or one
# block per query block, FLASH_ATTN_EXT_SM90_FWD_PERSISTENT; groups /
# no-groups: a causal call's (batch, head)s in groups a wave wide, block-major
# within a group, or each in turn, FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS).
_WS = {"FLASH_ATTN_EXT_SM90_FWD": "ws_strict", "FLASH_ATTN_EXT_SM90_BWD": "ws_strict"}
SM90_KERNELS = {
    "classic": {"FLASH_ATTN_EXT_SM90_FWD": "classic", "FLASH_ATTN_EXT_SM90_BWD": "classic"},
    "classic-bwd": {"FLASH_ATTN_EXT_SM90_BWD": "classic"},
    "ws": _WS,
    "narrow": {**_WS, "FLASH_ATTN_EXT_SM90_FWD_TILES": "narrow"},
    "wide": {**_WS, "FLASH_ATTN_EXT_SM90_FWD_TILES": "wide"},
    "persistent": {**_WS, "FLASH_ATTN_EXT_SM90_FWD_PERSISTENT": "1"},
    "per-tile": {**_WS, "FLASH_ATTN_EXT_SM90_FWD_PERSISTENT": "0"},
    "groups": {**_WS, "FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS": "1"},
    "no-groups": {**_WS, "FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS": "0"},
}
SM90_ENV = ("FLASH_ATTN_EXT_SM90_FWD", "FLASH_ATTN_EXT_SM90_BWD", "FLASH_ATTN_EXT_SM90_FWD_TILES",
            "FLASH_ATTN_EXT_SM90_FWD_PERSISTENT", "FLASH_ATTN_EXT_SM90_CAUSAL_GROUPS")


def is_ours(name):
    return name == "ours" or name.startswith("ours:")


@contextlib.contextmanager
def sm90_env(kernel):
    """The Hopper kernel switches for one implementation; the library reads them on every call."""
    old = {name: os.environ.get(name) for name in SM90_ENV}
    for name in SM90_ENV:
        os.environ.pop(name, None)
    os.environ.update(SM90_KERNELS[kernel])
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def all_implementations():
    """common.implementations, compiled FlexAttention ("flex") and one "ours:<kernel>" per Hopper
    kernel family."""
    impls = implementations("cuda")
    impls["flex"] = (contextlib.nullcontext, common.flex_attention_compiled)
    for kernel in SM90_KERNELS:
        impls[f"ours:{kernel}"] = (lambda k=kernel: sm90_env(k), impls["ours"][1])
    return impls


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--hdims", default="64,128,256")
    p.add_argument("--seqlens", default="512,1k,2k,4k,8k,16k")
    p.add_argument("--causal", default="both", help="0, 1 or both")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    p.add_argument("--model-dim", type=int, default=2048, help="nheads * headdim")
    p.add_argument("--impls", default="ours,flash,cudnn,efficient")
    p.add_argument("--directions", default="fwd,bwd,fwdbwd")
    p.add_argument("--sm90", "--sm90-fwd", dest="sm90", default="", metavar="KERNELS",
                   help="e.g. classic,ws or narrow,wide: run ours once per Hopper kernel variant (SM90_KERNELS)")
    p.add_argument("--memory-seqlens", default="16k,32k,64k", help="empty string: skip the memory table")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench rep, ms")
    p.add_argument("--quick", action="store_true", help="bf16, hd 64/128, seqlen 1k/4k/16k, memory at 16k/32k")
    p.add_argument("--json", default=None, help="output JSON path (default benchmarks/results/<device>_<date>.json)")
    p.add_argument("--plot", default=None, help="output PNG path (default: the JSON path with .png)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the tables of an earlier run's JSON (no GPU needed) and exit")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        if "--dtypes" not in given:
            args.dtypes = "bf16"
        if "--hdims" not in given:
            args.hdims = "64,128"
        if "--seqlens" not in given:
            args.seqlens = "1k,4k,16k"
        if "--memory-seqlens" not in given:
            args.memory_seqlens = "16k,32k"
    args.dtypes = common.parse_list(args.dtypes)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: {bad} not in {list(DTYPES)}")
    args.hdims = common.parse_list(args.hdims, int)
    args.seqlens = common.parse_list(args.seqlens, int)
    args.causal = common.parse_causal(args.causal)
    args.impls = common.parse_list(args.impls)
    args.sm90 = common.parse_list(args.sm90)
    bad = [k for k in args.sm90 if k not in SM90_KERNELS]
    if bad:
        p.error(f"--sm90: {bad} not in {list(SM90_KERNELS)}")
    if args.sm90:
        variants = [f"ours:{k}" for k in args.sm90]
        at = args.impls.index("ours") if "ours" in args.impls else 0
        args.impls = args.impls[:at] + variants + [i for i in args.impls[at:] if i != "ours"]
    args.directions = common.parse_list(args.directions)
    args.memory_seqlens = common.parse_list(args.memory_seqlens, int)
    return args


class StickyCudaError(RuntimeError):
    pass


def check_device_alive():
    """After a failure: a sticky CUDA error (illegal address...) poisons the context; stop then."""
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        raise StickyCudaError(short_error(exc)) from exc


def measure_impl(name, ctx_factory, fn, q, k, v, dout, causal, directions, warmup, rep):
    """{direction: ms or None}, {direction: error}, forward output in (B, S, H, D) (or None)."""
    ms, errors, out_bshd = {}, {}, None
    # SDPA returns (B, H, S, D); its dout is the same values seen through a transposed view.
    g = dout if is_ours(name) else dout.transpose(1, 2)
    with ctx_factory():
        try:
            with torch.no_grad():
                out = fn(q, k, v, causal)
            torch.cuda.synchronize()
            out_bshd = out if is_ours(name) else out.transpose(1, 2)
        except Exception as exc:  # noqa: BLE001  (a refusing backend is data, not a crash)
            check_device_alive()
            return {d: None for d in directions}, {"fwd": short_error(exc)}, None
        for direction in directions:
            try:
                if direction == "fwd":
                    ms[direction] = time_cuda_ms(fwd_closure(fn, q, k, v, causal), warmup, rep)
                elif direction == "bwd":
                    run, _out = bwd_closure(fn, q, k, v, causal, g)
                    ms[direction] = time_cuda_ms(run, warmup, rep)
                    del run, _out
                else:
                    ms[direction] = time_cuda_ms(fwdbwd_closure(fn, q, k, v, causal, g), warmup, rep)
            except Exception as exc:  # noqa: BLE001
                check_device_alive()
                ms[direction], errors[direction] = None, short_error(exc)
    return ms, errors, out_bshd


def run_speed(args, payload, json_path):
    impls = all_implementations()
    unknown = [i for i in args.impls if i not in impls]
    if unknown:
        raise SystemExit(f"--impls: {unknown} not in {[i for i in impls if not i.startswith('ours:')]}")
    rows = payload["rows"]
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for d in args.hdims:
            for causal in args.causal:
                for S in args.seqlens:
                    B, H = max(1, args.tokens // S), max(1, args.model_dim // d)
                    q, k, v = make_inputs(B, S, S, H, H, d, dtype, "cuda", seed=S + d)
                    dout = torch.randn_like(q)
                    row = {"dtype": dtype_name, "d": d, "causal": causal, "S": S, "B": B, "H": H}
                    ours_out, ours_first = None, None
                    for name in args.impls:
                        ctx_factory, fn = impls[name]
                        ms, errors, out = measure_impl(name, ctx_factory, fn, q, k, v, dout, causal,
                                                       args.directions, args.warmup, args.rep)
                        for direction in args.directions:
                            flops = attention_flops(B, H, S, S, d, causal, direction)
                            row[f"{name}_{direction}"] = tflops(flops, ms.get(direction))
                            row[f"{name}_{direction}_ms"] = ms.get(direction)
                        if errors:
                            row[f"{name}_error"] = errors
                        if is_ours(name) and out is not None:
                            row[f"{name}_nonfinite"] = bool(not torch.isfinite(out).all())
                            if ours_out is None:
                                ours_out, ours_first = out, name
                            else:  # another Hopper forward: against the first one run
                                row[f"{name}_maxdiff_vs_{ours_first}"] = float(
                                    (ours_out.float() - out.float()).abs().max())
                        elif out is not None and ours_out is not None:
                            row[f"ours_maxdiff_vs_{name}"] = float((ours_out.float() - out.float()).abs().max())
                        del out
                    rows.append(row)
                    common.write_json(json_path, payload)
                    print(progress_line(row, args.impls), flush=True)
                    del q, k, v, dout, ours_out
    return rows


def progress_line(row, impls):
    parts = [f"{row['dtype']} hd{row['d']} {'causal' if row['causal'] else 'full  '} S={row['S']:>5}"]
    for name in impls:
        vals = "/".join(common.fmt(row.get(f"{name}_{d}"), 0) for d in DIRECTIONS if f"{name}_{d}" in row)
        parts.append(f"{name} {vals}")
    for name in impls:
        if is_ours(name) and f"{name}_error" in row:
            parts.append(f"{name}: {list(row[f'{name}_error'].values())[0][:80]}")
    return "  ".join(parts)


def run_memory(args, payload, json_path):
    """Peak extra memory of forward+backward, ours vs each SDPA backend (bf16, hd128, B=1, H=16)."""
    from torch.nn.attention import SDPBackend

    impls = dict(all_implementations())
    impls["math"] = (lambda: common.sdpa_context(SDPBackend.MATH), common.sdpa_attention)
    B, H, D, dtype = 1, 16, 128, torch.bfloat16
    out_rows = payload["memory"]
    for S in args.memory_seqlens:
        q, k, v = make_inputs(B, S, S, H, H, D, dtype, "cuda", seed=S)
        dout = torch.randn_like(q)
        elem = q.element_size()
        floor = 4 * B * S * H * D * elem + B * H * S * 4  # out, dq, dk, dv + fp32 lse
        for name in [n for n in args.impls if n in impls] + ["math"]:
            entry = {"S": S, "backend": name, "floor_MiB": round(mib(floor), 1), "peak_extra_MiB": None,
                     "ratio": None}
            if name == "math":
                need = 16 * B * H * S * S
                free = torch.cuda.mem_get_info()[0]
                if S > 16384 or need > 0.95 * free:
                    entry["skipped"] = f"needs ~{need / 2**30:.0f} GiB (free {free / 2**30:.0f} GiB)" \
                        if S <= 16384 else "math measured at 16k only"
                    out_rows.append(entry)
                    continue
            ctx_factory, fn = impls[name]
            g = dout if is_ours(name) else dout.transpose(1, 2)
            try:
                with ctx_factory():
                    peak = cuda_peak_extra_bytes(fwdbwd_closure(fn, q, k, v, False, g))
                entry["peak_extra_MiB"] = round(mib(peak), 1)
                entry["ratio"] = round(peak / floor, 2)
            except torch.cuda.OutOfMemoryError as exc:
                entry["error"] = "OOM: " + short_error(exc)[:120]
            except Exception as exc:  # noqa: BLE001
                check_device_alive()
                entry["error"] = short_error(exc)
            torch.cuda.empty_cache()
            out_rows.append(entry)
            common.write_json(json_path, payload)
            print(f"memory S={S:>6} {name:>9}: peak extra {common.fmt(entry['peak_extra_MiB'])} MiB, "
                  f"ratio {common.fmt(entry['ratio'], 2)}  {entry.get('error', entry.get('skipped', ''))}",
                  flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


SHORT = {"ours": "our", "ours:classic": "cl", "ours:ws": "ws", "flash": "fa", "cudnn": "cud", "efficient": "eff",
         "flex": "flx",
         "fwd": "f", "bwd": "b", "fwdbwd": "fb"}


def ratio_pairs(impls):
    """(numerator, denominator) of the ratio columns: each of ours against flash, cudnn and flex, and
    ws / classic."""
    ours = [i for i in impls if is_ours(i)]
    pairs = [(o, base) for o in ours for base in ("flash", "cudnn", "flex") if base in impls]
    if "ours:ws" in impls and "ours:classic" in impls:
        pairs.append(("ours:ws", "ours:classic"))
    return pairs


def ratio_label(num, den):
    prefix = "" if num == "ours" else SHORT.get(num, num)
    return f"{prefix}/{SHORT.get(den, den)}"


def speed_table(rows, impls, directions, table_impls=("flash", "cudnn", "flex")):
    """Compact table (TFLOP/s; f = fwd, b = bwd, fb = fwd+bwd; /fa = ours / flash). EFFICIENT is in the JSON."""
    shown = [i for i in impls if i in table_impls or is_ours(i)] or list(impls)
    pairs = ratio_pairs(impls)
    headers = ["dtype", "hd", "c", "S"]
    for name in shown:
        headers += [f"{SHORT.get(name, name)} {SHORT[d]}" for d in directions]
    for num, den in pairs:
        headers += [f"{ratio_label(num, den)} {SHORT[d]}" for d in directions]
    body = []
    for r in rows:
        cells = [r["dtype"], r["d"], "y" if r["causal"] else "n", r["S"]]
        for name in shown:
            cells += [common.fmt(r.get(f"{name}_{d}"), 0) for d in directions]
        for num, den in pairs:
            cells += [common.fmt(ratio(r.get(f"{num}_{d}"), r.get(f"{den}_{d}")), 2) for d in directions]
        body.append(cells)
    return markdown_table(headers, body)


def geomean_summary(rows, directions, impls=("ours", "flash", "cudnn", "flex")):
    lines = []
    for num, den in ratio_pairs(impls):
        parts = []
        for d in directions:
            vals = [ratio(r.get(f"{num}_{d}"), r.get(f"{den}_{d}")) for r in rows]
            vals = [v for v in vals if v]
            if vals:
                gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
                parts.append(f"{d} {gm:.2f} (n={len(vals)})")
        if parts:
            lines.append(f"geomean {num}/{den}: " + ", ".join(parts))
    return "\n".join(lines)


def memory_table(mem_rows):
    body = [[m["S"], m["backend"], m["peak_extra_MiB"], m["floor_MiB"], common.fmt(m["ratio"], 2),
             (m.get("error") or m.get("skipped") or "")[:50]] for m in mem_rows]
    return markdown_table(["S", "backend", "peak extra MiB", "floor MiB", "ratio", "note"], body)


def print_tables(payload, impls, directions):
    if payload.get("memory"):
        print("\nPeak extra memory of fwd+bwd (bf16, hd128, B=1, H=16); floor = out+dq+dk+dv+lse:")
        print(memory_table(payload["memory"]))
    if payload.get("rows"):
        print(f"\nTFLOP/s on {payload.get('device')} (torch {payload.get('torch')}); f = fwd, b = bwd, "
              f"fb = fwd+bwd; our = ours, fa = SDPA flash, cud = SDPA cuDNN; /fa, /cud = ours / backend:")
        print(speed_table(payload["rows"], impls, directions))
        print(geomean_summary(payload["rows"], directions, impls))
        bad = [r for r in payload["rows"] if any(v for k, v in r.items() if k.endswith("_nonfinite"))]
        if bad:
            print(f"WARNING: our output had NaN/inf in {len(bad)} rows")
        diffs = [(r.get("ours_maxdiff_vs_flash"), r) for r in payload["rows"] if r.get("ours_maxdiff_vs_flash")]
        if diffs:
            worst, row = max(diffs, key=lambda x: x[0])
            print(f"max |ours - SDPA flash| over rows: {worst:.2e} ({row['dtype']} hd{row['d']} "
                  f"{'causal' if row['causal'] else 'full'} S={row['S']})")
        errs = {f"{k[:-len('_error')]}: {v.get('fwd') or next(iter(v.values()))}"
                for r in payload["rows"] for k, v in r.items() if k.endswith("_error") and is_ours(k[:-len("_error")])}
        for e in sorted(errs)[:5]:
            print(f"failed: {e}")
    if payload.get("aborted"):
        print(f"ABORTED: {payload['aborted']}")


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            payload = json.load(f)
        saved = payload.get("args", {})
        print_tables(payload, saved.get("impls", args.impls), saved.get("directions", args.directions))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU (use benchmarks/bench_cpu.py on CPU)")
    env = common.environment("cuda")
    json_path = args.json or os.path.join(common.ROOT, common.default_json_path(env))
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    payload = {
        **env,
        "method": {
            "timing": "median of triton.testing.do_bench" if _has_triton() else "median of CUDA events",
            "warmup_ms": args.warmup, "rep_ms": args.rep,
            "bwd": "autograd.grad(out, (q,k,v), dout, retain_graph=True) after one untimed forward",
            "fwdbwd": "forward + autograd.grad timed together",
            "flops": "fwd 4*B*H*S*S*D (/2 causal), bwd 2.5x, fwdbwd 3.5x",
            "memory": "max_memory_allocated - memory_allocated before fwd+bwd; floor = out+dq+dk+dv+lse",
        },
        "args": {k: v for k, v in vars(args).items()},
        "rows": [],
        "memory": [],
    }
    try:
        import flash_attn_ext  # noqa: F401

        payload["ours_import"] = "ok"
    except Exception as exc:  # noqa: BLE001
        payload["ours_import"] = short_error(exc)
        print(f"warning: flash_attn_ext does not import ({payload['ours_import']}); 'ours' will be None")
    print(f"# {env['device']}  torch {env['torch']}  cuda {env.get('cuda')}  triton {env.get('triton')}  "
          f"{env['date']}", flush=True)
    status = 0
    try:
        if args.seqlens and args.hdims and args.dtypes:
            run_speed(args, payload, json_path)
        if args.memory_seqlens:
            run_memory(args, payload, json_path)
    except StickyCudaError as exc:
        payload["aborted"] = f"CUDA context lost: {exc}"
        print(f"ABORTED: {payload['aborted']}", flush=True)
        status = 2
    common.write_json(json_path, payload)
    plotted = common.plot_tflops(payload["rows"], plot_path, args.impls, args.directions,
                                 title=f"{env['device']}, torch {env['torch']}") if payload["rows"] else None
    print(f"\nJSON: {json_path}" + (f"\nplot: {plotted}" if plotted else "\nplot: skipped (no matplotlib or rows)"))
    print_tables(payload, args.impls, args.directions)
    return status


def _has_triton():
    try:
        import triton.testing  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
