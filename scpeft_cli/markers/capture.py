"""The q and k the last layer run really computes, read by a forward hook on its QKV projection.

The hook sits on whatever module is `self_attn.qkv` once the strategy is attached (our LoRA wrapper, a
huggingface peft layer, or the plain Linear), so LoRA updates and everything upstream of the layer
(adapters, prompts, token prompts) are in what it sees. Nothing is changed when no capture is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from scpeft_cli.backbones.base import Backbone
from scpeft_cli.errors import UserError


def attention_of(backbone: Backbone):
    """The last layer's `SelfAttention`; one line where it has no attention matrix to read (FAVOR+)."""
    attention = backbone.active_layers[-1].self_attn
    if attention.kernel is not None:
        raise UserError(
            f"scpeft markers reads softmax attention scores, and {backbone.family}'s {type(attention.kernel).__name__} "
            "attention (Performer random features) has no attention matrix; use an scGPT, Geneformer or scFoundation run"
        )
    return attention


@contextlib.contextmanager
def last_layer_qkv(backbone: Backbone) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `captured["qkv"]` holds the fused projection output of the last forward pass."""
    captured: dict[str, torch.Tensor] = {}
    handle = attention_of(backbone).qkv.register_forward_hook(lambda _module, _inputs, output: captured.update(qkv=output))
    try:
        yield captured
    finally:
        handle.remove()


def query_key(qkv: torch.Tensor, *, n_heads: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (batch, heads, n_tokens, head_dim) at the cell's own positions, in fp32.

    Prompt tokens (prefix tuning) are always in front of the cell's tokens, so the last `n_tokens` rows
    are the cell's: prompt keys are left out.
    """
    batch, length, _ = qkv.shape
    heads = qkv.float().view(batch, length, 3, n_heads, -1)[:, length - n_tokens :]
    return heads[:, :, 0].transpose(1, 2), heads[:, :, 1].transpose(1, 2)
