"""Attention whose gradient reaches only a block of prompt keys and values in front of the sequence.

In the first prompted layer of a frozen backbone (deep prefix prompts, layer 0 by default), nothing
trainable feeds the cells' queries, keys and values: they come from frozen embeddings. Only the prompt
block's keys and values need gradients. The generic attention backward pass computes gradients for
every query, key and value anyway, quadratic in the cell's length. The block's gradients need only the
softmax probabilities at the block's columns, and the forward kernel's log-sum-exp of each query row
gives those exactly, `P = exp(scale * q k_block^T - lse)`; the backward pass then costs
length x block size instead of length^2.

CPU only: the log-sum-exp comes from torch's CPU flash-attention kernel, the one that
`scaled_dot_product_attention` runs on CPU, so the forward pass is the generic path's kernel on the same
inputs. On other devices (not tested here: no GPU was available) callers use the generic path (`applies`).
"""

from __future__ import annotations

import torch
from torch import nn


def applies(modules: list[nn.Module], x: torch.Tensor, block: torch.Tensor, dropout_p: float) -> bool:
    """Whether only `block` trains: the queries, keys and values that `modules` (norm, projection) make of `x`
    are constants.

    Decided before projecting, so that the generic path can still project block and sequence together.
    """
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and dropout_p == 0.0
        and block.requires_grad
        and not x.requires_grad
        and not any(p.requires_grad for module in modules for p in module.parameters())
    )


def with_prompts_visible(padding_mask: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """The key padding mask of `n_prompts` prompt tokens put in front of the cells: prompts are never masked."""
    return torch.cat([padding_mask.new_zeros(padding_mask.shape[0], n_prompts), padding_mask], dim=1)


def attention_training_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_k: torch.Tensor,
    block_v: torch.Tensor,
    padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`scaled_dot_product_attention(q, [block_k; k], [block_v; v])` with gradients for the block only.

    `q`, `k`, `v`: (batch, heads, length, head_dim), constants; `block_k`, `block_v`: (batch, heads, n, head_dim),
    never masked; `padding_mask`: (batch, length), True at padding keys.
    """
    if q.requires_grad or k.requires_grad or v.requires_grad:
        raise ValueError("attention_training_block needs constant queries, keys and values outside the block")
    mask = None
    if padding_mask is not None:
        hidden = with_prompts_visible(padding_mask, block_k.shape[2])[:, None, None, :]
        # the additive mask scaled_dot_product_attention makes of a boolean one
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    return _BlockTrainedAttention.apply(q, k, v, block_k, block_v, mask)


class _BlockTrainedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_k, block_v, mask):
        keys, values = torch.cat([block_k, k], dim=2), torch.cat([block_v, v], dim=2)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, attn_mask=mask)
        # q alone: a view of the fused projection's output would keep k and v alive too
        ctx.save_for_backward(q.contiguous(), block_k, block_v, out, lse)
        ctx.block_dtype = block_k.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, block_k, block_v, out, lse = (t.float() for t in ctx.saved_tensors)
        grad_out = grad_out.float()
        scale = q.shape[-1] ** -0.5
        grad_block_k, grad_block_v = torch.empty_like(block_k), torch.empty_like(block_v)
        for cell in range(q.shape[0]):  # one cell at a time: the (heads, length, n) temporaries stay small
            q_c, d_out = q[cell], grad_out[cell]
            probs = torch.matmul(q_c, block_k[cell].transpose(-1, -2)).mul_(scale).sub_(lse[cell].unsqueeze(-1)).exp_()
            torch.matmul(probs.transpose(-1, -2), d_out, out=grad_block_v[cell])
            # softmax backward at the block's columns: P * (dP - rowsum(dO * O))
            grad_scores = torch.matmul(d_out, block_v[cell].transpose(-1, -2))
            grad_scores.sub_((d_out * out[cell]).sum(-1, keepdim=True)).mul_(probs)
            torch.matmul(grad_scores.transpose(-1, -2), q_c, out=grad_block_k[cell]).mul_(scale)
        return None, None, None, grad_block_k.to(ctx.block_dtype), grad_block_v.to(ctx.block_dtype), None
