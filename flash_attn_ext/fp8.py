"""FP8 inputs: float8_e4m3fn q, k and v with descale factors, as
FlashAttention-3 and vLLM pass them (`q_descale`, `k_descale`, `v_descale`),
to flash_attn_func, flash_attn_varlen_func and flash_attn_with_kvcache (whose
FP8 caches go through flash_attn_varlen_func: kvcache._fp8_attention).

A descale is fp32, of shape (batch, nheads_k), or one value for the whole
tensor (shape () or (1,), as vLLM's per-tensor scales); the real value of an
element of head h in sequence b is its fp8 value times the descale of (b, h's
key/value head): for q, query head h uses entry h // (nheads / nheads_k), as
in FlashAttention-3. The output is bfloat16 (FlashAttention-3's), softmax_lse
fp32. Forward only, as in FlashAttention-3: FP8 inputs that require a
gradient raise.

Two ways to compute it, chosen in one place, `native_fp8_reason`:

- native: the FP8 tensor-core forward on Hopper (the fwd_fp8 op: e4m3 wgmmas
  for Q K^T and P V in the warp-specialized kernel, q_descale * k_descale
  folded into the softmax scale, v_descale into the output; P is rounded to
  e4m3 as in FlashAttention-3). For H100/H200 (compute capability 9.0), a
  build with the e4m3 units (setup.py's FLASH_ATTN_EXT_DTYPES), head dims
  128 and 256 (one for q, k and v), dense and variable-length calls, causal
  masks, windows, GQA/MQA, a positive softmax_scale, and no softcap, ALiBi,
  dropout, sinks or paged keys. Descales must be finite and not negative
  (as quantization scales are; FLASH_ATTN_EXT_DEBUG_CHECKS=1 verifies it):
  the kernel's online softmax takes the row max of the raw scores, which a
  negative q_descale * k_descale would turn into the min. Head dim 64 is not
  native: its 64-byte e4m3 rows would need a 64-byte-swizzled layout the
  kernel does not have.
- dequantize: q, k and v are dequantized (value x descale) to bfloat16 on
  CUDA (fp32 on the CPU, then the output rounded to bfloat16) and the
  regular kernels run: every other call (CPU, other GPUs, head dims 32, 64,
  96, 192 and head dims that need padding, the score features above,
  paged keys, empty problems). Exact to the inputs' FP8 values up to one
  bfloat16 rounding of each dequantized element, and no faster than a
  bfloat16 call.

FLASH_ATTN_EXT_FP8_FWD (read on every call; developer and test switch):
`auto` (default) as above, `dequant` always dequantizes, `native_strict`
raises a RuntimeError naming why when the native kernel cannot take a call
(the tests use it to prove that the native kernel ran).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)
OUT_DTYPE = torch.bfloat16
MODE_ENV = "FLASH_ATTN_EXT_FP8_FWD"


def _compiled_head_dims() -> Tuple[int, ...]:
    """Head dims of the native FP8 forward in this build (setup.py records them)."""
    try:
        from ._build_config import FP8_FWD_HEAD_DIMS
    except ImportError:  # no build record, or one from before FP8_FWD_HEAD_DIMS existed
        return ()
    return tuple(FP8_FWD_HEAD_DIMS)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_mode() -> str:
    mode = os.environ.get(MODE_ENV, "") or "auto"
    if mode not in ("auto", "dequant", "native_strict"):
        raise RuntimeError(f"flash_attn_ext: {MODE_ENV} must be auto, dequant or native_strict, got {mode!r}")
    return mode


def native_fp8_reason(q, k, v, softmax_scale, softcap=0.0, alibi_slopes=None, sinks=None, dropout_p=0.0,
                      paged=False) -> Optional[str]:
    """Why the native FP8 kernel cannot take this call, or None when it can.

    The one place where an FP8 call's path is decided (the module docstring
    lists the rules); the fwd_fp8 op itself raises on anything else rather
    than fall back."""
    if fp8_mode() == "dequant":
        return f"{MODE_ENV}=dequant"
    if q.device.type != "cuda":
        return f"the tensors are on {q.device.type}, not CUDA"
    dims = _compiled_head_dims()
    if not dims:
        return "this build has no native FP8 forward (it needs sm_90a and e4m3 in FLASH_ATTN_EXT_DTYPES)"
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return "the GPU is not compute capability 9.0 (H100/H200)"
    if os.environ.get("FLASH_ATTN_EXT_DISABLE_SM90", "") not in ("", "0"):
        return "FLASH_ATTN_EXT_DISABLE_SM90 is set"
    d = q.shape[-1]
    if d not in dims or k.shape[-1] != d or v.shape[-1] != d:
        return (f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]}: the native FP8 forward has one head dim of "
                f"{', '.join(map(str, dims))}")
    features = [name for name, on in (("softcap", softcap > 0), ("alibi_slopes", alibi_slopes is not None),
                                      ("dropout", dropout_p > 0), ("sinks", sinks is not None),
                                      ("paged keys (block_table)", paged)) if on]
    if features:
        return f"{', '.join(features)}: the native FP8 forward takes the plain softmax only"
    if not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0):
        return f"softmax_scale {softmax_scale!r} is not positive and finite"
    if q.numel() == 0 or k.numel() == 0:
        return "an empty problem"
    return None


def use_native(fn: str, reason: Optional[str]) -> bool:
    """Applies native_strict: a reason becomes an error."""
    if reason is not None and fp8_mode() == "native_strict":
        raise RuntimeError(f"{fn}: {MODE_ENV}=native_strict, but the native FP8 forward cannot take this call: {reason}")
    return reason is None


def is_fp8_call(fn: str, q, k, v, q_descale, k_descale, v_descale, names=("q", "k", "v")) -> bool:
    """Whether q, k and v are FP8 (all three, or none: else a TypeError), and
    descales only with FP8 inputs (else a ValueError naming them). `names`:
    the three tensors as the caller's signature calls them (the kv-cache
    function's are q, k_cache and v_cache)."""
    fp8 = [isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in (q, k, v)]
    named = tuple(zip(names, (q, k, v)))
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.itemsize == 1 and t.dtype not in FP8_DTYPES:
            raise TypeError(f"{fn}: FP8 inputs must be float8_e4m3fn (FlashAttention-3's), got {name} {t.dtype}")
    if any(fp8) and not all(fp8):
        dtypes = ", ".join(f"{n} {t.dtype}" for n, t in named)
        raise TypeError(f"{fn}: {names[0]}, {names[1]} and {names[2]} must all be float8_e4m3fn or none of them, "
                        f"got {dtypes}")
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


def _checked_tables(fn: str, q, k, v, q_descale, k_descale, v_descale, dims: int, batch: int):
    """Every FP8 path's checks (no gradient, shapes) and its three fp32
    (batch, nheads_k) descale tables."""
    _check_no_grad(fn, q, k, v)
    _check_shapes(fn, q, k, v, dims)
    return [_descale_table(fn, n, d, batch, k.shape[-2], q.device)
            for n, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))]


def dequantize_dense(fn: str, q, k, v, q_descale, k_descale, v_descale) -> Tuple[torch.Tensor, ...]:
    """q, k, v of (batch, seqlen, heads, d) as the kernels' dtype."""
    tables = _checked_tables(fn, q, k, v, q_descale, k_descale, v_descale, 4, q.shape[0])
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
    batch, nheads_k = cu_seqlens_q.numel() - 1, k.shape[1]
    tables = _checked_tables(fn, q, k, v, q_descale, k_descale, v_descale, 3, batch)
    if batch == 0:  # no sequence: every row is outside one (its output is 0); any scale does
        tables = [torch.ones((1, nheads_k), dtype=torch.float32, device=q.device)] * 3
    q_rows = rows_batch(cu_seqlens_q, q.shape[0])
    k_rows = rows_batch(cu_seqlens_k, k.shape[0])
    return (_dequantize(q, tables[0], q_rows), _dequantize(k, tables[1], k_rows), _dequantize(v, tables[2], k_rows))


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where its data or strides are not 16-byte
    aligned (the native kernel's TMA and 16-byte loads need both). Storage
    offsets rather than data pointers (allocations are aligned), which fake
    tensors under torch.compile have too."""
    ok = x.stride(-1) == 1 and x.storage_offset() % 16 == 0 and all(
        st % 16 == 0 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
    return x if ok else x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation


def _check_descale_values(fn, tables):
    """FLASH_ATTN_EXT_DEBUG_CHECKS=1: descales finite and not negative (the
    native kernel folds q_descale * k_descale into an exp2 scale that must be
    positive; a zero product acts as a zero scale)."""
    from . import _ops
    if not _ops.debug_checks_enabled() or _ops.is_tracing():
        return
    for name, t in zip(("q_descale", "k_descale", "v_descale"), tables):
        if t.numel() and not bool(torch.isfinite(t).all() and (t >= 0).all()):
            raise RuntimeError(f"{fn}: {name} must be finite and not negative for the native FP8 forward, got values in "
                               f"[{t.min().item()}, {t.max().item()}]")


def native_dense(fn: str, q, k, v, q_descale, k_descale, v_descale, softmax_scale: float, causal: bool,
                 window_left: int, window_right: int):
    """(out bf16, softmax_lse) of dense FP8 inputs by the native kernel."""
    from . import _ops
    tables = _checked_tables(fn, q, k, v, q_descale, k_descale, v_descale, 4, q.shape[0])
    _check_descale_values(fn, tables)
    return _ops.fwd_fp8(_aligned(q), _aligned(k), _aligned(v), *tables, None, None, None, 0, 0, float(softmax_scale),
                        bool(causal), window_left, window_right)


def native_varlen(fn: str, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q: int, max_seqlen_k: int,
                  q_descale, k_descale, v_descale, softmax_scale: float, causal: bool, window_left: int,
                  window_right: int):
    """(out bf16, softmax_lse) of variable-length FP8 inputs by the native kernel."""
    from . import _ops
    tables = _checked_tables(fn, q, k, v, q_descale, k_descale, v_descale, 3, cu_seqlens_q.numel() - 1)
    _check_descale_values(fn, tables)
    return _ops.fwd_fp8(_aligned(q), _aligned(k), _aligned(v), *tables, cu_seqlens_q, cu_seqlens_k, seqused_k,
                        max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(causal), window_left, window_right)
