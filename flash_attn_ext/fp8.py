"""FP8 inputs: float8_e4m3fn q, k and v with descale factors, as
FlashAttention-3 and vLLM pass them (`q_descale`, `k_descale`, `v_descale`).

A descale is fp32, of shape (batch, nheads_k), or one value for the whole
tensor (shape () or (1,), as vLLM's per-tensor scales); the real value of an
element of head h in sequence b is its fp8 value times the descale of (b, h's
key/value head): for q, query head h uses entry h // (nheads / nheads_k), as
in FlashAttention-3. The output is bfloat16 (FlashAttention-3's), softmax_lse
fp32. Forward only, as in FlashAttention-3: FP8 inputs that require a
gradient raise.

How it is computed today: q, k and v are dequantized (value x descale) to
bfloat16 on CUDA (fp32 on the CPU, then the output rounded to bfloat16) and
the regular kernels run. That is exact to the inputs' FP8 values up to one
bfloat16 rounding of each dequantized element, but it is no faster than a
bfloat16 call (it reads and writes each input once more): the FP8 tensor-core
forward of issue 13 is still to come, and will keep these semantics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)
OUT_DTYPE = torch.bfloat16


def is_fp8_call(fn: str, q, k, v, q_descale, k_descale, v_descale) -> bool:
    """Whether q, k and v are FP8 (all three, or none: else a TypeError), and
    descales only with FP8 inputs (else a ValueError naming them)."""
    fp8 = [isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in (q, k, v)]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.itemsize == 1 and t.dtype not in FP8_DTYPES:
            raise TypeError(f"{fn}: FP8 inputs must be float8_e4m3fn (FlashAttention-3's), got {name} {t.dtype}")
    if any(fp8) and not all(fp8):
        dtypes = ", ".join(f"{n} {t.dtype}" for n, t in (("q", q), ("k", k), ("v", v)))
        raise TypeError(f"{fn}: q, k and v must all be float8_e4m3fn or none of them, got {dtypes}")
    given = [n for n, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))
             if d is not None]
    if given and not all(fp8):
        raise ValueError(f"{fn}: {', '.join(given)} apply to float8_e4m3fn inputs only, got q of dtype {q.dtype}")
    return all(fp8)


def _descale_table(fn: str, name: str, descale: Optional[torch.Tensor], batch: int, nheads_k: int,
                   device: torch.device) -> torch.Tensor:
    """The descale as fp32 (batch, nheads_k); ones when not given."""
    if descale is None:
        return torch.ones((batch, nheads_k), dtype=torch.float32, device=device)
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(descale).__name__}")
    if descale.dtype != torch.float32:
        raise TypeError(f"{fn}: {name} must be float32, got {descale.dtype}")
    if descale.device != device:
        raise ValueError(f"{fn}: {name} is on {descale.device}, the inputs on {device}")
    if descale.numel() == 1 and descale.dim() <= 1:
        return descale.reshape(1, 1).expand(batch, nheads_k)
    if tuple(descale.shape) != (batch, nheads_k):
        raise ValueError(f"{fn}: {name} must be (batch, nheads_k) = ({batch}, {nheads_k}) or one value, got shape "
                         f"{tuple(descale.shape)}")
    return descale


def _check_no_grad(fn: str, q, k, v):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(f"{fn}: FP8 inputs have no backward (FlashAttention-3's FP8 attention is forward "
                                  "only); detach them, or pass bfloat16 inputs to train")


def _dequantize(x: torch.Tensor, table: torch.Tensor, rows_batch: Optional[torch.Tensor]) -> torch.Tensor:
    """x (batch, seqlen, heads, d), or (total, heads, d) with rows_batch
    (total,) the sequence of each row, times its (batch, heads_k) descale."""
    group = x.shape[-2] // table.shape[1]
    per_head = table.repeat_interleave(group, dim=1) if group > 1 else table  # (batch, heads)
    scale = per_head[:, None, :, None] if rows_batch is None else per_head[rows_batch][:, :, None]
    compute = OUT_DTYPE if x.device.type == "cuda" else torch.float32
    return (x.to(torch.float32) * scale).to(compute)


def _check_shapes(fn: str, q, k, v, dims: int):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise ValueError(f"{fn}: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"{fn}: nheads ({q.shape[-2]}) must be a multiple of nheads_k ({k.shape[-2]})")


def dequantize_dense(fn: str, q, k, v, q_descale, k_descale, v_descale) -> Tuple[torch.Tensor, ...]:
    """q, k, v of (batch, seqlen, heads, d) as the kernels' dtype."""
    _check_no_grad(fn, q, k, v)
    _check_shapes(fn, q, k, v, 4)
    batch, nheads_k = q.shape[0], k.shape[2]
    tables = [_descale_table(fn, n, d, batch, nheads_k, q.device)
              for n, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))]
    return tuple(_dequantize(x, t, None) for x, t in zip((q, k, v), tables))


def rows_batch(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence of each of `total` rows (rows past the last sequence: the
    last), without a host synchronisation."""
    batch = cu_seqlens.numel() - 1
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True).clamp_(max=max(batch - 1, 0))


def dequantize_varlen(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale,
                      v_descale) -> Tuple[torch.Tensor, ...]:
    """q (total_q, heads, d), k, v (total_k, heads_k, d) as the kernels' dtype."""
    _check_no_grad(fn, q, k, v)
    _check_shapes(fn, q, k, v, 3)
    batch, nheads_k = cu_seqlens_q.numel() - 1, k.shape[1]
    tables = [_descale_table(fn, n, d, batch, nheads_k, q.device)
              for n, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))]
    if batch == 0:  # no sequence: every row is outside one (its output is 0); any scale does
        tables = [torch.ones((1, nheads_k), dtype=torch.float32, device=q.device)] * 3
    q_rows = rows_batch(cu_seqlens_q, q.shape[0])
    k_rows = rows_batch(cu_seqlens_k, k.shape[0])
    return (_dequantize(q, tables[0], q_rows), _dequantize(k, tables[1], k_rows), _dequantize(v, tables[2], k_rows))
