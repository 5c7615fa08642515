"""Deep prefix prompts: in front of the sequence, no outputs where nothing reads them, the published results."""

import pytest
import torch
from torch import nn

from scpeft_cli.backbones.layers import TransformerLayer, run_layers
from scpeft_cli.peft.prefix import PrefixPrompts

BATCH, LENGTH, D_MODEL, N_LAYERS, N_TOKENS = 3, 7, 16, 4, 2


def stack(**options) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(TransformerLayer(D_MODEL, 4, 24, dropout=0.0, **options) for _ in range(N_LAYERS))
    return layers.eval().requires_grad_(False)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding_mask[1, 5:] = True
    return x, padding_mask


def prompts(prompted: list[int]) -> PrefixPrompts:
    hook = PrefixPrompts(prompted, N_TOKENS, D_MODEL, n_layers=N_LAYERS)
    with torch.no_grad():
        hook.scpeft_prefix.normal_(generator=torch.Generator().manual_seed(2))
    return hook


def published_definition(layers: nn.ModuleList, hook: PrefixPrompts, x, padding_mask) -> torch.Tensor:
    """Every position computed, prompts right after `<cls>` (the published method): inserted at the first
    prompted layer, replaced by each later one, stripped after the last layer."""
    n = N_TOKENS
    for index, layer in enumerate(layers):
        if index in hook.position:
            prompt = hook.scpeft_prefix[hook.position[index]].expand(BATCH, -1, -1)
            if index == hook.layers[0]:
                visible = padding_mask.new_zeros(BATCH, n)
                padding_mask = torch.cat([padding_mask[:, :1], visible, padding_mask[:, 1:]], dim=1)
                x = torch.cat([x[:, :1], prompt, x[:, 1:]], dim=1)
            else:
                x = torch.cat([x[:, :1], prompt, x[:, 1 + n :]], dim=1)
        x = layer(x, padding_mask)
    return torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)


@pytest.mark.parametrize("prompted", [[0, 1, 2, 3], [1, 3], [0], [2]], ids=["all", "1,3", "first", "third"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_prompts_in_front_computed_where_read_match_the_published_definition(prompted, norm_first):
    """The layers carry no position, so prompts in front give what prompts after `<cls>` give (up to rounding)."""
    layers, hook = stack(norm_first=norm_first), prompts(prompted)
    x, padding_mask = inputs()

    def output_and_prefix_grad(run):
        hook.zero_grad(set_to_none=True)
        out = run(layers, hook, x, padding_mask)
        out.pow(2).sum().backward()
        return out.detach(), hook.scpeft_prefix.grad

    out, grad = output_and_prefix_grad(lambda layers, hook, x, mask: run_layers(layers, x, mask, hook))
    expected, expected_grad = output_and_prefix_grad(published_definition)
    assert out.shape == (BATCH, LENGTH, D_MODEL)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_layers_followed_by_a_prompted_layer_output_only_the_cell_positions():
    layers, hook = stack(), prompts([1, 3])
    lengths = []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    x, padding_mask = inputs()
    run_layers(layers, x, padding_mask, hook)
    # layer 0: no prompts yet; 1: read by unprompted layer 2; 2: replaced by layer 3; 3: left out of the output
    assert lengths == [LENGTH, LENGTH + N_TOKENS, LENGTH, LENGTH]


@pytest.mark.parametrize("prompted", [[0, 2], [0, 1, 2, 3]], ids=["0,2", "all"])
def test_gradient_checkpointing_skips_the_same_outputs(prompted):
    layers, hook = stack(), prompts(prompted)
    layers.train()
    x, padding_mask = inputs()

    def prefix_grad(checkpointing) -> torch.Tensor:
        hook.zero_grad(set_to_none=True)
        run_layers(layers, x, padding_mask, hook, checkpointing=checkpointing).pow(2).sum().backward()
        return hook.scpeft_prefix.grad

    torch.testing.assert_close(prefix_grad(True), prefix_grad(False), rtol=1e-5, atol=1e-6)
