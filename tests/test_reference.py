"""The shared reference (flash_attn_ext/reference.py) checked against PyTorch's
own attention and against identities of each score feature, so that the
kernels' tests compare with something that is itself right."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICES
from flash_attn_ext.reference import alibi_bias, attention_ref, visible_mask


def rand(*shape, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 1))])
def test_matches_sdpa_math(device, causal, window):
    b, sq, sk, h, hk, d = 2, 7, 11, 4, 2, 8
    q, k, v = rand(b, sq, h, d, device=device), rand(b, sk, hk, d, device=device), rand(b, sk, hk, d, device=device)
    bias = rand(b, h, sq, sk, device=device)
    out, lse = attention_ref(q, k, v, causal=causal, window=window, bias=bias, softmax_scale=0.3)
    vis = visible_mask(sq, sk, causal, window, device=device)
    mask = bias.masked_fill(~vis, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    rows_seen = vis.any(-1)
    torch.testing.assert_close(out[:, rows_seen], expected[:, rows_seen])
    assert (out[:, ~rows_seen] == 0).all() and torch.isinf(lse[:, :, ~rows_seen]).all()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * 0.3 + mask
    torch.testing.assert_close(lse[:, :, rows_seen], torch.logsumexp(scores, -1)[:, :, rows_seen])


def test_softcap():
    q, k, v = rand(1, 5, 2, 4), rand(1, 6, 2, 4), rand(1, 6, 2, 4)
    q = q * 10  # large scores, so that the cap matters
    cap = 2.5
    out, lse = attention_ref(q, k, v, softcap=cap, softmax_scale=0.5)
    scores = cap * torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5 / cap)
    assert scores.abs().max() <= cap  # tanh saturates to exactly 1 for the largest scores
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v))


def test_alibi_is_flash_attn_bias():
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    bias = alibi_bias(slopes, 1, 2, 3, 5)
    # query i, key j: -slope * |i + Sk - Sq - j|; e.g. head 0, i = 0, j = 4: -0.5 * |0 + 2 - 4| = -1.
    assert bias[0, 0, 0, 4].item() == -1.0 and bias[0, 1, 2, 4].item() == 0.0 and bias[0, 1, 0, 0].item() == -0.5
    q, k, v = rand(1, 3, 2, 4), rand(1, 5, 2, 4), rand(1, 5, 2, 4)
    torch.testing.assert_close(attention_ref(q, k, v, alibi_slopes=slopes)[0], attention_ref(q, k, v, bias=bias)[0])
    per_batch = torch.tensor([[0.5, 0.25], [0.1, 0.2]], dtype=torch.float64)
    assert alibi_bias(per_batch, 2, 2, 3, 5)[1, 0, 0, 4].item() == pytest.approx(-0.2)


def test_sinks():
    q, k, v = rand(2, 4, 3, 8), rand(2, 6, 3, 8), rand(2, 6, 3, 8)
    sinks = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    out, lse = attention_ref(q, k, v, sinks=sinks, causal=True)
    out0, lse0 = attention_ref(q, k, v, causal=True)
    # The sink joins the denominator: lse grows by it, and out shrinks by the same factor.
    torch.testing.assert_close(lse, torch.logaddexp(lse0, sinks.view(1, 3, 1)))
    torch.testing.assert_close(out, out0 * torch.exp(lse0 - lse).transpose(1, 2)[..., None])
    # A sink of -inf is no sink.
    torch.testing.assert_close(attention_ref(q, k, v, sinks=torch.full((3,), -math.inf, dtype=torch.float64))[0],
                               attention_ref(q, k, v)[0])
    # Its gradient flows.
    s = sinks.clone().requires_grad_()
    attention_ref(q, k, v, sinks=s)[0].sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_dropout_mask_and_v_head_dim():
    q, k, v = rand(1, 4, 2, 8), rand(1, 5, 2, 8), rand(1, 5, 2, 3)
    keep = torch.rand(1, 2, 4, 5) > 0.3
    out, lse = attention_ref(q, k, v, dropout_mask=keep, dropout_p=0.3)
    assert out.shape == (1, 4, 2, 3)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * 8 ** -0.5, -1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs * keep / 0.7, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, attention_ref(q, k, v)[1])  # lse is that of the undropped softmax


def test_lowp_path_is_close():
    q, k, v = (x.to(torch.bfloat16) for x in (rand(1, 9, 2, 16), rand(1, 9, 2, 16), rand(1, 9, 2, 16)))
    ref, _ = attention_ref(q, k, v, causal=True)
    lowp, lse = attention_ref(q, k, v, causal=True, upcast=False)
    assert lowp.dtype == torch.bfloat16 and lse.dtype == torch.float32
    err = (lowp.double() - ref).abs().max().item()
    assert 0 < err < 0.05  # rounded, but close


def test_two_x_rule_allowance_is_one_rounding():
    """The 2x rule's allowance is flash-attn's for rounding the reference to
    our dtype: a bf16 result whose largest element rounded the other way
    from PyTorch's passes, one off by several units in the last place fails,
    and an fp32 result gets no 16-bit allowance."""
    from flash_attn_ext.reference import two_x_rule

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4096, generator=g, dtype=torch.float64) * 12
    pytorch = ref.to(torch.bfloat16)  # rounded to nearest: at most half a unit off
    i = int(ref.abs().argmax())
    ulp = 2.0 ** (math.floor(math.log2(abs(ref[i].item()))) - 7)
    flipped = pytorch.clone()
    flipped[i] = pytorch[i] + math.copysign(ulp, (ref[i] - pytorch[i].double()).item() or 1.0)
    verdict = two_x_rule(flipped, ref, pytorch)
    assert verdict.ok, verdict.reason
    far = pytorch.clone()
    far[i] = pytorch[i] + 6 * ulp
    assert not two_x_rule(far, ref, pytorch).ok
    assert not two_x_rule(ref.float() + 1e-3, ref, ref.float()).ok
