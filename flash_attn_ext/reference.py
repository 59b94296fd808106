"""Attention written out in PyTorch: the one reference the tests, the main job
(`python -m flash_attn_ext`) and the benchmarks compare our kernels with.

It materialises the (seqlen_q, seqlen_k) score matrix, so it is for small
problems only. It follows this package's conventions (flash-attn 2.x's):
tensors are (batch, seqlen, nheads, headdim); causal masks and windows are
aligned to the bottom-right corner (query i sees key j when
j <= i + seqlen_k - seqlen_q [+ window right] and, with a left window,
j >= i + seqlen_k - seqlen_q - window left); a row that sees no key gives
output 0 and lse +inf. GQA/MQA repeat k and v heads. The score features are
applied in the order the kernels apply them: scale, softcap, ALiBi, bias,
mask; then softmax (with attention sinks in the denominator), then dropout.

upcast=True computes in float64 (the reference). upcast=False computes the
matrix products in the inputs' dtype and the softmax in float32, the way a
PyTorch user's own attention does: its error against the reference is
"PyTorch's own error" of the project's accuracy rule (our error may be at
most twice it, plus a small slack).

The rule itself is here too (`two_x_rule`), with `sdpa_default`, PyTorch's
default SDPA backend on this package's layout and masks: the tests
(tests/conftest.py), the main job and the benchmarks judge by this one
implementation.

The rule, and why two PyTorch results: in a low-precision dtype our error
against the float64 reference may be at most twice PyTorch's own error in
that dtype, plus a small absolute slack. PyTorch's own error is that of the
attention a PyTorch user gets: the worse of its math attention computed in
the dtype (attention_ref(upcast=False)) and its default SDPA backend
(sdpa_default) on the same inputs. Every FlashAttention backward, PyTorch's
flash kernels and ours, takes D = rowsum(dO * O) from the output rounded to
the dtype; on rows that see only a handful of keys that rounding dominates
the gradient error, and against the math path alone tiny causal problems (7
keys) measured up to 3.3x in about 1 of 40 random draws (2x-2.2x on longer
ones).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["attention_ref", "visible_mask", "alibi_bias", "sdpa_default", "two_x_rule", "TwoXRule"]


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool = False, window: Sequence[int] = (-1, -1),
                 device="cpu") -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k): which keys each query sees (bottom-right aligned;
    a negative window side is unbounded; causal means a right side of 0)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    offset = seqlen_k - seqlen_q
    vis = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        vis &= j <= i + offset + right
    if left >= 0:
        vis &= j >= i + offset - left
    return vis


def alibi_bias(slopes: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
               dtype=torch.float64) -> torch.Tensor:
    """flash-attn's ALiBi bias, (batch, nheads, seqlen_q, seqlen_k):
    -slope * |i + seqlen_k - seqlen_q - j|. slopes: (nheads,) or (batch, nheads)."""
    slopes = slopes.to(dtype)
    slopes = slopes.expand(batch, nheads) if slopes.dim() == 1 else slopes
    i = torch.arange(seqlen_q, device=slopes.device, dtype=dtype)[:, None]
    j = torch.arange(seqlen_k, device=slopes.device, dtype=dtype)[None, :]
    distance = (i + (seqlen_k - seqlen_q) - j).abs()
    return -slopes[:, :, None, None] * distance


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
    return_probs: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """(out, lse) of attention on (batch, seqlen, nheads, headdim) tensors.

    bias: additive, broadcastable to (batch, nheads, seqlen_q, seqlen_k).
    softcap > 0: scores become softcap * tanh(scores / softcap) (after the scale).
    alibi_slopes: (nheads,) or (batch, nheads); see alibi_bias.
    sinks: (nheads,) logits that join each row's softmax denominator without a
    value (gpt-oss's s_aux); lse then includes them.
    dropout_mask: bool (batch, nheads, seqlen_q, seqlen_k), True = kept, or
    the S_dmask flash_attn_func(return_attn_probs=True) returns (dropped
    entries carry a negative sign); kept probabilities are divided by
    1 - dropout_p. lse is that of the undropped softmax.
    v may have its own head dim; out takes it. out is in the computing dtype
    (float64 with upcast), lse in float64 / float32. return_probs: also the
    softmax's probabilities (batch, nheads, seqlen_q, seqlen_k), before dropout.
    """
    dtype = torch.float64 if upcast else q.dtype
    softmax_dtype = torch.float64 if upcast else torch.float32
    qd, kd, vd = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    batch, nheads, seqlen_q, seqlen_k = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
    group = nheads // k.shape[2]
    kd = kd.repeat_interleave(group, dim=1)
    vd = vd.repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = (qd @ kd.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, batch, nheads, seqlen_q, seqlen_k, dtype=dtype)
    if bias is not None:
        scores = scores + bias.to(dtype)
    vis = visible_mask(seqlen_q, seqlen_k, causal, window, device=q.device)
    scores = scores.masked_fill(~vis, float("-inf")).to(softmax_dtype)
    if sinks is not None:
        # The sink is one more column of the softmax, whose probability is dropped.
        sink_col = sinks.to(softmax_dtype).view(1, nheads, 1, 1).expand(batch, nheads, seqlen_q, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty[..., None], 0.0)  # empty rows: NaN -> 0
    if sinks is not None:
        probs = probs[..., :seqlen_k]
    undropped = probs
    if dropout_mask is not None:
        if dropout_mask.dtype != torch.bool:  # S_dmask (return_attn_probs): dropped entries negative
            dropout_mask = ~torch.signbit(dropout_mask)
        probs = probs.masked_fill(~dropout_mask.to(probs.device), 0.0) / (1.0 - dropout_p)
    out = (probs.to(dtype) @ vd).transpose(1, 2)
    if return_probs:
        return out, lse.masked_fill(empty, float("inf")), undropped
    return out, lse.masked_fill(empty, float("inf"))


def sdpa_default(q, k, v, causal=False, window=(-1, -1), softmax_scale=None):
    """PyTorch's default SDPA backend on (batch, seqlen, nheads, headdim) inputs
    in their dtype, with this package's masks (bottom-right causal, windows)
    given as an explicit mask unless they are SDPA's own is_causal. Rows that
    see no key come out NaN (PyTorch's convention); two_x_rule then ignores
    this result."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal or tuple(window) != (-1, -1):
        if causal and tuple(window) == (-1, -1) and seqlen_q == seqlen_k:
            is_causal = True
        else:
            mask = visible_mask(seqlen_q, seqlen_k, causal, window, device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
        scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class TwoXRule(NamedTuple):
    """The verdict of two_x_rule: errors are max abs differences from the
    float64 reference; torch_err is NaN when no PyTorch result was usable."""
    ok: bool
    err: float
    torch_err: float
    bound: float
    reason: str


def two_x_rule(ours: torch.Tensor, ref64: torch.Tensor,
               pytorch_lowp: Union[torch.Tensor, Sequence[Optional[torch.Tensor]]], slack: float = 1e-5) -> TwoXRule:
    """The project's accuracy rule: ours (any dtype) against the float64
    reference ref64, given PyTorch's result(s) in the same dtype (one tensor,
    or several, e.g. (math path, default SDPA backend), of which the worse sets
    the bar; results with NaN are left out). ok when ours has no NaN and
    max|ours - ref64| <= 2 * PyTorch's max error + allowance, the allowance
    being the larger of slack * max(1, max|ref64|) and flash-attn's for
    rounding the reference to our dtype: 2 * max|(r + 0.3) - 0.3 - r| with r
    the reference in that dtype (the tests of flash-attn 2 and 3 add it to
    the same bar). In 16 bits that is up to one unit in the last place of the
    largest values: a result rounded to bf16 is otherwise judged by whether
    its largest element rounded the same way as PyTorch's (the Hopper
    backward's dbias, up to 12 in bf16, failed the bare 2x bound on some
    random draws with an error of one such unit). Non-finite reference
    values do not enter the allowance."""
    if torch.isnan(ours).any():
        return TwoXRule(False, math.nan, math.nan, math.nan, "NaN in our result")
    lowps = [t for t in (pytorch_lowp if isinstance(pytorch_lowp, (tuple, list)) else (pytorch_lowp,))
             if t is not None and not torch.isnan(t).any()]
    if not lowps:
        return TwoXRule(False, math.nan, math.nan, math.nan, "no PyTorch result to compare with")
    if not ours.numel():
        return TwoXRule(True, 0.0, 0.0, slack, "")
    dtype = ours.dtype if ours.dtype.is_floating_point else torch.float64
    ours, ref64 = ours.double(), ref64.double()
    err = (ours - ref64).abs().max().item()
    torch_err = max((t.double() - ref64).abs().max().item() for t in lowps)
    r = ref64[torch.isfinite(ref64)].to(dtype)
    rounding = 2 * ((r + 0.3) - 0.3 - r).abs().max().item() if r.numel() else 0.0
    bound = 2 * torch_err + max(slack * max(1.0, ref64.abs().max().item()), rounding)
    ok = err <= bound
    reason = "" if ok else f"error {err:.3e} > 2 x PyTorch's {torch_err:.3e} + allowance"
    return TwoXRule(ok, err, torch_err, bound, reason)
