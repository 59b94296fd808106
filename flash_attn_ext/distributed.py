"""Context parallelism: attention over a sequence split across the ranks of a
torch.distributed process group.

Every rank holds a slice of the sequence (q, k and v of its own rows, shaped
(batch, local_seqlen, nheads, headdim) as in flash_attn_func) and receives
the output rows of its slice; the result, gradients included, is that of
flash_attn_func on the whole sequence. Two ways to get there:

- `ring_flash_attn_func`: the K/V blocks travel round the ring (rank r sends
  to r+1 and receives from r-1 through torch.distributed point-to-point ops,
  started before the step's local attention and waited for after it). Each
  step attends the local queries to the block at hand with the fwd op; the
  partial outputs are merged through their log-sum-exps (`merge_attention`).
  The backward goes round the ring again, recomputing every block with the
  merged lse and output; dK/dV travel with their block and arrive home after
  a full turn. Memory per rank: one K/V block in flight besides its own.
- `all_gather_flash_attn_func`: every rank gathers the whole K/V, runs the
  fwd op once per contiguous piece of its queries, and the dK/dV of the
  backward are reduce-scattered back to their owners. Fewer, larger calls
  and two collectives: the choice for short rings.

Both take the same sharding (`layout`): "zigzag" splits the sequence into
2 * world_size chunks and gives rank r chunks r and 2 * world_size - 1 - r,
so that causal attention costs every rank the same; "contiguous" gives rank
r the r-th 1 / world_size of the sequence. `shard` and `unshard` convert.
Masks (causal, windows, bottom-right aligned for seqlen_q != seqlen_k) are
those of flash_attn_func on the full sequence: `_plan_blocks` works out,
for each pair of query and key pieces, which keys each query sees and how the
op's own bottom-right aligned window expresses it (or that it sees none).

Arguments are exchanged before any attention work (one small all_gather per
call, `check_args=True`): a rank whose arguments are wrong or differ from the
others' makes every rank raise the same error instead of leaving the others
waiting for it. Runs over any backend with point-to-point ops (NCCL, gloo).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _ops
from ._autocast import autocast_inputs
from .interface import _softcap_value, _window_sides

__all__ = [
    "ring_flash_attn_func",
    "all_gather_flash_attn_func",
    "shard",
    "unshard",
    "gather",
    "merge_attention",
    "LAYOUTS",
]

LAYOUTS = ("zigzag", "contiguous")
_PREFIX = "flash_attn_ext.distributed"


# ---------------------------------------------------------------------------
# Sharding: which global rows a rank holds.

def _pieces(layout: str, rank: int, world_size: int, local_len: int) -> List[Tuple[int, int, int]]:
    """The contiguous pieces of the global sequence a rank holds, in its local
    order, as (global_start, local_start, length)."""
    if layout == "zigzag":
        c = local_len // 2
        return [(rank * c, 0, c), ((2 * world_size - 1 - rank) * c, c, c)]
    return [(rank * local_len, 0, local_len)]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{_PREFIX}: layout must be one of {LAYOUTS}, got {layout!r}")


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s part of the full-sequence tensor `x` (sequence along `dim`)
    under `layout`; a copy (zigzag) or a view (contiguous)."""
    _check_layout(layout)
    n, parts = x.shape[dim], (2 * world_size if layout == "zigzag" else world_size)
    if n % parts:
        raise ValueError(
            f"{_PREFIX}: the sequence length {n} must be divisible by {parts} to be split {layout} over "
            f"{world_size} ranks")
    pieces = _pieces(layout, rank, world_size, n // world_size)
    if len(pieces) == 1:
        return x.narrow(dim, pieces[0][0], pieces[0][2])
    return torch.cat([x.narrow(dim, g, length) for g, _, length in pieces], dim)


def unshard(parts: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from every rank's part (`parts[r]` from rank r),
    the inverse of `shard`."""
    _check_layout(layout)
    world_size, local_len = len(parts), parts[0].shape[dim]
    placed = []
    for r, part in enumerate(parts):
        for g, lo, length in _pieces(layout, r, world_size, local_len):
            placed.append((g, part.narrow(dim, lo, length)))
    placed.sort(key=lambda item: item[0])
    return torch.cat([t for _, t in placed], dim)


def gather(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
           dim: int = 1) -> torch.Tensor:
    """All ranks' parts of a sharded tensor put together (all_gather, then
    `unshard`); every rank gets the full tensor. Not differentiable."""
    _check_layout(layout)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return unshard(parts, layout, dim)


# ---------------------------------------------------------------------------
# The lse merge.

def _merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Folds one partial attention result into a running one, in place.

    out_acc (B, S, H, D) and lse_acc (B, H, S) hold the merge so far, with
    -inf for rows that have seen no key yet; out_blk and lse_blk come from the
    op, whose rows that saw no key have lse = +inf (and out = 0). With
    m = logaddexp(lse_acc, lse_blk), the merged output is
    exp(lse_acc - m) * out_acc + exp(lse_blk - m) * out_blk. Where both are
    empty m is -inf; subtracting 0 there instead keeps both weights 0."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    lse_blk = lse_blk.masked_fill(lse_blk == math.inf, -math.inf)
    merged = torch.logaddexp(lse_acc, lse_blk)
    base = merged.masked_fill(merged == -math.inf, 0.0)
    w_acc = (lse_acc - base).exp().transpose(1, 2).unsqueeze(-1)
    w_blk = (lse_blk - base).exp().transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype) * w_blk)
    lse_acc.copy_(merged)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of the same queries over the union of two disjoint key sets,
    from the results over each: out (batch, seqlen, nheads, headdim) and lse
    (batch, nheads, seqlen) as the op or flash_attn_func(return_attn_probs=True)
    return them. Rows empty on one side (lse = +inf) take the other side's
    result; rows empty on both give out 0 and lse +inf. Returns (out, lse) in
    fp32 (fp64 if either out is fp64)."""
    dtype = _acc_dtype(torch.promote_types(out_a.dtype, out_b.dtype))
    out = out_a.to(dtype, copy=True)
    lse = lse_a.to(dtype, copy=True)
    lse.masked_fill_(lse == math.inf, -math.inf)
    _merge_into(out, lse, out_b, lse_b)
    return out, lse.masked_fill_(lse == -math.inf, math.inf)


def _block_rounding_slack(dtype: torch.dtype, world_size: int) -> float:
    """The extra slack of the 2x rule (reference.two_x_rule, relative to the
    reference's scale) for a context-parallel result in `dtype` over
    `world_size` ranks, beside flash_attn_func's: every op call returns its
    partial out / dq / dk / dv rounded to the dtype before the fp32 merge or
    sum, so a rank's result carries one rounding (eps / 2) per contributing
    block, up to 2 * world_size pieces, where flash_attn_func's carries one.
    0 for fp32 / fp64, whose partials are not rounded below the merge's
    precision. Shared by tests/test_distributed.py and
    benchmarks/bench_context_parallel.py."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    return 2 * world_size * torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------
# Planning: which op calls a (query pieces, key pieces) pair needs.

@dataclass(frozen=True)
class _Block:
    """One op call: local query rows [q_lo, q_hi) against local key rows
    [k_lo, k_hi) with the op's bottom-right aligned window (-1: unbounded)."""
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    window_left: int
    window_right: int

    def is_full(self) -> bool:
        return self.window_left < 0 and self.window_right < 0


def _pair_block(q_piece, k_piece, left: Optional[int], right: Optional[int]) -> Optional[_Block]:
    """The call for one query piece against one key piece, or None when no
    query sees any key. Pieces are (global_start, local_start, length) with the
    queries' global positions already shifted by seqlen_k - seqlen_q, so query
    position i sees key position j when i - left <= j <= i + right (None:
    unbounded).

    Keys no query reaches and queries that reach no key are trimmed away
    first; afterwards the last query sees the last key, so the op's window,
    which is aligned on that corner, needs only non-negative sides:
    right + (q1 - k1) and left - (q1 - k1). A side that binds no pair is
    passed as -1 (no mask on that side)."""
    qg, ql, qn = q_piece
    kg, kl, kn = k_piece
    q0, q1, k0, k1 = qg, qg + qn, kg, kg + kn
    if left is not None:
        k0 = max(k0, q0 - left)
    if right is not None:
        q0 = max(q0, k0 - right)
        k1 = min(k1, q1 + right)
    if left is not None:
        q1 = min(q1, k1 + left)
    if q0 >= q1 or k0 >= k1:
        return None
    window_right = -1 if right is None or k1 - 1 <= q0 + right else right + q1 - k1
    window_left = -1 if left is None or k0 >= q1 - 1 - left else left + k1 - q1
    return _Block(ql + q0 - qg, ql + q1 - qg, kl + k0 - kg, kl + k1 - kg, window_left, window_right)


def _plan_blocks(q_pieces, k_pieces, causal: bool, window: Tuple[int, int]) -> List[_Block]:
    """The op calls that attend every query piece to every key piece.

    The pieces of one rank are in global order, so two common cases take one
    call instead of one per pair: every visible pair fully visible and
    together a rectangle of whole pieces (no mask: the pieces are simply
    concatenated), and the rank's own block under a plain causal mask (the
    local order is the global order, so the local causal mask is the true
    one)."""
    left = window[0] if window[0] >= 0 else None
    right = 0 if causal else (window[1] if window[1] >= 0 else None)
    grid = [[_pair_block(qp, kp, left, right) for kp in k_pieces] for qp in q_pieces]
    if all(b is None for row in grid for b in row):
        return []
    qi = [i for i, row in enumerate(grid) if any(b is not None for b in row)]
    ki = [j for j in range(len(k_pieces)) if any(row[j] is not None for row in grid)]
    whole = all(
        grid[i][j] is not None and grid[i][j].is_full()
        and (grid[i][j].q_hi - grid[i][j].q_lo, grid[i][j].k_hi - grid[i][j].k_lo) == (q_pieces[i][2], k_pieces[j][2])
        for i in qi for j in ki)
    if whole and qi == list(range(qi[0], qi[-1] + 1)) and ki == list(range(ki[0], ki[-1] + 1)):
        return [_Block(q_pieces[qi[0]][1], q_pieces[qi[-1]][1] + q_pieces[qi[-1]][2],
                       k_pieces[ki[0]][1], k_pieces[ki[-1]][1] + k_pieces[ki[-1]][2], -1, -1)]
    if right == 0 and left is None and [(g, n) for g, _, n in q_pieces] == [(g, n) for g, _, n in k_pieces]:
        total = sum(n for _, _, n in q_pieces)
        return [_Block(0, total, 0, total, -1, 0)]
    return [b for row in grid for b in row if b is not None]


# ---------------------------------------------------------------------------
# Communication.

class _Ring:
    """A process group seen as a ring: send to rank + 1, receive from rank - 1."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{_PREFIX}: torch.distributed is not initialised (call init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise RuntimeError(f"{_PREFIX}: this process is not a member of the given process group")
        as_group = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(as_group, (self.rank + 1) % self.world_size)
        self.prev = dist.get_global_rank(as_group, (self.rank - 1) % self.world_size)

    def exchange(self, tensor: torch.Tensor):
        """Starts sending `tensor` to the next rank and receiving the previous
        rank's into a new tensor; returns (that tensor, requests to wait on)."""
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return received, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for req in requests:
        req.wait()


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_FIELDS = ["q.shape", "k.shape", "v.shape", "dtype", "causal", "window_size", "layout", "softmax_scale", "softcap",
           "method"]


def _local_problem(q, k, v, layout, dropout_p, alibi_slopes) -> Optional[Tuple[type, str]]:
    """What is wrong with this rank's arguments on their own, as (exception
    class, message), or None."""
    if dropout_p != 0.0:
        return NotImplementedError, f"dropout_p={dropout_p} is not supported yet (only 0.0)"
    if alibi_slopes is not None:
        return NotImplementedError, "alibi_slopes is not supported yet (only None)"
    message = _shape_problem(q, k, v, layout)
    return None if message is None else (ValueError, message)


def _shape_problem(q, k, v, layout) -> Optional[str]:
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v must be tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"q, k and v must be (batch, local_seqlen, nheads, headdim), got {tuple(q.shape)}, {tuple(k.shape)} "
                f"and {tuple(v.shape)}")
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
    if q.dtype not in _DTYPES:
        return f"unsupported dtype {q.dtype}"
    if q.device != k.device or q.device != v.device:
        return f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}"
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"nheads of q ({q.shape[2]}) must be a multiple of nheads of k and v ({k.shape[2]})"
    if layout == "zigzag" and (q.shape[1] % 2 or k.shape[1] % 2):
        return (f"zigzag sharding gives every rank two equal chunks, so the local sequence lengths must be even, "
                f"got {q.shape[1]} (q) and {k.shape[1]} (k); the global length must be divisible by "
                f"2 * world_size")
    return None


def _check_across_ranks(ring: _Ring, q, k, v, causal, window, layout, softmax_scale, softcap, method,
                        problem) -> None:
    """Raises on every rank if any rank's arguments are wrong or differ from
    rank 0's: one all_gather of a few integers, so that no rank goes on to
    wait for a partner that has already failed."""
    def shape(t):
        return list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [-1] * 4

    def bits(x):
        return torch.tensor([float(x or 0.0)], dtype=torch.float64).view(torch.int64).item()

    fields = [shape(q), shape(k), shape(v),
              [_DTYPES.index(q.dtype) if problem is None else -1], [int(causal)], list(window),
              [LAYOUTS.index(layout) if layout in LAYOUTS else -1], [bits(softmax_scale)], [bits(softcap)], [method]]
    flat = [0 if problem is None else 1] + [x for f in fields for x in f]
    if ring.world_size == 1:
        rows = [flat]
    else:
        # NCCL carries CUDA tensors only; any other backend takes CPU ones.
        if dist.get_backend(ring.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        mine = torch.tensor(flat, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(ring.world_size)]
        dist.all_gather(gathered, mine, group=ring.group)
        rows = torch.stack(gathered).tolist()
    if problem is not None:
        raise problem[0](f"{_PREFIX}: {problem[1]}")
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise RuntimeError(
            f"{_PREFIX}: rank(s) {failed} of the group rejected their arguments (see the error there); "
            "no rank ran the attention")
    start = 1
    for name, f in zip(_FIELDS, fields):
        values = [tuple(row[start:start + len(f)]) for row in rows]
        start += len(f)
        if any(val != values[0] for val in values):
            listing = ", ".join(f"rank {r}: {val}" for r, val in enumerate(values))
            raise ValueError(f"{_PREFIX}: the ranks disagree on {name} ({listing}); every rank must pass the same")


# ---------------------------------------------------------------------------
# The op calls, shared by both variants.

def _lse_parts(lse_acc: torch.Tensor, dtype: torch.dtype):
    """softmax_lse (fp32, +inf for empty rows) and the op's lse_residual for a
    merged lse: empty unless the inputs are fp64, where the residual carries
    what fp32 rounding lost (the fp64 backward recomputes P with it)."""
    lse_acc = lse_acc.masked_fill(lse_acc == -math.inf, math.inf)
    lse = lse_acc.float().contiguous()
    if dtype != torch.float64:
        return lse, lse.new_empty((0,))
    residual = (lse_acc - lse.double()).nan_to_num(0.0, 0.0, 0.0).float().contiguous()
    return lse, residual


def _rows(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a (B, H, S) lse-shaped tensor, contiguous as the op needs them."""
    return t[:, :, lo:hi].contiguous()


def _fwd_block(q, k, v, b: _Block, scale: float, softcap: float):
    """out, lse as an fp32/fp64 log-sum-exp including the residual. softcap
    acts per score, so each block applies it as the whole call would."""
    out, lse, residual = _ops.fwd(q[:, b.q_lo:b.q_hi], k[:, b.k_lo:b.k_hi], v[:, b.k_lo:b.k_hi], None, scale, False,
                                  b.window_left, b.window_right, False, softcap)
    if residual.numel():
        lse = lse.double() + residual.double()
    return out, lse


def _bwd_block(dout, q, k, v, out, lse, residual, dlse, b: _Block, scale: float, softcap: float,
               deterministic: bool):
    res = _rows(residual, b.q_lo, b.q_hi) if residual.numel() else residual
    dl = _rows(dlse, b.q_lo, b.q_hi) if dlse is not None else None
    dq, dk, dv, *_ = _ops.bwd(dout[:, b.q_lo:b.q_hi], q[:, b.q_lo:b.q_hi], k[:, b.k_lo:b.k_hi], v[:, b.k_lo:b.k_hi],
                              out[:, b.q_lo:b.q_hi], _rows(lse, b.q_lo, b.q_hi), res, dl, None, scale, False,
                              b.window_left, b.window_right, deterministic, False, softcap)
    return dq, dk, dv


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Geometry:
    """Everything about a call that does not depend on the data: the pieces of
    every rank and the op calls between them."""

    def __init__(self, ring: _Ring, q, k, causal, window, layout):
        self.ring, self.causal, self.window, self.layout = ring, causal, window, layout
        world = ring.world_size
        lq, lk = q.shape[1], k.shape[1]
        self.seqlen_k = world * lk
        offset = world * lk - world * lq  # bottom-right alignment of the global mask
        self.q_pieces = [(g + offset, lo, n) for g, lo, n in _pieces(layout, ring.rank, world, lq)]
        self.k_pieces = [_pieces(layout, r, world, lk) for r in range(world)]

    def ring_blocks(self, src: int) -> List[_Block]:
        return _plan_blocks(self.q_pieces, self.k_pieces[src], self.causal, self.window)

    def gathered_blocks(self) -> List[_Block]:
        # Against the whole key sequence, one call per query piece at most.
        return [b for qp in self.q_pieces for b in _plan_blocks([qp], [(0, 0, self.seqlen_k)], self.causal, self.window)]


# ---------------------------------------------------------------------------
# Ring attention.

class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, geo: _Geometry, scale: float, softcap: float, deterministic: bool):
        ring, world = geo.ring, geo.ring.world_size
        acc = _acc_dtype(q.dtype)
        out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=acc, device=q.device)
        kv = torch.stack((k, v))
        for step in range(world):
            if step + 1 < world:
                next_kv, requests = ring.exchange(kv)
            for b in geo.ring_blocks((ring.rank - step) % world):
                out_b, lse_b = _fwd_block(q, kv[0], kv[1], b, scale, softcap)
                _merge_into(out_acc[:, b.q_lo:b.q_hi], lse_acc[:, :, b.q_lo:b.q_hi], out_b, lse_b)
            if step + 1 < world:
                _wait(requests)
                kv = next_kv
        out = out_acc.to(q.dtype)
        lse, residual = _lse_parts(lse_acc, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, residual)
        ctx.geo, ctx.scale, ctx.softcap, ctx.deterministic = geo, scale, softcap, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, residual = ctx.saved_tensors
        geo = ctx.geo
        ring, world = geo.ring, geo.ring.world_size
        dout = torch.zeros_like(out) if dout is None else _unit_last(dout)
        dlse = dlse.float().contiguous() if dlse is not None else None
        acc = _acc_dtype(q.dtype)
        dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack((k, v))
        dkv_in, dkv_requests = None, []
        for step in range(world):
            if step + 1 < world:
                next_kv, kv_requests = ring.exchange(kv)
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            for b in geo.ring_blocks((ring.rank - step) % world):
                dq, dk, dv = _bwd_block(dout, q, kv[0], kv[1], out, lse, residual, dlse, b, ctx.scale,
                                        ctx.softcap, ctx.deterministic)
                dq_acc[:, b.q_lo:b.q_hi] += dq
                dkv[0, :, b.k_lo:b.k_hi] += dk
                dkv[1, :, b.k_lo:b.k_hi] += dv
            if step > 0:
                # The earlier ranks' share of this block's gradient, which
                # arrived while this step computed.
                _wait(dkv_requests)
                dkv += dkv_in
            if world > 1:
                dkv_in, dkv_requests = ring.exchange(dkv)
            if step + 1 < world:
                _wait(kv_requests)
                kv = next_kv
        if world > 1:
            _wait(dkv_requests)  # after a full turn: this rank's own K/V gradient
            dkv = dkv_in
        return dq_acc.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------
# All-gather attention.

def _gather_kv(geo: _Geometry, kv: torch.Tensor) -> torch.Tensor:
    """(2, B, local, Hk, D) from every rank -> (2, B, seqlen_k, Hk, D) in global order."""
    ring = geo.ring
    if ring.world_size == 1:
        return unshard([kv], geo.layout, dim=2)
    parts = [torch.empty_like(kv) for _ in range(ring.world_size)]
    dist.all_gather(parts, kv, group=ring.group)
    return unshard(parts, geo.layout, dim=2)


class _AllGatherAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, geo: _Geometry, scale: float, softcap: float, deterministic: bool):
        full = _gather_kv(geo, torch.stack((k, v)))
        acc = _acc_dtype(q.dtype)
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), math.inf, dtype=acc, device=q.device)
        for b in geo.gathered_blocks():
            out_b, lse_b = _fwd_block(q, full[0], full[1], b, scale, softcap)
            out[:, b.q_lo:b.q_hi] = out_b
            lse_acc[:, :, b.q_lo:b.q_hi] = lse_b
        lse, residual = _lse_parts(lse_acc, q.dtype)
        # The gathered K/V are not kept: the backward gathers them again, so
        # that a rank's saved memory stays its own share of the sequence.
        ctx.save_for_backward(q, k, v, out, lse, residual)
        ctx.geo, ctx.scale, ctx.softcap, ctx.deterministic = geo, scale, softcap, deterministic
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, residual = ctx.saved_tensors
        geo = ctx.geo
        ring = geo.ring
        dout = torch.zeros_like(out) if dout is None else _unit_last(dout)
        dlse = dlse.float().contiguous() if dlse is not None else None
        full = _gather_kv(geo, torch.stack((k, v)))
        acc = _acc_dtype(q.dtype)
        dq_all = torch.zeros_like(q, memory_format=torch.contiguous_format)
        dfull = torch.zeros(full.shape, dtype=acc, device=full.device)
        for b in geo.gathered_blocks():
            dq, dk, dv = _bwd_block(dout, q, full[0], full[1], out, lse, residual, dlse, b, ctx.scale,
                                    ctx.softcap, ctx.deterministic)
            dq_all[:, b.q_lo:b.q_hi] = dq
            dfull[0, :, b.k_lo:b.k_hi] += dk
            dfull[1, :, b.k_lo:b.k_hi] += dv
        world = ring.world_size
        parts = [shard(dfull, r, world, geo.layout, dim=2).contiguous() for r in range(world)]
        if world == 1:
            dkv = parts[0]
        else:
            dkv = torch.empty_like(parts[0])
            dist.reduce_scatter(dkv, parts, op=dist.ReduceOp.SUM, group=ring.group)
        return dq_all, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------
# Entry points.

def _context_parallel(fn, method, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, group, layout, check_args):
    ring = _Ring(group)
    problem = _local_problem(q, k, v, layout, dropout_p, alibi_slopes)
    try:
        window = _window_sides(window_size)
    except (TypeError, ValueError) as e:
        window, problem = (-1, -1), problem or (type(e), str(e).replace("flash_attn_ext: ", ""))
    try:
        softcap = _softcap_value(softcap)
    except (TypeError, ValueError) as e:
        softcap, problem = 0.0, problem or (type(e), str(e).replace("flash_attn_ext: ", ""))
    if problem is None and softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    if check_args or ring.world_size == 1:
        _check_across_ranks(ring, q, k, v, bool(causal), window, layout, softmax_scale, softcap, method, problem)
    elif problem is not None:
        raise problem[0](f"{_PREFIX}: {problem[1]}")
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    q, k, v = autocast_inputs(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    geo = _Geometry(ring, q, k, bool(causal), window, layout)
    out, lse = fn.apply(q, k, v, geo, float(softmax_scale), softcap, deterministic)
    if return_attn_probs:
        return out, lse, None
    return out


def ring_flash_attn_func(
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
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "zigzag",
    check_args: bool = True,
):
    """flash_attn_func over a sequence sharded across `group` (default: the
    world), by ring attention.

    q: (batch, seqlen_q / world_size, nheads, headdim), k and v:
    (batch, seqlen_k / world_size, nheads_k, headdim): this rank's part of the
    full tensors as `shard(x, rank, world_size, layout)` cuts them ("zigzag":
    the global lengths divisible by 2 * world_size; "contiguous": by
    world_size). Returns this rank's rows of flash_attn_func(full q, full k,
    full v, ...) in the same layout; causal and window_size mean what they mean
    there on the full sequences (bottom-right aligned). With
    return_attn_probs: (out, softmax_lse of this rank's rows, None).
    Differentiable in q, k, v and softmax_lse.

    Every rank of the group must call it with the same shapes and options.
    check_args=True (the default) exchanges them first (one small all_gather)
    so that a mismatch, or a rank rejecting its arguments, raises on every
    rank instead of leaving the others waiting; False skips that.
    softcap (> 0) caps every score as in flash_attn_func. dropout_p and
    alibi_slopes must keep their defaults (not supported yet:
    NotImplementedError; ALiBi's distances are global positions, which the
    per-block calls do not know). Attention bias is not supported.
    """
    return _context_parallel(_RingAttention, 0, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, deterministic, return_attn_probs, group, layout, check_args)


def all_gather_flash_attn_func(
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
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "zigzag",
    check_args: bool = True,
):
    """ring_flash_attn_func's result (same arguments, same layouts) by
    gathering the whole K/V on every rank: all_gather of K/V in the forward and
    again in the backward, one op call per contiguous piece of the local
    queries, dK/dV reduce-scattered to their owners. Peak memory holds the full
    K/V (and their fp32 gradients in the backward): for short rings."""
    return _context_parallel(_AllGatherAttention, 1, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, deterministic, return_attn_probs, group, layout, check_args)
