"""flash-attn's low-level functions, for libraries built on them.

Ring-attention libraries (ring-flash-attention and others) do not call
flash_attn_func: they import `_flash_attn_forward` / `_flash_attn_backward`
(and the varlen pair, on the varlen ops) from `flash_attn.flash_attn_interface`, merge the lse
they return themselves, and hand the merged lse back to the backward. This
module has those four functions with flash-attn 2.8's exact signatures and
return values, backed by the `flash_attn_ext::fwd` / `bwd` ops, and
`install_as_flash_attn()`, which makes `import flash_attn` find this package
where flash-attn itself is not installed, so such libraries run unchanged
(with `flash_attn.bert_padding`, flash_attn_ext.bert_padding; flash-attn's
other submodules, such as flash_attn.layers.rotary, are not provided).

Dropout follows flash-attn 2.8's convention: the forward returns
rng_state, int64 (2,) = [seed, offset] on q's device (drawn from torch's
generator; two zeros without dropout), and the backward takes it back to
regenerate the same keep-mask. S_dmask (return_softmax=True, which needs
dropout_p > 0 as in flash-attn) is the probabilities (batch, nheads,
seqlen_q, seqlen_k), negative where dropped; an empty tensor otherwise
(the varlen forward's is (batch, nheads, max_seqlen_q, max_seqlen_k), as
flash_attn_varlen_func's). leftpad_k
(left-padded keys) goes through a gather of k and v. softcap, alibi_slopes
and dropout_p go to the kernels.

lse: flash-attn's softmax_lse is fp32, and these functions neither return
nor take the op's lse_residual. For fp16/bf16/fp32 inputs the op has none;
for fp64 inputs (CPU) the backward recomputes the probabilities from the
fp32 lse it is given, so its gradients are accurate to about 1e-7 relative,
not to fp64 (flash_attn_func and flash_attn_ext.distributed keep the
residual and are exact).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional, Tuple

import torch

from . import _ops
from .interface import dropout_probs, dropout_value, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .kvcache import flash_attn_with_kvcache
from .varlen import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    _varlen_dropout_probs,
    unpad_left,
    unpage,
)

__all__ = [
    "_flash_attn_forward",
    "_flash_attn_backward",
    "_flash_attn_varlen_forward",
    "_flash_attn_varlen_backward",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "install_as_flash_attn",
]

# The flash-attn release whose signatures these are.
FLASH_ATTN_VERSION = "2.8.3"


def _maybe_contiguous(x):
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _round_multiple(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _reject(dropout_p, return_softmax=False) -> float:
    """Checks the arguments; returns dropout_p as a float."""
    dropout_p = dropout_value(dropout_p)
    if return_softmax and dropout_p == 0.0:
        # flash-attn itself only allows it with dropout.
        raise NotImplementedError("flash_attn_ext: return_softmax=True is not supported (it needs dropout_p > 0)")
    return dropout_p


def _rng_state_for(dropout_p: float, device) -> torch.Tensor:
    """flash-attn's rng_state of a forward: [seed, offset] drawn for dropout, else two zeros."""
    if dropout_p > 0:
        return _ops.draw_rng_state(device)
    return torch.zeros((2,), dtype=torch.int64, device=device)


def _backward_rng_state(dropout_p: float, rng_state: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if dropout_p == 0.0:
        return None
    if rng_state is None:
        raise ValueError("flash_attn_ext: a backward with dropout_p > 0 needs the rng_state its forward returned")
    return rng_state.to(torch.int64).contiguous()


def _residual_for(q: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The lse_residual argument of the bwd op when only the fp32 lse is known:
    zeros where the op wants one (fp64), else the empty tensor."""
    if q.dtype == torch.float64:
        return torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)
    return lse.new_empty((0,), dtype=torch.float32)


def _write(dst: Optional[torch.Tensor], src: torch.Tensor) -> torch.Tensor:
    return src if dst is None else dst.copy_(src)


def _flash_attn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn 2.8's forward: (out, softmax_lse, S_dmask, rng_state) for q
    (batch, seqlen_q, nheads, headdim), k, v (batch, seqlen_k, nheads_k,
    headdim); softmax_lse (batch, nheads, seqlen_q) fp32, +inf for rows that
    see no key. No autograd: libraries wrap it in their own."""
    dropout_p = _reject(dropout_p, return_softmax)
    q, k, v = [_maybe_contiguous(x) for x in (q, k, v)]
    rng_state = _rng_state_for(dropout_p, q.device)
    with torch.no_grad():
        out, softmax_lse, _ = _ops.fwd(q, k, v, None, float(softmax_scale), bool(causal), int(window_size_left),
                                       int(window_size_right), False, float(softcap), alibi_slopes, None, dropout_p,
                                       rng_state if dropout_p > 0 else None)
    s_dmask = q.new_empty((0,))
    if return_softmax:
        s_dmask = dropout_probs(q, k, v, float(softmax_scale), bool(causal),
                                (int(window_size_left), int(window_size_right)), float(softcap), alibi_slopes, None,
                                dropout_p, rng_state)
    return out, softmax_lse, s_dmask, rng_state


def _flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """flash-attn 2.8's backward: writes the gradients into dq, dk, dv (any of
    them may be None, then that gradient is dropped, as in flash-attn) and
    returns softmax_d = rowsum(dout * out), (batch, nheads, seqlen_q rounded up
    to a multiple of 128) fp32, zero past seqlen_q. softmax_lse may be another
    call's (ring attention passes the merged lse with the merged out)."""
    dropout_p = _reject(dropout_p)
    rng_state = _backward_rng_state(dropout_p, rng_state)
    dout, q, k, v, out = [_maybe_contiguous(x) for x in (dout, q, k, v, out)]
    lse = softmax_lse.float().contiguous()
    with torch.no_grad():
        gq, gk, gv, _, d = _ops.bwd(dout, q, k, v, out, lse, _residual_for(q, lse), None, None,
                                    float(softmax_scale), bool(causal), int(window_size_left), int(window_size_right),
                                    bool(deterministic) or torch.are_deterministic_algorithms_enabled(), False,
                                    float(softcap), alibi_slopes, dropout_p, rng_state, True)
        _write(dq, gq), _write(dk, gk), _write(dv, gv)
        batch, seqlen_q, nheads, _ = q.shape
        softmax_d = torch.zeros((batch, nheads, _round_multiple(seqlen_q, 128)), dtype=torch.float32, device=q.device)
        softmax_d[:, :, :seqlen_q] = d  # the kernels' own D (return_softmax_d)
    return softmax_d


def _flash_attn_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn 2.8's varlen forward: q (total_q, nheads, headdim), k, v
    (total_k, nheads_k, headdim), sequence i at rows cu_seqlens[i] to
    cu_seqlens[i + 1]; returns (out, softmax_lse (nheads, total_q) fp32,
    S_dmask, rng_state). block_table: paged k/v (flash_attn_ext.varlen.unpage);
    seqused_k: keys used per sequence; leftpad_k: where each sequence's keys
    start within its rows (flash_attn_ext.varlen.unpad_left; not with
    block_table, as in flash-attn). zero_tensors has nothing to do (every
    output row is written: rows outside every sequence get 0 and lse +inf).
    One rng_state serves the whole batch (the kernels' dropout counter holds
    the sequence index)."""
    dropout_p = _reject(dropout_p, return_softmax)
    q, k, v = [_maybe_contiguous(x) for x in (q, k, v)]
    if block_table is not None and leftpad_k is not None:
        # As in flash-attn 2.8, which refuses the pair.
        raise NotImplementedError("flash_attn_ext: leftpad_k together with block_table (paged KV) is not supported")
    if block_table is not None:
        k, v, cu_seqlens_k, seqused_k = unpage(k, v, block_table, cu_seqlens_k, seqused_k)
    if leftpad_k is not None:
        k, v, cu_seqlens_k, seqused_k = unpad_left(k, v, cu_seqlens_k, leftpad_k, seqused_k)
    rng_state = _rng_state_for(dropout_p, q.device)
    with torch.no_grad():
        out, softmax_lse, _ = _ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, int(max_seqlen_q),
                                              int(max_seqlen_k), float(softmax_scale), bool(causal),
                                              int(window_size_left), int(window_size_right), False, float(softcap),
                                              alibi_slopes, None, dropout_p, rng_state if dropout_p > 0 else None)
    s_dmask = q.new_empty((0,))
    if return_softmax:
        s_dmask = _varlen_dropout_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, int(max_seqlen_q),
                                        int(max_seqlen_k), float(softmax_scale), bool(causal),
                                        (int(window_size_left), int(window_size_right)), float(softcap),
                                        alibi_slopes, None, dropout_p, rng_state)
    return out, softmax_lse, s_dmask, rng_state


def _flash_attn_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    """flash-attn 2.8's varlen backward: writes into dq, dk, dv and returns
    softmax_d (nheads, total_q + 128 * batch) fp32, zero past total_q (the
    shape flash-attn allocates)."""
    dropout_p = _reject(dropout_p)
    rng_state = _backward_rng_state(dropout_p, rng_state)
    dout, q, k, v, out = [_maybe_contiguous(x) for x in (dout, q, k, v, out)]
    lse = softmax_lse.float().contiguous()
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    with torch.no_grad():
        gq, gk, gv, d = _ops.varlen_bwd(dout, q, k, v, out, lse, _residual_for(q, lse), None, cu_seqlens_q,
                                        cu_seqlens_k, None, int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale),
                                        bool(causal), int(window_size_left), int(window_size_right), deterministic,
                                        float(softcap), alibi_slopes, dropout_p, rng_state, True)
        _write(dq, gq), _write(dk, gk), _write(dv, gv)
        batch = cu_seqlens_q.shape[0] - 1
        softmax_d = torch.zeros((q.shape[1], q.shape[0] + 128 * batch), dtype=torch.float32, device=q.device)
        softmax_d[:, :q.shape[0]] = d
    return softmax_d


def install_as_flash_attn(force: bool = False) -> types.ModuleType:
    """Makes `import flash_attn` and `from flash_attn.flash_attn_interface
    import ...` find flash_attn_ext (this module, flash_attn_func and the
    packed variants, flash_attn_with_kvcache, __version__ = FLASH_ATTN_VERSION), for libraries written
    against flash-attn, and `flash_attn.bert_padding` (flash_attn_ext.bert_padding: unpad_input,
    pad_input, index_first_axis, ...). Other flash-attn submodules (flash_attn.layers, .ops,
    .modules, ...) are absent: importing them raises ModuleNotFoundError. The modules carry
    import specs, so importlib.util.find_spec("flash_attn") (transformers' availability checks)
    answers instead of raising. Refuses (RuntimeError) where a real flash_attn is
    installed or imported, unless force=True. Returns the `flash_attn` module."""
    existing = sys.modules.get("flash_attn")
    if existing is not None and getattr(existing, "__flash_attn_ext__", False):
        return existing
    if not force and (existing is not None or importlib.util.find_spec("flash_attn") is not None):
        raise RuntimeError(
            "flash_attn_ext: a flash_attn package is installed; install_as_flash_attn() would hide it "
            "(pass force=True to do so anyway)")
    package = types.ModuleType("flash_attn", "flash_attn_ext standing in for flash-attn (install_as_flash_attn)")
    package.__version__ = FLASH_ATTN_VERSION
    package.__flash_attn_ext__ = True
    package.__path__ = []  # a package, so that its submodule imports resolve through sys.modules
    # A module without __spec__ in sys.modules makes importlib.util.find_spec raise ValueError.
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.flash_attn_interface = sys.modules[__name__]
    from . import bert_padding

    package.bert_padding = bert_padding
    for name in ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
                 "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"):
        setattr(package, name, globals()[name])
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = sys.modules[__name__]
    sys.modules["flash_attn.bert_padding"] = bert_padding
    return package
