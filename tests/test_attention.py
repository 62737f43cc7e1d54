"""Sliding-window attention: the windowed forms equal the dense-mask reference."""

import pytest
import torch
import torch.nn.functional as F

import ltm
from ltm.attention import CHUNK, dense_mask, plan_window, uses_window_kernel, window_attention, windowed_keys
from ltm.model import KVCache


def qkv(T, B=2, H=3, Dh=8, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, Dh, generator=g, dtype=torch.float64 if grad else torch.float32).requires_grad_(grad)
            for _ in range(3)]


@pytest.mark.parametrize("T, w", [(256, 1), (256, 64), (512, 127), (512, 128), (512, 129), (1024, 256)])
def test_the_chunked_window_equals_the_dense_mask(T, w):
    q, k, v = qkv(T)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(T, w, q.device))
    chunked = window_attention(q, k, v, plan_window(T, w, q.shape[1], q.device, "chunked"))
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)


def test_the_chunked_window_has_the_dense_masks_gradients():
    T, w = 512, 200
    q, k, v = qkv(T, grad=True)
    grads = []
    for kind in ("dense", "chunked"):
        out = window_attention(q, k, v, plan_window(T, w, q.shape[1], q.device, kind))
        grads.append(torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_flex_attention_with_its_block_mask_equals_the_dense_mask_forward():
    T, w = 512, 200  # FlexAttention has no backward on a CPU; CUDA checks it in test_cuda.py
    q, k, v = qkv(T, H=2, Dh=16)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(T, w, q.device))
    flex = window_attention(q, k, v, plan_window(T, w, q.shape[1], q.device, "flex"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_flex_attention_inside_a_compiled_model_equals_the_dense_mask():
    # Compiled, q and k are views of one RoPE output and the block mask is built in the graph, as
    # in the compiled decoder update on a GPU; inductor's CPU template once got such views wrong.
    cfg = ltm.ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=4, ctx=512, window=128, n_latents=4)
    torch.manual_seed(0)
    model = ltm.build_model(cfg).eval()
    tokens, z = torch.randint(0, 64, (2, 512)), torch.randn(2, 4, 64)
    model.attention = "dense"
    with torch.no_grad():
        dense = model(tokens, z)
    model.attention = "flex"
    torch._dynamo.reset()
    with torch.no_grad():
        flex = torch.compile(lambda m, t, z_: m(t, z_), dynamic=False)(model, tokens, z)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_auto_uses_a_window_kernel_only_where_it_saves_half_the_scores():
    assert windowed_keys(256) == 3 * CHUNK and uses_window_kernel(1024, 256)  # the paper's shape
    assert not uses_window_kernel(128, 64) and not uses_window_kernel(128, 8)  # the micro presets: dense
    assert not uses_window_kernel(1000, 100)  # not whole blocks
    cpu = torch.device("cpu")
    assert plan_window(1024, 256, 8, cpu).kind == "chunked" and plan_window(128, 8, 4, cpu).kind == "dense"
    assert plan_window(128, 128, 4, cpu) is None  # the window covers the sequence: plain causal
    with pytest.raises(ValueError, match="divisible by 128"):
        plan_window(1000, 100, 4, cpu, "chunked")
    with pytest.raises(ValueError, match="unknown window kind 'sparse'"):
        plan_window(1024, 100, 4, cpu, "sparse")


def test_a_model_gives_the_same_logits_and_decodes_the_same_with_either_window():
    cfg = ltm.ModelConfig(vocab_size=50, n_layers=2, d_model=32, n_heads=2, ctx=256, window=40, n_latents=4)
    torch.manual_seed(0)
    model = ltm.build_model(cfg)
    tokens = torch.randint(0, 50, (2, 256))
    z = torch.randn(2, 4, 32)
    out = {}
    for kind in ("dense", "chunked"):
        model.attention = kind
        out[kind] = model(tokens, z)
        cache = KVCache(cfg.n_layers)  # a prompt through the window, then one token at a time
        steps = [model(tokens[:, :128], z, cache)[:, -1]] + [model(tokens[:, t:t + 1], z, cache)[:, -1]
                                                            for t in range(128, 140)]
        torch.testing.assert_close(torch.stack(steps, 1), out[kind][:, 127:140], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["chunked"], out["dense"], atol=1e-5, rtol=1e-5)
