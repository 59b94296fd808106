"""Decoding speed (issue 10): one query token per sequence against a KV cache,
in bytes of K and V read per second, beside PyTorch SDPA's FLASH and CUDNN
backends on the same cache (a dense q of one token) and the device's copy
bandwidth, all in one process.

Grid: batch {1, 8, 64} x cached length {4k, 32k, 128k} x {GQA 32/8, MHA
32/32}, head dim 128, bf16; ours on a contiguous cache and on paged caches
(page 16 and 256, blocks in random order). Every implementation is timed the
same way: `--reps` calls captured in one CUDA graph, replayed, timed with CUDA
events (median of --trials), so that launch overhead (the Python wrapper,
the dispatcher) does not count and only the kernels do. Copy bandwidth:
`dst.copy_(k_cache); dst.copy_(v_cache)` of the same bytes, counted as bytes
read plus written per second (the usual copy figure; a kernel that only reads
can at best match it). Shapes whose caches do not fit are skipped.

    python benchmarks/bench_decode.py [--quick] [--json PATH] [--png PATH]

Developer mode, `--sweep`: every configuration of the CUDA decode kernel
(FLASH_ATTN_EXT_DECODE_CONFIG; the table is csrc/cuda/flash_decode_launch.cuh)
over the contiguous shapes of the table, and paged with page 16, beside
cuDNN, FLASH and the copy in the same process; prints ours/cuDNN per shape
and config, the geomean per config, paged/contiguous per config, and the
largest difference from cuDNN's output (a sanity check; the tests are
tests/test_kvcache.py). About 2-3 minutes on an H200.

    python benchmarks/bench_decode.py --sweep [--configs a,b] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the checkout first on the path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import flash_attn_ext  # noqa: E402,F401

HEADS, HEAD_DIM, DTYPE = 32, 128, torch.bfloat16


def try_time(fn, reps):
    try:
        return common.graph_time_ms(fn, reps), None
    except Exception as e:  # a backend that refuses the shape, or runs out of memory
        torch.cuda.synchronize()
        return None, common.short_error(e)


def measure(batch, seqlen, nheads_k, pages, free_bytes):
    kv_bytes = 2 * batch * seqlen * nheads_k * HEAD_DIM * 2
    row = {"batch": batch, "seqlen": seqlen, "nheads": HEADS, "nheads_k": nheads_k, "kv_bytes": kv_bytes}
    if 1.6 * kv_bytes > free_bytes:
        row["skipped"] = f"needs {1.6 * kv_bytes / 2**30:.0f} GiB"
        return row
    dev = "cuda"
    reps = int(min(200, max(3, 0.03 / (kv_bytes / 4e12))))
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=dev)
    scale = HEAD_DIM ** -0.5
    op = torch.ops.flash_attn_ext.fwd_kvcache

    k_cache = torch.randn(batch, seqlen, nheads_k, HEAD_DIM, device=dev, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    ms, err = try_time(lambda: op(q, k_cache, v_cache, seqlens, None, None, None, scale, True, -1, -1), reps)
    row["ours_ms"], row["ours_error"] = ms, err
    # SDPA: (batch, heads, seqlen, dim) views of the same cache.
    qs, ks, vs = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=nheads_k != HEADS)
        row[f"{name}_ms"], row[f"{name}_error"] = try_time(sdpa, reps)
    dst = torch.empty_like(k_cache)

    def copy():
        dst.copy_(k_cache)
        dst.copy_(v_cache)
    row["copy_ms"], _ = try_time(copy, reps)
    del k_cache, v_cache, qs, ks, vs, dst
    torch.cuda.empty_cache()

    for page in pages:
        blocks_per_seq = math.ceil(seqlen / page)
        num_blocks = batch * blocks_per_seq
        kp = torch.randn(num_blocks, page, nheads_k, HEAD_DIM, device=dev, dtype=DTYPE)
        vp = torch.randn_like(kp)
        table = torch.randperm(num_blocks, device=dev).view(batch, blocks_per_seq).int()
        ms, err = try_time(lambda: op(q, kp, vp, seqlens, None, None, table, scale, True, -1, -1), reps)
        row[f"paged{page}_ms"], row[f"paged{page}_error"] = ms, err
        del kp, vp
        torch.cuda.empty_cache()

    def rate(ms):  # TB/s of K/V read
        return None if ms is None else kv_bytes / (ms * 1e-3) / 1e12
    for impl in ["ours", "flash", "cudnn"] + [f"paged{p}" for p in pages]:
        row[f"{impl}_TBs"] = rate(row.get(f"{impl}_ms"))
    row["copy_TBs"] = None if row["copy_ms"] is None else 2 * kv_bytes / (row["copy_ms"] * 1e-3) / 1e12
    return {k: v for k, v in row.items() if v is not None}


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows, pages):
    head = ["kv", "batch", "seqlen", "MB read", "ours", "paged" + "/".join(map(str, pages)), "flash", "cudnn", "copy",
            "ours/copy", "ours/best SDPA", "paged/ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kv = "GQA 32/8" if r["nheads_k"] == 8 else "MHA 32/32"
        if "skipped" in r:
            lines.append(f"| {kv} | {r['batch']} | {r['seqlen']} | {r['kv_bytes'] / 1e6:.0f} | skipped: {r['skipped']} |")
            continue
        ours, copy = r.get("ours_TBs"), r.get("copy_TBs")
        sdpa = max([r[k] for k in ("flash_TBs", "cudnn_TBs") if k in r], default=None)
        paged = [r.get(f"paged{p}_TBs") for p in pages]
        lines.append("| " + " | ".join([
            kv, str(r["batch"]), str(r["seqlen"]), f"{r['kv_bytes'] / 1e6:.0f}", fmt(ours),
            "/".join(fmt(p) for p in paged), fmt(r.get("flash_TBs")), fmt(r.get("cudnn_TBs")), fmt(copy),
            fmt(ours / copy if ours and copy else None), fmt(ours / sdpa if ours and sdpa else None),
            "/".join(fmt(p / ours if p and ours else None) for p in paged)]) + " |")
    return "\n".join(lines)


def plot(rows, pages, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, hk in zip(axes, (8, 32)):
        sub = [r for r in rows if r["nheads_k"] == hk and "skipped" not in r]
        labels = [f"b{r['batch']}\n{r['seqlen'] // 1024}k" for r in sub]
        x = range(len(sub))
        impls = ["ours"] + [f"paged{p}" for p in pages] + ["flash", "cudnn"]
        colors = {"paged16": "tab:pink", "paged256": "tab:purple"}
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ax.bar([xi + i * width for xi in x], [r.get(f"{impl}_TBs", 0) for r in sub], width,
                   label=impl, color=colors.get(impl, common.COLORS.get(impl)))
        ax.plot([xi + 0.4 for xi in x], [r.get("copy_TBs", 0) for r in sub], "k_", markersize=20, label="copy")
        ax.set_xticks([xi + 0.4 for xi in x])
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("K/V read, TB/s")
        ax.set_title(f"decode, {'GQA 32/8' if hk == 8 else 'MHA 32/32'}, hd128 bf16")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def sweep(args):
    """--sweep: each decode configuration over the contiguous table (and paged, page 16)."""
    from flash_attn_ext.kvcache import DECODE_CONFIG_ENV, _decode_configs

    configs = args.configs.split(",") if args.configs else _decode_configs()
    pages = [int(x) for x in args.sweep_pages.split(",") if x]
    op = torch.ops.flash_attn_ext.fwd_kvcache
    scale = HEAD_DIM ** -0.5
    torch.manual_seed(0)
    rows, start = [], time.time()
    dev = "cuda"

    def run_configs(row, prefix, call, ref=None):
        for c in configs:
            os.environ[DECODE_CONFIG_ENV] = c
            ms, err = try_time(call, row["reps"])
            row[f"{prefix}{c}_ms"] = ms
            if err:
                row[f"{prefix}{c}_error"] = err
            if ref is not None and ms is not None:
                row[f"{prefix}{c}_maxdiff"] = (call()[0].float() - ref).abs().max().item()
        os.environ.pop(DECODE_CONFIG_ENV, None)

    for hk in (8, 32):
        for b in (1, 8, 64):
            for s in (4096, 32768, 131072):
                kv_bytes = 2 * b * s * hk * HEAD_DIM * 2
                row = {"batch": b, "seqlen": s, "nheads_k": hk, "kv_bytes": kv_bytes,
                       "reps": int(min(200, max(3, 0.02 / (kv_bytes / 4e12))))}
                rows.append(row)
                free, _ = torch.cuda.mem_get_info()
                if 1.6 * kv_bytes > free:
                    row["skipped"] = f"needs {1.6 * kv_bytes / 2**30:.0f} GiB"
                    continue
                q = torch.randn(b, 1, HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
                seqlens = torch.full((b,), s, dtype=torch.int32, device=dev)
                kc = torch.randn(b, s, hk, HEAD_DIM, device=dev, dtype=DTYPE)
                vc = torch.randn_like(kc)
                qs, ks, vs = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                ref = None
                for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=hk != HEADS)
                    row[f"{name}_ms"], _ = try_time(sdpa, row["reps"])
                    if row[f"{name}_ms"] is not None and (ref is None or name == "cudnn"):
                        ref = sdpa().transpose(1, 2).float()
                dst = torch.empty_like(kc)

                def copy():
                    dst.copy_(kc)
                    dst.copy_(vc)
                row["copy_ms"], _ = try_time(copy, row["reps"])
                del dst
                run_configs(row, "", lambda: op(q, kc, vc, seqlens, None, None, None, scale, True, -1, -1), ref)
                del kc, vc, qs, ks, vs
                torch.cuda.empty_cache()
                for page in pages:
                    nblk = b * math.ceil(s / page)
                    kp = torch.randn(nblk, page, hk, HEAD_DIM, device=dev, dtype=DTYPE)
                    vp = torch.randn_like(kp)
                    table = torch.randperm(nblk, device=dev).view(b, -1).int()
                    run_configs(row, f"paged{page}_",
                                lambda: op(q, kp, vp, seqlens, None, None, table, scale, True, -1, -1))
                    del kp, vp
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
    seconds = round(time.time() - start)
    print(sweep_table(rows, configs, pages))
    print(f"sweep: {seconds} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "configs": configs, "seconds": seconds, "rows": rows}, f, indent=1)
        print("wrote", args.json)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def sweep_table(rows, configs, pages):
    """ours/cuDNN per shape and config (time ratio cuDNN/ours: > 1 is faster than cuDNN), then summaries."""
    done = [r for r in rows if "skipped" not in r]
    head = ["shape", "cudnn TB/s", "copy TB/s", "flash/cudnn"] + configs
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio = {c: [] for c in configs}
    paged = {(c, p): [] for c in configs for p in pages}
    worst = {c: 0.0 for c in configs}
    for r in done:
        kv = "GQA" if r["nheads_k"] == 8 else "MHA"
        cudnn = r.get("cudnn_ms")
        cells = [f"{kv} b{r['batch']} {r['seqlen'] // 1024}k",
                 fmt(r["kv_bytes"] / (cudnn * 1e-3) / 1e12 if cudnn else None),
                 fmt(2 * r["kv_bytes"] / (r["copy_ms"] * 1e-3) / 1e12 if r.get("copy_ms") else None),
                 fmt(cudnn / r["flash_ms"] if cudnn and r.get("flash_ms") else None)]
        for c in configs:
            ours = r.get(f"{c}_ms")
            x = cudnn / ours if cudnn and ours else None
            ratio[c].append(x)
            cells.append(fmt(x, 3))
            worst[c] = max(worst[c], r.get(f"{c}_maxdiff", 0.0))
            for p in pages:
                pm = r.get(f"paged{p}_{c}_ms")
                paged[(c, p)].append(ours / pm if ours and pm else None)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| geomean ours/cuDNN | | | | " + " | ".join(fmt(geomean(ratio[c]), 3) for c in configs) + " |")
    lines.append("| min ours/cuDNN | | | | " + " | ".join(
        fmt(min([x for x in ratio[c] if x], default=None), 3) for c in configs) + " |")
    for p in pages:
        lines.append(f"| geomean paged{p}/contig | | | | " + " | ".join(
            fmt(geomean(paged[(c, p)]), 3) for c in configs) + " |")
        lines.append(f"| min paged{p}/contig | | | | " + " | ".join(
            fmt(min([x for x in paged[(c, p)] if x], default=None), 3) for c in configs) + " |")
    lines.append("| max abs diff vs cuDNN | | | | " + " | ".join(f"{worst[c]:.1e}" for c in configs) + " |")
    lines.append("(speed ratios, time of the baseline / time of ours: above 1 is faster than cuDNN, "
                 "paged as fast as contiguous at 1)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch {1, 64} x {4k, 128k}, GQA only, page 16")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--replot", default=None, metavar="JSON", help="redraw the PNG and table of a saved run")
    p.add_argument("--sweep", action="store_true",
                   help="developer: every FLASH_ATTN_EXT_DECODE_CONFIG over the contiguous table and paged")
    p.add_argument("--configs", default=None, help="--sweep: comma-separated configuration names (default: all)")
    p.add_argument("--sweep-pages", default="16", help="--sweep: page sizes to time paged (comma-separated, '' none)")
    args = p.parse_args()
    if args.sweep:
        sweep(args)
        return
    if args.replot:
        rows = json.load(open(args.replot))["rows"]
        pages = sorted({int(k[5:-4]) for r in rows for k in r if k.startswith("paged") and k.endswith("_TBs")})
        print(table(rows, pages))
        print("wrote", plot(rows, pages, args.png or args.replot[: -len(".json")] + ".png"))
        return
    batches, lengths, kv_heads, pages = [1, 8, 64], [4096, 32768, 131072], [8, 32], [16, 256]
    if args.quick:
        batches, lengths, kv_heads, pages = [1, 64], [4096, 131072], [8], [16]
    torch.manual_seed(0)
    rows = []
    start = time.time()
    for hk in kv_heads:
        for b in batches:
            for s in lengths:
                free, _ = torch.cuda.mem_get_info()
                rows.append(measure(b, s, hk, pages, free))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows, pages))
    stamp = time.strftime("%Y-%m-%d")
    json_path = args.json or os.path.join(common.ROOT, "benchmarks", "results", f"h200_{stamp}_decode.json")
    png_path = args.png or json_path[: -len(".json")] + ".png"
    with open(json_path, "w") as f:
        json.dump({"date": stamp, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "note": __doc__.split("\n\n")[1].replace("\n", " "), "seconds": round(time.time() - start),
                   "rows": rows}, f, indent=1)
    print("wrote", json_path, plot(rows, pages, png_path))


if __name__ == "__main__":
    main()
