"""Attention that trains only the prompt block: the generic attention's outputs and the block's gradients,
and the first prompted layer of a frozen stack skipping the generic attention backward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from scpeft_cli.backbones.layers import TransformerLayer, run_layers
from scpeft_cli.backbones.prompt_attention import attention_training_block
from scpeft_cli.peft.prefix import PrefixPrompts

BATCH, HEADS, LENGTH, HEAD_DIM, N_BLOCK = 3, 2, 9, 8, 4


def attention_inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=generator, dtype=dtype) for _ in range(3))
    block_k, block_v = (
        torch.randn(BATCH, HEADS, N_BLOCK, HEAD_DIM, generator=generator, dtype=dtype).requires_grad_()
        for _ in range(2)
    )
    padding_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding_mask[1, 6:] = True
    padding_mask[2, 3:] = True
    return q, k, v, block_k, block_v, padding_mask


def generic_attention(q, k, v, block_k, block_v, padding_mask):
    visible = torch.cat([padding_mask.new_zeros(BATCH, N_BLOCK), padding_mask], dim=1)
    keys, values = torch.cat([block_k, k], dim=2), torch.cat([block_v, v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=~visible[:, None, None, :])


def output_and_block_grads(attention, q, k, v, block_k, block_v, padding_mask):
    block_k.grad = block_v.grad = None
    out = attention(q, k, v, block_k, block_v, padding_mask)
    (out.float() * torch.linspace(-1, 1, HEAD_DIM)).sum().backward()
    return out.detach(), block_k.grad, block_v.grad


def test_outputs_are_the_generic_attention_s_and_block_gradients_match():
    inputs = attention_inputs()
    out, grad_k, grad_v = output_and_block_grads(attention_training_block, *inputs)
    expected, expected_k, expected_v = output_and_block_grads(generic_attention, *inputs)
    assert torch.equal(out, expected)  # the same CPU kernel on the same inputs
    torch.testing.assert_close(grad_k, expected_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_v, expected_v, rtol=1e-5, atol=1e-6)
    assert grad_k.abs().sum() > 0 and grad_v.abs().sum() > 0


def test_bf16_block_gradients_match_the_generic_path_within_bf16_rounding():
    inputs = attention_inputs(torch.bfloat16)
    out, grad_k, grad_v = output_and_block_grads(attention_training_block, *inputs)
    expected, expected_k, expected_v = output_and_block_grads(generic_attention, *inputs)
    assert out.dtype == grad_k.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    torch.testing.assert_close(grad_k, expected_k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_v, expected_v, rtol=2e-2, atol=2e-2)


def test_queries_that_need_gradients_are_refused():
    q, k, v, block_k, block_v, padding_mask = attention_inputs()
    with pytest.raises(ValueError, match="constant queries, keys and values"):
        attention_training_block(q.requires_grad_(), k, v, block_k, block_v, padding_mask)


D_MODEL, N_LAYERS, N_TOKENS = 16, 3, 2


def frozen_stack(**options) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(TransformerLayer(D_MODEL, 4, 24, dropout=0.0, **options) for _ in range(N_LAYERS))
    return layers.requires_grad_(False)


def attention_backward_passes(layers, x, padding_mask, hook) -> tuple[int, int]:
    """(generic flash-attention backward passes, prompt-block-only backward passes) of one training step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_layers(layers, x, padding_mask, hook).pow(2).sum().backward()
    counts = {event.key: event.count for event in prof.key_averages()}
    return counts.get("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 0), counts.get(
        "_BlockTrainedAttentionBackward", 0
    )


def stack_inputs():
    x = torch.randn(BATCH, LENGTH, D_MODEL, generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding_mask[1, 6:] = True
    return x, padding_mask


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_first_prompted_layer_of_a_frozen_stack_runs_no_generic_attention_backward(norm_first):
    layers = frozen_stack(norm_first=norm_first)
    hook = PrefixPrompts(list(range(N_LAYERS)), N_TOKENS, D_MODEL, n_layers=N_LAYERS)
    x, padding_mask = stack_inputs()
    assert attention_backward_passes(layers, x, padding_mask, hook) == (N_LAYERS - 1, 1)
    assert hook.scpeft_prefix.grad[0].abs().sum() > 0  # layer 0's prompts still get their gradient


@pytest.mark.parametrize(
    "case", ["cells need gradients", "trainable projection", "trainable pre-norm", "attention dropout"]
)
def test_the_generic_backward_runs_wherever_more_than_the_prompts_train(case):
    options = {"attention_dropout": 0.1} if case == "attention dropout" else {}
    layers = frozen_stack(norm_first=case == "trainable pre-norm", **options).train()
    hook = PrefixPrompts(list(range(N_LAYERS)), N_TOKENS, D_MODEL, n_layers=N_LAYERS)
    x, padding_mask = stack_inputs()
    if case == "cells need gradients":  # e.g. a token prompt on the embedding
        x.requires_grad_()
    if case == "trainable projection":  # e.g. LoRA on the fused QKV projection
        layers[0].self_attn.qkv.requires_grad_()
    if case == "trainable pre-norm":  # the LayerNorm before the projection
        layers[0].norm1.requires_grad_()
    generic, block_only = attention_backward_passes(layers, x, padding_mask, hook)
    # attention dropout runs the unfused kernel, whose backward is no flash backward
    assert (generic, block_only) == (0 if case == "attention dropout" else N_LAYERS, 0)
