"""flash_attn_ext.integrations.transformers (issue 11, section 2): tiny models
built from configs (no downloads), Llama with GQA, Gemma 2 (softcap, sliding
window) and gpt-oss (sinks, sliding window), run with attn_implementation=
"faext" against transformers' own implementation ("sdpa" for Llama,
"eager" where sdpa lacks the feature) under the project's 2x rule, both
measured against an fp64 eager run of the same weights: logits with and
without padding (left and right), packed sequences (position_ids, the
packed mask, cu_seq_lens) against separate runs, a chunk over a KV cache,
greedy generation, gradients, and a few training steps with dropout. Every
case also checks which of our entry points ran (dense or varlen). CPU in
fp32 always, CUDA in bf16 when present. Skipped without transformers."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

import flash_attn_ext.integrations.transformers as fx  # noqa: E402
from conftest import DEVICES, assert_close_to_ref  # noqa: E402

VOCAB = 128
CASES = [pytest.param(d, id=d) for d in DEVICES]
MODELS = ["llama", "gemma2", "gpt_oss"]


def dtype_for(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def config(kind, **extra):
    # head_dim 64: compiled in every build, restricted GPU builds included.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  pad_token_id=0)
    common.update(extra)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    # One sliding-window layer (window 4, shorter than the test sequences) and one full layer.
    layers = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if kind == "gemma2":
        return transformers.Gemma2Config(attn_logit_softcapping=1.5, query_pre_attn_scalar=64, **layers, **common)
    # Two experts, both used by every token: no top-k choice that a rounding
    # difference could flip (bf16 on CUDA).
    return transformers.GptOssConfig(num_local_experts=2, num_experts_per_tok=2, **layers, **common,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


BASELINE = {"llama": "sdpa", "gemma2": "eager", "gpt_oss": "eager"}  # sdpa has no softcap / sinks


def build(kind, device, **extra):
    # Experts (gpt-oss) in plain matmuls: the grouped-mm path has no fp64 for the reference.
    model = transformers.AutoModelForCausalLM.from_config(config(kind, **extra), attn_implementation="faext",
                                                          experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random init gives near-uniform attention (scores ~0.03); larger
            # q and k make the masks, the window and the softcap matter.
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
            if name.endswith("sinks"):
                p.normal_(0.0, 1.0)
    return model.to(device=device, dtype=dtype_for(device)).eval()


def exact_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                    softcap=None, s_aux=None, **kwargs):
    """Attention in fp64 throughout, over transformers' dense additive mask
    (its "eager" mask function). transformers' own eager attention takes the
    softmax in fp32, which turns the mask's fp64 minimum into -inf (NaN on
    padded rows that then reach every row through 0 * NaN)."""
    assert not dropout, "the reference runs in eval mode"
    q, k, v = query.double(), key.double(), value.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    assert attention_mask is not None and attention_mask.dim() == 4  # the eager mask never skips
    s = s + attention_mask[..., : k.shape[-2]].double()
    if s_aux is not None:
        s = torch.cat([s, s_aux.double().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = torch.softmax(s, -1)[..., : k.shape[-2]]
    return (p @ v).transpose(1, 2), None


transformers.AttentionInterface.register("exact64", exact_attention)
transformers.AttentionMaskInterface.register("exact64", transformers.masking_utils.eager_mask)


def reference_of(model):
    """The same weights in fp64, attention in fp64 (exact_attention)."""
    ref = copy.deepcopy(model).to(torch.float64)
    ref.set_attn_implementation("exact64")
    return ref


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls into our entry points, with the dropout they got."""
    seen = {"dense": 0, "varlen": 0, "dropout": []}

    def counting(kind, fn):
        def wrapper(*args, **kwargs):
            seen[kind] += 1
            seen["dropout"].append(kwargs.get("dropout_p", 0.0))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fx, "flash_attn_func", counting("dense", fx.flash_attn_func))
    monkeypatch.setattr(fx, "flash_attn_varlen_func", counting("varlen", fx.flash_attn_varlen_func))
    return seen


def padding_mask(kind, batch, length, device):
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if kind == "left":
        mask[0, :3] = 0
        mask[2, :7] = 0
    elif kind == "right":
        mask[0, -4:] = 0
        mask[2, -6:] = 0
    return mask


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("device", CASES)
def test_logits(kind, padding, device, calls):
    model = build(kind, device)
    ids = torch.randint(1, VOCAB, (3, 12), device=device)
    mask = padding_mask(padding, 3, 12, device)
    inputs = dict(input_ids=ids, attention_mask=mask)
    ours = run(model, "faext", **inputs)
    assert calls["varlen" if padding != "none" else "dense"] == 2  # one call per layer
    assert calls["dense" if padding != "none" else "varlen"] == 0
    theirs = run(model, BASELINE[kind], **inputs)
    ref = run(reference_of(model), "exact64", **inputs)
    valid = mask.bool()
    assert_close_to_ref(ours[valid], ref[valid], theirs[valid], f"{kind} logits, {padding} padding")


PACKED = [[5, 4, 3], [7, 5]]  # two rows of 12 tokens, each packing several sequences


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("device", CASES)
def test_packed_sequences(kind, device, calls):
    """position_ids restarting at 0: each packed sequence attends only to
    itself, as if run alone; through transformers' packed mask (no cache),
    through position_ids (use_cache=True, where transformers' mask does not
    look), and through cu_seq_lens keyword arguments on one flattened row."""
    model = build(kind, device)
    ids = torch.randint(1, VOCAB, (2, 12), device=device)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in PACKED]).to(device)
    ref_model = reference_of(model)
    ours_alone, theirs_alone, ref_alone = [], [], []
    for b, row in enumerate(PACKED):
        start = 0
        for n in row:
            piece = dict(input_ids=ids[b:b + 1, start:start + n])
            ours_alone.append(run(model, "faext", **piece)[0])
            theirs_alone.append(run(model, BASELINE[kind], **piece)[0])
            ref_alone.append(run(ref_model, "exact64", **piece)[0])
            start += n
    ref, theirs = torch.cat(ref_alone), torch.cat(theirs_alone)
    assert_close_to_ref(torch.cat(ours_alone), ref, theirs, f"{kind} separate sequences")

    lengths = [n for row in PACKED for n in row]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    variants = {
        "packed mask": dict(input_ids=ids, position_ids=pos, use_cache=False),
        "position_ids": dict(input_ids=ids, position_ids=pos, use_cache=True),
        "cu_seq_lens": dict(input_ids=ids.reshape(1, -1), position_ids=pos.reshape(1, -1), use_cache=True,
                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths)),
    }
    for name, inputs in variants.items():
        calls["dense"] = calls["varlen"] = 0
        ours = run(model, "faext", **inputs).reshape(-1, VOCAB)
        assert calls["varlen"] == 2 and calls["dense"] == 0, name
        assert_close_to_ref(ours, ref, theirs, f"{kind} packed via {name}")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("device", CASES)
def test_chunk_over_cache(kind, padding, device, calls):
    """A second chunk of 4 tokens over a KV cache of 8 (fewer queries than
    keys), with padding in the cached part: left, or right padding of the
    first chunk followed by more tokens (padding in the middle)."""
    model = build(kind, device)
    ids = torch.randint(1, VOCAB, (2, 12), device=device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[0, 5:8] = 0

    def second_chunk(m, impl):
        m.set_attn_implementation(impl)
        with torch.no_grad():
            first = m(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
            return m(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=first.past_key_values,
                     use_cache=True).logits

    ours = second_chunk(model, "faext")
    # The padding is in the first chunk: varlen there; the second chunk's
    # window layers may keep only unpadded keys (then dense).
    assert calls["varlen"] + calls["dense"] == 4 and calls["varlen"] >= 3
    theirs = second_chunk(model, BASELINE[kind])
    ref = second_chunk(reference_of(model), "exact64")
    assert_close_to_ref(ours, ref, theirs, f"{kind} chunk over the cache, {padding} padding")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("device", CASES)
def test_greedy_generation(kind, padding, device, calls):
    """model.generate with a KV cache (one token at a time over the cache)
    gives transformers' tokens; where the two differ, the fp64 model must see
    the two candidates as a near tie at the first difference."""
    model = build(kind, device)
    ids = torch.randint(1, VOCAB, (3, 10), device=device)
    mask = padding_mask(padding, 3, 10, device)

    def generate(impl):
        model.set_attn_implementation(impl)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=0)

    ours = generate("faext")
    # 2 layers x 5 steps; with padding the full layer is varlen at every step
    # (a window layer goes dense once its window has left the padding).
    assert calls["dense"] + calls["varlen"] == 2 * 5 and calls["dropout"] == [0.0] * 10
    assert calls["varlen"] >= 5 if padding == "left" else calls["varlen"] == 0
    theirs = generate(BASELINE[kind])
    if torch.equal(ours, theirs):
        return
    ref = reference_of(model)
    tie = 0.05 if dtype_for(device) == torch.bfloat16 else 1e-3
    for b in range(ids.shape[0]):
        diff = (ours[b] != theirs[b]).nonzero()
        if diff.numel() == 0:
            continue
        t = int(diff[0])
        logits = run(ref, "exact64", input_ids=ours[b:b + 1, :t], attention_mask=torch.cat(
            [mask[b:b + 1], mask.new_ones(1, t - ids.shape[1])], 1))[0, -1]
        gap = (logits[ours[b, t]] - logits[theirs[b, t]]).abs().item()
        assert gap < tie, (f"{kind}: row {b} generates {ours[b, t]} where {BASELINE[kind]} gives {theirs[b, t]} "
                           f"(fp64 logit gap {gap:.2e})")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("device", CASES)
def test_gradients(kind, device):
    """One backward with right padding: the gradients of every attention
    projection against transformers' own and fp64, under the 2x rule."""
    model = build(kind, device)
    ids = torch.randint(1, VOCAB, (3, 12), device=device)
    mask = padding_mask("right", 3, 12, device)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(m, impl):
        m.set_attn_implementation(impl)
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()
                if "self_attn" in n and p.grad is not None}

    ours, theirs, ref = grads(model, "faext"), grads(model, BASELINE[kind]), grads(reference_of(model), "exact64")
    assert ours.keys() == ref.keys() and ours
    for name in ours:
        assert_close_to_ref(ours[name], ref[name], theirs[name], f"{kind} d/d {name}")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("device", CASES)
def test_training_lowers_loss(kind, device, calls):
    """A few AdamW steps in train mode with the config's attention_dropout:
    the dropout reaches our kernels, and the loss goes down."""
    model = build(kind, device, attention_dropout=0.1).train()
    ids = torch.randint(1, VOCAB, (4, 16), device=device)
    mask = padding_mask("right", 4, 16, device)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert calls["varlen"] == 2 * 6 and calls["dropout"] == [0.1] * 12
    assert losses[-1] < losses[0] * 0.9, losses
    model.eval()
    calls["dropout"].clear()
    run(model, "faext", input_ids=ids, attention_mask=mask)
    assert calls["dropout"] == [0.0, 0.0]  # eval: no dropout


def test_names_transformers_would_route_elsewhere():
    for bad in ("flash_attn_ext", "my_flash", "kernels-community/faext", "faext_sdpa", "eager2"):
        with pytest.raises(ValueError, match="cannot register"):
            fx.register(bad)
    assert fx.register("faext_other") == "faext_other"
    model = transformers.AutoModelForCausalLM.from_config(config("llama"), attn_implementation="faext_other")
    assert model.config._attn_implementation == "faext_other"


def test_attention_without_mask_function_refused():
    transformers.AttentionInterface.register("faext_nomask", fx.attention_forward)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config("llama"), attn_implementation="faext_nomask")
        ids = torch.randint(1, VOCAB, (2, 6))
        with pytest.raises(RuntimeError, match="without its mask function"):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        transformers.AttentionInterface._global_mapping.pop("faext_nomask", None)


def test_unsupported_features_raise():
    model = build("llama", "cpu")
    ids = torch.randint(1, VOCAB, (2, 6))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    dense = torch.zeros(2, 1, 6, 6)
    with pytest.raises(NotImplementedError, match="attention_mask of shape"):
        model(input_ids=ids, attention_mask=dense)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 64)
    k = torch.randn(1, 2, 3, 64)
    with pytest.raises(NotImplementedError, match="position_bias"):
        fx.attention_forward(attn, q, k, k, None, position_bias=torch.zeros(1, 4, 3, 3))
    with pytest.raises(NotImplementedError, match="some_new_feature"):
        fx.attention_forward(attn, q, k, k, None, some_new_feature=1.0)
    from transformers.masking_utils import causal_mask_function, or_masks

    overlay = or_masks(causal_mask_function, lambda b, h, q_idx, kv_idx: kv_idx < 2)
    with pytest.raises(NotImplementedError, match="or_mask"):
        fx.attention_mask(batch_size=1, q_length=4, kv_length=4, mask_function=overlay)


def test_readme_example():
    """The README's transformers example, as written there."""
    import pathlib

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Hugging Face transformers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (Hugging Face transformers)", "exec"), {})
