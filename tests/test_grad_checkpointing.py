"""trainer.grad_checkpointing: recomputed layers give the same loss and gradients and keep fewer activations."""

import pytest
import torch
from torch import nn

from scpeft_cli.backbones.layers import TransformerLayer, run_layers


def stack(n_layers: int = 3) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(TransformerLayer(16, 2, 32, dropout=0.2) for _ in range(n_layers)).train()


def loss_and_grads(layers: nn.ModuleList, checkpointing) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(3, 7, dtype=torch.bool)
    padding_mask[0, 5:] = True
    saved_bytes = 0

    def pack(t):
        nonlocal saved_bytes
        saved_bytes += t.numel() * t.element_size()
        return t

    torch.manual_seed(2)  # the same dropout masks in every run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run_layers(layers, x, padding_mask, checkpointing=checkpointing).pow(2).mean()
    layers.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in layers.parameters()], saved_bytes


@pytest.mark.parametrize("checkpointing", [True, 1, 2])
def test_checkpointed_layers_give_identical_loss_and_gradients_with_fewer_saved_activations(checkpointing):
    layers = stack()
    loss, grads, saved = loss_and_grads(layers, False)
    loss_ckpt, grads_ckpt, saved_ckpt = loss_and_grads(layers, checkpointing)
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g, g_ckpt, rtol=0, atol=1e-6)
    assert saved_ckpt < saved


def test_more_checkpointed_layers_keep_less():
    layers = stack()
    saved = [loss_and_grads(layers, n)[2] for n in (0, 1, 2, 3)]
    assert saved == sorted(saved, reverse=True) and len(set(saved)) == 4
    assert loss_and_grads(layers, True)[2] == saved[3]
