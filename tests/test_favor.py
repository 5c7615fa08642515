"""FAVOR+ linear attention (scBERT's Performer) against a direct transcription of its formulas."""

import pytest
import torch
from torch import nn

from scpeft_cli.backbones.favor import draw_projection, favor_attention, softmax_kernel_features

BATCH, HEADS, DIM_HEAD, FEATURES = 3, 2, 8, 12


def random(*shape, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(n_q: int = 7, n_k: int = 7, *, batch: int = BATCH, dtype=torch.float64):
    return (
        random(batch, HEADS, n_q, DIM_HEAD, seed=1, scale=0.7, dtype=dtype),
        random(batch, HEADS, n_k, DIM_HEAD, seed=2, scale=0.7, dtype=dtype),
        random(batch, HEADS, n_k, DIM_HEAD, seed=3, dtype=dtype),
    )


def direct_features(x: torch.Tensor, projection: torch.Tensor, stabiliser: torch.Tensor) -> torch.Tensor:
    """phi(x) for one head's rows x [n, d], written out: ratio * (exp(dn x.p_f - |x|^2 dn^2 / 2 - stab) + 1e-4)."""
    dn, ratio = x.shape[-1] ** -0.25, projection.shape[0] ** -0.5
    out = torch.empty(x.shape[0], projection.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for f in range(projection.shape[0]):
            exponent = dn * torch.dot(x[i], projection[f]) - torch.dot(x[i], x[i]) * dn**2 / 2 - stabiliser[i]
            out[i, f] = ratio * (torch.exp(exponent) + 1e-4)
    return out


def direct_attention(q, k, v, projection, *, whole_batch_max: bool = False) -> torch.Tensor:
    """Quadratic form of the same estimate: weights A_ij = phi(q_i) . phi(k_j), out_i = sum_j A_ij v_j / sum_j A_ij.

    Key stabiliser: the max of dn k.p over the cell's heads, keys and features, or over the whole batch
    (`whole_batch_max`, what upstream computes).
    """
    dn = q.shape[-1] ** -0.25
    projected_keys = dn * k @ projection.T
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        key_max = projected_keys.max() if whole_batch_max else projected_keys[b].max()
        for h in range(q.shape[1]):
            query_max = (dn * q[b, h] @ projection.T).max(dim=1).values
            q_features = direct_features(q[b, h], projection, query_max)
            k_features = direct_features(k[b, h], projection, key_max.expand(k.shape[2]))
            weights = q_features @ k_features.T
            out[b, h] = weights @ v[b, h] / weights.sum(dim=1, keepdim=True)
    return out


def test_matches_direct_implementation():
    q, k, v = qkv()
    projection = random(FEATURES, DIM_HEAD, seed=4)
    out = favor_attention(q, k, v, projection)
    torch.testing.assert_close(out, direct_attention(q, k, v, projection), atol=1e-6, rtol=0)  # measured 5.6e-16


def test_query_features_are_a_per_row_max_and_key_features_a_per_cell_max():
    q, k, _ = qkv()
    projection = random(FEATURES, DIM_HEAD, seed=4)
    dn = DIM_HEAD**-0.25
    key_max = (dn * k @ projection.T).amax(dim=(1, 2, 3))
    for b in range(BATCH):
        for h in range(HEADS):
            query_max = (dn * q[b, h] @ projection.T).max(dim=1).values
            torch.testing.assert_close(
                softmax_kernel_features(q, projection, is_query=True)[b, h],
                direct_features(q[b, h], projection, query_max),
            )
            torch.testing.assert_close(
                softmax_kernel_features(k, projection, is_query=False)[b, h],
                direct_features(k[b, h], projection, key_max[b].expand(k.shape[2])),
            )


def test_approaches_softmax_attention_as_features_grow():
    # small q, k: the positive-feature estimate of exp(q.k / sqrt(d)) has low variance
    q, k, v = qkv(32, 32, batch=2)
    q, k = 0.3 * q, 0.3 * k
    exact = torch.softmax(q @ k.transpose(-1, -2) / DIM_HEAD**0.5, dim=-1) @ v

    def error(nb_features: int) -> float:
        projection = draw_projection(nb_features, DIM_HEAD, torch.Generator().manual_seed(0)).double()
        return (favor_attention(q, k, v, projection) - exact).abs().max().item()

    few, many = error(16), error(4096)
    assert many < 0.005  # measured 0.0028 (0.0175 with Performer's sign-biased QR directions)
    assert many < few / 5  # measured 0.0262 with 16 features


def test_draw_projection_is_blocks_of_orthogonal_rows_with_gaussian_lengths():
    projection = draw_projection(20, DIM_HEAD, torch.Generator().manual_seed(0))
    assert projection.shape == (20, DIM_HEAD)
    directions = projection / projection.norm(dim=1, keepdim=True)
    for start in range(0, 20, DIM_HEAD):
        block = directions[start : start + DIM_HEAD]
        torch.testing.assert_close(block @ block.T, torch.eye(len(block)), atol=1e-5, rtol=0)
    assert not torch.allclose(projection.norm(dim=1), projection.norm(dim=1)[0])  # lengths drawn, not constant
    torch.testing.assert_close(projection, draw_projection(20, DIM_HEAD, torch.Generator().manual_seed(0)))
    # uniform directions: a block's first row points either way along the first axis (plain LAPACK QR: never +)
    first_rows = draw_projection(200 * DIM_HEAD, DIM_HEAD, torch.Generator().manual_seed(1))[::DIM_HEAD, 0]
    assert 0.35 < (first_rows > 0).double().mean() < 0.65


def test_a_cells_output_does_not_depend_on_its_batch_mates():
    q, k, v = qkv()
    k[1:] *= 3  # batch mates whose keys raise a whole-batch max
    projection = random(FEATURES, DIM_HEAD, seed=4)
    alone = favor_attention(q[:1], k[:1], v[:1], projection)
    # the same up to rounding: batched matmul kernels may sum in another order (measured 2.2e-16)
    torch.testing.assert_close(favor_attention(q, k, v, projection)[:1], alone, atol=1e-14, rtol=0)
    # upstream's whole-batch key max shrinks the first cell's exp terms next to eps: other numbers
    batched_upstream = direct_attention(q, k, v, projection, whole_batch_max=True)[:1]
    alone_upstream = direct_attention(q[:1], k[:1], v[:1], projection, whole_batch_max=True)
    assert (batched_upstream - alone_upstream).abs().max() > 1e-3  # measured 0.77
    torch.testing.assert_close(alone_upstream, alone, atol=1e-6, rtol=0)


def test_padded_keys_change_nothing():
    q, k, v = qkv(5, 9)
    lengths = [9, 6, 2]
    padding_mask = torch.arange(9)[None, :] >= torch.tensor(lengths)[:, None]
    k = k.masked_fill(padding_mask[:, None, :, None], 50.0)  # huge padded keys: would overflow exp if used
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    projection = random(FEATURES, DIM_HEAD, seed=4)
    out = favor_attention(q, k, v, projection, key_padding_mask=padding_mask)
    for b, n in enumerate(lengths):
        unpadded = favor_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], projection)
        torch.testing.assert_close(out[b : b + 1], unpadded, atol=1e-12, rtol=0)  # measured 4.4e-16
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (k.grad[padding_mask[:, None, :, None].expand_as(k)] == 0).all()
    with pytest.raises(ValueError, match="keys only"):
        softmax_kernel_features(q, projection, is_query=True, key_padding_mask=padding_mask)


def test_fewer_queries_than_keys():
    q, k, v = qkv(4, 10)  # e.g. 6 prefix keys/values in front of 4 cells' positions
    projection = random(FEATURES, DIM_HEAD, seed=4)
    out = favor_attention(q, k, v, projection)
    assert out.shape == (BATCH, HEADS, 4, DIM_HEAD)
    torch.testing.assert_close(out, direct_attention(q, k, v, projection), atol=1e-6, rtol=0)  # measured 6.7e-16


def test_bf16_inputs_are_computed_in_float32():
    q, k, v = (t.bfloat16() for t in qkv(16, 16, dtype=torch.float32))
    projection = draw_projection(FEATURES, DIM_HEAD, torch.Generator().manual_seed(0))
    out = favor_attention(q, k, v, projection)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    reference = favor_attention(q.float(), k.float(), v.float(), projection)
    # measured 1.8e-3, the bf16 rounding of outputs near 1 (6.4e-3 with features and sums in bf16)
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=0)
    # autocast does not turn the matmuls inside to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = favor_attention(q.float(), k.float(), v.float(), projection)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)


def test_gradients_reach_q_k_v_but_not_a_buffer_projection():
    module = nn.Module()
    module.register_buffer("projection", draw_projection(FEATURES, DIM_HEAD, torch.Generator().manual_seed(0)))
    q, k, v = (t.float().requires_grad_(True) for t in qkv())
    favor_attention(q, k, v, module.projection).pow(2).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert module.projection.grad is None
