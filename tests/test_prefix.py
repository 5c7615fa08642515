"""Deep prefix prompts compute no outputs at prompt positions that nothing reads, and change no result by it."""

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


def every_position_computed(layers: nn.ModuleList, hook: PrefixPrompts, x, padding_mask) -> torch.Tensor:
    """The plain definition: each prompted layer's block replaces the previous one; the output leaves it out."""
    carried = False
    for index, layer in enumerate(layers):
        if index in hook.position:
            if carried:
                x, padding_mask = x[:, N_TOKENS:], padding_mask[:, N_TOKENS:]
            x, padding_mask = hook.before_layer(index, x, padding_mask)
            carried = True
        x = layer(x, padding_mask)
    return x[:, N_TOKENS:] if carried else x


@pytest.mark.parametrize("prompted", [[0, 1, 2, 3], [1, 3], [0], [2]], ids=["all", "1,3", "first", "third"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_skipping_unread_prompt_outputs_gives_the_same_result_and_gradients(prompted, norm_first):
    layers, hook = stack(norm_first=norm_first), prompts(prompted)
    x, padding_mask = inputs()

    def output_and_prefix_grad(run):
        hook.zero_grad(set_to_none=True)
        out = run(layers, hook, x, padding_mask)
        out.pow(2).sum().backward()
        return out.detach(), hook.scpeft_prefix.grad

    out, grad = output_and_prefix_grad(lambda layers, hook, x, mask: run_layers(layers, x, mask, hook))
    expected, expected_grad = output_and_prefix_grad(every_position_computed)
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
