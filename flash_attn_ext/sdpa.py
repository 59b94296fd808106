"""`scaled_dot_product_attention` with the semantics of
`torch.nn.functional.scaled_dot_product_attention`, computed by our op.

PyTorch's layout is (..., heads, seqlen, headdim); the op's is
(batch, seqlen, heads, headdim) with a contiguous last dimension. A contiguous
(B, H, S, D) tensor transposed to (B, S, H, D) is such a view, so inputs go to
the op through strides, without copies; the output comes back the same way.

Two conventions differ between PyTorch and the op, and are mapped here:
  * causal masks: PyTorch's `is_causal` is aligned top-left (query i sees keys
    j <= i), the op's is aligned bottom-right (query i sees keys
    j <= i + Sk - Sq, as in flash-attn 2.x); see `attention_bshd`.
  * boolean masks: True means "takes part" in PyTorch; the op takes an additive
    float bias, so masks become 0 / -inf biases, broadcast with stride 0.
Rows that see no key at all give 0 output and 0 gradients here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ops
from ._autocast import autocast_inputs
from .interface import dropout_value

__all__ = ["scaled_dot_product_attention", "attention_bshd", "mask_to_bias"]

_NAME = "flash_attn_ext.scaled_dot_product_attention"


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as an additive bias of `dtype`, keeping its shape.

    Boolean masks follow PyTorch's SDPA convention (True = attend): they become
    0 where True and -inf where False. Float masks are cast (cast_bias;
    differentiably, so a mask that requires grad receives its gradient).
    """
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full_like(zero, float("-inf")))
    return cast_bias(mask, dtype)


def cast_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float bias cast to `dtype`, its finite values first clamped to
    dtype's finite range: a float32 -1e5 (a common "masked" value) would
    become -inf in fp16, turning a row whose keys all carry it from PyTorch's
    uniform average into a row without keys (output 0). +-inf and NaN pass
    unchanged."""
    if bias.dtype != dtype and bias.dtype.is_floating_point and dtype.is_floating_point:
        info = torch.finfo(dtype)
        if info.max < torch.finfo(bias.dtype).max:
            bias = torch.where(torch.isfinite(bias), bias.clamp(info.min, info.max), bias)
    return bias.to(dtype)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The op reads rows through arbitrary batch/seq/head strides but needs
    # unit stride along the head dimension: copy only when that is missing.
    if x.size(-1) > 1 and x.stride(-1) != 1:
        return x.contiguous()
    return x


def _fwd(q, k, v, bias, scale, causal, window_left, window_right, dropout_p=0.0, rng_state=None):
    deterministic = torch.are_deterministic_algorithms_enabled()
    if dropout_p > 0:
        out, _, _ = _ops.call_fwd(q, k, v, bias, scale, causal, window_left, window_right, deterministic, 0.0, None,
                                  None, dropout_p, rng_state)
    else:
        out, _, _ = _ops.call_fwd(q, k, v, bias, scale, causal, window_left, window_right, deterministic)
    return out


def attention_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    causal_top_left: bool = False,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention in the op's layout: q (B, Sq, H, D), k/v (B, Sk, Hk, D[v]).

    `bias` is additive, in q's dtype, already expanded to (B, H, Sq, Sk) (stride 0
    along broadcast dimensions is fine) or None. `causal_top_left` applies
    PyTorch's causal mask (query i sees keys j <= i) on top of the bias.
    `dropout_p` > 0 drops attention probabilities in the kernels with the
    keep-mask of `rng_state` (int64 [seed, offset] on q's device; drawn from
    torch's generator when None). Returns (B, Sq, H, Dv). Differentiable in
    q, k, v and bias.
    """
    if dropout_p > 0 and rng_state is None:
        rng_state = _ops.draw_rng_state(q.device)
    # Zero-size problems go through the op too (it returns empty or zero
    # outputs and zero gradients), so that the result joins the autograd graph.
    # A value head dim Ev != E goes to the op as it is (it pads the narrower
    # side itself, csrc/checks.h fwd_on_one_head_dim).
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if not causal_top_left:
        return _fwd(q, k, v, bias, scale, False, -1, -1, dropout_p, rng_state)

    if seqlen_q <= seqlen_k:
        # Top-left causal never shows keys past index Sq - 1, and restricted to
        # the first Sq keys it is the square causal mask, where top-left and
        # bottom-right alignment coincide. Slicing is a view; autograd gives the
        # dropped keys zero gradient.
        if seqlen_q < seqlen_k:
            k, v = k[:, :seqlen_q], v[:, :seqlen_q]
            bias = None if bias is None else bias[..., :seqlen_q]
        return _fwd(q, k, v, bias, scale, True, -1, -1, dropout_p, rng_state)

    # Sq > Sk: query i sees j <= i = i + (Sk - Sq) + (Sq - Sk), i.e. a
    # bottom-right window reaching Sq - Sk keys to the right, unbounded left.
    return _fwd(q, k, v, bias, scale, False, -1, seqlen_q - seqlen_k, dropout_p, rng_state)


def _check_mask_dtype(mask: torch.Tensor, query: torch.Tensor) -> None:
    if mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(
            f"{_NAME}: expected attn_mask dtype to be bool or float or to match query dtype, but got "
            f"attn_mask.dtype: {mask.dtype} and query.dtype: {query.dtype} instead."
        )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`.

    query (..., Hq, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev); at least
    2-D, leading dims equal or broadcastable. Hk == Hq unless `enable_gqa`,
    then Hq % Hk == 0 (query head h uses key/value head h // (Hq // Hk)).
    `attn_mask` is boolean (True = attend) or additive float (float32 or the
    dtype of query), broadcastable to (..., Hq, L, S); a float mask that
    requires grad gets its gradient (a float32 mask with fp16/bf16 inputs is
    added in float32, as PyTorch's math path does: off CUDA the call then runs
    in float32). `is_causal` is PyTorch's top-left causal
    mask (query i attends to keys j <= i) and excludes `attn_mask`. `scale`
    defaults to 1/sqrt(E). `dropout_p` in [0, 1) drops attention
    probabilities in the kernels (flash-attn's semantics; the mask comes from
    torch's generator of query's device, so torch.manual_seed reproduces it).
    Inside autocast, fp32 inputs are cast to the autocast dtype, as PyTorch
    does for its SDPA (the CUDA kernels take fp16/bf16 only).

    A query row that may attend to no key returns 0 (and zero gradients).
    Memory is linear in L and S except for a materialised `attn_mask`.

    Differences from PyTorch: a head dim E of 0 and zero heads raise an error
    (the op's head dim is 1 to 256, and it needs at least one head), and so
    does a value head dim Ev above 256.
    On CUDA a float32 mask with fp16/bf16 inputs is cast to their dtype, its
    finite values clamped to that dtype's range (cast_bias).
    """
    dropout_p = dropout_value(dropout_p)
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(
            f"{_NAME}: expected query, key, and value to all be at least 2 dimensional, but got "
            f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead."
        )
    # Before autocast, which looks at query's device only.
    _ops.check_same_device(_NAME, {"query": query, "key": key, "value": value, "attn_mask": attn_mask})
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            f"{_NAME}: expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    if attn_mask is not None and is_causal:
        raise RuntimeError(
            f"{_NAME}: explicit attn_mask should not be set when is_causal=True "
            "(torch: _scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True)"
        )
    if query.size(-1) != key.size(-1):
        raise RuntimeError(
            f"{_NAME}: query and key must have the same head dim (last dimension), got {query.size(-1)} "
            f"and {key.size(-1)}"
        )
    if key.size(-2) != value.size(-2):
        raise RuntimeError(
            f"{_NAME}: key and value must have the same sequence length (dim -2), got {key.size(-2)} "
            f"and {value.size(-2)}"
        )
    if attn_mask is not None:
        _check_mask_dtype(attn_mask, query)
    input_dtype = query.dtype

    seqlen_q, head_dim = query.shape[-2:]
    seqlen_k, head_dim_v = value.shape[-2:]
    if head_dim == 0:
        raise RuntimeError(
            f"{_NAME}: the head dim (last dimension of query and key) must be between 1 and 256, got 0"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    # Heads: dim -3 when it exists (PyTorch's GQA rule), otherwise 1.
    hq = query.size(-3) if query.dim() >= 3 else 1
    hk = key.size(-3) if key.dim() >= 3 else 1
    hv = value.size(-3) if value.dim() >= 3 else 1
    if hq == 0 or hk == 0 or hv == 0:
        raise RuntimeError(
            f"{_NAME}: query, key and value need at least one head (dim -3), got {hq}, {hk} and {hv}"
        )
    if enable_gqa:
        if hq % hk != 0 or hq % hv != 0:
            raise RuntimeError(
                f"{_NAME}: number of heads in key and value must divide the number of heads in query "
                f"(enable_gqa=True), got query heads {hq}, key heads {hk}, value heads {hv}"
            )
    elif not (hq == hk == hv):
        raise RuntimeError(
            f"{_NAME}: query, key and value must have the same number of heads (dim -3) unless "
            f"enable_gqa=True, got {hq}, {hk} and {hv}"
        )

    # Leading (batch) dims broadcast as in PyTorch; flatten them into one.
    try:
        lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except RuntimeError as e:
        raise RuntimeError(f"{_NAME}: batch dimensions of query, key and value do not broadcast: {e}") from None

    def to_bhsd(x: torch.Tensor, heads: int) -> torch.Tensor:
        x = x.reshape((1,) * (3 - x.dim()) + tuple(x.shape)) if x.dim() < 3 else x
        x = x.expand(*lead, heads, *x.shape[-2:])  # stride 0 over broadcast batch dims
        if len(lead) == 1:
            return x
        if len(lead) == 0:
            return x.unsqueeze(0)
        return x.reshape(-1, *x.shape[-3:])  # > 4-D: may copy

    # A float32 mask with fp16/bf16 inputs: PyTorch's CPU math path computes in
    # float32 and adds the mask there; casting the mask to fp16/bf16 instead
    # would overflow it (-1e5 -> -inf in fp16: a row of large finite biases
    # becomes a row without keys) or round it (bf16 keeps 8 bits). Where the
    # op has float32 kernels (all but CUDA) the call runs in float32 too.
    compute_dtype = query.dtype
    if (attn_mask is not None and attn_mask.dtype == torch.float32
            and query.dtype in (torch.float16, torch.bfloat16) and query.device.type != "cuda"):
        compute_dtype = attn_mask.dtype
        query, key, value = query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype)

    q4, k4, v4 = to_bhsd(query, hq), to_bhsd(key, hk), to_bhsd(value, hv)
    if hk != hv:
        # The op shares one head count between k and v: repeat both up to Hq.
        k4 = k4.repeat_interleave(hq // hk, dim=1)
        v4 = v4.repeat_interleave(hq // hv, dim=1)
    batch = q4.size(0)

    bias = None
    if attn_mask is not None:
        full = (*lead, hq, seqlen_q, seqlen_k)
        try:
            bias = mask_to_bias(attn_mask, compute_dtype).expand(full)
        except RuntimeError:
            raise RuntimeError(
                f"{_NAME}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                f"{full} (..., heads, L, S)"
            ) from None
        if len(lead) != 1:
            bias = bias.reshape(batch, hq, seqlen_q, seqlen_k)  # view for <= 4-D inputs

    out = attention_bshd(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2), bias, float(scale), causal_top_left=is_causal,
        dropout_p=dropout_p,
    )
    out = out.transpose(1, 2)  # (B, H, L, Ev), a view of the op's (B, L, H, Ev) output
    if out.dtype != input_dtype:
        out = out.to(input_dtype)  # computed in float32 for a float32 mask (above)
    if max(query.dim(), key.dim(), value.dim()) == 2:
        return out[0, 0]
    if len(lead) != 1:
        out = out.reshape(*lead, hq, seqlen_q, head_dim_v)
    return out
