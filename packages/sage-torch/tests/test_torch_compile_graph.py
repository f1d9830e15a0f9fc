"""GPU: torch.compile(fullgraph=True) with inductor, and CUDA graph capture, of attention() and the
patched SDPA. Runs on whatever path the device has (kernel, or PyTorch fallback when none is
built): both must compile without graph breaks and capture without host syncs."""

import warnings

import pytest
import torch

import sage_torch
from sage_torch import _dispatch
from sage_torch_testing import make_qkv

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sage_torch.SageFallbackWarning)
        yield


def _path(dtype, d):
    arch = _dispatch.device_arch(torch.device("cuda"))
    return _dispatch.resolve(arch, dtype, d, "auto", strict=False).describe()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("d", [64, 128])
def test_compile_fullgraph_inductor(layout, d, seed):
    print("path:", _path(torch.bfloat16, d))
    q, k, v = make_qkv(2, 4, 2, 130, 257, d, layout=layout, dtype=torch.bfloat16, device="cuda", seed=seed)

    def f(q, k, v):
        o, lse = sage_torch.attention(q * 0.5, k, v, layout=layout, is_causal=True, return_lse=True)
        return o.float() * 2, lse + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)  # fullgraph: any graph break is an error
    o_c, lse_c = compiled(q, k, v)
    o_e, lse_e = f(q, k, v)
    torch.testing.assert_close(o_c, o_e, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse_c, lse_e, rtol=0, atol=1e-4)


def test_compile_patched_sdpa_model(seed):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(128, 128)

        def forward(self, q, k, v):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(o)

    model = Block().to("cuda", torch.float16).eval()
    q, k, v = make_qkv(1, 4, 4, 256, 256, 128, dtype=torch.float16, device="cuda", seed=seed)
    with torch.no_grad(), sage_torch.patch_sdpa():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(q, k, v)
        eager = model(q, k, v)
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-2)


def _graph_check(fn, inputs, seed):
    """Capture fn(*static) in a CUDA graph, replay on new data, compare with eager on that data."""
    static = [t.clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up outside capture: lazy imports, allocator, caches
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    fresh = [torch.randn(t.shape, device="cuda", dtype=torch.float32,
                         generator=torch.Generator("cuda").manual_seed(seed + 10 + i)).to(t.dtype)
             for i, t in enumerate(inputs)]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    expected = fn(*fresh)
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for got, exp in zip(outs, exps):
        torch.testing.assert_close(got, exp, rtol=0, atol=2e-3)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cuda_graph_capture_attention(layout, seed):
    print("path:", _path(torch.bfloat16, 128))
    q, k, v = make_qkv(1, 8, 2, 200, 333, 128, layout=layout, dtype=torch.bfloat16, device="cuda", seed=seed)
    _graph_check(lambda q, k, v: sage_torch.attention(q, k, v, layout=layout, is_causal=True, return_lse=True),
                 (q, k, v), seed)


def test_cuda_graph_capture_compiled_reduce_overhead(seed):
    q, k, v = make_qkv(1, 4, 4, 512, 512, 64, dtype=torch.float16, device="cuda", seed=seed)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: sage_torch.attention(q, k, v, is_causal=True) * 1.0,
                             mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # cudagraph trees record on the 2nd/3rd call
        out = compiled(q, k, v).clone()
    torch.testing.assert_close(out, sage_torch.attention(q, k, v, is_causal=True), rtol=0, atol=2e-3)
