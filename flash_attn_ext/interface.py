"""flash-attn 2.x compatible entry points.

Same names, signatures, layouts (batch, seqlen, nheads, headdim) and return
conventions as `flash_attn.flash_attn_interface`, backed by the
`flash_attn_ext::fwd` / `bwd` custom ops (CPU and CUDA). Arguments whose
feature is not implemented raise NotImplementedError naming the argument;
none is ignored.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from . import _ops
from ._autocast import autocast_inputs

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]


def _check_unsupported(dropout_p: float) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attn_ext: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"flash_attn_ext: dropout_p={dropout_p} is not supported yet (only 0.0)")


def _softcap_value(softcap) -> float:
    """softcap as the op takes it: a float >= 0 (0 = off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"flash_attn_ext: softcap must be a number >= 0 (0.0 = off), got {softcap!r}")
    if not softcap >= 0 or softcap == float("inf"):
        raise ValueError(f"flash_attn_ext: softcap must be a finite number >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap)


def _sinks_argument(s_aux, learnable_sink):
    """The attention sinks, under either of the names the ecosystem uses:
    `s_aux` (vLLM, transformers' gpt-oss) or `learnable_sink` (FlashAttention-4)."""
    if s_aux is not None and learnable_sink is not None:
        raise ValueError("flash_attn_ext: pass the attention sinks as s_aux or as learnable_sink, not both")
    return s_aux if s_aux is not None else learnable_sink


# A window side this wide reaches past any sequence the op accepts.
_INT_MAX = 2**31 - 1


def _window_sides(window_size) -> Tuple[int, int]:
    """window_size checked and normalised for the op: two Python ints, -1 for
    an unbounded side. Negative sides are unbounded whatever their value, and
    so are sides beyond the int range (wider than any sequence)."""
    if not isinstance(window_size, (tuple, list)):
        raise TypeError(
            f"flash_attn_ext: window_size must be a pair (left, right) of ints, got {type(window_size).__name__} "
            f"{window_size!r}"
        )
    if len(window_size) != 2:
        raise ValueError(f"flash_attn_ext: window_size must be a pair (left, right), got {window_size!r}")
    sides = []
    for side in window_size:
        value = None
        # bool is an int to Python, but a window of True keys is a mistake.
        if not (isinstance(side, bool) or (isinstance(side, torch.Tensor) and side.dtype == torch.bool)):
            try:
                value = operator.index(side)  # int, numpy integer, integer 0-d tensor
            except TypeError:
                pass
        if value is None:
            raise TypeError(
                f"flash_attn_ext: window_size must hold integers (left, right), got {window_size!r} with an element "
                f"of type {type(side).__name__}"
            )
        sides.append(-1 if value < 0 or value > _INT_MAX else int(value))
    return sides[0], sides[1]


def _check_sizes(q, k, v):
    """Zero head dim and zero heads, named here before the op sees them (the
    default softmax_scale, 1/sqrt(headdim), would divide by zero first)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return  # the op names the wrong rank
    if q.shape[3] == 0:
        raise RuntimeError("flash_attn_ext: head dim must be between 1 and 256, got 0 (q.shape[-1] == 0)")
    if q.shape[2] == 0 or k.shape[2] == 0 or v.shape[2] == 0:
        raise RuntimeError(
            f"flash_attn_ext: q, k and v need at least one head, got nheads {q.shape[2]} (q), {k.shape[2]} (k) and "
            f"{v.shape[2]} (v)"
        )


def _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap=0.0,
               alibi_slopes=None, sinks=None):
    window_left, window_right = _window_sides(window_size)
    softcap = _softcap_value(softcap)
    # Before autocast, which looks at q's device only.
    _ops.check_same_device("flash_attn_ext", {"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes, "sinks": sinks})
    _check_sizes(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    q, k, v = autocast_inputs(q, k, v)
    out, softmax_lse, _ = _ops.call_fwd(q, k, v, None, float(softmax_scale), bool(causal), window_left, window_right,
                                         deterministic, softcap, alibi_slopes, sinks)
    if return_attn_probs:
        # flash-attn returns (out, softmax_lse, S_dmask); S_dmask only carries
        # information with dropout, which is not supported, so it is None.
        return out, softmax_lse, None
    return out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
):
    """Exact attention softmax(q k^T * softmax_scale) v without materialising the scores.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads must be divisible by
            nheads_k (multi-query / grouped-query attention).
        dropout_p: must be 0.0 (dropout is not supported yet).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: mask keys after the query; with seqlen_q != seqlen_k the mask is
            aligned to the bottom-right corner (flash-attn >= 2.1).
        window_size: (left, right) sliding window around the aligned diagonal,
            a pair of ints; a negative side, or one wider than any sequence,
            means unbounded (-1 by convention).
        softcap: > 0 caps the scores: s -> softcap * tanh(s / softcap), after
            the scale (Gemma 2); 0.0 (default) is off.
        alibi_slopes: fp32 (nheads,) or (batch, nheads): adds
            -slope * |i + seqlen_k - seqlen_q - j| to the score of query i and
            key j (flash-attn's ALiBi); the slopes get no gradient.
        deterministic: bit-reproducible backward on CUDA (the CPU backward
            always is); also implied by torch.use_deterministic_algorithms(True).
        return_attn_probs: also return softmax_lse (batch, nheads, seqlen_q)
            fp32 and None in place of the dropout mask.
        s_aux / learnable_sink (keyword only, either name): attention sinks,
            fp32 (nheads,) logits that join every row's softmax denominator
            without a value (gpt-oss); softmax_lse includes them, and they
            receive a gradient.

    Rows that see no key (causal with seqlen_q > seqlen_k, or a window) give
    output 0, softmax_lse +inf and zero gradients.
    """
    _check_unsupported(dropout_p)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink))


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
):
    """flash_attn_func on qkv packed as (batch, seqlen, 3, nheads, headdim).

    q, k and v are read through strided views of qkv (no copy).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn_ext: qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    _check_unsupported(dropout_p)
    q, k, v = qkv.unbind(2)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink))


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
):
    """flash_attn_func with k and v packed as kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn_ext: kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    _check_unsupported(dropout_p)
    k, v = kv.unbind(2)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink))
