"""Memory-lean dropout: the same function as nn.Dropout / ReLU + nn.Dropout, with 1-byte masks kept for backward."""

import pytest
import torch
from torch import nn

from scpeft_cli.backbones.dropout import Dropout, ReluDropout, activation_dropout
from scpeft_cli.backbones.layers import TransformerLayer


def saved_for_backward(fn, x: torch.Tensor) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def reference(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What nn.Dropout would give with the mask `module` drew: kept entries scaled by 1 / (1 - p)."""
    h = torch.relu(x) if isinstance(module, ReluDropout) else x
    kept = out != 0
    return torch.where(kept, h / (1 - module.p), 0)


@pytest.mark.parametrize("module_type", [Dropout, ReluDropout])
def test_train_mode_drops_a_share_p_and_rescales_the_rest(module_type):
    torch.manual_seed(0)
    module = module_type(0.3).train()
    x = torch.rand(200, 500) + 0.1  # positive, so ReLU keeps everything and only dropout zeroes
    out = module(x)
    torch.testing.assert_close(out, reference(module, x, out))
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01


@pytest.mark.parametrize("module_type", [Dropout, ReluDropout])
def test_gradient_flows_through_exactly_the_kept_entries(module_type):
    torch.manual_seed(1)
    module = module_type(0.5).train()
    x = torch.randn(64, 32, requires_grad=True)
    out = module(x)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    kept = out != 0
    torch.testing.assert_close(x.grad, torch.where(kept, weight / 0.5, 0))
    if module_type is ReluDropout:
        assert not kept[x <= 0].any()


@pytest.mark.parametrize("module_type", [Dropout, ReluDropout])
def test_backward_keeps_only_a_bool_mask(module_type):
    x = torch.randn(16, 64, requires_grad=True)
    saved = saved_for_backward(module_type(0.2).train(), x * 1)
    assert saved and all(t.dtype == torch.bool for t in saved)
    # nn.ReLU + nn.Dropout keep float32 tensors as large as the input
    plain = saved_for_backward(nn.Sequential(nn.ReLU(), nn.Dropout(0.2)).train(), x * 1)
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in plain)


@pytest.mark.parametrize("module_type", [Dropout, ReluDropout])
def test_eval_mode_and_p_zero_are_exact(module_type):
    x = torch.randn(8, 16)
    expected = torch.relu(x) if module_type is ReluDropout else x
    assert torch.equal(module_type(0.4).eval()(x), expected)
    assert torch.equal(module_type(0.0).train()(x), expected)
    assert torch.equal(module_type(1.0).train()(x), torch.zeros_like(x))


def test_gelu_activation_keeps_gelu_and_a_lean_dropout():
    block = activation_dropout("gelu", 0.1).eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(block(x), nn.functional.gelu(x))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        activation_dropout("tanh", 0.1)


def test_layer_backward_stores_no_float_dropout_masks():
    """In a frozen layer, every saved tensor of the input's size is bool, or an attention / LayerNorm input."""
    torch.manual_seed(0)
    layer = TransformerLayer(32, 4, 32, dropout=0.2).train().requires_grad_(False)
    x = torch.randn(2, 10, 32, requires_grad=True)
    saved = saved_for_backward(layer, x * 1)
    masks = [t for t in saved if t.dtype == torch.bool]
    assert len(masks) == 3  # dropout1, ReLU + dropout, dropout2
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    activations = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()}
    # the two LayerNorm inputs; attention behind the frozen projection saves through its own hooks,
    # which these do not see (what it keeps: tests/test_recompute.py)
    assert len(activations - weights) == 2
