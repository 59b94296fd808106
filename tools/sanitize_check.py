"""A small workload for compute-sanitizer: forward and backward of our CUDA
kernels on a few small shapes that hit partial tiles, causal masks, GQA,
seqlen_q != seqlen_k, rows with no visible key and padded head dims, with
and without dropout; and variable-length batches (empty sequences,
seqused_k, paged keys, and cumulative lengths that point past the tensors,
which the kernels must clamp); and decode steps over KV caches (contiguous,
left-padded, paged with
pages of 8, 16, 24 and 256 rows, with lengths, left pads and block ids out of
range, which the decode kernel clamps); and FP8 forwards (the native Hopper
kernel where it is built), dense and varlen.

    compute-sanitizer --tool memcheck  --kernel-name kns=flash python3 tools/sanitize_check.py
    compute-sanitizer --tool racecheck --kernel-name kns=flash python3 tools/sanitize_check.py

Kept tiny because the sanitizer slows kernels 10-100x. Shapes whose head
dim or dtype is not compiled in this build are skipped (and counted).
Exits non-zero when a result is not finite; memory errors and races are the
sanitizer's to report.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_attn_ext  # noqa: E402

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal)
CASES = [
    (1, 65, 65, 2, 2, 64, True),      # partial tiles, causal
    (2, 129, 97, 4, 2, 128, False),   # seqlen_q > seqlen_k, GQA
    (1, 70, 33, 2, 1, 128, True),     # causal with rows that see no key (MQA)
    (1, 31, 200, 2, 2, 80, True),     # padded head dim (80 -> 96 or 128), seqlen_q < seqlen_k
    (1, 100, 100, 2, 2, 256, False),  # largest head dim
    (1, 300, 260, 4, 2, 256, True),   # head dim 256, several query and key blocks (the split-dim backward)
    (1, 1, 17, 1, 1, 32, False),      # single query
    (2, 7, 7, 2, 2, 16, True),        # tiny: one partial tile, head dim 16 padded
    (1, 300, 257, 4, 2, 64, True),    # several tiles (Hopper kernels: 128-row blocks)
    (2, 1300, 1300, 16, 4, 128, True),  # more tiles than SMs: the persistent grids run several per block
]
# Varlen: (query lengths, key lengths, nheads, nheads_k, headdim, causal, extra)
VARLEN_CASES = [
    ([3, 0, 70, 129], [5, 9, 70, 129], 4, 2, 64, True, None),
    ([1, 1, 1], [40, 0, 300], 4, 1, 128, False, "seqused"),
    ([9, 70], [33, 300], 2, 2, 64, True, "paged"),
    ([5, 6], [5, 6], 2, 2, 64, False, "out-of-range"),
    ([700, 0, 1, 1290, 65, 900] * 4, [650, 3, 1, 1290, 200, 900] * 4, 8, 2, 128, True, None),  # persistent, varlen
    # More sequences than the tile-list kernel takes at a time (1024): the persistent forward's
    # list of query blocks and the Hopper backward's of key blocks.
    ([(i * 37) % 150 for i in range(1030)] + [700], [(i * 53) % 150 for i in range(1030)] + [650], 2, 1, 128, True,
     None),
    ([600] * 40, [600] * 40, 4, 2, 128, True, "overlapping"),
    # Head dim 64 where sequences average 384 query rows or more: the Hopper forward's 192-row
    # tiles (sm90_fwd_takes_hd64_plain_tiles), with an empty sequence, a 1-row one and partial
    # last blocks; causal and not.
    ([700, 0, 1, 1290, 65, 900], [650, 3, 1, 1290, 200, 900], 4, 2, 64, True, None),
    ([500, 391, 1, 777], [500, 391, 2, 777], 4, 4, 64, False, None),
]
# Decode: (page size or None, leftpad, out-of-range index values, num_splits)
DECODE_CASES = [
    (None, False, False, 1),
    (None, True, False, 3),
    (None, False, True, 0),
    (8, False, False, 0),
    (16, False, True, 2),
    (24, True, False, 0),
    (256, False, False, 1),
]
MISSING = ("not compiled in this build", "no CUDA kernel compiled", "Could not run 'flash_attn_ext::")


def run_varlen(lens_q, lens_k, H, Hk, D, causal, extra, dtype):
    """Forward and backward of one varlen case; returns the results."""
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")  # noqa: E731
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    kw = {}
    max_q, max_k = max(lens_q), max(lens_k)
    if extra == "seqused":
        kw["seqused_k"] = torch.tensor([min(7, n) for n in lens_k], dtype=torch.int32, device="cuda")
    elif extra == "paged":
        page = 16
        blocks = sum(-(-n // page) for n in lens_k) + 2
        k = torch.randn(blocks, page, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(blocks, page, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
        width = max(-(-n // page) for n in lens_k)
        kw["block_table"] = torch.randint(0, blocks, (len(lens_k), width), dtype=torch.int32, device="cuda")
    elif extra == "out-of-range":
        # Lengths past the tensors and above the max: clamped, never read.
        cu_q = torch.tensor([0, 9, 1000], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 4000, 2], dtype=torch.int32, device="cuda")
        max_q = max_k = 2048
    elif extra == "overlapping":
        # Sequences that overlap (cumulative lengths going down and up again):
        # more query (key) blocks than q's (k's) rows can hold, which the
        # persistent forward's (the Hopper backward's) tile list clamps to
        # its room.
        q, k, v = (t[:600].detach().requires_grad_() for t in (q, k, v))
        cu_q = cu_k = torch.tensor([0, 600] * (len(lens_q) // 2) + [0], dtype=torch.int32, device="cuda")
    out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    return (out, *grads)


def run_decode(page, leftpad, out_of_range, splits, dtype):
    """One flash_attn_with_kvcache step (append and attend); returns the output."""
    batch, H, Hk, D, capacity = 3, 8, 2, 128, 300
    lens = [0, 150, 299]
    if page is None:
        k_cache = torch.randn(batch, capacity, Hk, D, device="cuda", dtype=dtype)
        table = None
    else:
        width = -(-capacity // page)
        k_cache = torch.randn(batch * width + 1, page, Hk, D, device="cuda", dtype=dtype)
        table = torch.randperm(batch * width, device="cuda")[: batch * width].view(batch, width).int()
        if out_of_range:
            table[1, 0], table[2, -1] = -5, 10_000
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    if out_of_range:
        seqlens[2] = 100_000
    pads = torch.tensor([0, 7, 40], dtype=torch.int32, device="cuda") if leftpad else None
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=dtype)
    k_new, v_new = torch.randn(batch, 1, Hk, D, device="cuda", dtype=dtype), None
    v_new = torch.randn_like(k_new)
    out = flash_attn_ext.flash_attn_with_kvcache(q, k_cache, v_cache, k_new if not out_of_range else None,
                                                 v_new if not out_of_range else None, cache_seqlens=seqlens,
                                                 cache_leftpad=pads, block_table=table, causal=True,
                                                 num_splits=splits)
    torch.cuda.synchronize()
    return out


def run_dense(B, Sq, Sk, H, Hk, D, causal, dtype, dropout_p=0.0):
    """Forward and backward of one flash_attn_func case; returns the results."""
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    out = flash_attn_ext.flash_attn_func(q, k, v, causal=causal, dropout_p=dropout_p)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    return (out, *grads)


def run_fp8(varlen):
    """One FP8 forward (the native Hopper kernel where the build and GPU have it, else the
    dequantizing path): partial tiles, GQA, causal; varlen with an empty sequence."""
    e4m3 = torch.float8_e4m3fn
    H, Hk, D = 4, 2, 128
    ds = [torch.rand(3 if varlen else 2, Hk, device="cuda") + 0.25 for _ in range(3)]
    if varlen:
        lens_q, lens_k = [70, 0, 129], [200, 5, 129]
        cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")  # noqa: E731
        q = (torch.randn(sum(lens_q), H, D, device="cuda") * 3).to(e4m3)
        k = (torch.randn(sum(lens_k), Hk, D, device="cuda") * 3).to(e4m3)
        v = (torch.randn(sum(lens_k), Hk, D, device="cuda") * 3).to(e4m3)
        out = flash_attn_ext.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                    causal=True, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    else:
        q = (torch.randn(2, 130, H, D, device="cuda") * 3).to(e4m3)
        k = (torch.randn(2, 300, Hk, D, device="cuda") * 3).to(e4m3)
        v = (torch.randn(2, 300, Hk, D, device="cuda") * 3).to(e4m3)
        out = flash_attn_ext.flash_attn_func(q, k, v, causal=True, q_descale=ds[0], k_descale=ds[1],
                                             v_descale=ds[2])
    torch.cuda.synchronize()
    return (out,)


def main() -> int:
    dtypes = [torch.bfloat16, torch.float16]
    if len(sys.argv) > 1 and sys.argv[1] == "--one-dtype":
        dtypes = dtypes[:1]
    counts = {"ran": 0, "skipped": 0, "bad": 0}

    def check(label, fn, *args):
        """Runs one case; a build without its kernels skips it; a non-finite
        result counts as bad (out-of-range index values give clamped, wrong
        but finite, answers)."""
        try:
            tensors = fn(*args)
        except (RuntimeError, NotImplementedError) as exc:
            if any(m in str(exc) for m in MISSING):
                counts["skipped"] += 1
                return
            raise
        counts["ran"] += 1
        if not all(torch.isfinite(t).all() for t in tensors):
            counts["bad"] += 1
            print(f"non-finite result: {label} {args}")

    # Both kernel families: on compute capability 9.0 the Hopper kernels run by
    # default and FLASH_ATTN_EXT_DISABLE_SM90=1 (read on every call) selects
    # the mma.sync ones; elsewhere both passes run the mma.sync kernels.
    for disable in ("0", "1"):
        os.environ["FLASH_ATTN_EXT_DISABLE_SM90"] = disable
        for dtype in dtypes:
            for case in CASES:
                check(f"dense, sm90 disabled={disable}", run_dense, *case, dtype)
            for case in CASES[:3]:  # dropout: the keep-bit shuffles of the backwards
                check(f"dense dropout, sm90 disabled={disable}", run_dense, *case, dtype, 0.1)
            for case in VARLEN_CASES:
                check(f"varlen, sm90 disabled={disable}", run_varlen, *case, dtype)
    for dtype in dtypes:
        for case in DECODE_CASES:
            check("decode", lambda *a: (run_decode(*a),), *case, dtype)
    for varlen in (False, True):
        check("fp8", run_fp8, varlen)
    print(f"sanitize_check: {counts['ran']} cases ran, {counts['skipped']} skipped (not in this build), "
          f"{counts['bad']} non-finite")
    return 1 if counts["bad"] or counts["ran"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
