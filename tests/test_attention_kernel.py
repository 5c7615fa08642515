"""The shared layer with an attention kernel in place of softmax attention (scBERT's FAVOR+): the same
projections, insertion points and prefixes, computing exactly the kernel's formula."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.backbones.favor import FavorKernel, favor_attention
from scpeft_cli.backbones.layers import TransformerLayer

D_MODEL, HEADS, DIM_HEAD, FEATURES = 12, 3, 8, 16


def favor_layer(seed: int = 0) -> TransformerLayer:
    torch.manual_seed(seed)
    kernel = FavorKernel(FEATURES, DIM_HEAD, torch.Generator().manual_seed(seed))
    return TransformerLayer(D_MODEL, HEADS, 20, dropout=0.0, activation="gelu", norm_first=True, qkv_bias=False,
                            attention_dim=HEADS * DIM_HEAD, attention_kernel=kernel).eval()  # fmt: skip


def by_hand(layer: TransformerLayer, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-norm block with separate q/k/v rows of the fused projection and the published FAVOR+ formula."""
    attn = layer.self_attn
    inner = HEADS * DIM_HEAD
    w_q, w_k, w_v = attn.qkv.weight.split(inner)
    h = layer.norm1(x)
    keys_in = h if prefix is None else torch.cat([layer.norm1(prefix), h], dim=1)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], HEADS, DIM_HEAD).transpose(1, 2)

    q, k, v = heads(h @ w_q.T), heads(keys_in @ w_k.T), heads(keys_in @ w_v.T)
    out = favor_attention(q, k, v, attn.kernel.projection_matrix)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], inner))
    return x + layer.linear2(nn.functional.gelu(layer.linear1(layer.norm2(x))))


def test_a_favor_layer_computes_the_pre_norm_block_with_favor_attention():
    layer, x = favor_layer(), torch.randn(2, 7, D_MODEL)
    assert layer.self_attn.qkv.bias is None and layer.self_attn.out_proj.bias is not None
    assert layer.self_attn.qkv.weight.shape == (3 * HEADS * DIM_HEAD, D_MODEL)
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=1e-5, atol=1e-6)


def test_prefix_tokens_join_the_keys_and_values_of_favor_attention():
    layer, x, prefix = favor_layer(), torch.randn(2, 7, D_MODEL), torch.randn(2, 3, D_MODEL)
    torch.testing.assert_close(layer(x, prefix=prefix), by_hand(layer, x, prefix), rtol=1e-5, atol=1e-6)


def test_the_projection_matrix_is_state_and_gets_no_gradient():
    layer = favor_layer()
    assert "self_attn.kernel.projection_matrix" in layer.state_dict()
    assert "self_attn.kernel.projection_matrix" not in dict(layer.named_parameters())
    stored = layer.self_attn.kernel.projection_matrix.clone()
    layer.train()
    layer(torch.randn(2, 5, D_MODEL, requires_grad=True)).sum().backward()
    assert torch.equal(layer.self_attn.kernel.projection_matrix, stored), "never redrawn"


def test_recomputing_frozen_qkv_gives_the_same_gradients_with_favor():
    layer, x = favor_layer().train(), torch.randn(2, 6, D_MODEL)
    layer.self_attn.qkv.requires_grad_(False)
    grads = []
    for keep in (True, False):
        inputs = x.clone().requires_grad_(True)
        layer(inputs, keep_qkv=keep).square().sum().backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
