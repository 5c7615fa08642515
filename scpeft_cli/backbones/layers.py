"""The one transformer layer every softmax-attention backbone uses, so a strategy is written once.

Fused QKV projection + `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), with
norm placement, activation and eps configurable to match each backbone's checkpoint.

Insertion points for PEFT strategies (empty by default, so a plain layer computes exactly the backbone):
- `scpeft_attn_adapter`: applied to the output of the attention sub-block (after norm1 when post-norm);
- `scpeft_ffn_adapter`: its output on the feed-forward sub-block's input is added after that sub-block;
- `self_attn.qkv` / `out_proj` / `linear1` / `linear2`: the Linear layers LoRA-family methods wrap;
- `run_layers(..., prompts=...)`: a hook before each layer (deep prompts), which also says which of a
  layer's leading positions no later step reads, so the layer need not compute their outputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scpeft_cli.backbones.dropout import Dropout, activation_dropout
from scpeft_cli.backbones.recompute import RecomputedProjection, normalized, recomputable


class SelfAttention(nn.Module):
    """Multi-head self-attention on a fused `qkv` Linear (rows [q; k; v], heads contiguous)."""

    def __init__(self, d_model: int, n_heads: int, *, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, keep_qkv: bool = False, skip: int = 0
    ) -> torch.Tensor:
        """Attention outputs at positions `skip:` (every position is still a key and value).

        `keep_qkv`: let autograd keep q, k, v even when the projection is frozen and could recompute them.
        """
        batch, length, d_model = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q = q[:, :, skip:]
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        saving = (
            contextlib.nullcontext()
            if keep_qkv or not recomputable(self.qkv, x)
            else RecomputedProjection(self.qkv, x, qkv).hooks()
        )
        with saving:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length - skip, d_model))


class TransformerLayer(nn.Module):
    """Attention + feed-forward block; post-norm (scGPT, BERT) or pre-norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = SelfAttention(d_model, n_heads, dropout=attention_dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.activation_dropout = activation_dropout(activation, dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.scpeft_attn_adapter: nn.Module = nn.Identity()
        self.scpeft_ffn_adapter: nn.Module | None = None

    def _attention_block(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, keep_qkv: bool, skip: int
    ) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, padding_mask, keep_qkv=keep_qkv, skip=skip))

    def _feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.activation_dropout(self.linear1(x))))

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, *, keep_qkv: bool = False, skip: int = 0
    ) -> torch.Tensor:
        """The layer's outputs at positions `skip:`; the first `skip` positions serve only as keys and values.

        `keep_qkv`: attention keeps q, k, v for backward even behind a frozen projection.
        """
        if self.norm_first:
            attended = self._attention_block(normalized(self.norm1, x), padding_mask, keep_qkv, skip)
            x = self.scpeft_attn_adapter(x[:, skip:] + attended)
            out = x + self._feed_forward_block(self.norm2(x))
        else:
            attended = self._attention_block(x, padding_mask, keep_qkv, skip)
            x = self.scpeft_attn_adapter(self.norm1(x[:, skip:] + attended))
            out = normalized(self.norm2, x + self._feed_forward_block(x))
        if self.scpeft_ffn_adapter is not None:
            out = out + self.scpeft_ffn_adapter(x)
        return out


class PromptHook(nn.Module):
    """Deep-prompt insertion point: may change the sequence before each layer.

    `unread_outputs(index)`: how many leading positions of layer `index`'s input no later layer and not
    the stack's output reads (prompts the next layer replaces); the layer computes no outputs there and
    the sequence leaves it that much shorter.
    """

    def before_layer(self, index: int, x: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, padding_mask

    def unread_outputs(self, index: int) -> int:
        return 0


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    padding_mask: torch.Tensor,
    prompts: PromptHook | None = None,
    *,
    checkpointing: bool | int = False,
    recompute_frozen_qkv: bool = True,
) -> torch.Tensor:
    """The layer stack, with the prompt hook (if any) around each layer.

    `checkpointing` (training only): True for every layer, or the number of layers from the first,
    that keep no activations inside and recompute them in the backward pass: less memory for about
    one more forward pass of those layers. Dropout masks are the same in the recomputation.
    `recompute_frozen_qkv`: attention behind a frozen QKV projection keeps the projection's input
    instead of q, k, v and recomputes them in backward (`backbones/recompute.py`); False keeps q, k, v,
    which costs two thirds more attention memory and saves one QKV matmul per layer.
    """
    recomputed = len(layers) if checkpointing is True else int(checkpointing)
    for index, layer in enumerate(layers):
        skip = 0
        if prompts is not None:
            x, padding_mask = prompts.before_layer(index, x, padding_mask)
            skip = prompts.unread_outputs(index)
        if index < recomputed and torch.is_grad_enabled():
            # the whole layer is recomputed in backward, so attention need not recompute q/k/v on its own
            x = checkpoint(layer, x, padding_mask, keep_qkv=True, skip=skip, use_reentrant=False)
        else:
            x = layer(x, padding_mask, keep_qkv=not recompute_frozen_qkv, skip=skip)
        padding_mask = padding_mask[:, skip:]
    return x
