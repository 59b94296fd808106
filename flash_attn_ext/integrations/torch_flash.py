"""flash_attn_ext in PyTorch's flash-attention registry (torch.nn.attention).

PyTorch lets a provider replace the kernels behind SDPA's FLASH backend:
`register_flash_attention_impl(name, register_fn=...)` records a provider,
and the user opts in with `activate_flash_attention_impl(name)` (undone by
`restore_flash_attention_impl()`). `import flash_attn_ext` registers this
module under IMPL_NAME; nothing is activated until the user asks, as PyTorch
requires (`activate()` / `deactivate()` here are shorthands).

Activation registers Python kernels, through a torch.library.Library, for
the aten ops PyTorch's flash path runs, on the CPU and (with our CUDA
kernels present) CUDA dispatch keys:
  _flash_attention_forward / _backward        flash-attn 2's level: dense
      (B, S, H, D) or varlen (total, H, D) with cum_seq_q/k; what
      torch.nn.attention.varlen.varlen_attn and context parallelism call.
  _flash_attention_forward_no_dropout_inplace varlen_attn_out (torch >= 2.13).
  _scaled_dot_product_flash_attention / _backward   SDPA's FLASH backend on
      CUDA: (B, H, S, D) tensors.
  _scaled_dot_product_flash_attention_for_cpu / _backward   SDPA's FLASH
      backend on the CPU (an op of its own there, with top-left is_causal).
PyTorch's autograd formulas for these ops stay in place: the forward kernels
run our fwd / varlen_fwd ops, the backward kernels our bwd / varlen_bwd.

A call we cannot compute exactly is declined: before any work, its kernel
hands the call, untouched, to the kernel PyTorch had registered for that
dispatch key (captured at activation with torch.library.get_kernel), or, where
PyTorch has none (its flash ops on the CPU), raises NotImplementedError naming
the reason. `counts` records both outcomes per op, for tests and debugging.

Conventions mapped here (docs/design.md has the table):
  * is_causal: the flash-attn level and the CUDA SDPA op are flash-attn 2's
    kernel, bottom-right aligned like ours (SDPA itself only sends them
    seqlen_q == seqlen_k, where the alignments coincide; the CUDA SDPA op
    declines is_causal with seqlen_q != seqlen_k); the CPU SDPA op is
    top-left and mapped as flash_attn_ext.sdpa does (keys sliced or a
    bottom-right window).
  * dropout: our [seed, offset] int64 pair travels as the ops' rng_state
    output (viewed as uint64, the dtype PyTorch's meta functions give it) and
    comes back to the backward kernel, which regenerates the same mask. Which
    forward produced an rng_state is remembered (by storage, weakly), so that
    a backward of a declined forward goes to PyTorch too; an rng_state of
    unknown origin with dropout_p > 0 raises rather than guess a mask.
  * scale None is 1 / sqrt(head dim); window sizes None or < 0 are unbounded.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Optional

import torch

from .. import _ops

__all__ = ["IMPL_NAME", "activate", "deactivate", "is_active", "registry_available", "register", "counts"]

IMPL_NAME = "flash_attn_ext"

# The registry and torch.library.get_kernel (the way to reach PyTorch's own
# kernel for a declined call) arrived together with FA4 in SDPA, PyTorch 2.10.
MIN_TORCH = "2.10"

# op name -> calls our kernels ran; "<op name>:declined" -> calls handed back.
counts: Counter = Counter()

# Messages of our ops that mean "this build has no kernel for that", raised
# before any work (csrc/cuda/dispatch.h): such a call is declined, not failed.
_MISSING_KERNEL = ("not compiled in this build",)


def _attention_module():
    try:
        import torch.nn.attention as attention
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return attention


def registry_available() -> bool:
    """Whether this torch has the flash-attention registry and get_kernel."""
    attention = _attention_module()
    return (attention is not None and hasattr(attention, "register_flash_attention_impl")
            and hasattr(attention, "activate_flash_attention_impl") and hasattr(torch.library, "get_kernel"))


def _require_registry() -> None:
    if not registry_available():
        raise RuntimeError(
            f"flash_attn_ext: PyTorch's flash-attention registry (torch.nn.attention.register_flash_attention_impl "
            f"and torch.library.get_kernel) needs torch >= {MIN_TORCH}; this is torch {torch.__version__}. "
            "flash_attn_ext's own functions (flash_attn_func, scaled_dot_product_attention, ...) work without it")


def register() -> bool:
    """Records flash_attn_ext in the registry (no activation); False where the
    registry is missing. Called by `import flash_attn_ext`."""
    if not registry_available():
        return False
    _attention_module().register_flash_attention_impl(IMPL_NAME, register_fn=_Handle)
    return True


def activate() -> None:
    """torch.nn.attention.activate_flash_attention_impl("flash_attn_ext"):
    from now on SDPA's FLASH backend, varlen_attn and the aten flash ops run
    our kernels. Raises RuntimeError naming the torch needed where the
    registry is missing."""
    _require_registry()
    if IMPL_NAME not in _attention_module().list_flash_attention_impls():
        register()
    _attention_module().activate_flash_attention_impl(IMPL_NAME)


def deactivate() -> None:
    """Gives PyTorch's own flash kernels back (if ours are active)."""
    _require_registry()
    if is_active():
        _attention_module().restore_flash_attention_impl()


def is_active() -> bool:
    return registry_available() and _attention_module().current_flash_attention_impl() == IMPL_NAME


# ---------------------------------------------------------------------------
# Declining, and which forward an rng_state came from.


class _Decline(Exception):
    """Raised by a kernel below before it does any work: the call is PyTorch's."""


class _RngOrigins:
    """The rng_state tensors forwards with dropout returned, by storage, held
    weakly: ours (our [seed, offset]) and theirs (PyTorch's kernel ran the
    forward). Autograd saves the forward's output and hands the same storage
    to the backward, whatever Python object wraps it by then."""

    def __init__(self) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._lock = threading.Lock()
        self._origin: dict = {}
        self._limit = 256

    def mark(self, tensor: torch.Tensor, origin: str) -> None:
        ref = self._ref(tensor.untyped_storage())
        with self._lock:
            self._origin[ref] = origin
            if len(self._origin) > self._limit:  # forget the storages that are gone
                self._origin = {r: o for r, o in self._origin.items() if not r.expired()}
                self._limit = max(256, 2 * len(self._origin))

    def origin(self, tensor: torch.Tensor) -> Optional[str]:
        with self._lock:
            return self._origin.get(self._ref(tensor.untyped_storage()))


_rng_origins = _RngOrigins()


def _rng_outputs(rng: Optional[torch.Tensor], device) -> tuple:
    """The (rng_state, unused) outputs: (2,) and () uint64, as PyTorch's meta
    functions shape them; rng_state holds our [seed, offset] with dropout."""
    unused = torch.zeros((), dtype=torch.uint64, device=device)
    if rng is None:
        return torch.zeros(2, dtype=torch.uint64, device=device), unused
    state = rng.view(torch.uint64)
    _rng_origins.mark(state, "ours")
    return state, unused


def _backward_rng(rng_state, dropout_p: float) -> Optional[torch.Tensor]:
    """Our [seed, offset] for a backward with dropout (None without dropout);
    declines when PyTorch's kernel ran the forward."""
    if dropout_p <= 0:
        return None
    origin = None if rng_state is None else _rng_origins.origin(rng_state)
    if origin == "theirs":
        raise _Decline("PyTorch's kernel ran the forward (its dropout mask)")
    if origin != "ours":
        raise RuntimeError(
            "flash_attn_ext: a flash-attention backward with dropout_p > 0 got an rng_state that no forward seen "
            "by this implementation returned (was the implementation activated or restored between the forward "
            "and the backward, or the rng_state copied?); its dropout mask cannot be known, so nothing is computed")
    return rng_state.view(torch.int64).contiguous()


def _run(op, *args, may_decline: bool = True):
    """op(*args), where our build lacking the kernel declines the call."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if any(m in str(exc) for m in _MISSING_KERNEL):
            if may_decline:
                raise _Decline(str(exc)) from None
            raise RuntimeError(f"{exc} (and the forward ran our kernels with dropout, so PyTorch's backward cannot "
                               "reproduce its mask)") from None
        raise


# ---------------------------------------------------------------------------
# Argument conventions.


def _scale(scale, head_dim: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _window(side) -> int:
    return -1 if side is None or side < 0 else int(side)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.size(-1) > 1 and x.stride(-1) != 1 else x


def _check_dtype(query: torch.Tensor) -> None:
    """What the flash-attn-level ops can carry: their logsumexp is float32,
    which cannot hold what the backward needs for float64 inputs; on CUDA our
    kernels take float16 / bfloat16 (as flash-attn's)."""
    if query.dtype == torch.float64:
        raise _Decline("float64 inputs (the op's float32 logsumexp cannot carry the float64 log-sum-exp)")
    if query.device.type == "cuda" and query.dtype not in (torch.float16, torch.bfloat16):
        raise _Decline(f"{query.dtype} inputs on CUDA (our CUDA kernels take float16 and bfloat16)")


def _like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value in reference's memory layout: PyTorch's meta functions give most
    of these ops' results empty_like(input) layouts, and torch.compile
    (inductor) asserts the strides it was told. A copy only where they differ
    (inputs that are transposed (B, S, H, D) tensors, as models make them,
    need none)."""
    if value.shape != reference.shape or value.stride() == reference.stride():
        return value
    return torch.empty_like(reference).copy_(value)


# ---------------------------------------------------------------------------
# flash-attn 2's level: _flash_attention_forward / _backward.


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                   scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                   block_table=None, num_splits=None):
    """(out, softmax_lse, our rng_state or None) of the flash-attn-level forward."""
    if return_debug_mask:
        raise _Decline("return_debug_mask=True (PyTorch's debug attention-mask layout)")
    if num_splits is not None and num_splits > 1:
        raise _Decline(f"num_splits={num_splits} (split-KV); our forward never splits the keys, as num_splits=1 asks")
    _check_dtype(query)
    scale = _scale(scale, query.size(-1))
    window_left, window_right = _window(window_size_left), _window(window_size_right)
    deterministic = torch.are_deterministic_algorithms_enabled()
    dropout_p = float(dropout_p)
    q, k, v = _last_dim_contiguous(query), _last_dim_contiguous(key), _last_dim_contiguous(value)
    if cum_seq_q is None:
        if cum_seq_k is not None or seqused_k is not None or block_table is not None:
            raise _Decline("cum_seq_k, seqused_k or block_table with a dense (4-D) query")
        rng = _ops.draw_rng_state(q.device) if dropout_p > 0 else None
        out, lse, _ = _run(_ops.fwd, q, k, v, None, scale, bool(is_causal), window_left, window_right,
                           deterministic, 0.0, alibi_slopes, None, dropout_p, rng)
        return out, lse, rng
    if block_table is not None:
        from ..varlen import unpage

        if cum_seq_k is None:  # lengths from seqused_k alone: every sequence may use all its pages
            per_seq = block_table.shape[1] * key.shape[1]
            cum_seq_k = torch.arange(block_table.shape[0] + 1, dtype=torch.int32, device=q.device) * per_seq
        k, v, cum_seq_k, seqused_k = unpage(k, v, block_table, cum_seq_k, seqused_k)
    elif cum_seq_k is None:
        raise _Decline("cum_seq_k=None without block_table")
    rng = _ops.draw_rng_state(q.device) if dropout_p > 0 else None
    out, lse, _ = _run(_ops.varlen_fwd, q, k, v, cum_seq_q, cum_seq_k, seqused_k, int(max_q), int(max_k), scale,
                       bool(is_causal), window_left, window_right, deterministic, 0.0, alibi_slopes, None, dropout_p,
                       rng)
    return out, lse, rng


def _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                             return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                             seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None):
    out, lse, rng = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                   return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                                   alibi_slopes, block_table, num_splits)
    rng_state, unused = _rng_outputs(rng, query.device)
    return _like(query, out), lse, rng_state, unused, query.new_empty(0)


def _flash_attention_forward_no_dropout_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                                dropout_p, is_causal, return_debug_mask, *, scale=None,
                                                window_size_left=None, window_size_right=None, seqused_k=None,
                                                alibi_slopes=None, block_table=None, num_splits=None):
    if dropout_p > 0:
        raise _Decline("dropout_p > 0 in the no-dropout op")
    result, lse, _ = _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, 0.0, is_causal,
                                    return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                                    alibi_slopes, block_table, num_splits)
    out.copy_(result)
    return lse


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, rng_state, scale=None, window_size_left=None, window_size_right=None):
    _check_dtype(query)
    dropout_p = float(dropout_p)
    rng = _backward_rng(rng_state, dropout_p)
    may_decline = rng is None  # with our mask, PyTorch's backward would compute another gradient
    scale = _scale(scale, query.size(-1))
    window_left, window_right = _window(window_size_left), _window(window_size_right)
    deterministic = torch.are_deterministic_algorithms_enabled()
    dout, q, k, v, o = (_last_dim_contiguous(t) for t in (grad_out, query, key, value, out))
    lse = logsumexp.float().contiguous()
    no_residual = lse.new_empty(0)  # float16/bfloat16/float32 without a bias: the op keeps none
    if cum_seq_q is None:
        dq, dk, dv, *_ = _run(_ops.bwd, dout, q, k, v, o, lse, no_residual, None, None, scale, bool(is_causal),
                              window_left, window_right, deterministic, False, 0.0, None, dropout_p, rng,
                              may_decline=may_decline)
    else:
        if cum_seq_k is None:
            raise _Decline("cum_seq_k=None in the backward")
        dq, dk, dv, _ = _run(_ops.varlen_bwd, dout, q, k, v, o, lse, no_residual, None, cum_seq_q, cum_seq_k, None,
                             int(max_q), int(max_k), scale, bool(is_causal), window_left, window_right, deterministic,
                             0.0, None, dropout_p, rng, may_decline=may_decline)
    return _like(query, dq), _like(key, dk), _like(value, dv)


def _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                              dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                              window_size_right=None):
    return _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                           dropout_p, is_causal, rng_state, scale, window_size_left, window_size_right)


# ---------------------------------------------------------------------------
# SDPA's FLASH backend on CUDA: (B, H, S, D) tensors, flash-attn 2 underneath.


def _check_sdpa_causal(query, key, is_causal) -> None:
    if is_causal and query.size(-2) != key.size(-2):
        # SDPA never sends this (its FLASH backend refuses non-square causal);
        # PyTorch's kernel then decides what is_causal means.
        raise _Decline("is_causal with seqlen_q != seqlen_k (SDPA's mask is top-left, flash-attn 2's bottom-right)")


def _scaled_dot_product_flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                                        *, scale=None):
    if query.dim() != 4:
        raise _Decline(f"a {query.dim()}-D query")
    _check_sdpa_causal(query, key, is_causal)
    out, lse, rng = _flash_forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), None, None,
                                   query.size(2), key.size(2), dropout_p, is_causal, return_debug_mask, scale)
    rng_state, unused = _rng_outputs(rng, query.device)
    return (_like(query, out.transpose(1, 2)), lse, None, None, query.size(2), key.size(2), rng_state, unused,
            query.new_empty(0))


def _scaled_dot_product_flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                                                 max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *,
                                                 scale=None):
    if query.dim() != 4:
        raise _Decline(f"a {query.dim()}-D query")
    _check_sdpa_causal(query, key, is_causal)
    dq, dk, dv = _flash_backward(grad_out.transpose(1, 2), query.transpose(1, 2), key.transpose(1, 2),
                                 value.transpose(1, 2), out.transpose(1, 2), logsumexp, None, None, max_q, max_k,
                                 dropout_p, is_causal, philox_seed, scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------
# SDPA's FLASH backend on the CPU: its own op, top-left is_causal, a logsumexp
# in the computation dtype (float64 for float64 inputs), no dropout.


def _cpu_checks(query, key, value, dropout_p, attn_mask) -> None:
    if dropout_p > 0:
        raise _Decline("dropout_p > 0 (the CPU op returns no random state for its backward)")
    if attn_mask is not None:
        raise _Decline("attn_mask")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise _Decline("inputs that are not 4-D")


def _top_left(k, v, seqlen_q: int, seqlen_k: int, is_causal: bool):
    """(k, v, causal, window_right) for our bottom-right op computing SDPA's
    top-left causal mask (query i sees keys j <= i), keys in (B, S, H, D):
    Sq <= Sk: only the first Sq keys are ever seen, and on them the two
    alignments coincide; Sq > Sk: a window reaching Sq - Sk keys past the
    bottom-right diagonal."""
    if not is_causal:
        return k, v, False, -1
    if seqlen_q <= seqlen_k:
        return k[:, :seqlen_q], v[:, :seqlen_q], True, -1
    return k, v, False, seqlen_q - seqlen_k


def _scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p=0.0, is_causal=False, *,
                                                attn_mask=None, scale=None):
    _cpu_checks(query, key, value, dropout_p, attn_mask)
    seqlen_q, seqlen_k = query.size(2), key.size(2)
    q = _last_dim_contiguous(query.transpose(1, 2))
    k, v = _last_dim_contiguous(key.transpose(1, 2)), _last_dim_contiguous(value.transpose(1, 2))
    k, v, causal, window_right = _top_left(k, v, seqlen_q, seqlen_k, is_causal)
    out, lse, residual = _run(_ops.fwd, q, k, v, None, _scale(scale, query.size(-1)), causal, -1, window_right,
                              torch.are_deterministic_algorithms_enabled())
    if query.dtype == torch.float64:  # the full log-sum-exp: what fp32 softmax_lse holds plus the residual
        lse = lse.double() + residual.double()
    batch, nheads = query.size(0), query.size(1)
    logsumexp = lse.new_empty((batch, seqlen_q, nheads)).transpose(1, 2)  # the meta function's layout
    logsumexp.copy_(lse)
    return _like(query, out.transpose(1, 2)), logsumexp


def _scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p,
                                                         is_causal, *, attn_mask=None, scale=None):
    _cpu_checks(query, key, value, dropout_p, attn_mask)
    seqlen_q, seqlen_k = query.size(2), key.size(2)
    dout, q, o = (_last_dim_contiguous(t.transpose(1, 2)) for t in (grad_out, query, out))
    k_full, v_full = _last_dim_contiguous(key.transpose(1, 2)), _last_dim_contiguous(value.transpose(1, 2))
    k, v, causal, window_right = _top_left(k_full, v_full, seqlen_q, seqlen_k, is_causal)
    if query.dtype == torch.float64:
        lse = logsumexp.float().contiguous()
        finite = torch.isfinite(logsumexp)
        residual = torch.where(finite, logsumexp - lse.double(), 0.0).float().contiguous()
    else:
        lse, residual = logsumexp.float().contiguous(), logsumexp.new_empty(0, dtype=torch.float32)
    dq, dk, dv, *_ = _run(_ops.bwd, dout, q, k, v, o, lse, residual, None, None, _scale(scale, query.size(-1)),
                          causal, -1, window_right, torch.are_deterministic_algorithms_enabled(), False)
    if k.size(1) != seqlen_k:  # keys past Sq - 1 take no part: zero gradient
        dk = torch.cat([dk, dk.new_zeros(dk.size(0), seqlen_k - k.size(1), *dk.shape[2:])], dim=1)
        dv = torch.cat([dv, dv.new_zeros(dv.size(0), seqlen_k - v.size(1), *dv.shape[2:])], dim=1)
    # The meta function's layout: (B, S, H, D) in memory, which bwd's results are.
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------
# Activation: one Library holding every kernel, dropped by remove().

# op name -> (our implementation, index of the rng_state among its results or
# None, dispatch keys). Ops a torch lacks (the in-place variant before 2.13)
# are skipped.
_KERNELS = {
    "_flash_attention_forward": (_flash_attention_forward, 2, ("CPU", "CUDA")),
    "_flash_attention_forward_no_dropout_inplace": (_flash_attention_forward_no_dropout_inplace, None,
                                                    ("CPU", "CUDA")),
    "_flash_attention_backward": (_flash_attention_backward, None, ("CPU", "CUDA")),
    "_scaled_dot_product_flash_attention": (_scaled_dot_product_flash_attention, 6, ("CPU", "CUDA")),
    "_scaled_dot_product_flash_attention_backward": (_scaled_dot_product_flash_attention_backward, None,
                                                     ("CPU", "CUDA")),
    "_scaled_dot_product_flash_attention_for_cpu": (_scaled_dot_product_flash_attention_for_cpu, None, ("CPU",)),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        _scaled_dot_product_flash_attention_for_cpu_backward, None, ("CPU",)),
}


def _dispatch_keys():
    keys = ["CPU"]
    if torch.backends.cuda.is_built() and _ops.HAS_CUDA_KERNELS:
        keys.append("CUDA")
    return keys


def _pytorch_kernel(name: str, key: str):
    """PyTorch's kernel for aten::name at `key`, or None where it has none."""
    try:
        return torch.library.get_kernel(f"aten::{name}", key)
    except RuntimeError:
        return None


def _make_kernel(name: str, key: str, impl, rng_index, fallback):
    def kernel(keyset, *args, **kwargs):
        try:
            result = impl(*args, **kwargs)
        except _Decline as why:
            counts[f"{name}:declined"] += 1
            if fallback is None:
                raise NotImplementedError(
                    f"flash_attn_ext (activated as PyTorch's flash-attention implementation) cannot run aten::{name} "
                    f"on {key} for this call: {why}; PyTorch has no {key} kernel for it to fall back to") from None
            result = fallback.call_boxed(keyset, *args, **kwargs)
            if rng_index is not None and isinstance(result[rng_index], torch.Tensor):
                _rng_origins.mark(result[rng_index], "theirs")
            return result
        counts[name] += 1
        return result

    kernel.__name__ = f"flash_attn_ext_{name}_{key}"
    return kernel


class _Handle:
    """The registry's register_fn: registers the kernels; remove() drops them,
    which gives PyTorch's kernels back."""

    def __init__(self) -> None:
        self.library: Optional[torch.library.Library] = torch.library.Library("aten", "IMPL")
        for name, (impl, rng_index, keys) in _KERNELS.items():
            if not hasattr(torch.ops.aten, name):
                continue
            for key in _dispatch_keys():
                if key in keys:
                    fallback = _pytorch_kernel(name, key)  # captured before ours replaces it
                    self.library.impl(name, _make_kernel(name, key, impl, rng_index, fallback), key,
                                      with_keyset=True)

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None
