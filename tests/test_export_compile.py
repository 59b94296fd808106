"""torch.compile (fullgraph, so any graph break fails), torch.export and CUDA
graph capture of small models built on each entry point."""
import functools

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import flash_attn_ext.sdpa as sdpa_mod
from flash_attn_ext.mha import MultiheadAttention
from flash_attn_ext.sdpa import scaled_dot_product_attention

try:
    from flash_attn_ext.interface import flash_attn_func
except ImportError:  # the interface module is optional for these tests
    flash_attn_func = None

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
E, H = 64, 2  # head dim 32


@functools.lru_cache(maxsize=None)
def dtype_for(device):
    """fp32 where the op has fp32 kernels (CPU), else bf16 (CUDA)."""
    q = torch.randn(1, 4, 1, 32, device=device)
    try:
        sdpa_mod._ops.fwd(q, q, q, None, 1.0, False, -1, -1, False)
        return torch.float32
    except RuntimeError:
        return torch.bfloat16


class SdpaBlock(nn.Module):
    """Attention + MLP through our scaled_dot_product_attention."""

    def __init__(self, kind="sdpa_causal"):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, E // H).permute(2, 0, 3, 1, 4)  # each (B, H, S, D), views
        if self.kind == "sdpa_causal":
            y = scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kind == "sdpa_mask":
            y = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # flash_attn_func: (B, S, H, D)
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, E))
        return x + self.mlp(x)


class MhaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MultiheadAttention(E, H, batch_first=True)
        self.norm = nn.LayerNorm(E)

    def forward(self, x, key_padding_mask=None):
        h = self.norm(x)
        return x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]


def make_model(kind, device, dtype):
    torch.manual_seed(0)
    model = MhaBlock() if kind == "mha" else SdpaBlock(kind)
    return model.to(device, dtype)


def make_args(kind, device, dtype, batch=2, seqlen=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seqlen, E, generator=g).to(device, dtype)
    if kind == "mha":
        kpm = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
        kpm[0, -5:] = True
        return (x, kpm)
    if kind == "sdpa_mask":
        mask = torch.rand(batch, 1, seqlen, seqlen, generator=g) < 0.8
        mask[..., 0] = True
        return (x, mask.to(device))
    return (x,)


KINDS = ["sdpa_causal", "sdpa_mask", "mha", "flash_attn_func"]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


def uses_our_op(gm: torch.fx.GraphModule) -> bool:
    return any("flash_attn_ext" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_fwd_bwd(device, kind):
    """fullgraph=True fails on any graph break; aot_eager traces forward and
    backward through the op's fake and autograd registrations."""
    if kind == "flash_attn_func" and flash_attn_func is None:
        pytest.skip("flash_attn_ext.interface not available")
    dtype = dtype_for(device)
    model = make_model(kind, device, dtype)
    args = make_args(kind, device, dtype)
    graphs = []

    def keep(gm, _):  # run AOTAutograd's forward and backward graphs as they are
        return make_boxed_func(gm)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = args[0].clone().requires_grad_()
    y = compiled(x, *args[1:])
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    gx = x.grad.clone()
    assert len(graphs) == 1 and uses_our_op(graphs[0])

    model.zero_grad()
    x2 = args[0].clone().requires_grad_()
    y2 = model(x2, *args[1:])
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, **tol(dtype))
    torch.testing.assert_close(gx, x2.grad, **tol(dtype))
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor(device):
    """The default (inductor) backend on one model, forward and backward."""
    dtype = dtype_for(device)
    model = make_model("sdpa_mask", device, dtype)
    x, mask = make_args("sdpa_mask", device, dtype)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    xc = x.clone().requires_grad_()
    y = compiled(xc, mask)
    y.sum().backward()
    xe = x.clone().requires_grad_()
    y_eager = model(xe, mask)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, **tol(dtype))
    torch.testing.assert_close(xc.grad, xe.grad, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mha", "sdpa_mask", "sdpa_causal"])
def test_export(device, kind):
    dtype = dtype_for(device)
    model = make_model(kind, device, dtype).eval()
    args = make_args(kind, device, dtype)
    with torch.no_grad():
        exported = torch.export.export(model, args)
        assert uses_our_op(exported.graph_module)
        expected = model(*args)
        torch.testing.assert_close(exported.module()(*args), expected, **tol(dtype))
        # New inputs of the same shapes through the exported program.
        args2 = tuple(a + 0.5 * torch.randn_like(a) if a.is_floating_point() else a for a in args)
        torch.testing.assert_close(exported.module()(*args2), model(*args2), **tol(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("kind", ["sdpa_causal", "mha"])
def test_cuda_graph_capture(kind):
    """Forward and backward captured in a CUDA graph replay like eager."""
    device, dtype = "cuda", dtype_for("cuda")
    model = make_model(kind, device, dtype)
    args = make_args(kind, device, dtype)
    static_x = args[0].clone().requires_grad_()

    def step():
        y = model(static_x, *args[1:])
        y.square().sum().backward()
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=False)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()

    new_x = torch.randn_like(args[0])
    with torch.no_grad():
        static_x.copy_(new_x)
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    got_y, got_g = static_y.clone(), [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    x = new_x.clone().requires_grad_()
    y = model(x, *args[1:])
    y.square().sum().backward()
    torch.testing.assert_close(got_y, y, **tol(dtype))
    for a, p in zip(got_g, model.parameters()):
        torch.testing.assert_close(a, p.grad, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes(device):
    """One dynamic-shape graph serves several sequence lengths (Sq < Sk, =, >)."""
    dtype = dtype_for(device)
    fn = torch.compile(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
                       backend="aot_eager", dynamic=True, fullgraph=True)
    for sq, sk in ((8, 12), (12, 12), (20, 12), (13, 30)):
        q = torch.randn(2, 2, sq, 32, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, sk, 32, device=device, dtype=dtype, requires_grad=True)
        out = fn(q, k, k)
        out.sum().backward()
        ref = scaled_dot_product_attention(q, k, k, is_causal=True)
        torch.testing.assert_close(out, ref, **tol(dtype))
