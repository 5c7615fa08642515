"""Attention behind a frozen QKV projection keeps the projection's input, not q/k/v, for backward."""

import weakref

import pytest
import torch
from live_memory import LiveTensorMemory
from torch import nn

from scpeft_cli.backbones.layers import TransformerLayer, run_layers
from scpeft_cli.backbones.recompute import RecomputedProjection, normalized, recomputable
from scpeft_cli.peft.lora import LoRALinear

BATCH, LENGTH, D_MODEL = 3, 9, 16


def frozen_layer(**options) -> TransformerLayer:
    torch.manual_seed(0)
    layer = TransformerLayer(D_MODEL, 4, 32, dropout=0.2, **options).train()
    layer.requires_grad_(False)
    return layer


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding_mask[1, 6:] = True
    return x, padding_mask


def output_and_input_grad(layer, *, keep_qkv: bool, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x, padding_mask = inputs()
    x.requires_grad_(True)
    torch.manual_seed(2)  # the same dropout masks in every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, padding_mask, keep_qkv=keep_qkv)
    out.float().pow(2).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize(
    "options",
    [{}, {"attention_dropout": 0.1}, {"norm_first": True}],
    ids=["post-norm", "attention-dropout", "pre-norm"],
)
def test_recomputed_qkv_gives_bit_identical_outputs_and_gradients(options):
    layer = frozen_layer(**options)
    kept_out, kept_grad = output_and_input_grad(layer, keep_qkv=True)
    out, grad = output_and_input_grad(layer, keep_qkv=False)
    assert torch.equal(out, kept_out)
    assert torch.equal(grad, kept_grad)


def test_recomputation_runs_under_the_forward_pass_autocast():
    layer = frozen_layer()
    kept_out, kept_grad = output_and_input_grad(layer, keep_qkv=True, autocast=True)
    out, grad = output_and_input_grad(layer, keep_qkv=False, autocast=True)
    assert not torch.equal(out, output_and_input_grad(layer, keep_qkv=False)[0])  # bf16 matmuls did run
    assert torch.equal(out, kept_out)
    assert torch.equal(grad, kept_grad)


def frozen_stack(n_layers: int = 3, **options) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(TransformerLayer(D_MODEL, 4, 32, dropout=0.2, **options) for _ in range(n_layers))
    return layers.train().requires_grad_(False)


def stack_output_and_input_grad(layers, *, recompute: bool, autocast: bool = False):
    x, padding_mask = inputs()
    x.requires_grad_(True)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = run_layers(layers, x, padding_mask, recompute_frozen_qkv=recompute)
    out.float().pow(2).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_qkv_recomputed_from_layernorm_inputs_is_bit_identical_through_a_stack(norm_first, autocast):
    layers = frozen_stack(norm_first=norm_first)
    out, grad = stack_output_and_input_grad(layers, recompute=True, autocast=autocast)
    kept_out, kept_grad = stack_output_and_input_grad(layers, recompute=False, autocast=autocast)
    assert torch.equal(out, kept_out)
    assert torch.equal(grad, kept_grad)


def test_a_frozen_post_norm_stack_keeps_no_layer_input_for_the_recomputation():
    """Layer 0 keeps the stack's input (held anyway); later layers keep their input's LayerNorm input (held anyway)."""
    layers = frozen_stack()
    x, padding_mask = inputs()
    x.requires_grad_(True)

    def held(recompute: bool) -> float:
        with LiveTensorMemory() as memory:
            out = run_layers(layers, x, padding_mask, recompute_frozen_qkv=recompute)
        del out
        return memory.end_megabytes

    qkv_mb = BATCH * LENGTH * 3 * D_MODEL * 4 / 2**20
    assert held(False) - held(True) == pytest.approx(len(layers) * qkv_mb, rel=1e-9)


def test_layernorm_input_modified_in_place_before_backward_is_an_error():
    norm = nn.LayerNorm(4).requires_grad_(False)
    linear = nn.Linear(4, 12).requires_grad_(False)
    source = torch.randn(2, 4, requires_grad=True) * 1.0
    normed = normalized(norm, source)
    qkv = linear(normed)
    recomputation = RecomputedProjection(linear, normed, qkv)
    assert recomputation.kept_input is source
    with recomputation.hooks():
        out = (qkv[:, :4] * qkv[:, 4:8]).sum()
    with torch.no_grad():
        source.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


def held_after_forward(layer, *, keep_qkv: bool, prefix: torch.Tensor | None = None) -> float:
    x, padding_mask = inputs()
    x.requires_grad_(True)
    with LiveTensorMemory() as memory:
        out = layer(x, padding_mask, keep_qkv=keep_qkv, prefix=prefix)
    del out
    return memory.end_megabytes


def test_frozen_attention_keeps_exactly_the_qkv_output_less():
    layer = frozen_layer()
    qkv_mb = BATCH * LENGTH * 3 * D_MODEL * 4 / 2**20
    saved = held_after_forward(layer, keep_qkv=True) - held_after_forward(layer, keep_qkv=False)
    assert saved == pytest.approx(qkv_mb, rel=1e-9)


def test_prompted_pre_norm_attention_recomputes_from_what_its_layernorm_keeps():
    """Prompts and cells are normalised together, so the LayerNorm's own input serves the recomputation."""
    layer = frozen_layer(norm_first=True)
    prefix = torch.randn(BATCH, 2, D_MODEL, requires_grad=True)
    qkv_mb = BATCH * (2 + LENGTH) * 3 * D_MODEL * 4 / 2**20
    kept = held_after_forward(layer, keep_qkv=True, prefix=prefix)
    saved = kept - held_after_forward(layer, keep_qkv=False, prefix=prefix)
    assert saved == pytest.approx(qkv_mb, rel=1e-9)


def test_only_plain_frozen_linear_projections_under_autograd_are_recomputed():
    linear = nn.Linear(4, 12)
    x = torch.randn(2, 4, requires_grad=True)
    assert not recomputable(linear, x)  # trainable (full fine-tuning)
    linear.requires_grad_(False)
    assert recomputable(linear, x)
    assert not recomputable(linear, x.detach())  # no gradient to the input: nothing is saved
    with torch.no_grad():
        assert not recomputable(linear, x)
    lora = LoRALinear(linear, blocks=[(0, 4)], r=2, alpha=2.0, dropout=0.0)
    lora.requires_grad_(False)
    assert not recomputable(lora, x)  # a wrapper may draw random numbers: keep its output


def test_input_modified_in_place_before_backward_is_an_error():
    linear = nn.Linear(4, 12).requires_grad_(False)
    x = torch.randn(2, 4, requires_grad=True)
    source = x * 1.0
    qkv = linear(source)
    with RecomputedProjection(linear, source, qkv).hooks():
        out = (qkv[:, :4] * qkv[:, 4:8]).sum()
    with torch.no_grad():
        source.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()


@pytest.mark.parametrize("checkpointing", [True, 1])
def test_gradient_checkpointing_of_frozen_layers_gives_identical_input_gradients(checkpointing):
    torch.manual_seed(0)
    layers = nn.ModuleList(TransformerLayer(D_MODEL, 4, 32, dropout=0.2) for _ in range(2)).train()
    layers.requires_grad_(False)

    def input_grad(checkpointing) -> torch.Tensor:
        x, padding_mask = inputs()
        x.requires_grad_(True)
        torch.manual_seed(2)
        run_layers(layers, x, padding_mask, checkpointing=checkpointing).pow(2).sum().backward()
        return x.grad

    assert torch.equal(input_grad(checkpointing), input_grad(False))


def test_marking_a_layernorm_output_does_not_keep_the_layernorm_input_alive():
    norm = nn.LayerNorm(4).requires_grad_(False)
    source = torch.randn(2, 4, requires_grad=True) * 1.0
    out = normalized(norm, source)
    source_ref = weakref.ref(source)
    del source
    out.sum().backward()  # the LayerNorm's backward releases its saved input
    assert source_ref() is None  # `out`, still alive, does not hold it
