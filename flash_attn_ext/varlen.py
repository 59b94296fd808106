"""flash-attn 2.x's variable-length entry points: flash_attn_varlen_func and
its packed variants.

A batch of sequences of different lengths is given without padding: q is
(total_q, nheads, headdim), the rows of all sequences one after the other,
and `cu_seqlens_q` (int32, batch + 1) holds where each sequence starts
(sequence b is rows cu_seqlens_q[b] to cu_seqlens_q[b + 1]); k and v
likewise with `cu_seqlens_k`. Causal masks and windows are aligned
bottom-right per sequence, as in flash-attn. The functions are backed by the
`flash_attn_ext::varlen_fwd` / `varlen_bwd` custom ops (CPU and CUDA), which
run the same kernels as the dense path (csrc/seq_info.h describes the
sequences to them).

The cumulative lengths live on the device, and checking them there would
cost a synchronisation: they are checked on CPU tensors always, and on
other devices when FLASH_ATTN_EXT_DEBUG_CHECKS=1 is set. With or without the
check, the kernels clamp every sequence to the tensors, so a wrong value
gives a wrong answer for that sequence, never a read or write outside q, k, v
or the outputs.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from . import _ops, fp8
from ._autocast import autocast_inputs
from .interface import _sinks_argument, _softcap_value, _window_sides, dropout_value

__all__ = ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]

def check_cu_seqlens_values(cu_seqlens: torch.Tensor, name: str, total: int, max_seqlen: Optional[int]) -> None:
    """The value checks the C++ side does for CPU tensors, for tensors on any
    device (this synchronises): non-decreasing, from >= 0, ending within
    `total` rows, no length above `max_seqlen` (None: unbounded)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu.numel() == 0:
        return
    lengths = cu[1:] - cu[:-1]
    if cu[0] < 0:
        raise RuntimeError(f"flash_attn_ext: {name}[0] must be >= 0, got {int(cu[0])}")
    if lengths.numel() and lengths.min() < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise RuntimeError(f"flash_attn_ext: {name} must be non-decreasing, but {name}[{i + 1}] = {int(cu[i + 1])} "
                           f"< {name}[{i}] = {int(cu[i])}")
    if max_seqlen is not None and lengths.numel() and lengths.max() > max_seqlen:
        i = int(torch.argmax(lengths))
        raise RuntimeError(f"flash_attn_ext: sequence {i} has length {int(lengths[i])} (from {name}), more than the "
                           f"maximum given, {max_seqlen}")
    if cu[-1] > total:
        raise RuntimeError(f"flash_attn_ext: {name}[-1] = {int(cu[-1])} exceeds the number of rows of the tensor it "
                           f"indexes ({total})")


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"flash_attn_ext: {name} must be an int, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = int(value)
    if isinstance(value, torch.SymInt):  # traced by torch.compile
        return value
    if not isinstance(value, bool) and not isinstance(value, int):
        try:
            value = operator.index(value)  # numpy integers, as flash-attn's op takes them
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"flash_attn_ext: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"flash_attn_ext: {name} must be >= 0, got {value}")
    return value


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, name: str) -> torch.Tensor:
    """The keys (or values) of paged sequences, contiguous: cache is
    (num_blocks, page_size, nheads_k, headdim), block_table (batch,
    max_blocks) int32; sequence b's j-th key is at page block_table[b,
    j // page_size], slot j % page_size. Returns (batch * max_blocks *
    page_size, nheads_k, headdim). Block ids are clamped into the cache, so a
    wrong id reads a wrong page, never outside the cache."""
    if cache.dim() != 4:
        raise ValueError(f"flash_attn_ext: with block_table, {name} must be the paged cache (num_blocks, page_size, "
                         f"nheads_k, headdim), got shape {tuple(cache.shape)}")
    if cache.shape[0] == 0:
        raise ValueError(f"flash_attn_ext: the paged {name} has no blocks")
    ids = block_table.long().clamp(0, cache.shape[0] - 1)
    return cache[ids].reshape(-1, cache.shape[2], cache.shape[3])


def unpage(k_cache, v_cache, block_table, cu_seqlens_k, seqused_k=None):
    """Paged keys and values as the varlen op takes them: (k, v, cu_seqlens_k,
    seqused_k) with the sequences' pages gathered into contiguous rows.
    k_cache, v_cache: (num_blocks, page_size, nheads_k, headdim);
    block_table: int32 (batch, max_blocks_per_seq); sequence b's keys are the
    first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots of its pages (and
    at most seqused_k[b] of them). Shapes depend on the tensors' shapes only,
    so this is safe under CUDA-graph capture. The block ids the sequences use
    (and that their lengths fit their rows) are checked on CPU tensors, and on
    others under FLASH_ATTN_EXT_DEBUG_CHECKS=1; otherwise a wrong id is
    clamped into the cache."""
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError(f"flash_attn_ext: block_table must be an int32 (batch, max_blocks_per_seq) tensor, got "
                         f"{block_table.dtype} of shape {tuple(block_table.shape)}")
    if block_table.shape[0] != cu_seqlens_k.shape[0] - 1:
        raise ValueError(f"flash_attn_ext: block_table has {block_table.shape[0]} rows, but cu_seqlens_k "
                         f"describes {cu_seqlens_k.shape[0] - 1} sequences")
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:2] != v_cache.shape[:2]:
        raise ValueError(f"flash_attn_ext: with block_table, k and v must be paged caches (num_blocks, "
                         f"page_size, nheads_k, headdim) of one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    if (block_table.device.type == "cpu" or _ops.debug_checks_enabled()) and not _ops.is_tracing():
        # The pages each sequence uses (entries past them may hold anything).
        page_size = k_cache.shape[1]
        used = lengths if seqused_k is None else torch.minimum(seqused_k, lengths)
        capacity = block_table.shape[1] * page_size
        if lengths.numel() and int(lengths.min()) < 0:
            b = int(torch.argmin(lengths))
            raise RuntimeError(f"flash_attn_ext: cu_seqlens_k must be non-decreasing, but cu_seqlens_k[{b + 1}] < "
                               f"cu_seqlens_k[{b}]")
        if lengths.numel() and int(lengths.max()) > capacity:
            b = int(torch.argmax(lengths))
            raise RuntimeError(f"flash_attn_ext: sequence {b} has {int(lengths[b])} keys (from cu_seqlens_k), more "
                               f"than its block_table row addresses ({block_table.shape[1]} pages of {page_size})")
        needed = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < used[:, None]
        bad = needed & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        if bool(bad.any()):
            b, j = (int(x) for x in torch.nonzero(bad)[0])
            raise RuntimeError(f"flash_attn_ext: block_table[{b}, {j}] = {int(block_table[b, j])} is outside [0, "
                               f"{k_cache.shape[0]}), the blocks of the cache")
    seqused_k = lengths if seqused_k is None else torch.minimum(seqused_k, lengths)
    per_seq = block_table.shape[1] * k_cache.shape[1]
    cu = torch.arange(0, block_table.shape[0] + 1, dtype=torch.int32, device=cu_seqlens_k.device) * per_seq
    return (_gather_pages(k_cache, block_table, "k"), _gather_pages(v_cache, block_table, "v"), cu, seqused_k)


def unpad_left(k, v, cu_seqlens_k, leftpad_k, seqused_k=None):
    """Left-padded keys and values (flash-attn 2.8's leftpad_k) as the varlen
    op takes them: sequence b's keys start leftpad_k[b] rows into its rows
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] (and number seqused_k[b] -
    leftpad_k[b] where seqused_k is given, as flash-attn counts them).
    Returns (k, v, cu_seqlens_k, seqused_k) with each sequence's keys moved
    to the start of its rows: one gather of k and v, whose shapes depend on
    the tensors' shapes only (no synchronisation; safe under CUDA-graph
    capture). Offsets are clamped into the tensors, so a wrong leftpad_k
    reads wrong rows, never outside k or v; its values are checked on CPU
    tensors, and on others under FLASH_ATTN_EXT_DEBUG_CHECKS=1."""
    batch = cu_seqlens_k.shape[0] - 1
    if not isinstance(leftpad_k, torch.Tensor) or leftpad_k.dtype != torch.int32 or leftpad_k.shape != (batch,):
        got = f"{leftpad_k.dtype} of shape {tuple(leftpad_k.shape)}" if isinstance(leftpad_k, torch.Tensor) \
            else type(leftpad_k).__name__
        raise ValueError(f"flash_attn_ext: leftpad_k must be an int32 ({batch},) tensor, one offset per sequence, "
                         f"got {got}")
    if leftpad_k.device != k.device:
        raise ValueError(f"flash_attn_ext: leftpad_k is on {leftpad_k.device}, k on {k.device}")
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    used = lengths if seqused_k is None else seqused_k
    if (k.device.type == "cpu" or _ops.debug_checks_enabled()) and not _ops.is_tracing() and batch:
        bad = (leftpad_k < 0) | (leftpad_k > used)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise RuntimeError(f"flash_attn_ext: leftpad_k[{i}] = {int(leftpad_k[i])} is outside [0, "
                               f"{int(used[i])}], the keys of sequence {i}")
    total = k.shape[0]
    if total == 0 or batch == 0:
        return k, v, cu_seqlens_k, (used - leftpad_k).clamp_min(0).to(torch.int32)
    rows = torch.arange(total, device=k.device)
    # The sequence of each row (rows past the last one count as the last).
    seq = torch.searchsorted(cu_seqlens_k[1:].long(), rows, right=True).clamp_max(batch - 1)
    src = (rows + leftpad_k.long()[seq]).clamp(0, total - 1)
    used = (used - leftpad_k).clamp_min(0).to(torch.int32)
    return k.index_select(0, src), v.index_select(0, src), cu_seqlens_k, used


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                      window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None,
                      seqused_k=None, sinks=None, dropout_p=0.0, q_descale=None, k_descale=None, v_descale=None):
    dropout_p = dropout_value(dropout_p)
    window_left, window_right = _window_sides(window_size)
    softcap = _softcap_value(softcap)
    max_seqlen_q = _as_int(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _as_int(max_seqlen_k, "max_seqlen_k")
    _ops.check_same_device("flash_attn_ext.flash_attn_varlen_func", {
        "q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "seqused_k": seqused_k,
        "block_table": block_table, "alibi_slopes": alibi_slopes, "sinks": sinks})
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn_ext: {name} must be a tensor, got {type(t).__name__}")
    # A head dim with a stride other than 1 is copied (flash-attn's
    # maybe_contiguous); the op reads any other strides in place.
    q, k, v = (x.contiguous() if x.dim() >= 1 and x.size(-1) > 1 and x.stride(-1) != 1 else x for x in (q, k, v))
    fn = "flash_attn_ext.flash_attn_varlen_func"
    fp8_call = fp8.is_fp8_call(fn, q, k, v, q_descale, k_descale, v_descale)
    native = False
    if fp8_call and q.dim() == 3 and k.dim() == v.dim() == (3 if block_table is None else 4):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        native = fp8.use_native(fn, fp8.native_fp8_reason(q, k, v, scale, softcap, alibi_slopes, sinks, dropout_p,
                                                          paged=block_table is not None))
    if block_table is not None:
        k, v, cu_seqlens_k, seqused_k = unpage(k, v, block_table, cu_seqlens_k, seqused_k)
    if fp8_call and not native:  # after unpage: each sequence's keys are then its own rows
        q, k, v = fp8.dequantize_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale)
    if q.dim() == 3 and q.shape[-1] == 0:
        raise RuntimeError("flash_attn_ext: head dim must be between 1 and 256, got 0 (q.shape[-1] == 0)")
    if _ops.debug_checks_enabled() and not _ops.is_tracing() and q.device.type != "cpu":
        check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
        check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0],
                                None if seqused_k is not None else max_seqlen_k)
        if seqused_k is not None and seqused_k.numel():
            used = seqused_k.detach().cpu()
            if used.min() < 0 or used.max() > max_seqlen_k:
                raise RuntimeError(f"flash_attn_ext: seqused_k must be in [0, max_seqlen_k = {max_seqlen_k}], got "
                                   f"values in [{int(used.min())}, {int(used.max())}]")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if native:
        out, softmax_lse = fp8.native_varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                             max_seqlen_k, q_descale, k_descale, v_descale, softmax_scale,
                                             bool(causal), window_left, window_right)
        return (out, softmax_lse, None) if return_attn_probs else out
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    q, k, v = autocast_inputs(q, k, v)
    # One rng_state for the batch: the kernels' dropout counter holds the
    # sequence index.
    rng_state = _ops.draw_rng_state(q.device) if dropout_p > 0 else None
    out, softmax_lse, _ = _ops.call_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                          float(softmax_scale), bool(causal), window_left, window_right,
                                          deterministic, softcap, alibi_slopes, sinks, dropout_p, rng_state)
    if fp8_call:
        out = out.to(fp8.OUT_DTYPE)
    if return_attn_probs:
        # flash-attn returns (out, softmax_lse, S_dmask); S_dmask only carries
        # information with dropout (None without, as flash-attn's).
        s_dmask = None
        if dropout_p > 0:
            s_dmask = _varlen_dropout_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                            max_seqlen_k, float(softmax_scale), bool(causal),
                                            (window_left, window_right), softcap, alibi_slopes, sinks, dropout_p,
                                            rng_state)
        return out, softmax_lse, s_dmask
    return out


def _varlen_dropout_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                          causal, window, softcap, alibi_slopes, sinks, dropout_p, rng_state):
    """flash-attn's S_dmask of a varlen call: (batch, nheads, max_seqlen_q,
    max_seqlen_k) in q's dtype, sequence b's probabilities in the top-left
    corner of its slice (0 elsewhere), negative where the call dropped them:
    the kernels' keep-mask of sequence b is that of batch index b
    (csrc/dropout.h). Materialises every sequence's scores and reads the
    lengths on the host: for testing small cases, as flash-attn means it."""
    from .reference import attention_ref

    batch, nheads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    keep = _ops.dropout_mask(rng_state, batch, nheads, max_seqlen_q, max_seqlen_k, dropout_p)
    s_dmask = q.new_zeros((batch, nheads, max_seqlen_q, max_seqlen_k))
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    with torch.no_grad():
        for b in range(batch):
            lq = min(cu_q[b + 1] - cu_q[b], max_seqlen_q)
            lk = min(cu_k[b + 1] - cu_k[b], max_seqlen_k, used[b] if used is not None else max_seqlen_k)
            if lq <= 0 or lk <= 0:
                continue
            slopes = alibi_slopes[b:b + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
            _, _, probs = attention_ref(q[None, cu_q[b]:cu_q[b] + lq], k[None, cu_k[b]:cu_k[b] + lk],
                                        v[None, cu_k[b]:cu_k[b] + lk], causal=causal, window=window,
                                        softmax_scale=softmax_scale, softcap=softcap, alibi_slopes=slopes,
                                        sinks=sinks, return_probs=True)
            probs = probs[0].to(q.dtype)
            s_dmask[b, :, :lq, :lk] = torch.where(keep[b, :, :lq, :lk], probs, -probs)
    return s_dmask


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    seqused_k: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Exact attention over a batch of variable-length sequences, unpadded.

    Args:
        q: (total_q, nheads, headdim), the query rows of all sequences.
        k, v: (total_k, nheads_k, headdim); or, with block_table, paged caches
            (num_blocks, page_size, nheads_k, headdim) with any page size.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): sequence b is rows
            cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (and likewise of k, v).
        max_seqlen_q, max_seqlen_k: ints, the longest sequence's lengths.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic: as in flash_attn_func (dropout: one draw of torch's
            generator for the batch); causal masks and windows align
            bottom-right within each sequence; alibi_slopes may be (batch, nheads).
        return_attn_probs: also return softmax_lse (nheads, total_q) fp32 and
            flash-attn's S_dmask: None without dropout; with dropout the
            probabilities (batch, nheads, max_seqlen_q, max_seqlen_k), negative
            where dropped (materialised: for testing small cases).
        block_table: int32 (batch, max_blocks_per_seq): paged k/v, sequence b's
            keys being the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots of
            its pages. The pages are gathered into a contiguous copy first (the
            forward kernels read contiguous keys); the block ids in use are
            checked on CPU tensors, clamped into the cache elsewhere.
        seqused_k (keyword only): int32 (batch,): sequence b uses only its
            first seqused_k[b] keys (vLLM's convention).
        s_aux / learnable_sink (keyword only): attention sinks, as in
            flash_attn_func.
        q_descale, k_descale, v_descale (keyword only): float8_e4m3fn inputs'
            factors, fp32 (batch, nheads_k) or one value, as in
            flash_attn_func (paged FP8 caches too: per sequence).

    Returns out (total_q, nheads, headdim). Rows of q outside every sequence
    get out 0 and lse +inf; a sequence without keys gives output 0 (lse
    +inf, or its sink).
    """
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table,
                             seqused_k, _sinks_argument(s_aux, learnable_sink), dropout_p, q_descale, k_descale,
                             v_descale)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
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
    """flash_attn_varlen_func on qkv packed as (total, 3, nheads, headdim), one
    cu_seqlens for queries and keys."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"flash_attn_ext: qkv must be (total, 3, nheads, headdim), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    q, k, v = qkv.unbind(1)
    return _varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                             sinks=_sinks_argument(s_aux, learnable_sink), dropout_p=dropout_p)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    """flash_attn_varlen_func with k and v packed as kv (total_k, 2, nheads_k, headdim)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"flash_attn_ext: kv must be (total_k, 2, nheads_k, headdim), got "
                         f"{tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__}")
    k, v = kv.unbind(1)
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                             sinks=_sinks_argument(s_aux, learnable_sink), dropout_p=dropout_p)
