"""flash-attn 2.x compatible entry points.

Same names, signatures, layouts (batch, seqlen, nheads, headdim) and return
conventions as `flash_attn.flash_attn_interface`, backed by the
`flash_attn_ext::fwd` / `bwd` custom ops (CPU and CUDA). Arguments whose
feature is not implemented raise NotImplementedError naming the argument;
none is ignored.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Tuple

import torch

from . import _ops, fp8
from ._autocast import autocast_inputs

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"]


def dropout_value(dropout_p, name: str = "dropout_p") -> float:
    """dropout_p as the op takes it: a float in [0, 1); ValueError naming it otherwise.
    Any real number is taken (numpy scalars and 0-d tensors too, as PyTorch's
    SDPA takes them), but not a bool."""
    value = None
    if isinstance(dropout_p, torch.Tensor):
        if dropout_p.dim() == 0 and dropout_p.dtype != torch.bool and not dropout_p.is_complex():
            value = float(dropout_p)
    elif isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool):
        value = float(dropout_p)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"flash_attn_ext: {name} must be a number in [0, 1), got {dropout_p!r}")
    return value


def dropout_probs(q, k, v, softmax_scale, causal, window, softcap, alibi_slopes, sinks, dropout_p, rng_state):
    """flash-attn's S_dmask for return_attn_probs with dropout: the softmax's
    probabilities (batch, nheads, seqlen_q, seqlen_k) in q's dtype, negative
    where the call dropped them (the kernels' keep-mask, regenerated from
    rng_state). Materialises the score matrix: for testing small cases."""
    from .reference import attention_ref

    with torch.no_grad():
        _, _, probs = attention_ref(q, k, v, causal=causal, window=window, softmax_scale=softmax_scale,
                                    softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, return_probs=True)
        mask = _ops.dropout_mask(rng_state, q.shape[0], q.shape[2], q.shape[1], k.shape[1], dropout_p)
        return torch.where(mask, probs, -probs).to(q.dtype)


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
               alibi_slopes=None, sinks=None, dropout_p=0.0, q_descale=None, k_descale=None, v_descale=None):
    window_left, window_right = _window_sides(window_size)
    softcap = _softcap_value(softcap)
    # Before autocast, which looks at q's device only.
    _ops.check_same_device("flash_attn_ext", {"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes, "sinks": sinks})
    fn = "flash_attn_ext.flash_attn_func"
    fp8_call = fp8.is_fp8_call(fn, q, k, v, q_descale, k_descale, v_descale)
    if fp8_call and q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        reason = fp8.native_fp8_reason(q, k, v, scale, softcap, alibi_slopes, sinks, dropout_p)
        if fp8.use_native(fn, reason):
            out, softmax_lse = fp8.native_dense(fn, q, k, v, q_descale, k_descale, v_descale, scale, bool(causal),
                                                window_left, window_right)
            return (out, softmax_lse, None) if return_attn_probs else out
    if fp8_call:
        q, k, v = fp8.dequantize_dense(fn, q, k, v, q_descale, k_descale, v_descale)
    # flash-attn copies inputs whose last dimension is strided (its
    # maybe_contiguous); the op reads any other strides in place.
    q, k, v = (x.contiguous() if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.size(-1) > 1 and x.stride(-1) != 1
               else x for x in (q, k, v))
    _check_sizes(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    q, k, v = autocast_inputs(q, k, v)
    rng_state = _ops.draw_rng_state(q.device) if dropout_p > 0 else None
    out, softmax_lse, _ = _ops.call_fwd(q, k, v, None, float(softmax_scale), bool(causal), window_left, window_right,
                                         deterministic, softcap, alibi_slopes, sinks, dropout_p, rng_state)
    if fp8_call:
        out = out.to(fp8.OUT_DTYPE)
    if return_attn_probs:
        # flash-attn returns (out, softmax_lse, S_dmask); S_dmask only carries
        # information with dropout (None without, as flash-attn's).
        s_dmask = None
        if dropout_p > 0:
            s_dmask = dropout_probs(q, k, v, float(softmax_scale), bool(causal), (window_left, window_right), softcap,
                                    alibi_slopes, sinks, dropout_p, rng_state)
        return out, softmax_lse, s_dmask
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
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Exact attention softmax(q k^T * softmax_scale) v without materialising the scores.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads must be divisible by
            nheads_k (multi-query / grouped-query attention).
        dropout_p: dropout probability in [0, 1) on the attention
            probabilities (flash-attn's semantics: kept ones scaled by
            1 / (1 - dropout_p), softmax_lse of the undropped softmax). The
            mask is drawn in the kernels from a seed taken from torch's
            generator of q's device (torch.manual_seed reproduces it).
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
            fp32 and, with dropout, flash-attn's S_dmask: the probabilities
            (batch, nheads, seqlen_q, seqlen_k) negated where dropped (None
            without dropout). S_dmask materialises the scores: small cases.
        s_aux / learnable_sink (keyword only, either name): attention sinks,
            fp32 (nheads,) logits that join every row's softmax denominator
            without a value (gpt-oss); softmax_lse includes them, and they
            receive a gradient.
        q_descale, k_descale, v_descale (keyword only): with float8_e4m3fn
            q, k and v, fp32 (batch, nheads_k) or single-value factors that
            turn the FP8 values into real ones (FlashAttention-3's names and
            shapes); the output is then bfloat16, and there is no backward.
            See flash_attn_ext/fp8.py (computed through bfloat16 for now).

    Rows that see no key (causal with seqlen_q > seqlen_k, or a window) give
    output 0, softmax_lse +inf and zero gradients.
    """
    dropout_p = dropout_value(dropout_p)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink), dropout_p, q_descale, k_descale,
                      v_descale)


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
    dropout_p = dropout_value(dropout_p)
    q, k, v = qkv.unbind(2)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink), dropout_p)


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
    dropout_p = dropout_value(dropout_p)
    k, v = kv.unbind(2)
    return _attention(q, k, v, softmax_scale, causal, window_size, deterministic, return_attn_probs, softcap,
                      alibi_slopes, _sinks_argument(s_aux, learnable_sink), dropout_p)
