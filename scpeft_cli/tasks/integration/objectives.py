"""Training objectives of scPEFT's batch-integration task on scGPT: GEP, MVC, ECS, DAB and domain-specific batch norm.

Definitions follow scGPT (`scgpt/model/model.py`, `scgpt/loss.py`, `scgpt/model/dsbn.py`,
`scgpt/model/grad_reverse.py`, `random_mask_value` in `scgpt/tokenizer/gene_tokenizer.py`) and the weights of
its batch-integration tutorial, which scPEFT's batch-correction runs reuse: mask ratio 0.4, GEP + MVC
(masked MSE, weight 1 each), ECS (threshold 0.8, weight 10), DAB (cross-entropy through gradient reversal,
weight 1), DSBN on the input embedding. Module attribute names equal scGPT's, so the pretrained `decoder.*`
and `mvc_decoder.*` tensors of a checkpoint load by name, and fine-tuned `dsbn.*` /
`grad_reverse_discriminator.*` tensors keep their upstream names. Each function's docstring says where we
deliberately differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BatchDiscriminator",
    "DomainSpecificBatchNorm1d",
    "ExpressionDecoder",
    "GradientReversal",
    "MVCDecoder",
    "OBJECTIVES",
    "ObjectiveWeights",
    "dab_loss",
    "ecs_loss",
    "gep_loss",
    "grad_reverse",
    "integration_loss",
    "mask_values",
    "masked_mse_loss",
    "mvc_loss",
    "zero_prob_nll",
]


# --------------------------------------------------------------------------------------------------------------
# Masking (scGPT `random_mask_value`)
# --------------------------------------------------------------------------------------------------------------
def mask_values(
    values: Tensor,
    padding_mask: Tensor,
    *,
    mask_ratio: float = 0.4,
    mask_value: float = -1.0,
    generator: torch.Generator | None = None,
    keep_first_n: int = 1,
) -> tuple[Tensor, Tensor]:
    """Hide a random `mask_ratio` share of each cell's gene values; return `(masked_values, mask)`.

    `values` (batch, seq_len) are the binned expression values with `<cls>` at position 0; `padding_mask`
    (batch, seq_len) is True at padding (the `src_key_padding_mask` convention). Per cell, the candidates are
    the non-padding positions from `keep_first_n` on; `int(n_candidates * mask_ratio)` of them (rounded
    down, as upstream's `int(len(non_padding_idx) * mask_ratio)`), drawn without replacement from
    `generator` (None: torch's global generator, which training checkpoints save), are set to `mask_value`. `mask` is True exactly there; the input is not modified.

    Differences from scGPT's `random_mask_value`:
    - upstream takes every position whose value differs from `pad_value` as a candidate, so `<cls>` (value 0)
      is counted and can be masked; here positions `< keep_first_n` (default 1: `<cls>`) never are and do
      not count. `keep_first_n=0` gives upstream's candidate set and count.
    - padding comes from `padding_mask`, not from comparing values with `pad_value`.
    - draws come from torch (upstream: the global NumPy RNG), so runs and resumed runs repeat exactly.
    - upstream returns only the values and recovers the mask as `values == mask_value`; the two agree
      unless an original value already equals `mask_value`.
    """
    if values.dim() != 2 or padding_mask.shape != values.shape:
        raise ValueError(
            f"values and padding_mask must both be (batch, seq_len); got {tuple(values.shape)} "
            f"and {tuple(padding_mask.shape)}."
        )
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}.")
    if keep_first_n < 0:
        raise ValueError(f"keep_first_n must be >= 0, got {keep_first_n}.")
    if not values.is_floating_point():
        values = values.float()
    candidates = ~padding_mask.bool()
    candidates[:, :keep_first_n] = False
    n_candidates = candidates.sum(dim=1).tolist()
    # Python float arithmetic, exactly as upstream rounds (e.g. int(5 * 0.4) == 2).
    n_mask = torch.tensor([int(n * mask_ratio) for n in n_candidates], device=values.device)
    device = values.device if generator is None else generator.device
    scores = torch.rand(values.shape, generator=generator, device=device).to(values.device)
    scores = scores.masked_fill(~candidates, 2.0)  # non-candidates sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = candidates & (ranks < n_mask.unsqueeze(1))
    return values.masked_fill(mask, mask_value), mask


# --------------------------------------------------------------------------------------------------------------
# Decoders (scGPT `ExprDecoder`, `MVCDecoder`)
# --------------------------------------------------------------------------------------------------------------
def _value_mlp(d_in: int, d_model: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, d_model),
        nn.LeakyReLU(),
        nn.Linear(d_model, 1),
    )


class ExpressionDecoder(nn.Module):
    """GEP head: predicts each token's expression value from its transformer state (scGPT `ExprDecoder`).

    `fc = [Linear(d_in, d), LeakyReLU, Linear(d, d), LeakyReLU, Linear(d, 1)]`, so stored as `decoder` its
    tensors are `decoder.fc.{0,2,4}.{weight,bias}`, the names (and, with `use_batch_labels=False`, the shapes)
    of the whole-human checkpoint. `use_batch_labels=True` is upstream's d_in = 2 * d_model (token state
    concatenated with a batch embedding, as scGPT's integration tutorial runs it); then `fc.0` no longer
    has the pretrained shape. `explicit_zero_prob=True` adds upstream's `zero_logit` MLP (same layout; not
    in whole-human) read through :meth:`zero_probs`. Unlike upstream, :meth:`forward` returns the
    prediction tensor rather than a dict.
    """

    def __init__(self, d_model: int, *, use_batch_labels: bool = False, explicit_zero_prob: bool = False) -> None:
        super().__init__()
        d_in = 2 * d_model if use_batch_labels else d_model
        self.fc = _value_mlp(d_in, d_model)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = _value_mlp(d_in, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, seq_len, d_in) token states -> (batch, seq_len) predicted values."""
        return self.fc(x).squeeze(-1)

    def zero_probs(self, x: Tensor) -> Tensor:
        """(batch, seq_len) Bernoulli probabilities (upstream calls them `zero_probs`; :func:`zero_prob_nll` scores
        them against `target > 0`, so they act as the probability that a value is non-zero)."""
        if not self.explicit_zero_prob:
            raise RuntimeError("ExpressionDecoder was built with explicit_zero_prob=False; it has no zero_logit head.")
        return torch.sigmoid(self.zero_logit(x).squeeze(-1))


class MVCDecoder(nn.Module):
    """MVC (GEPC) head: predicts each gene's value from the cell embedding and the gene embedding (scGPT
    `MVCDecoder`, the "inner product" style used by whole-human).

    `pred[b, i] = W(sigmoid(gene2query(gene_embs[b, i]))) . cell_emb[b]` with `gene2query: Linear(d, d)` and
    `W: Linear(d, d_in, bias=False)`; stored as `mvc_decoder` its tensors are `mvc_decoder.gene2query.{weight,
    bias}` and `mvc_decoder.W.weight`, as in the checkpoint. `gene_embs` are what upstream passes: the gene-id
    embeddings after the gene encoder's LayerNorm (not the value embedding, not the transformer output).
    `arch_style="inner product, detach"` stops gradients into `gene_embs`, as upstream. `use_batch_labels` makes
    d_in = 2 * d_model (cell embedding concatenated with a batch embedding) and `explicit_zero_prob` adds
    `W_zero_logit: Linear(d, d_in)`, as upstream. Upstream's "concat query" and "sum query" styles are not
    provided (no scGPT checkpoint we load uses them).
    """

    _STYLES = ("inner product", "inner product, detach")

    def __init__(
        self,
        d_model: int,
        arch_style: str = "inner product",
        *,
        use_batch_labels: bool = False,
        explicit_zero_prob: bool = False,
    ) -> None:
        super().__init__()
        if arch_style not in self._STYLES:
            raise ValueError(f"MVCDecoder arch_style must be one of {self._STYLES}, got {arch_style!r}.")
        d_in = 2 * d_model if use_batch_labels else d_model
        self.arch_style = arch_style
        self.do_detach = arch_style.endswith("detach")
        self.explicit_zero_prob = explicit_zero_prob
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_in, bias=False)
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_in)

    def _queries(self, gene_embs: Tensor) -> Tensor:
        gene_embs = gene_embs.detach() if self.do_detach else gene_embs
        return self.query_activation(self.gene2query(gene_embs))

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        """cell_emb (batch, d_in), gene_embs (batch, seq_len, d_model) -> (batch, seq_len) predicted values."""
        return torch.bmm(self.W(self._queries(gene_embs)), cell_emb.unsqueeze(2)).squeeze(2)

    def zero_probs(self, cell_emb: Tensor, gene_embs: Tensor) -> Tensor:
        """(batch, seq_len) Bernoulli probabilities (upstream `zero_probs`) for :func:`zero_prob_nll`."""
        if not self.explicit_zero_prob:
            raise RuntimeError("MVCDecoder was built with explicit_zero_prob=False; it has no W_zero_logit.")
        logits = torch.bmm(self.W_zero_logit(self._queries(gene_embs)), cell_emb.unsqueeze(2)).squeeze(2)
        return torch.sigmoid(logits)


# --------------------------------------------------------------------------------------------------------------
# Losses on the masked values (scGPT `masked_mse_loss`, `criterion_neg_log_bernoulli`)
# --------------------------------------------------------------------------------------------------------------
def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked positions: `sum_{mask} (pred - target)^2 / mask.sum()`.

    Same value and gradient as scGPT's `masked_mse_loss` for finite inputs. Differences: the squares are taken
    over the selected positions only and in float32 (upstream multiplies by the mask, so a non-finite value at
    an unmasked position poisons the loss), and with no masked position the loss is 0 (upstream: 0/0 = NaN).
    """
    mask = mask.bool()
    diff = (pred.float() - target.float())[mask]
    if diff.numel() == 0:
        return pred.float().sum() * 0.0
    return (diff * diff).sum() / diff.numel()


def gep_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """GEP (masked gene expression prediction) loss: :func:`masked_mse_loss` on the expression decoder's output."""
    return masked_mse_loss(pred, target, mask)


def mvc_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MVC / GEPC loss: :func:`masked_mse_loss` on the MVC decoder's output, same masked positions and targets."""
    return masked_mse_loss(pred, target, mask)


def zero_prob_nll(zero_probs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Bernoulli negative log-likelihood of `target > 0` over the masked positions (scGPT
    `criterion_neg_log_bernoulli`; only with `explicit_zero_prob`). Probabilities are clamped to
    [1e-7, 1 - 1e-7] (upstream is not, and gives inf at exactly 0 or 1); 0 when nothing is masked."""
    mask = mask.bool()
    p = zero_probs.float()[mask].clamp(1e-7, 1.0 - 1e-7)
    if p.numel() == 0:
        return zero_probs.float().sum() * 0.0
    nonzero = (target[mask] > 0).float()
    return -(nonzero * p.log() + (1.0 - nonzero) * (1.0 - p).log()).mean()


# --------------------------------------------------------------------------------------------------------------
# Elastic cell similarity (inside scGPT `TransformerModel.forward`, ECS=True)
# --------------------------------------------------------------------------------------------------------------
def ecs_loss(cell_embeddings: Tensor, threshold: float = 0.8) -> Tensor:
    """ECS: `mean(1 - (relu(cos_sim) - threshold)^2)` over the (batch x batch) cosine-similarity matrix of the
    L2-normalised cell embeddings, with the diagonal set to 0 before the relu.

    Exactly upstream's form: the mean runs over all batch^2 entries, the zeroed diagonal included (each adds
    the constant 1 - threshold^2). The caller applies the weight (10 in scGPT's integration tutorial; upstream's
    model default threshold is 0.3, the tutorial and scPEFT use 0.8). Difference: computed in float32.
    """
    if cell_embeddings.dim() != 2:
        raise ValueError(f"cell_embeddings must be (batch, d), got {tuple(cell_embeddings.shape)}.")
    normed = F.normalize(cell_embeddings.float(), p=2, dim=1)
    cos_sim = normed @ normed.t()
    eye = torch.eye(cos_sim.size(0), dtype=torch.bool, device=cos_sim.device)
    cos_sim = F.relu(cos_sim.masked_fill(eye, 0.0))
    return torch.mean(1.0 - (cos_sim - threshold) ** 2)


# --------------------------------------------------------------------------------------------------------------
# Domain-adversarial batch classifier (scGPT `GradReverse`, `AdversarialDiscriminator`)
# --------------------------------------------------------------------------------------------------------------
class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `-lambd`."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:  # type: ignore[override]
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Gradient reversal (scGPT `grad_reverse`): returns `x` unchanged; gradients flowing back are `-lambd` times."""
    return _GradReverse.apply(x, lambd)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` with a settable `lambd` (upstream fixes lambd = 1). No parameters, so it
    adds no state-dict keys."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class BatchDiscriminator(nn.Module):
    """DAB: predicts each cell's batch from its cell embedding (scGPT `AdversarialDiscriminator`).

    `_decoder = [Linear(d, d), LeakyReLU, LayerNorm(d)] x (n_layers - 1)`, then `out_layer = Linear(d,
    n_batches)`; stored as `grad_reverse_discriminator` its tensors are upstream's
    `grad_reverse_discriminator._decoder.{0,2,3,5}.*` and `grad_reverse_discriminator.out_layer.*`. With
    `reverse_grad` (scGPT's integration model sets it) the input passes through gradient reversal first, so
    minimising :func:`dab_loss` trains the discriminator to tell batches apart while pushing the encoder to
    hide them. `lambd` scales the reversed gradient (upstream: 1.0).
    """

    def __init__(
        self, d_model: int, n_batches: int, n_layers: int = 3, reverse_grad: bool = True, lambd: float = 1.0
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}.")
        self.reverse_grad = reverse_grad
        self.grad_reverse = GradientReversal(lambd)
        self._decoder = nn.ModuleList()
        for _ in range(n_layers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.LeakyReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_batches)

    def forward(self, cell_emb: Tensor) -> Tensor:
        """(batch, d_model) cell embeddings -> (batch, n_batches) logits."""
        x = self.grad_reverse(cell_emb) if self.reverse_grad else cell_emb
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


def dab_loss(logits: Tensor, batch_ids: Tensor) -> Tensor:
    """DAB loss: cross-entropy of the discriminator's logits against the cells' batch ids (scGPT `criterion_dab =
    nn.CrossEntropyLoss()`, mean over cells)."""
    return F.cross_entropy(logits.float(), batch_ids.long())


# --------------------------------------------------------------------------------------------------------------
# Domain-specific batch norm (scGPT `dsbn.py`)
# --------------------------------------------------------------------------------------------------------------
class DomainSpecificBatchNorm1d(nn.Module):
    """One `BatchNorm1d` per batch (domain), applied to the input embedding (scGPT `DomainSpecificBatchNorm1d`).

    `bns[k]` is domain k's BatchNorm1d, so stored as `dsbn` the tensors are upstream's `dsbn.bns.{k}.*`. In
    training each domain's rows are normalised with their own batch statistics and update only that domain's
    running statistics; in eval each uses its own running statistics.

    Input layout: `x` is (N, C) or channels-last (B, L, C), the token embeddings as they come out of the
    embedding sum; the (B, L, C) case is normalised per channel over B and L, which is what upstream gets by
    calling BatchNorm1d on `total_embs.permute(0, 2, 1)` (padding and `<cls>` positions included, as upstream).

    `domain_label` is an int (the whole minibatch is that domain, upstream's call) or a (N,) / (B,) tensor of
    per-cell labels. Upstream takes `int(batch_labels[0])` for the whole minibatch: right in training, where
    its sampler draws each minibatch from one batch, but wrong for a minibatch that mixes batches (its
    embedding extraction does this). Here a mixed minibatch is split: each domain's rows go through that
    domain's BN (batch statistics from those rows only) and are put back in place; a single-domain tensor is
    the same as passing the int. (BatchNorm's own rule still holds per domain: in training a (N, C) input needs
    at least two rows of each domain present; (B, L, C) with L > 1 always has enough values.)

    Defaults are `dsbn.py`'s (eps 1e-5, affine). scGPT's integration model builds it with eps=6.1e-5 and
    affine=False; :class:`ObjectiveWeights` records those values.
    """

    def __init__(
        self,
        num_features: int,
        n_domains: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if n_domains < 1:
            raise ValueError(f"n_domains must be >= 1, got {n_domains}.")
        self.num_features = num_features
        self.n_domains = n_domains
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine,
                           track_running_stats=track_running_stats)
            for _ in range(n_domains)
        )

    def reset_running_stats(self) -> None:
        for bn in self.bns:
            bn.reset_running_stats()

    def _check_domain(self, label: int) -> None:
        if not 0 <= label < self.n_domains:
            raise ValueError(f"Domain label {label} is outside 0..{self.n_domains - 1} ({self.n_domains} domains).")

    def forward(self, x: Tensor, domain_label: int | Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.num_features:
            raise ValueError(
                f"expected (N, {self.num_features}) or (B, L, {self.num_features}) input, got {tuple(x.shape)}."
            )
        if isinstance(domain_label, Tensor) and domain_label.dim() == 0:
            domain_label = int(domain_label.item())
        if not isinstance(domain_label, Tensor):
            label = int(domain_label)
            self._check_domain(label)
            return self._normalise(self.bns[label], x)
        labels = domain_label.to(x.device).long()
        if labels.shape != (x.shape[0],):
            raise ValueError(f"domain_label must be an int or a ({x.shape[0]},) tensor, got {tuple(labels.shape)}.")
        present = torch.unique(labels).tolist()
        for label in present:
            self._check_domain(label)
        if len(present) == 1:
            return self._normalise(self.bns[present[0]], x)
        out = torch.empty_like(x)
        for label in present:
            rows = (labels == label).nonzero(as_tuple=True)[0]
            out[rows] = self._normalise(self.bns[label], x[rows])
        return out

    @staticmethod
    def _normalise(bn: nn.Module, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return bn(x)
        return bn(x.permute(0, 2, 1)).permute(0, 2, 1)


# --------------------------------------------------------------------------------------------------------------
# Weights and the combined loss (scGPT's Tutorial_Integration, as scPEFT runs it)
# --------------------------------------------------------------------------------------------------------------
OBJECTIVES = ("gep", "gep_zero", "mvc", "mvc_zero", "ecs", "dab")


@dataclass(frozen=True)
class ObjectiveWeights:
    """Switches and weights of the integration objectives; defaults are the published ones.

    scGPT's integration tutorial (reused by scPEFT's batch correction): mask_ratio 0.4, mask_value -1, pad_value
    -2; GEP always on (weight 1); GEPC = MVC on (weight 1); ECS threshold 0.8 with weight 10 (upstream switches
    it off with threshold 0); DAB weight 1 through gradient reversal; DSBN on (eps 6.1e-5, no affine).
    `explicit_zero_prob` is True in the tutorial and in scPEFT's runs, but whole-human has no `zero_logit` /
    `W_zero_logit` weights (they start untrained), so it is off here by default; when on, the two Bernoulli
    terms ("gep_zero", "mvc_zero") are added with weight 1 each, as upstream.
    """

    gep: bool = True
    gep_weight: float = 1.0
    mask_ratio: float = 0.4
    mask_value: float = -1.0
    pad_value: float = -2.0
    mvc: bool = True
    mvc_weight: float = 1.0
    ecs: bool = True
    ecs_threshold: float = 0.8
    ecs_weight: float = 10.0
    dab: bool = True
    dab_weight: float = 1.0
    dsbn: bool = True
    dsbn_eps: float = 6.1e-5
    dsbn_affine: bool = False
    explicit_zero_prob: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio}.")
        for name in ("gep_weight", "mvc_weight", "ecs_weight", "dab_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def enabled(self) -> dict[str, float]:
        """Each switched-on loss term and its weight, in :data:`OBJECTIVES` order."""
        terms = {
            "gep": (self.gep, self.gep_weight),
            "gep_zero": (self.gep and self.explicit_zero_prob, 1.0),
            "mvc": (self.mvc, self.mvc_weight),
            "mvc_zero": (self.mvc and self.explicit_zero_prob, 1.0),
            "ecs": (self.ecs, self.ecs_weight),
            "dab": (self.dab, self.dab_weight),
        }
        return {name: weight for name, (on, weight) in terms.items() if on}


def integration_loss(parts: Mapping[str, Tensor], weights: ObjectiveWeights) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the switched-on objectives; returns `(total, terms)`.

    `parts` maps objective names (:data:`OBJECTIVES`) to unweighted losses; parts of switched-off objectives
    are ignored, a switched-on one that is missing is an error. `terms` maps each switched-on name to its
    weighted contribution (they sum to `total`), e.g. `terms["ecs"] = 10 * ecs_loss(...)` as upstream logs it.
    """
    unknown = sorted(set(parts) - set(OBJECTIVES))
    if unknown:
        raise KeyError(f"Unknown objective(s) {unknown}; known: {list(OBJECTIVES)}.")
    enabled = weights.enabled()
    if not enabled:
        raise ValueError("Every integration objective is switched off; switch on at least one of gep/mvc/ecs/dab.")
    missing = [name for name in enabled if name not in parts]
    if missing:
        raise KeyError(f"Objective(s) {missing} are switched on but no loss was given for them.")
    terms = {name: weight * parts[name] for name, weight in enabled.items()}
    total = sum(terms.values(), torch.zeros((), device=next(iter(terms.values())).device))
    return total, terms
