"""`MultiheadAttention`: torch.nn.MultiheadAttention computed by our op, and
`replace_attention`, which swaps it into an existing model.

The class subclasses torch.nn.MultiheadAttention, so constructor, parameters
and state_dict keys are PyTorch's and checkpoints load both ways; only
`forward` differs. It follows the slow path of
torch.nn.functional.multi_head_attention_forward step by step (mask
canonicalisation, in-projection, bias_k/bias_v, add_zero_attn, the is_causal
hint), but keeps the projected q, k, v in the op's (batch, seq, heads, headdim)
layout, which both batch_first and sequence-first inputs give as views.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops
from .sdpa import attention_bshd, cast_bias

__all__ = ["MultiheadAttention", "replace_attention"]


def _canonical_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype, other: Optional[Tensor] = None,
                    other_name: str = "") -> Optional[Tensor]:
    """MHA's mask convention: bool True = masked out (-inf), float = additive."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=3)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, torch.full_like(zero, float("-inf")), zero)
    return mask


def _check_shapes(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                  attn_mask: Optional[Tensor], num_heads: int) -> bool:
    """Same rules and messages as PyTorch's _mha_shape_check; returns is_batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D but "
                                 f"found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but "
                                 f"found {attn_mask.dim()}-D tensor instead")
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError("For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError("For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D "
                                 f"but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError("For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                                     f"but found {attn_mask.dim()}-D tensor instead")
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != expected:
                raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
                         "tensor")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on flash_attn_ext's op.

    Same constructor, parameters, state_dict and forward signature as PyTorch's
    module; either loads the other's state_dict. Results match PyTorch within
    floating-point tolerance, with these differences:

    * A query that may attend to no key (every key masked) yields 0 output
      and zero gradients instead of NaN; its attention weights, computed
      explicitly, stay NaN as in PyTorch.
    * ``dropout > 0`` in training mode drops attention probabilities inside
      the kernels (ignored in eval mode, as in PyTorch), with a mask drawn
      from torch's generator but not PyTorch's stream: the same seed gives
      other masks than torch.nn.MultiheadAttention's.
    * ``need_weights=True`` (PyTorch's default) computes the attention weights
      explicitly as softmax(Q K^T * scale + mask), which costs
      O(batch * heads * L * S) memory; pass ``need_weights=False`` to keep memory
      linear in sequence length.
    * Nested tensors are not supported.
    * On CUDA the kernels take fp16/bf16: keep the module in one of those
      dtypes or run it under autocast (the projections then produce bf16/fp16).

    Masks follow PyTorch's MHA convention: boolean True means "may not attend",
    float masks are added to the attention scores. ``is_causal`` is a hint that
    ``attn_mask`` is the causal mask, exactly as in PyTorch: it requires
    ``attn_mask``, and the mask is replaced by the (top-left) causal mask only
    when no key_padding_mask is given and need_weights is False.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        dropout_p = self.dropout if self.training else 0.0
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("flash_attn_ext.MultiheadAttention does not support nested tensors")
        is_batched = _check_shapes(query, key, value, key_padding_mask, attn_mask, self.num_heads)

        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype, attn_mask, "attn_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint stands in for the mask
        else:
            # PyTorch then uses the mask and ignores the hint: with
            # need_weights it computes the weights from the mask alone, and a
            # key_padding_mask merged into it makes it no longer causal.
            attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
            is_causal = False

        if query.size(-1) != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got "
                                 f"{query.size(-1)}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        elif key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                                 f"{value.shape[:-1]}")

        # Project in the input's own layout (identity of query/key/value picks
        # the packed GEMMs), then take batch-first views (N, L|S, E).
        q, k, v = self._in_projection(query, key, value)
        if not is_batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        bsz, tgt_len, embed_dim = q.shape
        num_heads, head_dim = self.num_heads, self.head_dim

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, embed_dim)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be both set or both None")
        q = q.unflatten(-1, (num_heads, head_dim))
        k = k.unflatten(-1, (num_heads, head_dim))
        v = v.unflatten(-1, (num_heads, head_dim))
        if self.add_zero_attn:
            zeros = k.new_zeros((bsz, 1, num_heads, head_dim))
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)

        # q's dtype, not query's: under autocast the projections return fp16/bf16.
        # A float32 mask with fp16/bf16 inputs is added in float32, as
        # PyTorch's SDPA path does (cast, -1e5 overflows fp16 and loses bf16
        # digits): off CUDA, where the op has float32 kernels, the attention
        # then runs in float32.
        compute_dtype = q.dtype
        if (query.dtype in (torch.float16, torch.bfloat16) and q.device.type != "cuda"
                and any(m is not None and m.dtype == torch.float32 for m in (attn_mask, key_padding_mask))):
            compute_dtype = torch.float32
        bias = self._merged_bias(attn_mask, key_padding_mask, bsz, tgt_len, src_len, compute_dtype)
        scale = 1.0 / math.sqrt(head_dim)
        rng_state = _ops.draw_rng_state(q.device) if dropout_p > 0 else None
        out = attention_bshd(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), bias, scale,
                             causal_top_left=is_causal, dropout_p=dropout_p,
                             rng_state=rng_state).to(q.dtype)  # (N, L, H, D)
        if bias is not None:
            bias = bias.to(q.dtype)  # the weights below stay in q's dtype

        weights = None
        if need_weights:
            # O(N * H * L * S) memory: the price of returning the weights.
            scores = torch.matmul(q.transpose(1, 2) * scale, k.permute(0, 2, 3, 1))
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0:  # as PyTorch returns them: after dropout (the kernels' mask)
                mask = _ops.dropout_mask(rng_state, *weights.shape, dropout_p)
                weights = weights.masked_fill(~mask, 0.0) / (1.0 - dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                weights = weights.squeeze(0)

        if is_batched and not self.batch_first:
            out = out.transpose(0, 1)  # (L, N, H, D): PyTorch returns this layout contiguous
        out = F.linear(out.reshape(*out.shape[:2], embed_dim), self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            out = out.squeeze(0)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v = inputs times the projection weights, batch-first (N, L|S, E)."""
        e = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:
            # Self-attention: one GEMM; q, k, v are views of its output whose
            # head dims stay contiguous, as the op needs.
            return F.linear(query, w, b).chunk(3, dim=-1)
        if key is value:
            bq, bkv = (None, None) if b is None else b.split([e, 2 * e])
            k, v = F.linear(key, w[e:], bkv).chunk(2, dim=-1)
            return F.linear(query, w[:e], bq), k, v
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _merged_bias(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], bsz: int,
                     tgt_len: int, src_len: int, dtype: torch.dtype) -> Optional[Tensor]:
        """attn_mask (L, S) or (N*H, L, S) plus key_padding_mask (N, S), as one
        additive bias expanded (stride 0 where broadcast) to (N, H, L, S)."""
        num_heads = self.num_heads
        bias = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                bias = attn_mask.view(1, 1, tgt_len, src_len)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
                bias = attn_mask.view(bsz, num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(f"Expected key_padding_mask shape to be {(bsz, src_len)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            bias = kpm if bias is None else bias + kpm
        if bias is None:
            return None
        return cast_bias(bias, dtype).expand(bsz, num_heads, tgt_len, src_len)


def replace_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every torch.nn.MultiheadAttention in `model` for
    flash_attn_ext.MultiheadAttention, in place, and return the model.

    The swap changes the class of each module object: the same Parameter
    objects (so optimizers and tied weights stay valid), device, dtype,
    training mode and hooks. Only modules whose type is exactly
    torch.nn.MultiheadAttention are swapped: ours are left alone, and so are
    other subclasses, whose own methods a swap would drop. A model that is
    itself a MultiheadAttention is converted too.

    nn.TransformerEncoderLayer and nn.TransformerEncoder have a fused
    inference path (eval mode without autograd) that reads the attention
    weights and never calls their self_attn module; it is switched off for
    those whose self_attn is ours, so that our attention runs there too (see
    `_skip_fused_encoder_path`).
    """
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
    for module in model.modules():
        _skip_fused_encoder_path(module)
    return model


def _skip_fused_encoder_path(module: torch.nn.Module) -> None:
    """Make PyTorch's fused encoder inference path pass over `module` when its
    attention is ours.

    In eval mode with no gradient needed, TransformerEncoderLayer.forward calls
    torch._transformer_encoder_layer_fwd on self_attn's weights (bypassing
    self_attn.forward), if, among other conditions, its
    `activation_relu_or_gelu` flag is nonzero; the flag only selects that fused
    kernel's activation (the regular path calls `self.activation`), so setting
    it to 0 turns the fused path off and changes nothing else. A
    TransformerEncoder built from such a layer sees the flag too and does not
    turn padded batches into nested tensors (which the layers would then get);
    an encoder that already exists has that decided in `use_nested_tensor`,
    which is switched off here.
    """
    if isinstance(module, torch.nn.TransformerEncoderLayer) and isinstance(
        getattr(module, "self_attn", None), MultiheadAttention
    ):
        module.activation_relu_or_gelu = 0
    elif isinstance(module, torch.nn.TransformerEncoder) and any(
        isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in module.layers
    ):
        module.use_nested_tensor = False
