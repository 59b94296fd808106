"""flash_attn_ext as a Hugging Face transformers attention implementation.

Importing this module registers, under the name "faext" (`NAME`), an
attention function with transformers' `AttentionInterface` and its mask
function with `AttentionMaskInterface`; a model then runs our kernels with

    import flash_attn_ext.integrations.transformers  # registers "faext"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="faext")
    # or, on a loaded model: model.set_attn_implementation("faext")

Why both functions, and why this name:
  * transformers builds the attention mask in two steps: the model calls the
    mask function registered under its `attn_implementation` once per forward,
    and hands what it returns to the attention function of every layer. A name
    without a mask function gets no mask at all (transformers skips mask
    creation for unknown names), so padding would be silently dropped;
    `register()` therefore always registers the pair.
  * Any name containing "flash" is taken by transformers for one of its own
    FlashAttention flavours: model loading then tries to import flash-attn or
    download a kernel from the Hub (and fails), and model code takes
    flash-specific branches. A name shaped "org/repo" is a Hub kernel, and
    "sdpa", "eager" or "flex_attention" inside a name trigger those
    implementations' checks. "faext" is none of these; `register(name)`
    refuses names that are.

What the mask function hands over (never a dense 4-D mask):
  None when every row is one unpadded sequence, else a 2-D (batch, kv_length)
  tensor: transformers' boolean padding mask (True = a token), or, when
  transformers detected packed sequences in `position_ids`, int32 sequence
  ids (0 = padding, 1, 2, ... = the packed sequences of the row). It raises
  NotImplementedError for mask patterns our kernels cannot express (transformers'
  or/and mask overlays such as bidirectional image tokens, chunked attention,
  block-wise masks).

How the attention function maps transformers' arguments onto our ops:
  * a 2-D mask (padding, left or right, or sequence ids): the tokens are
    unpadded and every sequence of every row becomes one sequence of
    `flash_attn_varlen_func`; with a KV cache (fewer queries than keys: a
    decode step, a chunk of prefill) the queries are the last positions of
    each row, and the bottom-right causal alignment of the varlen kernels
    lines each sequence's queries up with its own last keys. Outputs at
    padded query positions are 0.
  * a boolean 2-D mask with non-causal attention and no window (an
    encoder, or an encoder-decoder's cross-attention, whose mask pads the
    encoder's keys and says nothing of the decoder's queries): only the keys
    are unpadded; every query of a row attends to that row's tokens, as in
    transformers' sdpa and eager.
  * `cu_seq_lens_q` / `cu_seq_lens_k` (and `max_length_q` / `max_length_k`)
    keyword arguments (padding-free training, e.g. DataCollatorWithFlattening):
    `flash_attn_varlen_func` on the flattened batch.
  * no mask but `position_ids` that restart (packed sequences, a position
    that is not the previous one plus 1 starts a new sequence, as in
    transformers' own detection) with as many queries as keys: varlen by
    those sequences. transformers' mask code only looks at `position_ids`
    without a cache; this catches the forward with `use_cache=True` too, as
    transformers' flash-attention path does (but for any batch size).
  * otherwise `flash_attn_func` on the dense batch, causal aligned
    bottom-right (a decode step's query sees the whole cache).
  * `scaling` -> softmax_scale; `sliding_window` w -> window_size
    (w - 1, w - 1) as in transformers' flash path (w - 1 keys to the left,
    the causal mask removes the right side); `softcap` -> softcap (Gemma 2);
    `s_aux` -> the sinks (gpt-oss, cast to fp32 for the op, their gradient
    flows back); `dropout` -> dropout_p (models pass their config's
    attention_dropout while training, 0 in eval); `is_causal` (else the
    module's) -> causal; GQA / MQA go to the kernels as they are (no
    repeat_kv); `deterministic` (or FLASH_ATTENTION_DETERMINISTIC=1, as
    transformers' flash path reads it) -> deterministic.
  * unsupported arguments raise NotImplementedError naming them:
    output_attentions=True (the kernels never form the probabilities),
    position_bias (T5-style bias), a 4-D attention mask, paged-cache
    arguments (block_table, k_cache, v_cache), head_mask; so do unknown
    keyword arguments that carry a value, while those that only steer the
    model around the attention (cache_position, use_cache, ...) are listed
    in `_IGNORED_KWARGS` with the reason they do not concern attention.

transformers is an optional dependency (`pip install flash_attn_ext[transformers]`);
this module needs transformers >= 4.56 (AttentionMaskInterface with the
packed-sequence mask) and was tested with 5.24.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

try:
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "flash_attn_ext.integrations.transformers needs Hugging Face transformers >= 4.56: "
        "pip install 'flash_attn_ext[transformers]' (or pip install transformers)"
    ) from e

from ..interface import flash_attn_func
from ..varlen import flash_attn_varlen_func

__all__ = ["NAME", "register", "attention_forward", "attention_mask"]

NAME = "faext"

# Keyword arguments transformers' models pass down to every attention
# function that do not change the attention itself, with why.
_IGNORED_KWARGS = {
    "cache_position": "positions of the new tokens in the cache: the cache has already been updated",
    "use_cache": "whether the model keeps a cache: already applied by the caller",
    "past_key_values": "the cache object: already applied by the caller",
    "cache": "the cache object: already applied by the caller",
    "position_embeddings": "rotary embeddings: already applied to q and k",
    "output_hidden_states": "a model output switch",
    "output_router_logits": "a model output switch (MoE)",
    "return_dict": "a model output switch",
    "num_items_in_batch": "a loss normalisation",
    "seq_idx": "per-token sequence ids for linear-attention layers; packing reaches us as position_ids or cu_seq_lens",
    "output_attentions": "handled: False is the default, True raises",
}


def _name_problem(name: str) -> Optional[str]:
    """Why transformers would not treat `name` as a plain registered implementation, or None."""
    if not isinstance(name, str) or not name:
        return "it must be a non-empty string"
    if "flash" in name:
        return ('transformers takes any name containing "flash" for one of its FlashAttention flavours (it imports '
                "flash-attn or fetches a kernel from the Hub, and model code takes flash-specific branches)")
    if "/" in name or ":" in name or "@" in name:
        return 'transformers takes names shaped "org/repo[@rev][:fn]" for Hub kernels'
    for other in ("sdpa", "eager", "flex_attention", "paged|"):
        if other in name:
            return f'transformers runs its "{other}" checks for names containing "{other}"'
    return None


# The code objects of transformers' mask building blocks, to recognise the
# mask pattern a model asks for (the mask function is a closure tree built
# from these; see transformers/masking_utils.py).
def _code_of(factory, *args):
    fn = getattr(_mu, factory, None)
    if fn is None:
        return None
    try:
        return fn(*args).__code__
    except Exception:  # pragma: no cover - a transformers whose factory changed signature
        return None


_AND_CODE = _code_of("and_masks", _mu.causal_mask_function)
_OR_CODE = _code_of("or_masks", _mu.causal_mask_function)
_SLIDING_CODE = _code_of("sliding_window_overlay", 1)
_SLIDING_BIDIR_CODE = _code_of("sliding_window_bidirectional_overlay", 1)
_PACKED_CODE = _code_of("packed_sequence_mask_function", torch.zeros(1, 1, dtype=torch.long))
_REMAP_CODE = _code_of("remap_positions_for_packed_sequence", _mu.causal_mask_function, torch.zeros(1, 1))
_CAUSAL = _mu.causal_mask_function
_BIDIRECTIONAL = getattr(_mu, "bidirectional_mask_function", None)


def _packed_ids(mask_function):
    """The packed-sequence ids (batch, length) inside a mask function built
    from transformers' blocks, or None; NotImplementedError for blocks the
    kernels cannot express. Causality and sliding windows are accepted here:
    the attention function receives them as is_causal and sliding_window."""
    if mask_function is None or mask_function is _CAUSAL or mask_function is _BIDIRECTIONAL:
        return None
    code = getattr(mask_function, "__code__", None)
    if code is not None and code in (_SLIDING_CODE, _SLIDING_BIDIR_CODE):
        return None
    if code is not None and code in (_AND_CODE, _PACKED_CODE, _REMAP_CODE):
        names = inspect.getclosurevars(mask_function).nonlocals
        if code == _PACKED_CODE:
            return names["packed_sequence_mask"]
        if code == _REMAP_CODE:
            # Positions renumbered within each packed sequence: the varlen
            # kernels index every sequence from 0 anyway.
            return _packed_ids(names["mask_function"])
        found = None
        for part in names["mask_functions"]:
            ids = _packed_ids(part)
            if ids is not None:
                found = ids
        return found
    what = getattr(mask_function, "__qualname__", repr(mask_function))
    if code is not None and code == _OR_CODE:
        what += " (transformers' or_masks: an or_mask_function overlay, e.g. bidirectional image tokens)"
    raise NotImplementedError(
        f"flash_attn_ext ({NAME}): the model asks for an attention mask built from {what}, a pattern the "
        f"flash_attn_ext kernels cannot express (they take causal / bidirectional attention, a sliding window, "
        f"padding and packed sequences); use attn_implementation='sdpa' or 'eager' for this model"
    )


def attention_mask(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None,
                   q_offset: int = 0, kv_offset: int = 0, mask_function=None,
                   attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask function for "faext": returns None or a 2-D
    (batch, kv_length) tensor, never a dense mask (see the module docstring).

    transformers calls it by keyword with (batch_size, q_length, kv_length,
    q_offset, kv_offset, mask_function, attention_mask) and hints for other
    implementations (allow_is_causal_skip, local_size, dtype, config, use_vmap,
    device, cache_position in older versions), which concern dense masks only.
    """
    packed = _packed_ids(mask_function)
    if kv_length is None:
        raise TypeError(f"flash_attn_ext ({NAME}) mask function: kv_length is required")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"flash_attn_ext ({NAME}): a {attention_mask.dim()}-D attention_mask; padding reaches the varlen "
                f"kernels as the 2-D (batch, length) padding mask")
        # The last kv_length positions (a sliding-window cache keeps fewer
        # keys than the mask has positions), as transformers' flash path.
        attention_mask = attention_mask[:, -kv_length:].bool()
    if packed is not None:
        # transformers numbers the packed sequences of a row from 0; we keep
        # 0 for padding.
        ids = packed.to(torch.int32) + 1
        if attention_mask is not None:
            ids = ids * attention_mask[:, -ids.shape[1]:].to(torch.int32)
        return ids
    if attention_mask is not None and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None  # one unpadded sequence per row: the dense kernels
    return attention_mask


def _kwarg_problems(kwargs):
    """NotImplementedError for keyword arguments we cannot honour."""
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"flash_attn_ext ({NAME}): output_attentions=True; the kernels never form the attention "
            f"probabilities: use attn_implementation='eager' to inspect them")
    for name in ("position_bias", "head_mask", "block_table", "k_cache", "v_cache", "attention_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"flash_attn_ext ({NAME}): the argument {name} is not supported")
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS or name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                               "max_length_k", "deterministic"):
            continue
        if value is None or value is False:
            continue
        raise NotImplementedError(
            f"flash_attn_ext ({NAME}): the attention argument {name}={_short(value)} is not supported (the "
            f"attention function does not know what it asks for, and ignores no argument)")


def _short(value):
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)[:60]


def _as_kernel_dtype(module, q, k, v):
    """CUDA kernels take fp16 / bf16. fp32 activations next to half-precision
    weights (PEFT upcasting norms, as transformers' flash path allows for)
    are cast to the weights' dtype; autocast is left to our functions."""
    if q.device.type != "cuda" or q.dtype != torch.float32 or torch.is_autocast_enabled("cuda"):
        return q, k, v
    target = None
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            target = layer.weight.dtype
            break
    if target in (torch.float16, torch.bfloat16):
        return q.to(target), k.to(target), v.to(target)
    raise TypeError(
        f"flash_attn_ext ({NAME}): the CUDA kernels take fp16 or bf16, got fp32 q/k/v; load the model with "
        f"dtype=torch.bfloat16 (or float16), or run it under torch.autocast")


# The last position_ids looked at and what they gave: every layer of a
# forward gets the same tensor, so the device is read once per forward.
_last_positions = (None, -1, 0, None)


def _sequences_of_positions(position_ids, batch, length):
    """int32 (batch, length) packed-sequence ids from position_ids when they
    restart somewhere (a position other than the previous one plus 1 starts a
    sequence), else None. Reads the device (one synchronisation per new
    position_ids tensor)."""
    global _last_positions
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != length:
        return None
    seen, version, seen_batch, ids = _last_positions
    if seen is position_ids and version == position_ids._version and seen_batch == batch:
        return ids
    ids = _packed_positions(position_ids, batch)
    _last_positions = (position_ids, position_ids._version, batch, ids)
    return ids


def _packed_positions(position_ids, batch):
    if position_ids.shape[0] != batch:
        if position_ids.shape[0] != 1:
            return None
        position_ids = position_ids.expand(batch, -1)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    ids = starts.to(torch.int32).cumsum(1, dtype=torch.int32)
    if not bool((ids[:, -1] > 1).any()):
        return None
    return ids


def _varlen_by_ids(q, k, v, ids, **attn):
    """Attention over the sequences that `ids` (batch, length_k) describes:
    nonzero = a token, and consecutive tokens of a row with different ids
    belong to different sequences. The queries are the last q.shape[1]
    positions of each row. Returns (batch, seqlen_q, nheads, headdim_v), 0 at
    padded queries."""
    batch, len_q = q.shape[0], q.shape[1]
    len_k = ids.shape[1]
    if k.shape[1] > len_k:  # a static cache: only the first len_k slots are filled
        k, v = k[:, :len_k], v[:, :len_k]
    elif k.shape[1] < len_k:
        ids = ids[:, -k.shape[1]:]
        len_k = k.shape[1]
    if len_q > len_k:
        raise ValueError(f"flash_attn_ext ({NAME}): {len_q} queries but only {len_k} key positions in the mask")
    flat = ids.reshape(-1)
    tokens = torch.nonzero(flat).squeeze(1)  # row-major: by row, then position
    out = q.new_zeros(batch * len_q, q.shape[2], v.shape[-1])
    if tokens.numel() == 0:
        return out.view(batch, len_q, q.shape[2], v.shape[-1])
    row, col = tokens // len_k, tokens % len_k
    values = flat[tokens]
    new = torch.ones_like(tokens, dtype=torch.bool)
    new[1:] = (row[1:] != row[:-1]) | (values[1:] != values[:-1])
    seq = new.to(torch.int64).cumsum(0) - 1
    nseq = int(seq[-1]) + 1
    is_query = col >= len_k - len_q
    counts_k = torch.bincount(seq, minlength=nseq)
    counts_q = torch.zeros(nseq, dtype=torch.int64, device=seq.device).index_add_(0, seq, is_query.to(torch.int64))
    cu_k = torch.nn.functional.pad(counts_k.cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.nn.functional.pad(counts_q.cumsum(0), (1, 0)).to(torch.int32)
    rows_q = (row * len_q + col - (len_k - len_q))[is_query]
    maxes = torch.stack([counts_q.max(), counts_k.max()]).tolist()
    q_rows = q.reshape(batch * len_q, q.shape[2], q.shape[3])[rows_q]
    k_rows = k.reshape(batch * len_k, k.shape[2], k.shape[3])[tokens]
    v_rows = v.reshape(batch * len_k, v.shape[2], v.shape[3])[tokens]
    o = flash_attn_varlen_func(q_rows, k_rows, v_rows, cu_q, cu_k, maxes[0], maxes[1], **attn)
    out = out.index_copy(0, rows_q, o.to(out.dtype))
    return out.view(batch, len_q, q.shape[2], v.shape[-1])


def _varlen_by_keys(q, k, v, mask, **attn):
    """Non-causal attention of every query of row b to the tokens of row b of
    the boolean key mask (batch, length_k). Returns (batch, seqlen_q, nheads,
    headdim_v); 0 for a row without tokens."""
    batch, len_q = q.shape[0], q.shape[1]
    if k.shape[1] > mask.shape[1]:  # a static cache: only the first slots are filled
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    elif k.shape[1] < mask.shape[1]:
        mask = mask[:, -k.shape[1]:]
    len_k = k.shape[1]
    tokens = torch.nonzero(mask.reshape(-1)).squeeze(1)
    counts_k = mask.sum(1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(counts_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * len_q
    max_k = int(counts_k.max()) if batch else 0
    o = flash_attn_varlen_func(q.reshape(batch * len_q, q.shape[2], q.shape[3]),
                               k.reshape(batch * len_k, k.shape[2], k.shape[3])[tokens],
                               v.reshape(batch * len_k, v.shape[2], v.shape[3])[tokens], cu_q, cu_k, len_q, max_k,
                               **attn)
    return o.view(batch, len_q, q.shape[2], v.shape[-1])


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, s_aux: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention function for "faext".

    query (batch, nheads, seqlen_q, headdim), key / value (batch, nheads_k,
    seqlen_k, headdim[_v]) as transformers' models pass them; returns
    (output (batch, seqlen_q, nheads, headdim_v), None). See the module
    docstring for how each argument maps onto our ops.
    """
    _check_mask_registered(module)
    _kwarg_problems(kwargs)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise NotImplementedError(
            f"flash_attn_ext ({NAME}): attention_mask of shape {shape}: the kernels take padding and packed "
            f"sequences as a 2-D (batch, length) mask, which transformers builds when the mask function is registered "
            f"with the attention function (flash_attn_ext.integrations.transformers.register()); dense custom masks "
            f"are not supported")
    if attention_mask is not None and attention_mask.dtype.is_floating_point:
        raise TypeError(f"flash_attn_ext ({NAME}): a 2-D attention_mask must be bool or integer (1 = token, "
                        f"0 = padding), got {attention_mask.dtype}")
    if s_aux is not None:
        if s_aux.dim() != 1 or s_aux.shape[0] != query.shape[1]:
            raise ValueError(f"flash_attn_ext ({NAME}): s_aux (attention sinks) must be (nheads,) = "
                             f"({query.shape[1]},), got {tuple(s_aux.shape)}")
        s_aux = s_aux.float()  # the op takes fp32 sinks; the cast passes the gradient back
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) < 1):
        raise ValueError(f"flash_attn_ext ({NAME}): sliding_window must be a positive int, got {sliding_window!r}")
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    attn = dict(dropout_p=float(dropout or 0.0), softmax_scale=scaling, causal=causal, window_size=window,
                softcap=float(softcap or 0.0), deterministic=bool(deterministic), s_aux=s_aux)

    # (batch, heads, seq, dim) -> (batch, seq, heads, dim): views, no copy.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q, k, v = _as_kernel_dtype(module, q, k, v)
    batch, len_q = q.shape[0], q.shape[1]

    if attention_mask is not None:
        if not causal and window == (-1, -1) and attention_mask.dtype == torch.bool:
            # A key-padding mask (cross-attention's queries are not the keys' positions).
            return _varlen_by_keys(q, k, v, attention_mask, **attn), None
        return _varlen_by_ids(q, k, v, attention_mask, **attn), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise ValueError(f"flash_attn_ext ({NAME}): cu_seq_lens_q and cu_seq_lens_k go together")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None or max_k is None:
            max_q, max_k = (int((c[1:] - c[:-1]).max()) if c.numel() > 1 else 0 for c in (cu_q, cu_k))
        o = flash_attn_varlen_func(q.reshape(-1, q.shape[2], q.shape[3]), k.reshape(-1, k.shape[2], k.shape[3]),
                                   v.reshape(-1, v.shape[2], v.shape[3]), cu_q.to(torch.int32), cu_k.to(torch.int32),
                                   int(max_q), int(max_k), **attn)
        return o.view(batch, len_q, o.shape[-2], o.shape[-1]), None

    if len_q > 1 and len_q == k.shape[1]:
        ids = _sequences_of_positions(kwargs.get("position_ids"), batch, len_q)
        if ids is not None:
            return _varlen_by_ids(q, k, v, ids, **attn), None

    return flash_attn_func(q, k, v, **attn), None


def _check_mask_registered(module):
    """The attention function without its mask function would get no padding
    mask at all: refuse that pairing rather than attend to padding."""
    config = getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if not isinstance(name, str):
        return
    if AttentionInterface._global_mapping.get(name) is attention_forward and \
            AttentionMaskInterface._global_mapping.get(name) is not attention_mask:
        raise RuntimeError(
            f"flash_attn_ext: attn_implementation {name!r} runs flash_attn_ext's attention function without its mask "
            f"function, so transformers would drop the padding mask; register both with "
            f"flash_attn_ext.integrations.transformers.register({name!r})")


def register(name: str = NAME) -> str:
    """Register the attention function and its mask function with
    transformers under `name` (default "faext"), and return the name, for
    `attn_implementation=name`. Raises ValueError for a name transformers
    would route elsewhere (see the module docstring)."""
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"flash_attn_ext: cannot register attn_implementation {name!r}: {problem}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


register()
