"""FAVOR+ linear attention (softmax kernel) as scBERT's Performer computes it, batched per cell.

scBERT's checkpoint stores each layer's random-feature projection P [nb_features, dim_head]; it is loaded
and never redrawn (`draw_projection` is for tests and randomly initialised backbones only). With
dn = dim_head^-0.25 and ratio = nb_features^-0.5 the positive random features are

    phi(x) = ratio * (exp(dn x P^T - |x|^2 dn^2 / 2 - stabiliser) + eps)

and attention is out = phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k)_n), linear in the number of keys.
The stabiliser of a query is its own max over features. Upstream's key stabiliser is one max over the
whole key tensor, batch included; through `eps` that makes a cell's output depend on its batch mates, so
here it is the max over that cell's (unpadded) keys: the same numbers upstream gets predicting one cell
at a time, as it does.
"""

from __future__ import annotations

import torch


def softmax_kernel_features(
    x: torch.Tensor,
    projection: torch.Tensor,
    *,
    is_query: bool,
    eps: float = 1e-4,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positive random features (batch, heads, n, nb_features) of queries or keys x (batch, heads, n, dim_head).

    `key_padding_mask` (batch, n), True at padding, keys only: padded keys neither set the cell's stabiliser
    nor contribute (their rows are zero), so padding leaves every output as it is without it.
    """
    if is_query and key_padding_mask is not None:
        raise ValueError("key_padding_mask applies to keys only (is_query=False)")
    dn = x.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    projected = torch.einsum("bhnd,fd->bhnf", dn * x, projection)
    half_norm = (x * x).sum(dim=-1, keepdim=True) * (dn * dn / 2)
    padded = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    if is_query:
        stabiliser = projected.amax(dim=-1, keepdim=True)
    elif padded is None:
        stabiliser = projected.amax(dim=(1, 2, 3), keepdim=True)
    else:
        stabiliser = projected.masked_fill(padded, float("-inf")).amax(dim=(1, 2, 3), keepdim=True)
    exponent = projected - half_norm - stabiliser
    if padded is None:
        return ratio * (torch.exp(exponent) + eps)
    # -inf before exp: padded rows of any size give exp = 0 and no NaN gradients (0 * inf)
    features = ratio * (torch.exp(exponent.masked_fill(padded, float("-inf"))) + eps)
    return features.masked_fill(padded, 0.0)


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal FAVOR+ attention (batch, heads, n_q, dim_head) of q over keys/values k, v (batch, heads, n_k, .).

    n_q may differ from n_k (prefix keys and values put in front of the cells' by the caller).
    `key_padding_mask` (batch, n_k), True at padding: padded keys contribute nothing; a cell whose keys
    are all padding has no attention defined and gets NaN, as softmax over no keys does.
    """
    # bf16 keeps 8 significant bits, too few for exponents of size |x|^2 / sqrt(d) and for the normaliser's
    # sum over thousands of keys: compute in float32 (float64 stays), with autocast off so matmuls do too.
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, projection = (t.to(dtype) for t in (q, k, v, projection))
        q_features = softmax_kernel_features(q, projection, is_query=True)
        k_features = softmax_kernel_features(k, projection, is_query=False, key_padding_mask=key_padding_mask)
        context = torch.einsum("bhnf,bhne->bhfe", k_features, v)
        normaliser = torch.einsum("bhnf,bhf->bhn", q_features, k_features.sum(dim=2))
        out = torch.einsum("bhnf,bhfe->bhne", q_features, context) / normaliser.unsqueeze(-1)
    return out.to(out_dtype)


def draw_projection(nb_features: int, dim_head: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An orthogonal Gaussian random-feature matrix [nb_features, dim_head], drawn as Performer draws it.

    Blocks of dim_head mutually orthogonal rows (QR of a square Gaussian matrix; the last block truncated),
    each row scaled by the norm of its own Gaussian vector of length dim_head (Performer's scaling=0), so
    rows have the lengths of Gaussian rows but less variance in the kernel estimate. For tests and random
    initialisation only: a loaded scBERT keeps its stored matrix.

    Unlike Performer, Q's columns take the signs of R's diagonal: LAPACK's QR fixes those signs, which
    leaves the directions non-uniform and biases the kernel estimate (measured, dim_head 8: 16% error at
    65,536 features, 0.7% with the signs); with the signs the rows are uniform, as the estimate assumes.
    """
    blocks = []
    for start in range(0, nb_features, dim_head):
        orthogonal, triangular = torch.linalg.qr(torch.randn(dim_head, dim_head, generator=generator))
        uniform = orthogonal * torch.diagonal(triangular).sign()
        blocks.append(uniform.T[: nb_features - start])
    norms = torch.randn(nb_features, dim_head, generator=generator).norm(dim=1)
    return norms[:, None] * torch.cat(blocks)


class FavorKernel(torch.nn.Module):
    """FAVOR+ as a `SelfAttention` kernel: one layer's projection matrix as a buffer (saved, loaded, never
    redrawn). No attention dropout: scBERT trains without it, and FAVOR+ has no attention matrix to drop."""

    def __init__(self, nb_features: int, dim_head: int, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("projection_matrix", draw_projection(nb_features, dim_head, generator))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return favor_attention(q, k, v, self.projection_matrix, key_padding_mask=padding_mask)

    def extra_repr(self) -> str:
        nb_features, dim_head = self.projection_matrix.shape
        return f"nb_features={nb_features}, dim_head={dim_head}"
