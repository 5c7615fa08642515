"""The batch-integration objectives (GEP, MVC, ECS, DAB, DSBN) against scGPT's definitions and hand-computed values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scpeft_cli.tasks.integration.objectives import (
    BatchDiscriminator,
    DomainSpecificBatchNorm1d,
    ExpressionDecoder,
    GradientReversal,
    MVCDecoder,
    ObjectiveWeights,
    dab_loss,
    ecs_loss,
    gep_loss,
    grad_reverse,
    integration_loss,
    mask_values,
    mvc_loss,
    zero_prob_nll,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- masking
def _padded_batch(lengths: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.arange(1, seq_len + 1, dtype=torch.float32).repeat(len(lengths), 1)
    values[:, 0] = 0.0  # <cls>
    padding = torch.arange(seq_len).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)
    return values.masked_fill(padding, -2.0), padding


def test_mask_counts_never_cls_or_padding():
    values, padding = _padded_batch([10, 7, 1], seq_len=10)
    masked, mask = mask_values(values, padding, mask_ratio=0.4, generator=_gen())
    # candidates per cell: 9, 6, 0 (<cls> excluded) -> int(9 * 0.4) = 3, int(6 * 0.4) = 2, 0
    assert mask.sum(dim=1).tolist() == [3, 2, 0]
    assert not mask[:, 0].any()
    assert not (mask & padding).any()
    assert torch.all(masked[mask] == -1.0)
    assert torch.equal(masked[~mask], values[~mask])
    assert torch.equal(values, _padded_batch([10, 7, 1], seq_len=10)[0])  # input untouched


def test_mask_rounding_follows_upstream_int():
    # upstream: n_mask = int(len(non_padding_idx) * mask_ratio); 100 * 0.29 = 28.999999999999996 -> 28
    values, padding = _padded_batch([101], seq_len=101)
    _, mask = mask_values(values, padding, mask_ratio=0.29, generator=_gen())
    assert int(mask.sum()) == int(100 * 0.29) == 28


def test_mask_keep_first_n_zero_counts_cls_like_upstream():
    values, padding = _padded_batch([10, 7, 1], seq_len=10)
    _, mask = mask_values(values, padding, mask_ratio=0.4, generator=_gen(), keep_first_n=0)
    assert mask.sum(dim=1).tolist() == [int(10 * 0.4), int(7 * 0.4), int(1 * 0.4)]
    # over many draws <cls> does get masked when it is a candidate
    hits = sum(bool(mask_values(values, padding, generator=_gen(s), keep_first_n=0)[1][0, 0]) for s in range(50))
    assert hits > 0


def test_mask_seeded_reproducibility():
    values, padding = _padded_batch([50, 40, 30, 20], seq_len=50)
    a = mask_values(values, padding, generator=_gen(7))
    b = mask_values(values, padding, generator=_gen(7))
    c = mask_values(values, padding, generator=_gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_rejects_bad_ratio():
    values, padding = _padded_batch([5], seq_len=5)
    with pytest.raises(ValueError, match="mask_ratio"):
        mask_values(values, padding, mask_ratio=1.5, generator=_gen())


# ---------------------------------------------------------------------------------------------------- losses
def test_gep_and_mvc_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 3.0]])
    mask = torch.tensor([[False, True, True], [True, False, True]])
    # masked diffs 2, 3, 4, 3 -> (4 + 9 + 16 + 9) / 4
    assert gep_loss(pred, target, mask).item() == pytest.approx(9.5)
    assert mvc_loss(pred, target, mask).item() == pytest.approx(9.5)


def test_masked_mse_equals_upstream_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 9), torch.randn(4, 9)
    mask = torch.rand(4, 9) < 0.4
    m = mask.float()
    upstream = F.mse_loss(pred * m, target * m, reduction="sum") / m.sum()
    assert gep_loss(pred, target, mask).item() == pytest.approx(upstream.item(), rel=1e-6)


def test_masked_mse_no_masked_position_is_zero():
    pred = torch.randn(2, 3, requires_grad=True)
    loss = gep_loss(pred, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 3))


def test_zero_prob_nll_matches_bernoulli():
    probs = torch.tensor([[0.2, 0.7, 0.9], [0.5, 0.1, 0.4]])
    target = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    log_p = torch.distributions.Bernoulli(probs=probs).log_prob((target > 0).float())
    expected = -(log_p * mask).sum() / mask.sum()
    assert zero_prob_nll(probs, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ecs_hand_computed_three_cells():
    # e1 = (1, 0), e2 = (-1, 0), e3 = (2, 2): cos(e1, e3) = 1/sqrt(2), cos(e1, e2) = -1 -> relu 0, cos(e2, e3) < 0 -> 0.
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 2.0]])
    a = 1 / math.sqrt(2)
    # 9 entries: two equal a, seven equal 0 (the zeroed diagonal included)
    expected = (7 * (1 - 0.8**2) + 2 * (1 - (a - 0.8) ** 2)) / 9
    assert expected == pytest.approx(0.50030463, abs=1e-7)
    assert ecs_loss(emb, threshold=0.8).item() == pytest.approx(expected, rel=1e-6)


def test_ecs_matches_upstream_form():
    torch.manual_seed(1)
    emb = torch.randn(6, 8)
    normed = F.normalize(emb, p=2, dim=1)
    cos = torch.mm(normed, normed.t()).masked_fill(torch.eye(6).bool(), 0.0)
    upstream = torch.mean(1 - (F.relu(cos) - 0.3) ** 2)
    assert ecs_loss(emb, threshold=0.3).item() == pytest.approx(upstream.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- gradient reversal, DAB
@pytest.mark.parametrize("lambd", [1.0, 0.5, 3.0])
def test_gradient_reversal_flips_and_scales(lambd):
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, -lambd * g)

    x2 = x.detach().clone().requires_grad_(True)
    layer = GradientReversal(lambd)
    out = layer(x2)
    assert torch.equal(out, x2)
    out.backward(g)
    assert torch.equal(x2.grad, -lambd * g)
    assert list(layer.state_dict()) == []


def test_discriminator_keys_and_structure():
    disc = BatchDiscriminator(16, n_batches=3)
    parent = nn.Module()
    parent.grad_reverse_discriminator = disc
    assert list(parent.state_dict()) == [
        f"grad_reverse_discriminator.{name}"
        for name in [
            "_decoder.0.weight", "_decoder.0.bias", "_decoder.2.weight", "_decoder.2.bias",
            "_decoder.3.weight", "_decoder.3.bias", "_decoder.5.weight", "_decoder.5.bias",
            "out_layer.weight", "out_layer.bias",
        ]
    ]
    kinds = [type(m) for m in disc._decoder]
    assert kinds == [nn.Linear, nn.LeakyReLU, nn.LayerNorm] * 2
    assert disc.out_layer.out_features == 3


def test_dab_loss_is_cross_entropy_and_reversal_flips_encoder_grad():
    torch.manual_seed(0)
    disc = BatchDiscriminator(8, n_batches=3, reverse_grad=True)
    plain = copy.deepcopy(disc)
    plain.reverse_grad = False
    emb = torch.randn(5, 8, requires_grad=True)
    ids = torch.tensor([0, 2, 1, 1, 0])
    logits = disc(emb)
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(5), ids].mean()
    loss = dab_loss(logits, ids)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()

    emb2 = emb.detach().clone().requires_grad_(True)
    dab_loss(plain(emb2), ids).backward()
    assert torch.allclose(emb.grad, -emb2.grad)
    # the discriminator's own parameters get the ordinary (unreversed) gradient
    assert torch.allclose(disc.out_layer.weight.grad, plain.out_layer.weight.grad)


# ---------------------------------------------------------------------------------------------------- decoders
def test_decoder_state_dict_keys_match_scgpt_checkpoint():
    d = 512  # whole-human shapes
    parent = nn.Module()
    parent.decoder = ExpressionDecoder(d)
    parent.mvc_decoder = MVCDecoder(d, arch_style="inner product")
    shapes = {k: tuple(v.shape) for k, v in parent.state_dict().items()}
    assert shapes == {
        "decoder.fc.0.weight": (d, d), "decoder.fc.0.bias": (d,),
        "decoder.fc.2.weight": (d, d), "decoder.fc.2.bias": (d,),
        "decoder.fc.4.weight": (1, d), "decoder.fc.4.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d), "mvc_decoder.gene2query.bias": (d,),
        "mvc_decoder.W.weight": (d, d),
    }
    # a checkpoint with exactly these names loads strictly
    ckpt = {k: torch.randn(s) for k, s in shapes.items()}
    parent.load_state_dict(ckpt, strict=True)


def test_decoder_options_match_upstream_names_and_shapes():
    d = 8
    expr = ExpressionDecoder(d, use_batch_labels=True, explicit_zero_prob=True)
    mvc = MVCDecoder(d, use_batch_labels=True, explicit_zero_prob=True)
    assert tuple(expr.fc[0].weight.shape) == (d, 2 * d)
    assert {k.split(".")[0] for k in expr.state_dict()} == {"fc", "zero_logit"}
    assert tuple(mvc.W.weight.shape) == (2 * d, d)
    assert tuple(mvc.W_zero_logit.weight.shape) == (2 * d, d)
    probs = expr.zero_probs(torch.randn(2, 3, 2 * d))
    assert probs.shape == (2, 3) and bool(((probs > 0) & (probs < 1)).all())
    with pytest.raises(ValueError, match="arch_style"):
        MVCDecoder(d, arch_style="concat query")


def test_decoders_compute_upstream_formulas():
    torch.manual_seed(0)
    d, b, n = 8, 3, 5
    expr, mvc = ExpressionDecoder(d), MVCDecoder(d)
    states, cell, genes = torch.randn(b, n, d), torch.randn(b, d), torch.randn(b, n, d)
    fc = expr.fc
    h = F.leaky_relu(fc[2](F.leaky_relu(fc[0](states))))
    assert torch.allclose(expr(states), fc[4](h).squeeze(-1))
    query = torch.sigmoid(genes @ mvc.gene2query.weight.t() + mvc.gene2query.bias)
    expected = torch.einsum("bnk,bk->bn", query @ mvc.W.weight.t(), cell)
    assert torch.allclose(mvc(cell, genes), expected, atol=1e-6)


def test_mvc_detach_style_stops_gene_embedding_gradient():
    mvc = MVCDecoder(4, arch_style="inner product, detach")
    genes = torch.randn(2, 3, 4, requires_grad=True)
    mvc(torch.randn(2, 4), genes).sum().backward()
    assert genes.grad is None


# ---------------------------------------------------------------------------------------------------- DSBN
def test_dsbn_separate_running_stats_per_domain():
    torch.manual_seed(0)
    c = 4
    dsbn = DomainSpecificBatchNorm1d(c, n_domains=2)
    x0 = torch.randn(32, 6, c) + 5.0
    x1 = torch.randn(32, 6, c) - 3.0
    dsbn.train()
    dsbn(x0, 0)
    assert torch.allclose(dsbn.bns[0].running_mean, 0.1 * x0.mean(dim=(0, 1)), atol=1e-6)
    assert torch.equal(dsbn.bns[1].running_mean, torch.zeros(c))  # untouched
    for _ in range(200):
        dsbn(x0, 0)
        dsbn(x1, torch.ones(32, dtype=torch.long))
    assert torch.allclose(dsbn.bns[0].running_mean, x0.mean(dim=(0, 1)), atol=1e-4)
    assert torch.allclose(dsbn.bns[1].running_mean, x1.mean(dim=(0, 1)), atol=1e-4)
    assert int(dsbn.bns[0].num_batches_tracked) == 201 and int(dsbn.bns[1].num_batches_tracked) == 200

    dsbn.eval()
    bn1 = dsbn.bns[1]
    expected = (x1 - bn1.running_mean) / torch.sqrt(bn1.running_var + bn1.eps) * bn1.weight + bn1.bias
    assert torch.allclose(dsbn(x1, 1), expected, atol=1e-5)


def test_dsbn_int_label_equals_upstream_permuted_call():
    torch.manual_seed(0)
    dsbn = DomainSpecificBatchNorm1d(4, n_domains=3, eps=6.1e-5, affine=False)
    reference = copy.deepcopy(dsbn.bns[2])
    x = torch.randn(5, 7, 4)
    out = dsbn(x, 2)
    upstream = reference(x.permute(0, 2, 1)).permute(0, 2, 1)
    assert torch.allclose(out, upstream, atol=1e-6)
    assert torch.allclose(dsbn.bns[2].running_var, reference.running_var)
    assert [k for k in dsbn.state_dict() if k.startswith("bns.2.")] == [
        "bns.2.running_mean", "bns.2.running_var", "bns.2.num_batches_tracked"
    ]


@pytest.mark.parametrize("training", [True, False])
def test_dsbn_mixed_minibatch_equals_per_domain_rows(training):
    torch.manual_seed(0)
    c = 3
    dsbn = DomainSpecificBatchNorm1d(c, n_domains=2)
    with torch.no_grad():
        for bn in dsbn.bns:  # distinct running stats and affine parameters per domain
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    reference = copy.deepcopy(dsbn)
    dsbn.train(training)
    reference.train(training)
    x = torch.randn(6, 5, c)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    out = dsbn(x, labels)
    for k in (0, 1):
        rows = (labels == k).nonzero(as_tuple=True)[0]
        assert torch.allclose(out[rows], reference(x[rows], k), atol=1e-6)
        assert torch.allclose(dsbn.bns[k].running_mean, reference.bns[k].running_mean)
    # 2-D input too
    x2 = torch.randn(6, c)
    out2 = dsbn(x2, labels)
    rows = torch.tensor([1, 3, 4])
    assert torch.allclose(out2[rows], reference(x2[rows], 1), atol=1e-6)


def test_dsbn_rejects_unknown_domain_and_bad_shape():
    dsbn = DomainSpecificBatchNorm1d(3, n_domains=2)
    with pytest.raises(ValueError, match="Domain label 2"):
        dsbn(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="Domain label"):
        dsbn(torch.randn(4, 3), torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="expected"):
        dsbn(torch.randn(4, 5), 0)


def test_dsbn_gradient_flows_through_mixed_batch():
    dsbn = DomainSpecificBatchNorm1d(3, n_domains=2)
    x = torch.randn(6, 4, 3, requires_grad=True)
    (dsbn(x, torch.tensor([0, 1, 0, 1, 1, 0])) * torch.randn(6, 4, 3)).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert dsbn.bns[0].weight.grad is not None and dsbn.bns[1].weight.grad is not None


# ---------------------------------------------------------------------------------------------------- weights, total
def test_published_defaults():
    w = ObjectiveWeights()
    assert (w.mask_ratio, w.mask_value, w.pad_value) == (0.4, -1.0, -2.0)
    assert (w.ecs_threshold, w.ecs_weight, w.dab_weight) == (0.8, 10.0, 1.0)
    assert w.gep and w.mvc and w.ecs and w.dab and w.dsbn
    assert (w.dsbn_eps, w.dsbn_affine) == (6.1e-5, False)
    assert w.enabled() == {"gep": 1.0, "mvc": 1.0, "ecs": 10.0, "dab": 1.0}


def _parts() -> dict[str, torch.Tensor]:
    return {
        "gep": torch.tensor(0.5), "gep_zero": torch.tensor(0.7), "mvc": torch.tensor(0.25),
        "mvc_zero": torch.tensor(0.6), "ecs": torch.tensor(0.1), "dab": torch.tensor(2.0),
    }


def test_integration_loss_total_and_terms():
    total, terms = integration_loss(_parts(), ObjectiveWeights())
    assert total.item() == pytest.approx(0.5 + 0.25 + 10 * 0.1 + 2.0)
    assert set(terms) == {"gep", "mvc", "ecs", "dab"}
    assert terms["ecs"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["gep", "mvc", "ecs", "dab"])
def test_switching_an_objective_off_removes_its_term(name):
    on_total, _ = integration_loss(_parts(), ObjectiveWeights())
    off_total, terms = integration_loss(_parts(), ObjectiveWeights(**{name: False}))
    assert name not in terms
    weight = ObjectiveWeights().enabled()[name]
    assert off_total.item() == pytest.approx(on_total.item() - weight * _parts()[name].item())
    parts = _parts()
    del parts[name]
    assert integration_loss(parts, ObjectiveWeights(**{name: False}))[0].item() == pytest.approx(off_total.item())


def test_integration_loss_explicit_zero_prob_and_errors():
    total, terms = integration_loss(_parts(), ObjectiveWeights(explicit_zero_prob=True))
    assert set(terms) == {"gep", "gep_zero", "mvc", "mvc_zero", "ecs", "dab"}
    assert total.item() == pytest.approx(0.5 + 0.7 + 0.25 + 0.6 + 1.0 + 2.0)
    parts = _parts()
    del parts["dab"]
    with pytest.raises(KeyError, match="dab"):
        integration_loss(parts, ObjectiveWeights())
    with pytest.raises(KeyError, match="Unknown"):
        integration_loss({**_parts(), "cce": torch.tensor(1.0)}, ObjectiveWeights())
    with pytest.raises(ValueError, match="switched off"):
        integration_loss(_parts(), ObjectiveWeights(gep=False, mvc=False, ecs=False, dab=False))


def test_integration_loss_backpropagates():
    x = torch.tensor(2.0, requires_grad=True)
    total, _ = integration_loss({"gep": x, "mvc": x, "ecs": x, "dab": x}, ObjectiveWeights())
    total.backward()
    assert x.grad.item() == pytest.approx(1 + 1 + 10 + 1)
