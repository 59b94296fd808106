"""Error of FP8 attention against a float64 reference, next to bfloat16's, on
inputs with outliers (the FlashAttention-3 paper's test: entries N(0, 1),
0.1% of them N(0, 10)).

    python benchmarks/fp8_error.py                 # CUDA if present, else the CPU
    python benchmarks/fp8_error.py --device cpu --seqlen 512 --json out.json

Rows: `bf16` (q, k, v rounded to bfloat16), `fp8 per-tensor` (float8_e4m3fn
with one descale per tensor, amax / 448), `fp8 per-head` (one descale per
(batch, kv head), FlashAttention-3's (batch, nheads_k) layout). Columns: RMSE
and max |error| of the output against the float64 attention of the
unrounded inputs. The FP8 rows run flash_attn_ext/fp8.py, which dequantizes
to bfloat16 (fp32 on the CPU) before the kernels: their error is the inputs'
FP8 rounding plus the bfloat16 path's, not that of an FP8 tensor-core kernel
(which would also round P to FP8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_attn_ext  # noqa: E402
from flash_attn_ext.reference import attention_ref  # noqa: E402

E4M3_MAX = 448.0


def outlier_inputs(b, s, h, d, device, generator):
    x = torch.randn(3, b, s, h, d, generator=generator, dtype=torch.float64)
    outliers = torch.rand(x.shape, generator=generator, dtype=torch.float64) < 1e-3
    x = torch.where(outliers, torch.randn(x.shape, generator=generator, dtype=torch.float64) * 10, x)
    return tuple(t.to(device) for t in x)


def quantize(x, per_head):
    """float8_e4m3fn values and fp32 descales (one, or per (batch, head))."""
    amax = x.abs().amax(dim=(1, 3)) if per_head else x.abs().amax().reshape(1)
    descale = (amax / E4M3_MAX).clamp_min(1e-12).float()
    scale = descale.double()[:, None, :, None] if per_head else descale.double()
    return (x / scale).to(torch.float8_e4m3fn), descale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--nheads", type=int, default=4)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    q, k, v = outlier_inputs(args.batch, args.seqlen, args.nheads, args.headdim, args.device, g)
    ref, _ = attention_ref(q, k, v)
    rows = {}
    out = flash_attn_ext.flash_attn_func(*(t.to(torch.bfloat16) for t in (q, k, v)))
    rows["bf16"] = out
    for name, per_head in (("fp8 per-tensor", False), ("fp8 per-head", True)):
        (q8, qd), (k8, kd), (v8, vd) = (quantize(t, per_head) for t in (q, k, v))
        rows[name] = flash_attn_ext.flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    results = {}
    print(f"device {args.device}, B {args.batch}, S {args.seqlen}, H {args.nheads}, D {args.headdim}, "
          f"inputs N(0,1) with 0.1% N(0,10)")
    print("| inputs | RMSE | max abs error |\n|---|---:|---:|")
    for name, out in rows.items():
        err = out.double() - ref
        results[name] = {"rmse": err.pow(2).mean().sqrt().item(), "max_abs": err.abs().max().item()}
        print(f"| {name} | {results[name]['rmse']:.2e} | {results[name]['max_abs']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
