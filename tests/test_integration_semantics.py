"""Integration semantics found in review, on the CPU: the flash_attn stand-in
(install_as_flash_attn keeps importlib.util.find_spec and transformers
working; flash_attn.bert_padding), torch.func over flash_attn_varlen_func
and flash_attn_with_kvcache (grad works, jvp raises instead of a zero
tangent), fp64 varlen backward of an empty batch, opcheck of the varlen and
kvcache ops with every optional argument, torch.export of the varlen and
kvcache entry points, fake vs real output shapes for odd shapes, and
transformers models (Qwen2, GPT-2, and BART's cross-attention with a padded
encoder) against transformers' sdpa."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_attn_ext
from flash_attn_ext import _ops, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn_ext import bert_padding

OPS = torch.ops.flash_attn_ext


def finite(*ts):
    for t in ts:
        assert not torch.isnan(t).any(), "NaN in an output"


def cu_of(lengths):
    return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)


def per_sequence_ref(q, k, v, cu_q, cu_k, causal):
    """fp64 reference of varlen attention, bottom-right causal, one sequence at a time."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        sq, eq, sk, ek = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if eq == sq or ek == sk:
            continue
        qq = q[sq:eq].double().transpose(0, 1)
        kk = k[sk:ek].double().repeat_interleave(rep, 1).transpose(0, 1)
        vv = v[sk:ek].double().repeat_interleave(rep, 1).transpose(0, 1)
        s = qq @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5
        if causal:
            i = torch.arange(eq - sq)[:, None] + (ek - sk) - (eq - sq)
            s = s.masked_fill(torch.arange(ek - sk)[None] > i, float("-inf"))
        out[sq:eq] = (torch.softmax(s, -1).nan_to_num() @ vv).transpose(0, 1)
    return out


# ---------------------------------------------------------------------------
# The flash_attn stand-in


def test_install_as_flash_attn_keeps_find_spec_and_transformers_working():
    """Before the fix, the stand-in module had no __spec__, so every
    importlib.util.find_spec("flash_attn") raised ValueError, and with it
    transformers' availability checks: building any model failed."""
    code = textwrap.dedent("""
        import importlib.util, sys
        import flash_attn_ext.flash_attn_interface as fai
        if importlib.util.find_spec("flash_attn") is not None:
            print("SKIP real flash_attn"); sys.exit(0)
        fai.install_as_flash_attn()
        assert importlib.util.find_spec("flash_attn") is not None
        assert importlib.util.find_spec("flash_attn.flash_attn_interface") is not None
        from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
        import flash_attn_ext.bert_padding as bp
        assert unpad_input is bp.unpad_input
        try:
            import flash_attn.layers.rotary
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("flash_attn.layers should be absent")
        try:
            import transformers
        except ImportError:
            print("OK no transformers"); sys.exit(0)
        from transformers.utils import is_flash_attn_2_available
        assert is_flash_attn_2_available() is False  # no flash-attn distribution: not taken for FA2
        cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model(input_ids=__import__("torch").randint(0, 32, (1, 5)))
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("SKIP"):
        pytest.skip("a real flash_attn is installed")
    assert run.stdout.strip().startswith("OK"), run.stdout


def test_bert_padding_round_trip_with_varlen():
    """flash-attn 2.8's unpad_input (five results, unused_mask) / pad_input
    around flash_attn_varlen_func equal the padded per-row computation, with
    gradients through the index functions."""
    batch, seqlen, h, d = 3, 9, 2, 16
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, :4] = 0
    x = torch.randn(batch, seqlen, h, d, dtype=torch.float64, requires_grad=True)
    xu, idx, cu, max_len, used = bert_padding.unpad_input(x, mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 15, 20] and max_len == 9
    assert used.tolist() == [6, 9, 5] and xu.shape == (20, h, d)
    out = flash_attn_varlen_func(xu, xu, xu, cu, cu, max_len, max_len, causal=True)
    ref = per_sequence_ref(xu.detach(), xu.detach(), xu.detach(), cu, cu, True)
    torch.testing.assert_close(out, ref)
    padded = bert_padding.pad_input(out, idx, batch, seqlen)
    assert padded.shape == (batch, seqlen, h, d)
    assert (padded[mask == 0] == 0).all()
    w = torch.randn_like(padded)
    (padded * w).sum().backward()
    finite(x.grad)
    assert (x.grad[mask == 0] == 0).all() and (x.grad[mask == 1] != 0).any()
    # unused_mask: allocated slots count in cu_seqlens, not in seqused.
    unused = torch.zeros_like(mask)
    unused[0, 6:8] = 1
    _, _, cu2, _, used2 = bert_padding.unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 8, 17, 22] and used2.tolist() == [6, 9, 5]
    # Concatenated sequences: row 0 holds sequences of 2 and 3 tokens.
    lens = torch.tensor([[2, 3, 0, 0, 0, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0, 0]])
    xc, _, cu3, max3 = bert_padding.unpad_input_for_concatenated_sequences(x, lens)
    assert cu3.tolist() == [0, 2, 5, 14, 18] and max3 == 9 and xc.shape[0] == 18


# ---------------------------------------------------------------------------
# torch.func and autograd over varlen and kvcache


def _varlen_case():
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    q = torch.randn(sum(lens_q), 4, 16, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 16, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 16, dtype=torch.float64)
    return q, k, v, cu_q, cu_k


def test_varlen_func_grad_and_create_graph():
    """torch.func.grad over flash_attn_varlen_func failed inside
    Function.apply (the legacy ctx form), and backward(create_graph=True)
    raised at once; both now give the first-order gradients, and only a
    second differentiation raises, as flash_attn_func does."""
    q, k, v, cu_q, cu_k = _varlen_case()
    w = torch.randn(q.shape[0], 4, 16, dtype=torch.float64)

    def loss(q, k, v):
        return (flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, causal=True) * w).sum()

    g = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = (per_sequence_ref(*leaves, cu_q, cu_k, True) * w).sum()
    g_ref = torch.autograd.grad(ref, leaves)
    for a, b in zip(g, g_ref):
        finite(a)
        torch.testing.assert_close(a, b)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g2 = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    for a, b in zip(g2, g_ref):
        torch.testing.assert_close(a.detach(), b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g2[0].square().sum(), leaves[1])


def test_forward_ad_raises_outside_torch_func():
    """torch.autograd.forward_ad (no torch.func transform) returned the outputs without a tangent for
    every entry point (a silent wrong answer); dual tensors now raise, plain ones under a dual level run."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (torch.randn(1, 5, 2, 16, dtype=torch.float64) for _ in range(3))
    qv, kv_, vv, cu_q, cu_k = _varlen_case()
    qd = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    calls = {
        "flash_attn_func": lambda x: flash_attn_ext.flash_attn_func(x, k, v),
        "varlen": lambda x: flash_attn_varlen_func(x, kv_, vv, cu_q, cu_k, 5, 6),
        "kvcache": lambda x: flash_attn_with_kvcache(x, kc, vc, cache_seqlens=6),
    }
    primals = {"flash_attn_func": q, "varlen": qv, "kvcache": qd}
    for name, call in calls.items():
        x = primals[name]
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call(fwAD.make_dual(x, torch.randn_like(x)))
            out = call(x)  # no tangent anywhere: runs as without the dual level
        torch.testing.assert_close(out, call(x), msg=name)


def test_forward_mode_raises_for_varlen_and_kvcache():
    """torch.func.jvp returned a zero tangent for both (a silent wrong answer)."""
    q, k, v, cu_q, cu_k = _varlen_case()
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6), (q,), (torch.randn_like(q),))
    qd = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6), (qd,), (torch.randn_like(qd),))
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.func.grad(lambda q: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6).sum())(qd)
    # vmap still runs both (one call per element).
    outs = torch.func.vmap(lambda q: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6))(qd[None].expand(3, -1, -1,
                                                                                                       -1, -1))
    torch.testing.assert_close(outs[1], flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=6))


def test_varlen_fp64_backward_without_rows():
    """fp64 varlen with no query rows: the backward refused the (nheads, 0)
    lse_residual its own forward had returned."""
    cu = torch.zeros(3, dtype=torch.int32)
    q = torch.randn(0, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(0, 2, 8, dtype=torch.float64, requires_grad=True)
    out = flash_attn_varlen_func(q, k, k, cu, cu, 0, 0, causal=True)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ---------------------------------------------------------------------------
# The ops: opcheck with optional arguments, fake vs real shapes, export


def test_opcheck_varlen_and_kvcache_with_optional_arguments():
    h, hk, d = 4, 2, 16
    sinks = torch.randn(h)
    rng = _ops.draw_rng_state("cpu")
    cq, ck = cu_of([3, 0, 5]), cu_of([4, 2, 7])
    used = torch.tensor([3, 1, 6], dtype=torch.int32)
    q = torch.randn(8, h, d, requires_grad=True)
    k = torch.randn(13, hk, d, requires_grad=True)
    v = torch.randn(13, hk, 8, requires_grad=True)
    slopes = torch.rand(3, h)
    args = (q, k, v, cq, ck, used, 5, 7, 0.25, True, 2, 0, False, 2.0, slopes, sinks.clone().requires_grad_(), 0.3,
            rng)
    torch.library.opcheck(OPS.varlen_fwd.default, args)
    out, lse, res = OPS.varlen_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    finite(out, lse)
    torch.library.opcheck(OPS.varlen_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, res,
                           torch.randn_like(lse), cq, ck, used, 5, 7, 0.25, True, 2, 0, False, 2.0, slopes, 0.3, rng,
                           True))
    qd = torch.randn(2, 3, h, d)
    kc, vc = torch.randn(3, 16, hk, d), torch.randn(3, 16, hk, d)
    seqlens = torch.tensor([5, 9], dtype=torch.int32)
    torch.library.opcheck(OPS.fwd_kvcache.default,
                          (qd, kc, vc, seqlens, torch.tensor([2, 0], dtype=torch.int32),
                           torch.tensor([1, 2], dtype=torch.int32), None, 0.25, True, 4, 0, 3.0, slopes[0], sinks, 2))
    pages_k, pages_v = torch.randn(6, 4, hk, d), torch.randn(6, 4, hk, d)
    table = torch.tensor([[5, 1, 0], [2, 3, 4]], dtype=torch.int32)
    torch.library.opcheck(OPS.fwd_kvcache.default,
                          (qd, pages_k, pages_v, seqlens, None, None, table, 0.25, True, -1, -1, 0.0, None, sinks, 0))


def _fake_matches_real(fn, *args):
    real = fn(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = fn(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), f"output {i}"
    return real


# batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, headdim_v
ODD_SHAPES = [(2, 0, 5, 2, 1, 8, 8), (0, 3, 5, 2, 2, 8, 8), (2, 3, 0, 2, 2, 8, 8), (2, 3, 5, 2, 2, 1, 1),
              (2, 7, 5, 4, 2, 16, 8), (1, 3, 5, 4, 1, 8, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fake_shapes_match_real(shape, dtype):
    b, sq, sk, h, hk, d, dv = shape
    q, k = torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype)
    v = torch.randn(b, sk, hk, dv, dtype=dtype)
    out, lse, res = _fake_matches_real(OPS.fwd.default, q, k, v, None, 0.3, True, -1, -1, False)
    finite(out)
    _fake_matches_real(OPS.bwd.default, torch.randn_like(out), q, k, v, out, lse, res, None, None, 0.3, True, -1, -1,
                       False, False, 0.0, None, 0.0, None, True)
    if d == dv:
        _fake_matches_real(OPS.fwd_kvcache.default, q, k, v, torch.full((b,), sk, dtype=torch.int32), None, None,
                           None, 0.3, True, -1, -1)
    # The same problem in the varlen layout.
    cu_q, cu_k = cu_of([sq] * b), cu_of([sk] * b)
    vq, vk, vv = q.reshape(b * sq, h, d), k.reshape(b * sk, hk, d), v.reshape(b * sk, hk, dv)
    out, lse, res = _fake_matches_real(OPS.varlen_fwd.default, vq, vk, vv, cu_q, cu_k, None, sq, sk, 0.3, True, -1,
                                       -1, False)
    _fake_matches_real(OPS.varlen_bwd.default, torch.randn_like(out), vq, vk, vv, out, lse, res, None, cu_q, cu_k,
                       None, sq, sk, 0.3, True, -1, -1, False, 0.0, None, 0.0, None, True)


def test_export_varlen_and_kvcache():
    class Varlen(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True, softcap=3.0)

    class Decode(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, k, v, seqlens, cos, sin):
            return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, causal=True)

    cu = cu_of([3, 5])
    qv, kv, vv = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    with torch.no_grad():
        ep = torch.export.export(Varlen(), (qv, kv, vv, cu))
        assert any("flash_attn_ext.varlen_fwd" in str(n.target) for n in ep.graph.nodes)
        qv2 = torch.randn_like(qv)
        torch.testing.assert_close(ep.module()(qv2, kv, vv, cu), Varlen()(qv2, kv, vv, cu), atol=0, rtol=0)
        caches = torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 16)
        step = (torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16),
                torch.tensor([4, 9], dtype=torch.int32), torch.randn(32, 4), torch.randn(32, 4))
        ep = torch.export.export(Decode(), (step[0], caches[0].clone(), caches[1].clone(), *step[1:]))
        a = [c.clone() for c in caches]
        b = [c.clone() for c in caches]
        got = ep.module()(step[0], a[0], a[1], *step[1:])
        want = Decode()(step[0], b[0], b[1], *step[1:])
        finite(got)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # the exported append wrote the cache
        torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


# ---------------------------------------------------------------------------
# transformers models against transformers' sdpa

try:
    import transformers

    import flash_attn_ext.integrations.transformers  # noqa: F401  (registers "faext")
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None,
                                        reason="transformers is not installed (pip install 'transformers>=4.56')")

VOCAB = 96


def _scaled_up(model, names):
    # Random init gives near-uniform attention; larger q and k make masks matter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names) and n.endswith("weight"):
                p.mul_(6)
    return model.float().eval()


def causal_lm(kind):
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       pad_token_id=0)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return _scaled_up(model, ("q_proj", "k_proj", "c_attn"))


def with_impl(model, impl, fn):
    model.set_attn_implementation(impl)
    return fn(model)


@needs_transformers
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_causal_lm_against_sdpa(kind, padding):
    """Logits and gradients (loss over real tokens only) with padding, and
    greedy generation over a KV cache with left padding."""
    model = causal_lm(kind)
    ids = torch.randint(3, VOCAB, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    if padding == "left":
        mask[0, :4], mask[2, :8] = 0, 0
    else:
        mask[0, -4:], mask[2, -8:] = 0, 0
    w = torch.randn(3, 11, VOCAB)

    def run(m):
        m.zero_grad()
        logits = m(input_ids=ids, attention_mask=mask).logits
        (logits * w * mask[..., None]).sum().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    ours, ours_g = with_impl(model, "faext", run)
    theirs, theirs_g = with_impl(model, "sdpa", run)
    finite(ours, ours_g)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours_g, theirs_g, atol=2e-4 * theirs_g.abs().max().item(), rtol=1e-4)
    if padding == "left":
        def gen(m):
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
            return out.sequences, torch.stack(out.scores)

        with torch.no_grad():
            ours_seq, ours_scores = with_impl(model, "faext", gen)
            theirs_seq, theirs_scores = with_impl(model, "sdpa", gen)
        finite(ours_scores)
        assert torch.equal(ours_seq, theirs_seq)
        torch.testing.assert_close(ours_scores, theirs_scores, atol=2e-5, rtol=2e-5)


@needs_transformers
def test_encoder_decoder_cross_attention_with_padded_encoder():
    """BART's cross-attention gets the encoder's padding mask and decoder
    queries: the queries used to be unpadded by the encoder's mask (decoder
    positions zeroed wherever the encoder row was padded), a silent wrong
    answer for decoders shorter than, as long as, or one token against, the
    encoder."""
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                  decoder_ffn_dim=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0)
    model = _scaled_up(transformers.BartForConditionalGeneration(cfg), ("q_proj", "k_proj"))
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, -3:], mask[2, -6:] = 0, 0
    for dec_len in (5, 9):
        dec = torch.randint(3, VOCAB, (3, dec_len))
        with torch.no_grad():
            ours, theirs = (with_impl(model, impl, lambda m: m(input_ids=ids, attention_mask=mask,
                                                               decoder_input_ids=dec).logits)
                            for impl in ("faext", "sdpa"))
        finite(ours)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)

    def gen(m):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1,
                         output_scores=True, return_dict_in_generate=True)
        return torch.stack(out.scores)

    with torch.no_grad():
        ours, theirs = with_impl(model, "faext", gen), with_impl(model, "sdpa", gen)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    # Gradients through the cross-attention.
    dec = torch.randint(3, VOCAB, (3, 5))
    w = torch.randn(3, 5, VOCAB)

    def grads(m):
        m.zero_grad()
        (m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    ours, theirs = with_impl(model, "faext", grads), with_impl(model, "sdpa", grads)
    torch.testing.assert_close(ours, theirs, atol=2e-4 * theirs.abs().max().item(), rtol=1e-4)
