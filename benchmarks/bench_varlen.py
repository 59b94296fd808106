"""Variable-length prefill (issue 10), on the GPU, in one process.

A batch of sequences of mixed lengths (128 to 4k tokens, 16k tokens in all by
default), bf16, head dim 128, 16 heads (GQA 16/4 with --kv-heads 4). Forward
and forward+backward TFLOP/s counted over the real (unpadded) work, sum over
sequences of 4 * Sq * Sk * H * D (halved when causal), for:
  varlen        flash_attn_varlen_func on the packed batch;
  dense-grouped our dense kernel on the same lengths: one batched call per
                distinct length (the lengths are drawn from 128, 256, ...,
                4k, so every length has a batch), timed back to back: the
                acceptance bar, varlen >= 0.95x at equal work;
  dense-loop    our dense kernel on each sequence alone (one launch each);
  dense-equal   our dense kernel on a batch of equal-length sequences with
                the same total work (what long uniform batches reach);
                the forwards of varlen and dense-equal are also timed in
                CUDA graphs (the GPU's time alone, a second table);
  sdpa-<name>   PyTorch SDPA (FLASH, CUDNN, EFFICIENT) on the zero-padded
                batch, with a boolean key-padding mask where the backend takes
                one (FLASH takes none: it computes the padded batch whole).

    python benchmarks/bench_varlen.py [--tokens 16384] [--causal] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the checkout first on the path)
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import flash_attn_ext  # noqa: E402


def mixed_lengths(total, lo, hi, seed):
    """Random powers of two in [lo, hi] (log-uniform), shuffled, summing to
    at most `total`, the rest filled with lo-long sequences."""
    g = torch.Generator().manual_seed(seed)
    choices = [1 << e for e in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
    lengths = []
    while True:
        n = choices[int(torch.randint(len(choices), (1,), generator=g))]
        if sum(lengths) + n > total:
            break
        lengths.append(n)
    lengths += [lo] * ((total - sum(lengths)) // lo)
    return [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]


# Also timed in CUDA graphs (forward, no autograd): the kernels' own rate.
GRAPHED = ("varlen", "dense-equal")


def time_ms(fn, backward):
    if not backward:
        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    out = fn()
    grad = torch.randn_like(out)
    return do_bench(lambda: fn().backward(grad), warmup=10, rep=50, return_mode="median")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--causal", default="both", help="0, 1 or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    h, hk, d = args.heads, args.kv_heads, args.headdim
    lens = mixed_lengths(args.tokens, args.min_len, args.max_len, args.seed)
    total, batch, max_len = sum(lens), len(lens), max(lens)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(dev)
    q = torch.randn(total, h, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(total, hk, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(total, hk, d, device=dev, dtype=dt, requires_grad=True)
    print(f"{batch} sequences, {total} tokens, lengths {min(lens)}..{max_len}, H {h}/{hk}, D {d}, bf16")

    rows = []
    causals = [False, True] if args.causal == "both" else [args.causal in ("1", "true")]
    for causal in causals:
        work = sum(4 * n * n * h * d for n in lens) / (2 if causal else 1)
        # Equal-length batch with the same work: B x S with B * S^2 = sum(n^2).
        s_eq = 1 << round(math.log2(math.sqrt(sum(n * n for n in lens) / 8)))
        b_eq = max(1, round(sum(n * n for n in lens) / (s_eq * s_eq)))
        work_eq = 4 * b_eq * s_eq * s_eq * h * d / (2 if causal else 1)

        def varlen():
            return flash_attn_ext.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)

        slices = [(int(a), int(b)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]

        groups = {}
        for a, b in slices:
            groups.setdefault(b - a, []).append(a)
        grouped_inputs = []
        for n, starts in groups.items():
            idx = torch.tensor([a + i for a in starts for i in range(n)], device=dev)
            grouped_inputs.append(tuple(t.detach()[idx].reshape(len(starts), n, *t.shape[1:]).requires_grad_()
                                        for t in (q, k, v)))

        def dense_grouped():
            outs = [flash_attn_ext.flash_attn_func(*inp, causal=causal) for inp in grouped_inputs]
            return torch.cat([o.reshape(-1, *o.shape[2:]) for o in outs])

        def dense_loop():
            return torch.cat([flash_attn_ext.flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b],
                                                             causal=causal)[0] for a, b in slices])

        qe = torch.randn(b_eq, s_eq, h, d, device=dev, dtype=dt, requires_grad=True)
        ke = torch.randn(b_eq, s_eq, hk, d, device=dev, dtype=dt, requires_grad=True)
        ve = torch.randn(b_eq, s_eq, hk, d, device=dev, dtype=dt, requires_grad=True)

        def dense_equal():
            return flash_attn_ext.flash_attn_func(qe, ke, ve, causal=causal)

        # Padded batch for SDPA: (batch, H, max_len, D), keys past a
        # sequence's length masked (bottom-right causal = top-left here, as
        # each sequence has Sq == Sk and padding sits at the end).
        pad = torch.zeros(batch, max_len, h, d, device=dev, dtype=dt)
        padk = torch.zeros(batch, max_len, hk, d, device=dev, dtype=dt)
        padv = torch.zeros_like(padk)
        for i, (a, b) in enumerate(slices):
            pad[i, :b - a] = q.detach()[a:b]
            padk[i, :b - a] = k.detach()[a:b]
            padv[i, :b - a] = v.detach()[a:b]
        qp, kp, vp = (t.transpose(1, 2).contiguous().requires_grad_() for t in (pad, padk, padv))
        valid = torch.arange(max_len, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & torch.ones(max_len, max_len, device=dev, dtype=torch.bool).tril()[None, None]

        def sdpa(backend, with_mask):
            def run():
                with torch.nn.attention.sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        qp, kp, vp, attn_mask=mask if with_mask else None, is_causal=causal and not with_mask,
                        enable_gqa=h != hk)
            return run

        B = torch.nn.attention.SDPBackend
        impls = {"varlen": (varlen, work), "dense-grouped": (dense_grouped, work), "dense-loop": (dense_loop, work),
                 "dense-equal": (dense_equal, work_eq),
                 "sdpa-flash (padded, no mask)": (sdpa(B.FLASH_ATTENTION, False), work),
                 "sdpa-cudnn (padded, mask)": (sdpa(B.CUDNN_ATTENTION, True), work),
                 "sdpa-efficient (padded, mask)": (sdpa(B.EFFICIENT_ATTENTION, True), work)}
        for name, (fn, flops) in impls.items():
            row = {"impl": name, "causal": causal, "tokens": total, "batch": batch}
            for direction, backward, mult in (("fwd", False, 1.0), ("fwdbwd", True, 3.5)):
                try:
                    ms = time_ms(fn, backward)
                    row[f"{direction}_ms"] = ms
                    row[f"{direction}_tflops"] = mult * flops / ms / 1e9
                except Exception as e:  # a backend that declines the shape
                    row[f"{direction}_error"] = str(e).splitlines()[0][:120]
            if name in GRAPHED:
                # The forward's GPU time alone: a varlen call's host work
                # (Python, autograd, the tile list's allocation) can exceed a
                # causal forward's GPU time on a slow host core.
                def no_grad(fn=fn):
                    with torch.no_grad():
                        return fn()
                ms = common.graph_time_ms(no_grad, 20)
                row["fwd_graph_ms"] = ms
                row["fwd_graph_tflops"] = flops / ms / 1e9
            rows.append(row)
    ref = {(r["causal"]): r for r in rows if r["impl"] == "dense-grouped"}
    print("| impl | causal | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd / dense-grouped | fwd+bwd / dense-grouped |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        e = ref[r["causal"]]
        f = r.get("fwd_tflops")
        fb = r.get("fwdbwd_tflops")
        rf = f / e["fwd_tflops"] if f and e.get("fwd_tflops") else None
        rfb = fb / e["fwdbwd_tflops"] if fb and e.get("fwdbwd_tflops") else None
        cell = lambda x: f"{x:.1f}" if x is not None else r.get("fwd_error", "-")  # noqa: E731
        print(f"| {r['impl']} | {int(r['causal'])} | {cell(f)} | {cell(fb)} | "
              f"{rf and f'{rf:.2f}x' or '-'} | {rfb and f'{rfb:.2f}x' or '-'} |")
    graphed = {(r["impl"], r["causal"]): r["fwd_graph_tflops"] for r in rows if "fwd_graph_tflops" in r}
    print("\nForward in CUDA graphs (no autograd, no host time), TFLOP/s:")
    print("| causal | varlen | dense-equal | varlen / dense-equal |")
    print("|---|---:|---:|---:|")
    for causal in causals:
        a, b = graphed.get(("varlen", causal)), graphed.get(("dense-equal", causal))
        if a and b:
            print(f"| {int(causal)} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    out = {"env": common.environment("cuda"), "lengths": lens, "heads": h, "kv_heads": hk, "headdim": d, "rows": rows}
    path = args.json or os.path.join(common.ROOT, "benchmarks", "results", "varlen.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
