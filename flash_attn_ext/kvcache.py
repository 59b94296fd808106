"""flash-attn 2.8's `flash_attn_with_kvcache`: attention of a few new tokens
over a KV cache, with the new keys and values appended to the cache in place.

The append (and rotary embedding of the new keys and of q) is done here with
tensor operations that never synchronise with the device (index_put_,
gathers, clamps), so a decode step can be captured in a CUDA graph and
traced by torch.compile(fullgraph=True); the attention is the
`flash_attn_ext::fwd_kvcache` op (csrc/kvcache.h: CPU, and a split-KV
decode kernel on CUDA).

Index values that only the device knows (cache_seqlens, cache_batch_idx,
cache_leftpad, block ids) are never used to read or write outside the
tensors: the append starts at min(cache_seqlens, capacity - seqlen_new)
clamped at 0, batch indices and block ids are clamped into their tensors,
and the kernels clamp the same way. An out-of-range value thus gives a wrong
result, not a memory error. They are checked, with an error naming the
value, on CPU tensors always and on CUDA tensors when the environment
variable FLASH_ATTN_EXT_DEBUG_CHECKS=1 is set (which costs a device
synchronisation per call, and is skipped while torch.compile traces).

FP8 (float8_e4m3fn) q and caches, with FlashAttention-3's descales
(flash_attn_ext/fp8.py), take another route after the same checks and the
same append (done on the caches' bytes): `_fp8_attention` hands the
sequences to flash_attn_varlen_func as variable-length rows over the cache
(cu_seqlens and seqused_k built with tensor operations, max_seqlen_k the
capacity), which runs the native Hopper FP8 kernel or dequantizes what it
is given: never more than the batch's own rows of the cache. That route
has no split-KV kernel (num_splits 0 or 1) and no rotary embedding.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple, Union

import torch

from . import _ops, fp8, varlen
from .interface import _sinks_argument, _softcap_value, _window_sides

__all__ = ["flash_attn_with_kvcache"]


def _check_index(t, name, batch, device):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_attn_ext: {name} must be an int32 tensor of shape (batch,), got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise RuntimeError(f"flash_attn_ext: {name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise RuntimeError(f"flash_attn_ext: {name} must be (batch,) = ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise RuntimeError(f"flash_attn_ext: {name} must be on the device of q ({device}), got {t.device}")
    return t.contiguous()  # the op reads it as a contiguous vector (a view of another tensor may not be)


def _rotate(x, cos, sin, interleaved):
    """Rotary embedding of x (..., headdim) by cos/sin (..., rotary_dim / 2)
    broadcast over x's head dimension, on its first rotary_dim channels, in
    fp32, rounded back to x's dtype (flash-attn's rule: pairs (0, 1), (2, 3),
    ... when interleaved, else (i, i + rotary_dim / 2), GPT-NeoX style)."""
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].float()
    cos, sin = cos.float(), sin.float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        y = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((y.to(x.dtype), x[..., rot:]), dim=-1)


def _check_values(cache_seqlens, seqlen_new, capacity, cache_batch_idx, cache_leftpad, block_table, page_size,
                  num_blocks, cache_rows):
    """The index values, with errors naming them (a device synchronisation on CUDA)."""
    seqlens = cache_seqlens.tolist()
    room = capacity - seqlen_new
    for b, n in enumerate(seqlens):
        if not 0 <= n <= room:
            what = f"room for the {seqlen_new} new keys" if seqlen_new else "keys"
            raise ValueError(f"flash_attn_ext: cache_seqlens[{b}] = {n} is outside [0, {room}]: the cache holds "
                             f"{capacity} keys per sequence, and needs {what}")
    ends = [n + seqlen_new for n in seqlens]
    pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * len(seqlens)
    for b, (lp, end) in enumerate(zip(pads, ends)):
        if not 0 <= lp <= end:
            raise ValueError(f"flash_attn_ext: cache_leftpad[{b}] = {lp} is outside [0, {end}] (the sequence's keys "
                             "after the append)")
    if cache_batch_idx is not None:
        for b, row in enumerate(cache_batch_idx.tolist()):
            if not 0 <= row < cache_rows:
                raise ValueError(f"flash_attn_ext: cache_batch_idx[{b}] = {row} is outside [0, {cache_rows}), the "
                                 "batch rows of k_cache")
    if block_table is not None:
        table = block_table.tolist()
        for b, (lp, end) in enumerate(zip(pads, ends)):
            for i in range(lp // page_size, (end + page_size - 1) // page_size):
                if not 0 <= table[b][i] < num_blocks:
                    raise ValueError(f"flash_attn_ext: block_table[{b}, {i}] = {table[b][i]} is outside [0, "
                                     f"{num_blocks}), the blocks of k_cache")


def _check_fp8_call(fn, q, k_cache, v_cache, k, v, cache_batch_idx, block_table, descales):
    """An FP8 call's checks that the 16-bit route leaves to its op, which
    runs after the append: fp8.py's (no gradient, nheads a multiple of
    nheads_k, the descales' shapes, dtypes and devices) and the op's on the
    cache's shape, so that a call that fails leaves the cache untouched."""
    fp8._checked_tables(fn, q, k_cache, v_cache, *descales, 4, q.shape[0])
    if k is not None:
        fp8._check_no_grad(fn, k, v, q)
    if k_cache.shape[-1] != q.shape[-1]:
        raise RuntimeError(f"flash_attn_ext: q and k_cache must have the same head dim, got {q.shape[-1]} and "
                           f"{k_cache.shape[-1]}")
    if q.shape[-1] > 256:
        raise RuntimeError(f"flash_attn_ext: head dim must be between 1 and 256, got {q.shape[-1]}")
    if block_table is not None:
        if k_cache.shape[1] == 0:
            raise RuntimeError(f"flash_attn_ext: a paged k_cache needs a page size >= 1, got shape "
                               f"{tuple(k_cache.shape)}")
        if k_cache.shape[0] == 0 and block_table.shape[1] > 0:
            raise RuntimeError("flash_attn_ext: a paged k_cache needs at least one block")
    elif cache_batch_idx is None and k_cache.shape[0] < q.shape[0]:
        raise RuntimeError(f"flash_attn_ext: k_cache has {k_cache.shape[0]} batch rows, fewer than q's batch of "
                           f"{q.shape[0]} (pass cache_batch_idx to pick rows)")
    elif cache_batch_idx is not None and q.shape[0] > 0 and k_cache.shape[0] == 0:
        raise RuntimeError("flash_attn_ext: cache_batch_idx needs a k_cache with at least one batch row")


def _fp8_attention(q, k_cache, v_cache, seqlens, cache_batch_idx, cache_leftpad, block_table, capacity,
                   softmax_scale, causal, window, softcap, alibi_slopes, sinks, descales, return_softmax_lse):
    """Attention of FP8 q over FP8 caches (after the append) as one call of
    flash_attn_varlen_func, which runs the native Hopper kernel or
    dequantizes (fp8.native_fp8_reason decides). Sequence b is q's rows
    b * seqlen_q ... (b + 1) * seqlen_q - 1 over its cache positions
    lp[b] ... seqlens[b] - 1, clamped as csrc/kvcache.h's clamp_sequence
    clamps them, so the varlen call sees the sequence the 16-bit route's op
    sees (masks bottom-right aligned on its own keys); its descales are entry
    b of each table (FlashAttention-3's convention). Tensor operations on
    shapes only: no host synchronisation, and max_seqlen_k is the capacity.

    Where the keys come from, never more than the batch's own rows of the
    cache (batch x capacity keys):
    - paged, without left padding: the block table goes to the varlen
      function (sequence b: the first seqlens[b] slots of its pages), which
      gathers the pages and dequantizes them (the native kernel takes no
      paged keys);
    - else rows of capacity keys, sequence b's starting at row b * capacity:
      a view of the cache's first batch rows (a copy only when their layout
      cannot be flattened), with cache_batch_idx a gathered copy of the rows
      it names (the varlen layout wants sequence b's keys at non-decreasing
      offsets, and a row may serve two sequences), paged with left padding
      the gathered pages (then the native kernel may take the call). Left
      padding moves sequence b's start to row b * capacity + lp[b], which
      keeps cu_seqlens_k non-decreasing (lp[b] <= capacity), and seqused_k
      = seqlens - lp counts its keys."""
    batch, seqlen_q, nheads, d = q.shape
    steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    seqlens = seqlens.clamp(0, capacity)
    pads = torch.minimum(cache_leftpad.clamp_min(0), seqlens) if cache_leftpad is not None else None
    cu_seqlens_k, seqused_k, table = steps * capacity, seqlens, None
    if block_table is not None and pads is None:
        keys, values, table = k_cache, v_cache, block_table
    else:
        def rows(cache, name):
            # Gathers on the bytes, as the append (see there).
            if block_table is not None:
                return varlen._gather_pages(cache.view(torch.uint8), block_table, name).view(cache.dtype)
            if cache_batch_idx is not None:
                picked = cache_batch_idx.long().clamp(0, cache.shape[0] - 1)
                return cache.view(torch.uint8).index_select(0, picked).view(cache.dtype).flatten(0, 1)
            return cache[:batch].flatten(0, 1)

        keys, values = rows(k_cache, "k_cache"), rows(v_cache, "v_cache")
        if pads is not None:
            cu_seqlens_k = cu_seqlens_k + torch.cat((pads, pads.new_zeros(1)))
            seqused_k = seqlens - pads
    out, lse, _ = varlen.flash_attn_varlen_func(
        q.reshape(batch * seqlen_q, nheads, d), keys, values, steps * seqlen_q, cu_seqlens_k, seqlen_q, capacity,
        softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
        return_attn_probs=True, block_table=table, seqused_k=seqused_k, s_aux=sinks, q_descale=descales[0],
        k_descale=descales[1], v_descale=descales[2])
    out = out.view(batch, seqlen_q, nheads, out.shape[-1])
    if not return_softmax_lse:
        return out
    # (nheads, batch * seqlen_q) -> the kv-cache layout (batch, nheads, seqlen_q).
    return out, lse.view(nheads, batch, seqlen_q).transpose(0, 1).contiguous()


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Attention of q over a KV cache, after appending k and v to it in place
    (flash-attn 2.8's signature and semantics).

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or
            with a block_table (num_blocks, page_size, nheads_k, headdim):
            a paged cache, any page size (flash-attn 2 needs multiples of
            256). Last dimension contiguous. nheads % nheads_k == 0.
        k, v: (batch, seqlen_new, nheads_k, headdim) or None: written into
            the caches at positions cache_seqlens[b] ... + seqlen_new - 1 of
            each sequence (rotated first when rotary_cos/sin are given),
            before the attention, which then sees them.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), with k and v
            only; seqlen_ro at least the cache's capacity per sequence. k is
            rotated at its cache positions; q at positions cache_seqlens[b] +
            i when causal or windowed (a window side narrower than the
            cache's capacity: flash-attn drops wider ones), else every row of
            q at cache_seqlens[b] (flash-attn's convention; positions count
            from the cache's first slot, left padding included). Not with
            FP8 caches (NotImplementedError: rotating e4m3 values would
            requantize them); rotate q and k before quantizing.
        cache_seqlens: int or int32 (batch,): keys in each sequence's cache
            before the append (left padding included). None: the whole cache.
        cache_batch_idx: int32 (batch,): the cache row of each sequence
            (contiguous caches only).
        cache_leftpad: int32 (batch,): the first valid cache position of
            each sequence; the sequence has cache_seqlens (+ seqlen_new) -
            cache_leftpad keys.
        block_table: int32 (batch, max_blocks_per_seq): the cache blocks of
            each sequence, in order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in
            flash_attn_func; masks are bottom-right aligned on each
            sequence's own keys.
        num_splits: 0 picks the number of key splits from the shapes and the
            GPU; n > 0 forces n (CUDA; the CPU ignores it). FP8 caches: 0 or
            1 (their route has no split-KV kernel; more raises
            NotImplementedError).
        return_softmax_lse: also return softmax_lse (batch, nheads, seqlen_q) fp32.
        s_aux / learnable_sink (keyword only): attention sinks, fp32 (nheads,).
        q_descale, k_descale, v_descale (keyword only): FP8 caches.
            float8_e4m3fn q, k_cache and v_cache (and k, v) with
            FlashAttention-3's descales: fp32 (batch, nheads_k) or one
            value; entry b belongs to q's sequence b, whichever cache row or
            pages hold its keys; absent: 1. The appended bytes are stored as
            given. The attention runs as one flash_attn_varlen_func call
            over the cache's rows (flash_attn_ext/fp8.py: the native Hopper
            FP8 kernel for head dims 128 and 256 without softcap, ALiBi or
            sinks, else the dequantizing path). Contiguous caches are
            flattened in place; with cache_batch_idx the rows it names are
            gathered into a copy first; a paged cache goes with its block
            table (pages gathered, dequantized), with cache_leftpad its
            pages are gathered here. Causal masks, windows and softcap /
            ALiBi / sinks mean what they mean for 16-bit caches.

    Returns out (batch, seqlen_q, nheads, headdim) (bfloat16 for FP8 caches),
    and softmax_lse with return_softmax_lse. No backward (as in flash-attn):
    asking for a gradient through the result raises (FP8 inputs that require
    a gradient raise at once).
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attn_ext: {name} must be a tensor, got {type(t).__name__}")
    fn = "flash_attn_ext.flash_attn_with_kvcache"
    fp8_call = fp8.is_fp8_call(fn, q, k_cache, v_cache, q_descale, k_descale, v_descale,
                               names=("q", "k_cache", "v_cache"))
    if q.dim() != 4:
        raise RuntimeError(f"flash_attn_ext: q must be 4-D (batch, seqlen_q, nheads, headdim), got {q.dim()}-D")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise RuntimeError(
            "flash_attn_ext: k_cache and v_cache must be 4-D (batch_cache, seqlen_cache, nheads_k, headdim), or "
            f"(num_blocks, page_size, nheads_k, headdim) with a block_table; got {k_cache.dim()}-D and "
            f"{v_cache.dim()}-D")
    if k_cache.shape != v_cache.shape:
        raise RuntimeError(f"flash_attn_ext: k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                           f"{tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise RuntimeError(f"flash_attn_ext: {name} must have a contiguous last dimension (stride 1)")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_ext: pass k and v together (new keys and values to append), or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_ext: pass rotary_cos and rotary_sin together, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("flash_attn_ext: rotary_cos/rotary_sin need k and v (rotary embedding is applied to the "
                         "appended keys and to q), as in flash-attn")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"flash_attn_ext: num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if fp8_call and rotary_cos is not None:
        # Rotating e4m3 values would round the rotated k back to e4m3 (with
        # which scale?) before it enters the cache: a requantization the
        # caller did not ask for. Rotate before quantizing instead.
        raise NotImplementedError(f"{fn}: rotary_cos / rotary_sin with FP8 (float8_e4m3fn) caches are not "
                                  "supported; apply the rotary embedding to q and k before quantizing them")
    if fp8_call and num_splits > 1:
        raise NotImplementedError(f"{fn}: num_splits = {num_splits} with FP8 caches: the FP8 route has no split-KV "
                                  "kernel (it runs the variable-length forward); pass 0 or 1")
    window_left, window_right = _window_sides(window_size)
    softcap = _softcap_value(softcap)
    sinks = _sinks_argument(s_aux, learnable_sink)
    _ops.check_same_device("flash_attn_ext", {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
                                              "rotary_cos": rotary_cos, "rotary_sin": rotary_sin,
                                              "cache_batch_idx": cache_batch_idx, "cache_leftpad": cache_leftpad,
                                              "block_table": block_table, "alibi_slopes": alibi_slopes,
                                              "sinks": sinks,
                                              "cache_seqlens": cache_seqlens})
    if q.shape[-1] == 0:
        raise RuntimeError("flash_attn_ext: head dim must be between 1 and 256, got 0 (q.shape[-1] == 0)")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise RuntimeError(f"flash_attn_ext: block_table must be an int32 tensor, got "
                               f"{getattr(block_table, 'dtype', type(block_table).__name__)}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise RuntimeError(f"flash_attn_ext: block_table must be (batch, max_blocks_per_seq) with batch = "
                               f"{batch}, got {tuple(block_table.shape)}")
        if cache_batch_idx is not None:
            raise RuntimeError("flash_attn_ext: cache_batch_idx cannot be combined with a block_table (the block "
                               "table already says where each sequence's keys are)")
        if block_table.stride(-1) != 1 and block_table.shape[-1] > 1:
            block_table = block_table.contiguous()  # as flash-attn's maybe_contiguous: the op reads rows
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        page_size = 0
        capacity = k_cache.shape[1]
    cache_batch_idx = _check_index(cache_batch_idx, "cache_batch_idx", batch, device)
    cache_leftpad = _check_index(cache_leftpad, "cache_leftpad", batch, device)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_ext: k and v need cache_seqlens (where to append them); without it the "
                             "cache is taken as full")
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = _check_index(cache_seqlens, "cache_seqlens", batch, device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    else:
        raise TypeError(f"flash_attn_ext: cache_seqlens must be an int or an int32 tensor (batch,), got "
                        f"{type(cache_seqlens).__name__}")

    seqlen_new = 0
    if k is not None:
        expected = (batch, k.shape[1] if k.dim() == 4 else -1, k_cache.shape[2], k_cache.shape[3])
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape) != expected:
                raise RuntimeError(f"flash_attn_ext: {name} must be (batch, seqlen_new, nheads_k, headdim) = "
                                   f"({batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}) like k, got "
                                   f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != k_cache.dtype:
                raise RuntimeError(f"flash_attn_ext: {name} must have the dtype of the cache ({k_cache.dtype}), "
                                   f"got {t.dtype}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"flash_attn_ext: k and v bring {seqlen_new} new keys, more than the cache holds per "
                             f"sequence ({capacity})")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise RuntimeError(f"flash_attn_ext: {name} must be a floating tensor (seqlen_ro, rotary_dim / 2)")
        if rotary_cos.shape != rotary_sin.shape:
            raise RuntimeError(f"flash_attn_ext: rotary_cos and rotary_sin must have one shape, got "
                               f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if not 0 < 2 * rotary_cos.shape[1] <= q.shape[-1]:
            raise RuntimeError(f"flash_attn_ext: rotary_dim = 2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]} "
                               f"must be between 2 and the head dim {q.shape[-1]}")
        if rotary_cos.shape[0] < capacity:
            raise RuntimeError(f"flash_attn_ext: rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions, fewer "
                               f"than the cache holds per sequence ({capacity})")

    if fp8_call:
        # Everything the FP8 route would refuse, refused before the append
        # writes into the cache (the 16-bit route's op checks after it).
        _check_fp8_call(fn, q, k_cache, v_cache, k, v, cache_batch_idx, block_table,
                        (q_descale, k_descale, v_descale))

    if not _ops.is_tracing() and (device.type == "cpu" or _ops.debug_checks_enabled()):
        _check_values(cache_seqlens, seqlen_new, capacity, cache_batch_idx, cache_leftpad, block_table, page_size,
                      k_cache.shape[0], k_cache.shape[0])

    if k is not None:
        # Where the new keys go: positions start + i, start clamped so that
        # they stay inside the cache (a correct call never needs the clamp).
        start = cache_seqlens.clamp(0, capacity - seqlen_new)
        pos = start[:, None] + torch.arange(seqlen_new, device=device, dtype=torch.int32)  # (batch, seqlen_new)
        pos = pos.long()
        if rotary_cos is not None:
            k = _rotate(k, rotary_cos[pos][:, :, None], rotary_sin[pos][:, :, None], rotary_interleaved)
            # flash-attn 2.8 (mha_fwd_kvcache) first drops a window side as
            # wide as the cache (>= capacity: -1), so only a narrower window
            # makes the call local and shifts q's positions row by row.
            if causal or 0 <= window_left < capacity or 0 <= window_right < capacity:
                q_pos = (start[:, None].long() + torch.arange(seqlen_q, device=device)).clamp(
                    max=rotary_cos.shape[0] - 1)
            else:
                q_pos = start[:, None].long().expand(batch, seqlen_q)
            q = _rotate(q, rotary_cos[q_pos][:, :, None], rotary_sin[q_pos][:, :, None], rotary_interleaved)
        if paged:
            blocks = block_table.long().gather(1, pos // page_size).clamp(0, k_cache.shape[0] - 1)
            index = (blocks, pos % page_size)
        else:
            rows = (cache_batch_idx.long().clamp(0, k_cache.shape[0] - 1) if cache_batch_idx is not None
                    else torch.arange(batch, device=device))
            index = (rows[:, None].expand(batch, seqlen_new), pos)
        if fp8_call:
            # The bytes, as bytes: exact, and uint8 indexing exists on every
            # device and torch release (FP8 coverage of the indexing ops has
            # varied between releases).
            k_cache.view(torch.uint8).index_put_(index, k.view(torch.uint8))
            v_cache.view(torch.uint8).index_put_(index, v.view(torch.uint8))
        else:
            k_cache.index_put_(index, k)
            v_cache.index_put_(index, v)
        cache_seqlens = (start + seqlen_new).to(torch.int32)

    if fp8_call:
        return _fp8_attention(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                              capacity, float(softmax_scale), bool(causal), (window_left, window_right), softcap,
                              alibi_slopes, sinks, (q_descale, k_descale, v_descale), return_softmax_lse)

    q = q if q.stride(-1) == 1 or q.shape[-1] == 1 else q.contiguous()
    out, softmax_lse = _ops.call_fwd_kvcache(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad,
                                        block_table, float(softmax_scale), bool(causal), window_left, window_right,
                                        softcap, alibi_slopes, sinks, int(num_splits))
    return (out, softmax_lse) if return_softmax_lse else out


DECODE_CONFIG_ENV = "FLASH_ATTN_EXT_DECODE_CONFIG"


def _decode_configs() -> List[str]:
    """Developer use (tests, benchmarks/bench_decode.py --sweep): the names of
    the CUDA decode kernel's configurations, which FLASH_ATTN_EXT_DECODE_CONFIG
    picks from (read on every call; unset: the first, the default). The table
    lives in one place, csrc/cuda/flash_decode_launch.cuh; its names are read
    here from the error that an unknown name raises."""
    q = torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.ones(1, device="cuda", dtype=torch.int32)
    old = os.environ.get(DECODE_CONFIG_ENV)
    os.environ[DECODE_CONFIG_ENV] = "?"
    try:
        torch.ops.flash_attn_ext.fwd_kvcache(q, q, q, seqlens, None, None, None, 1.0, False, -1, -1)
    except RuntimeError as e:
        found = re.search(r"the configurations are: ([\w, ]+)", str(e))
        if found is None:
            raise
        return [name.strip() for name in found.group(1).split(",")]
    finally:
        if old is None:
            del os.environ[DECODE_CONFIG_ENV]
        else:
            os.environ[DECODE_CONFIG_ENV] = old
    raise RuntimeError(f"flash_attn_ext: {DECODE_CONFIG_ENV}='?' raised no error; cannot list the configurations")
