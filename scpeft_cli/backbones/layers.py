"""The one transformer layer every softmax-attention backbone uses, so a strategy is written once.

Fused QKV projection + `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), or an
attention kernel in its place (scBERT's FAVOR+, `backbones/favor.py`) behind the same projections and
insertion points, with norm placement, activation, biases and eps configurable to match each checkpoint.

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
    """Multi-head self-attention on a fused `qkv` Linear (rows [q; k; v], heads contiguous).

    `kernel`: a module computing attention from (q, k, v, key padding mask) in place of softmax attention
    (scBERT's FAVOR+); None: `scaled_dot_product_attention`. `inner_dim`: the width of q, k and v
    (default d_model; scBERT's heads x dim_head differs from its d_model).
    """

    def __init__(
        self, d_model: int, n_heads: int, *, dropout: float = 0.0, bias: bool = True, qkv_bias: bool | None = None,
        inner_dim: int | None = None, kernel: nn.Module | None = None,
    ):  # fmt: skip
        super().__init__()
        inner_dim = inner_dim or d_model
        if inner_dim % n_heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by n_heads {n_heads}")
        if kernel is not None and dropout:
            raise ValueError("an attention kernel takes no attention dropout")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * inner_dim, bias=bias if qkv_bias is None else qkv_bias)
        self.out_proj = nn.Linear(inner_dim, d_model, bias=bias)
        self.kernel = kernel

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        keep_qkv: bool = False,
        prefix: torch.Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """Attention outputs at the positions of `x`.

        `prefix`: tokens in front of `x` that serve only as keys and values (never masked, no outputs).
        `norm`: normalisation of prefix and `x` before the projection (pre-norm layers), applied to both
        at once so that a frozen projection recomputes q/k/v from the input the norm keeps anyway.
        `keep_qkv`: let autograd keep q, k, v even when the projection is frozen and could recompute them.
        """
        dropout_p = self.dropout if self.training else 0.0
        skip = 0
        if prefix is not None:
            skip = prefix.shape[1]
            x, padding_mask = in_front(prefix, x, padding_mask)
        if norm is not None:
            x = normalized(norm, x)
        qkv = self.qkv(x)
        q, k, v = self._heads(qkv)
        q = q[:, :, skip:]
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        saving = (
            contextlib.nullcontext()
            if keep_qkv or not recomputable(self.qkv, x)
            else RecomputedProjection(self.qkv, x, qkv).hooks()
        )
        with saving:
            if self.kernel is not None:
                out = self.kernel(q, k, v, padding_mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self._merge_heads(out)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (batch, heads, length, head_dim) views of the fused projection's output."""
        batch, length, _ = qkv.shape
        return qkv.view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


def in_front(prefix: torch.Tensor, x: torch.Tensor, padding_mask: torch.Tensor | None):
    """`prefix` put in front of `x`, and never masked."""
    if padding_mask is not None:
        padding_mask = torch.cat([padding_mask.new_zeros(padding_mask.shape[0], prefix.shape[1]), padding_mask], dim=1)
    return torch.cat([prefix, x], dim=1), padding_mask


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
        qkv_bias: bool = True,
        attention_dim: int | None = None,
        attention_kernel: nn.Module | None = None,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = SelfAttention(
            d_model, n_heads, dropout=attention_dropout, qkv_bias=qkv_bias, inner_dim=attention_dim, kernel=attention_kernel
        )
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
        self, x: torch.Tensor, padding_mask: torch.Tensor | None, keep_qkv: bool, prefix: torch.Tensor | None
    ) -> torch.Tensor:
        norm = self.norm1 if self.norm_first else None
        return self.dropout1(self.self_attn(x, padding_mask, keep_qkv=keep_qkv, prefix=prefix, norm=norm))

    def _feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.activation_dropout(self.linear1(x))))

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        keep_qkv: bool = False,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's outputs at the positions of `x`.

        `prefix`: tokens in front of `x` that attention reads as keys and values only (deep prompts).
        `keep_qkv`: attention keeps q, k, v for backward even behind a frozen projection.
        """
        if self.norm_first:
            attended = self._attention_block(x, padding_mask, keep_qkv, prefix)
            x = self.scpeft_attn_adapter(x + attended)
            out = x + self._feed_forward_block(self.norm2(x))
        else:
            attended = self._attention_block(x, padding_mask, keep_qkv, prefix)
            x = self.scpeft_attn_adapter(self.norm1(x + attended))
            out = normalized(self.norm2, x + self._feed_forward_block(x))
        if self.scpeft_ffn_adapter is not None:
            out = out + self.scpeft_ffn_adapter(x)
        return out


class PromptHook(nn.Module):
    """Deep-prompt insertion point: prompt tokens in front of a layer's input, never masked.

    `block(index, x)`: the prompts to put in front of layer `index`'s input `x`, or None.
    `unread_outputs(index)`: how many leading positions of layer `index`'s input (prompts) no later layer and
    not the stack's output reads, because the next layer puts in its own; the layer computes no outputs there.
    """

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        return None

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

    Prompts whose outputs nothing reads go to the layer as its `prefix`: keys and values only, so the
    layer computes no outputs at their positions.
    `checkpointing` (training only): True for every layer, or the number of layers from the first,
    that keep no activations inside and recompute them in the backward pass: less memory for about
    one more forward pass of those layers. Dropout masks are the same in the recomputation.
    `recompute_frozen_qkv`: attention behind a frozen QKV projection keeps the projection's input
    instead of q, k, v and recomputes them in backward (`backbones/recompute.py`); False keeps q, k, v,
    which costs two thirds more attention memory and saves one QKV matmul per layer.
    """
    recomputed = len(layers) if checkpointing is True else int(checkpointing)
    for index, layer in enumerate(layers):
        prefix = None
        if prompts is not None:
            block, unread = prompts.block(index, x), prompts.unread_outputs(index)
            if block is not None and unread == block.shape[1]:
                prefix = block
            else:
                if block is not None:
                    x, padding_mask = in_front(block, x, padding_mask)
                if unread:  # prompts carried from an earlier layer, read for the last time
                    prefix, x, padding_mask = x[:, :unread], x[:, unread:], padding_mask[:, unread:]
        if index < recomputed and torch.is_grad_enabled():
            # the whole layer is recomputed in backward, so attention need not recompute q/k/v on its own
            x = checkpoint(layer, x, padding_mask, keep_qkv=True, prefix=prefix, use_reentrant=False)
        else:
            x = layer(x, padding_mask, keep_qkv=not recompute_frozen_qkv, prefix=prefix)
    return x
