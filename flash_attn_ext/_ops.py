"""Python side of the two custom ops defined in csrc/ops.cpp.

Loading `flash_attn_ext._C` registers the schemas and the CPU kernels, and
`flash_attn_ext._C_cuda` (present in CUDA builds, loaded under a CUDA build of
torch only) the CUDA kernels; this module adds what torch.compile and autograd need: fake (meta)
implementations that compute output shapes without running anything, and the
backward formula of `fwd`, which calls the `bwd` op. At the end: what
torch.func transforms need (`call_fwd`, `call_varlen_fwd`, `call_fwd_kvcache`,
vmap rules), and bwd's / varlen_bwd's autograd kernels, which make double
backward raise instead of returning zeros.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch._functorch.utils import enable_single_level_autograd_function as _enable_single_level_autograd_function



def missing_cpu_features(required, cpuinfo: str | None = None):
    """The features among `required` (/proc/cpuinfo names) this CPU lacks; [] where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: nothing to compare against
            return []
    present = set(cpuinfo.split())
    return [name for name in required if name not in present]


def check_cpu_features(required=None, cpuinfo: str | None = None) -> None:
    """Refuses, with a message, to load CPU kernels built for instructions this CPU lacks.

    setup.py records what the kernels were compiled for (AVX2 + FMA in a
    wheel, the build machine's own in a source build) in _build_config.py;
    on a CPU without it they would die of an illegal instruction, not raise."""
    if required is None:
        try:
            from ._build_config import CPU_FEATURES as required
        except ImportError:  # a build from before the record existed
            return
    missing = missing_cpu_features(required, cpuinfo)
    if missing:
        raise ImportError(
            f"flash_attn_ext was built for CPUs with {', '.join(required)}, and this CPU lacks "
            f"{', '.join(missing)}; rebuild it from source on this machine (pip install --no-build-isolation .), "
            'or with FLASH_ATTN_EXT_CPU_FLAGS="" for any x86-64'
        )


check_cpu_features()

from . import _C  # noqa: F401, E402  (loads the library: schemas and CPU kernels)


def _load_cuda_kernels() -> bool:
    """Imports flash_attn_ext._C_cuda where it was built and torch can run CUDA.

    The CUDA library links libtorch_cuda and the CUDA runtime, which a
    CPU-only torch does not have: there it is left alone (the ops then say
    they have no CUDA kernel, as with a CPU-only build). Under a CUDA torch a
    library that fails to load is an error, not a silent CPU-only package."""
    import importlib.util

    if torch.version.cuda is None or importlib.util.find_spec(f"{__package__}._C_cuda") is None:
        return False
    from . import _C_cuda  # noqa: F401

    return True


HAS_CUDA_KERNELS = _load_cuda_kernels()

DEBUG_CHECKS_ENV = "FLASH_ATTN_EXT_DEBUG_CHECKS"


def debug_checks_enabled() -> bool:
    """Whether FLASH_ATTN_EXT_DEBUG_CHECKS asks for the value checks that cost
    a device synchronisation (cumulative lengths, cache lengths, block ids):
    any value but unset, "", "0", "false", "no" or "off"."""
    import os

    return os.environ.get(DEBUG_CHECKS_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def is_tracing() -> bool:
    """torch.compile tracing or a CUDA graph capture: no value may be read
    back to the host then (the debug checks are skipped)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

fwd = torch.ops.flash_attn_ext.fwd.default
bwd = torch.ops.flash_attn_ext.bwd.default


def check_same_device(where, tensors):
    """Raises unless every tensor among `tensors` (a name -> value mapping; other
    values are ignored) is on one device, naming each tensor and its device.

    The fake kernels call it first: a meta tensor among real ones sends the
    op to them (Meta outranks the other dispatch keys), and they would
    otherwise return uninitialised memory shaped like the result."""
    named = [(name, t) for name, t in tensors.items() if isinstance(t, torch.Tensor)]
    if len({t.device for _, t in named}) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in named)
        raise RuntimeError(f"{where}: all tensors must be on the same device, got {listing}")


@torch.library.register_fake("flash_attn_ext::fwd")
def _fwd_fake(q, k, v, attn_bias, softmax_scale, causal, window_left, window_right, deterministic, softcap=0.0,
              alibi_slopes=None, sinks=None, dropout_p=0.0, rng_state=None):
    check_same_device("flash_attn_ext::fwd", locals())
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty((batch, seqlen_q, nheads, v.shape[-1]))  # v's head dim
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    # Same rule as needs_lse_residual in csrc/checks.h: only with a bias or fp64 inputs.
    residual_shape = (batch, nheads, seqlen_q) if attn_bias is not None or q.dtype == torch.float64 else (0,)
    lse_residual = q.new_empty(residual_shape, dtype=torch.float32)
    return out, softmax_lse, lse_residual


@torch.library.register_fake("flash_attn_ext::bwd")
def _bwd_fake(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, softmax_scale, causal,
              window_left, window_right, deterministic, bias_requires_grad, softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, rng_state=None, return_softmax_d=False):
    check_same_device("flash_attn_ext::bwd", locals())
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if bias_requires_grad:
        batch, seqlen_q, nheads, _ = q.shape
        dbias = q.new_empty((batch, nheads, seqlen_q, k.shape[1]))
    else:
        dbias = q.new_empty((0,))
    return dq, dk, dv, dbias, _softmax_d_fake(q, softmax_lse, return_softmax_d)


def _softmax_d_fake(q, softmax_lse, return_softmax_d):
    # bwd's D: like softmax_lse, in the kernels' accumulator type (fp64 for fp64 inputs).
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return softmax_lse.new_empty(softmax_lse.shape if return_softmax_d else (0,), dtype=dtype)


@torch.library.register_fake("flash_attn_ext::dropout_mask")
def _dropout_mask_fake(rng_state, batch, nheads, seqlen_q, seqlen_k, dropout_p):
    return rng_state.new_empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.bool)


# The schema's defaults of fwd's trailing arguments: softcap, alibi_slopes,
# sinks, dropout_p, rng_state.
_FWD_DEFAULTS = (0.0, None, None, 0.0, None)


def draw_rng_state(device) -> torch.Tensor:
    """[seed, offset] for a call with dropout (csrc/dropout.h): two int64
    drawn with torch's generator of `device`, on that device, so that
    torch.manual_seed reproduces a run and CUDA graph capture records the
    draw (the kernels read the pair from device memory at run time)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def dropout_mask(rng_state, batch, nheads, seqlen_q, seqlen_k, dropout_p) -> torch.Tensor:
    """The keep-mask (True = kept), bool (batch, nheads, seqlen_q, seqlen_k)
    on rng_state's device, that fwd and bwd apply for this rng_state and
    dropout_p: the same Philox function as the kernels', computed on the CPU
    (for small problems: tests and return_attn_probs)."""
    mask = torch.ops.flash_attn_ext.dropout_mask(rng_state.detach().cpu().contiguous(), batch, nheads, seqlen_q,
                                                 seqlen_k, float(dropout_p))
    return mask.to(rng_state.device)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, softmax_scale, causal, window_left, window_right, deterministic = inputs[:9]
    softcap, alibi_slopes, sinks, dropout_p, rng_state = tuple(inputs[9:]) + _FWD_DEFAULTS[len(inputs) - 9:]
    out, softmax_lse, lse_residual = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, lse_residual, attn_bias, alibi_slopes, sinks, rng_state)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.window = (window_left, window_right)
    ctx.deterministic = deterministic
    ctx.softcap = softcap
    ctx.dropout_p = dropout_p
    ctx.num_inputs = len(inputs)


_LOG2E = 1.4426950408889634


def sink_probabilities(sinks, softmax_lse, lse_residual):
    """exp(sink_h - lse_i), (batch, nheads, seqlen_q), as the forward's softmax
    gave the sink of head h in row i: in fp64 on CUDA and where fwd kept an
    lse_residual (the part of the log-sum-exp fp32 softmax_lse cannot hold,
    csrc/flash_params.h; in fp32 the sum would round back to softmax_lse),
    else in softmax_lse's dtype. The CPU's residual is a natural log. CUDA's
    softmax runs in the log2 domain: its residual completes lse * log2(e)
    rounded to fp32 (cuda/softmax.cuh, lse_log2), and it took the sink as
    sink * log2(e) rounded to fp32 (sink_log2), so the probability is formed
    there from the same two roundings: against the exact natural-log sink, a
    sink of -2**30 would be off by up to 64 log2 units."""
    sinks = sinks.detach()
    if softmax_lse.device.type == "cuda":
        lse_log2 = (softmax_lse * _LOG2E).double()  # fp32 products, as __fmul_rn; their difference exact in fp64
        if lse_residual.numel():
            lse_log2 = lse_log2 + lse_residual.double()
        sink_log2 = (sinks.float() * _LOG2E).double()
        return torch.exp2(sink_log2[None, :, None] - lse_log2)
    if not lse_residual.numel():
        dtype = torch.promote_types(softmax_lse.dtype, sinks.dtype)
        return torch.exp(sinks.to(dtype)[None, :, None] - softmax_lse.to(dtype))
    lse = softmax_lse.double() + lse_residual.double()
    return torch.exp(sinks.double()[None, :, None] - lse)


def sinks_grad(sinks, softmax_d, softmax_lse, lse_residual):
    """d loss / d sinks, (nheads,), from bwd's softmax_d (return_softmax_d=True):
    the sink of head h has probability P_i = exp(sink_h - lse_i) in row i and
    no value, so it enters the output only through lse: d out_i / d sink_h =
    -P_i out_i, and d loss / d sink_h = -sum_{b, i} P_i D_i with
    D_i = rowsum(dout_i * out_i) - dlse_i, the backward kernels' own D (fp32,
    fp64 for fp64 inputs). softmax_d, softmax_lse, lse_residual: (batch,
    nheads, seqlen_q), lse_residual possibly empty. lse-sized work only. A row
    with lse = +inf (no key, no sink) adds 0."""
    p_sink = sink_probabilities(sinks, softmax_lse, lse_residual)
    dtype = torch.promote_types(p_sink.dtype, softmax_d.dtype)
    return (-(p_sink.to(dtype) * softmax_d.to(dtype)).sum(dim=(0, 2))).to(sinks.dtype)


def _backward(ctx, dout, dsoftmax_lse, _dlse_residual):
    # lse_residual is an internal output (the part of the log-sum-exp fp32
    # softmax_lse cannot hold, csrc/flash_params.h); no entry point exposes
    # it, and its gradient is not used.
    q, k, v, out, softmax_lse, lse_residual, attn_bias, alibi_slopes, sinks, rng_state = ctx.saved_tensors
    # Autograd may hand in an expanded gradient (e.g. from out.sum()): the
    # kernels need a contiguous last dimension.
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    bias_requires_grad = attn_bias is not None and ctx.needs_input_grad[3]
    sinks_requires_grad = sinks is not None and ctx.needs_input_grad[11]
    if dsoftmax_lse is not None:
        dsoftmax_lse = dsoftmax_lse.float().contiguous()
    dq, dk, dv, dbias, softmax_d = bwd(
        dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, attn_bias, ctx.softmax_scale, ctx.causal,
        ctx.window[0], ctx.window[1], ctx.deterministic, bias_requires_grad, ctx.softcap, alibi_slopes,
        ctx.dropout_p, rng_state, sinks_requires_grad,
    )
    dsinks = sinks_grad(sinks, softmax_d, softmax_lse, lse_residual) if sinks_requires_grad else None
    grads = (dq, dk, dv, (dbias if bias_requires_grad else None), None, None, None, None, None, None, None, dsinks,
             None, None)
    return grads[: ctx.num_inputs]


torch.library.register_autograd("flash_attn_ext::fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# torch.func transforms and double backward.
#
# torch.library.register_autograd wraps the formula above in an
# autograd.Function whose forward takes ctx (the legacy form), and
# Function.apply rejects that form while a torch.func transform is active
# ("it must override the setup_context staticmethod", pytorch/pytorch#170834).
# The entry points therefore call `call_fwd`, which under a transform applies
# the same formula through a Function written in the form torch.func takes
# (_transformable).
# Eager calls that record a graph take that Function too: the Autograd
# kernel register_autograd installs calls torch.library's fill_defaults on
# every call, which rebuilds the schema's argument list once per argument,
# and a Function with setup_context binds an inspect.signature a call. On
# the project's 2-core CPU machine (torch 2.13, one thread, tiny inputs), a
# flash_attn_func call that records a graph took 316 us through the op's
# registered Autograd kernel and takes 137 us through EagerFunction (87 us
# without a gradient); flash_attn_varlen_func 530 -> 362 us. Traced
# calls (torch.compile, torch.export, a dispatch mode such as a FakeTensor
# or proxy mode) and calls without a gradient take the op directly, so the
# graphs see exactly the op and its registered formula.

_FORWARD_MODE_ERROR = (
    "flash_attn_ext: forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) is not "
    "supported; use reverse mode (backward, torch.func.grad, vjp, jacrev)"
)


def _transformable(op, setup_context, backward, name):
    """`op` with its autograd formula (setup_context, backward) as a
    torch.autograd.Function in the form torch.func transforms accept (grad,
    vjp, jacrev, vmap and their compositions; a forward-mode tangent
    raises: torch.func.jvp would otherwise return zeros), and the caller the
    entry points use: that Function under a transform, the op itself
    otherwise."""

    class Function(torch.autograd.Function):
        # vmap: forward and backward only call the ops, which vmap batches.
        generate_vmap_rule = True

        @staticmethod
        def forward(*inputs):
            return op(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        @staticmethod
        def jvp(ctx, *tangents):
            raise NotImplementedError(_FORWARD_MODE_ERROR)

    Function.__name__ = Function.__qualname__ = name

    # The same formula in the form register_autograd's wrapper has (forward
    # takes ctx and calls setup_context), which Function.apply runs without
    # binding a signature (the form above costs an inspect.signature a call)
    # and without fill_defaults. Made with type() so that its graph node is
    # named after it (<name>EagerBackward).
    def eager_forward(ctx, *inputs):
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    EagerFunction = type(name + "Eager", (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward),
        "backward": staticmethod(backward),
    })

    def call(*args):
        # Under torch.autograd.forward_ad's dual level too: the op itself,
        # whose registered formula has no forward mode, returned its outputs
        # without a tangent (a silent wrong answer); the Function raises.
        if torch._C._are_functorch_transforms_active() or getattr(forward_ad, "_current_level", -1) >= 0:
            return Function.apply(*args)
        if (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
                and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None):
            return EagerFunction.apply(*args)  # eager, recording: the same formula, without fill_defaults
        return op(*args)

    return call


# torch.ops.flash_attn_ext.fwd(*args), usable under torch.func transforms:
# what the entry points call.
call_fwd = _transformable(fwd, _setup_context, _backward, "_FwdFunction")


class _BwdOnceDifferentiable(torch.autograd.function._SingleLevelFunction):
    """The node autograd records for the bwd op when a backward builds a graph
    (create_graph=True, or any torch.func.grad): the gradients it returns are
    usable as values, and only differentiating them again raises, as with
    torch.autograd.function.once_differentiable.

    Applied from inside bwd's Autograd kernel, where torch.func transforms
    have already been dispatched: a plain autograd.Function would dispatch
    them again and fail, a single-level one records at the current level (as
    PyTorch's own autograd kernels do; pytorch/pytorch#184974 does the same
    for register_autograd)."""

    @staticmethod
    def forward(ctx, keyset, *args):
        # apply() turned grad mode off; a torch.func level below this one
        # (grad of grad) must still record, so it is restored (it was on).
        with torch.enable_grad(), torch._C._AutoDispatchBelowAutograd():
            return bwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "flash_attn_ext: double backward (differentiating a gradient of the attention, e.g. for a gradient "
            "penalty, Hessian-vector products, or torch.func.grad of torch.func.grad) is not supported: the "
            "attention backward is not itself differentiable"
        )

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_FORWARD_MODE_ERROR)


def _bwd_autograd(keyset, *args):
    # The Autograd kernel of bwd. Inside fwd's backward grad mode is off unless
    # the backward builds a graph; only then is there a node to record.
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        with _enable_single_level_autograd_function():
            return _BwdOnceDifferentiable.apply(keyset, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return bwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_autograd_lib = torch.library.Library("flash_attn_ext", "IMPL")  # kept alive: dropping it unregisters
_autograd_lib.impl("bwd", _bwd_autograd, "Autograd", with_keyset=True)


# Arguments that are not per batch element: fwd's alibi_slopes ((nheads,)
# or (batch, nheads)) and sinks ((nheads,)), bwd's alibi_slopes, and both
# ops' rng_state ((2,): one draw for the call; the folded call then draws
# its dropout from it as for a call of n * batch elements).
_PER_HEAD_ARGS = {"fwd": {10: "alibi_slopes", 11: "sinks", 13: "rng_state"},
                  "bwd": {16: "alibi_slopes", 18: "rng_state"}}


def _vmap_by_folding(op, name):
    """A vmap rule for `op` (fwd or bwd): every tensor argument and result has
    the batch as dim 0, so the vmapped dimension is folded into it and the op
    runs once, instead of once per element (PyTorch's fallback). Per-head
    arguments fold too where they can (ALiBi slopes become (n * batch,
    nheads)); sinks that differ per vmapped element cannot, and then the op
    runs once per element."""
    per_head = _PER_HEAD_ARGS[name]

    def run_per_element(info, in_dims, args):
        outs = []
        for i in range(info.batch_size):
            outs.append(op(*[x.select(d, i) if isinstance(x, torch.Tensor) and d is not None else x
                             for x, d in zip(args, in_dims)]))
        return tuple(torch.stack(rs) for rs in zip(*outs)), (0,) * len(outs[0])

    def rule(info, in_dims, *args):
        if any(per_head.get(i) in ("sinks", "rng_state") and d is not None for i, d in enumerate(in_dims)):
            return run_per_element(info, in_dims, args)
        n = info.batch_size
        # The batch size: dim 0 of the first batched argument, as the op sees it.
        batch = next(x.shape[1 if d == 0 else 0] for i, (x, d) in enumerate(zip(args, in_dims))
                     if isinstance(x, torch.Tensor) and i not in per_head)
        folded = []
        for i, (x, d) in enumerate(zip(args, in_dims)):
            if isinstance(x, torch.Tensor) and per_head.get(i) == "alibi_slopes":
                if d is not None or x.dim() == 2:  # per (element, batch, head): fold like the others
                    x = x.movedim(d, 0) if d is not None else x.expand(n, *x.shape)
                    x = x[:, None, :].expand(n, batch, x.shape[-1]) if x.dim() == 2 else x
                    x = x.reshape(n * batch, x.shape[-1]).contiguous()
            elif isinstance(x, torch.Tensor) and i not in per_head:
                x = x.movedim(d, 0) if d is not None else x.expand(n, *x.shape)
                x = x.reshape(n * x.shape[1], *x.shape[2:])
                if x.dim() == 3:  # softmax_lse and its companions: contiguous
                    x = x.contiguous()
                elif x.size(-1) > 1 and x.stride(-1) != 1:  # q, k, v, out, dout, bias: unit last stride
                    x = x.contiguous()
            folded.append(x)
        results, out_dims = [], []
        for r in op(*folded):
            if r.dim() >= 1 and r.shape[0] == n * batch:
                results.append(r.unflatten(0, (n, batch)))
                out_dims.append(0)
            else:  # bwd's empty dbias placeholder: the same for every element
                results.append(r)
                out_dims.append(None)
        return tuple(results), tuple(out_dims)

    return rule


torch.library.register_vmap("flash_attn_ext::fwd", _vmap_by_folding(fwd, "fwd"))
torch.library.register_vmap("flash_attn_ext::bwd", _vmap_by_folding(bwd, "bwd"))


# ---------------------------------------------------------------------------
# Variable-length batches: varlen_fwd / varlen_bwd (csrc/ops.cpp), the ops
# behind flash_attn_ext.varlen. Shapes: q (total_q, nheads, d), k and v
# (total_k, nheads_k, d), softmax_lse (nheads, total_q).

varlen_fwd = torch.ops.flash_attn_ext.varlen_fwd.default
varlen_bwd = torch.ops.flash_attn_ext.varlen_bwd.default


@torch.library.register_fake("flash_attn_ext::varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, window_left, window_right, deterministic, softcap=0.0, alibi_slopes=None, sinks=None,
                     dropout_p=0.0, rng_state=None):
    check_same_device("flash_attn_ext::varlen_fwd", locals())
    total_q, nheads, _ = q.shape
    out = q.new_empty((total_q, nheads, v.shape[-1]))  # v's head dim
    softmax_lse = q.new_empty((nheads, total_q), dtype=torch.float32)
    lse_residual = q.new_empty((nheads, total_q) if q.dtype == torch.float64 else (0,), dtype=torch.float32)
    return out, softmax_lse, lse_residual


@torch.library.register_fake("flash_attn_ext::varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, cu_seqlens_q, cu_seqlens_k,
                     seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
                     deterministic, softcap=0.0, alibi_slopes=None, dropout_p=0.0, rng_state=None,
                     return_softmax_d=False):
    check_same_device("flash_attn_ext::varlen_bwd", locals())
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            _softmax_d_fake(q, softmax_lse, return_softmax_d))


_VARLEN_FWD_DEFAULTS = (0.0, None, None, 0.0, None)  # softcap, alibi_slopes, sinks, dropout_p, rng_state
_VARLEN_FIXED = 13  # varlen_fwd's arguments before the score features


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
     window_left, window_right, deterministic) = inputs[:_VARLEN_FIXED]
    softcap, alibi_slopes, sinks, dropout_p, rng_state = (tuple(inputs[_VARLEN_FIXED:]) +
                                                          _VARLEN_FWD_DEFAULTS[len(inputs) - _VARLEN_FIXED:])
    out, softmax_lse, lse_residual = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, lse_residual, cu_seqlens_q, cu_seqlens_k, seqused_k,
                          alibi_slopes, sinks, rng_state)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, deterministic, softcap,
                dropout_p)
    ctx.num_inputs = len(inputs)


def _varlen_backward(ctx, dout, dsoftmax_lse, _dlse_residual):
    (q, k, v, out, softmax_lse, lse_residual, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks,
     rng_state) = ctx.saved_tensors
    (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, deterministic, softcap,
     dropout_p) = ctx.args
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    sinks_requires_grad = sinks is not None and ctx.needs_input_grad[15]
    if dsoftmax_lse is not None:
        dsoftmax_lse = dsoftmax_lse.float().contiguous()
    dq, dk, dv, softmax_d = varlen_bwd(dout, q, k, v, out, softmax_lse, lse_residual, dsoftmax_lse, cu_seqlens_q,
                                       cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                                       window_left, window_right, deterministic, softcap, alibi_slopes, dropout_p,
                                       rng_state, sinks_requires_grad)
    dsinks = None
    if sinks_requires_grad:
        # The dense formula over the one-sequence view: rows outside every
        # sequence have lse = +inf and add nothing.
        dsinks = sinks_grad(sinks, softmax_d[None], softmax_lse[None],
                            lse_residual[None] if lse_residual.numel() else lse_residual)
    grads = (dq, dk, dv) + (None,) * 12 + (dsinks, None, None)
    return grads[: ctx.num_inputs]


torch.library.register_autograd("flash_attn_ext::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)


class _VarlenBwdOnceDifferentiable(_BwdOnceDifferentiable):
    """_BwdOnceDifferentiable for varlen_bwd: a backward that builds a graph
    (create_graph=True, torch.func.grad) gets usable gradients, and only
    differentiating them again raises."""

    @staticmethod
    def forward(ctx, keyset, *args):
        with torch.enable_grad(), torch._C._AutoDispatchBelowAutograd():
            return varlen_bwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _varlen_bwd_autograd(keyset, *args):
    # As _bwd_autograd: the gradients are not themselves differentiable.
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        with _enable_single_level_autograd_function():
            return _VarlenBwdOnceDifferentiable.apply(keyset, *args)
    with torch._C._AutoDispatchBelowAutograd():
        return varlen_bwd.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_autograd_lib.impl("varlen_bwd", _varlen_bwd_autograd, "Autograd", with_keyset=True)


# torch.ops.flash_attn_ext.varlen_fwd(*args), usable under torch.func
# transforms as call_fwd (without it torch.func.grad fails inside
# Function.apply and torch.func.jvp returns a zero tangent): what
# flash_attn_varlen_func calls.
call_varlen_fwd = _transformable(varlen_fwd, _varlen_setup_context, _varlen_backward, "_VarlenFwdFunction")


# fwd_kvcache: inference over a KV cache (csrc/kvcache.h), called by
# flash_attn_ext.kvcache.flash_attn_with_kvcache. Forward only, like
# flash-attn's: its autograd formula raises when a gradient reaches it.

fwd_kvcache = torch.ops.flash_attn_ext.fwd_kvcache.default


@torch.library.register_fake("flash_attn_ext::fwd_kvcache")
def _fwd_kvcache_fake(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale,
                      causal, window_left, window_right, softcap=0.0, alibi_slopes=None, sinks=None, num_splits=0):
    check_same_device("flash_attn_ext::fwd_kvcache", locals())
    batch, seqlen_q, nheads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    return out, softmax_lse


def _fwd_kvcache_backward(ctx, *grads):
    raise RuntimeError(
        "flash_attn_ext: flash_attn_with_kvcache (the fwd_kvcache op) has no backward, as in flash-attn: it is for "
        "inference; use flash_attn_func (or run the decode step under torch.no_grad())"
    )


torch.library.register_autograd("flash_attn_ext::fwd_kvcache", _fwd_kvcache_backward,
                                setup_context=lambda ctx, inputs, output: None)


# torch.ops.flash_attn_ext.fwd_kvcache(*args), with torch.func transforms
# answered as in eager mode (vmap runs it, a gradient or a tangent raises):
# what flash_attn_with_kvcache calls.
call_fwd_kvcache = _transformable(fwd_kvcache, lambda ctx, inputs, output: None, _fwd_kvcache_backward,
                                  "_FwdKvcacheFunction")


# The native FP8 forward (flash_attn_ext/fp8.py calls it for the calls it can
# take): forward only, like FlashAttention-3's FP8 attention; FP8 inputs that
# require a gradient are refused before it is reached (fp8._check_no_grad).
fwd_fp8 = torch.ops.flash_attn_ext.fwd_fp8.default


@torch.library.register_fake("flash_attn_ext::fwd_fp8")
def _fwd_fp8_fake(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal, window_left, window_right):
    check_same_device("flash_attn_ext::fwd_fp8", locals())
    out = q.new_empty(q.shape, dtype=torch.bfloat16)
    if cu_seqlens_q is None:
        batch, seqlen_q, nheads, _ = q.shape
        softmax_lse = q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
    else:
        total_q, nheads, _ = q.shape
        softmax_lse = q.new_empty((nheads, total_q), dtype=torch.float32)
    return out, softmax_lse
