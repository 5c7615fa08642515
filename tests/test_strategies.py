"""The contract matrix: every backbone preset x every strategy and combination, at tiny sizes (as huggingface/peft
tests every method on one table of cases)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from live_memory import LiveTensorMemory
from safetensors.torch import load_file
from torch import nn

from scpeft_cli.assembly import assemble, load_trained, parameter_counts
from scpeft_cli.data.loading import prepare
from scpeft_cli.errors import UserError
from scpeft_cli.peft.lora import LoRALinear
from scpeft_cli.peft.persistence import WEIGHTS_FILE, save_adapter
from scpeft_cli.tokenizers.cache import tokenize_cells

GENES = [f"GENE{i}" for i in range(30)]
N_CLASSES = 4


def make_cells() -> anndata.AnnData:
    """Prepared cells (log-normalised X, raw counts, totals) as the data layer hands them to a backbone."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (6, len(GENES))) * (rng.random((6, len(GENES))) < 0.5)
    counts[:, 0] += 1  # no empty cell
    return prepare(
        sp.csr_matrix(counts.astype(np.float32)), obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]), genes=GENES,
        source="test", path=None, label_key=None, gene_key=None, layer=None, min_cells_per_class=0, drop_unlabeled=False,
    )


CELLS = make_cells()
# One tiny size per backbone preset; Geneformer embeds from its second-to-last layer, so it has one layer more.
BACKBONES = {
    "scgpt": ["backbone=scgpt_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.d_hid=24", "backbone.n_layers=4"],
    "geneformer": ["backbone=geneformer_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.d_ff=24", "backbone.n_layers=5"],
    "scbert": [
        "backbone=scbert_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.dim_head=8",
        "backbone.nb_features=8", "backbone.d_ff=24", "backbone.n_layers=4",
    ],
    "scfoundation": [
        "backbone=scfoundation_small", "backbone.d_model=16", "backbone.n_heads=2", "backbone.d_ff=24",
        "backbone.n_layers=4", "backbone.bin_num=6",
    ],
    "geneformer_v2": [
        "backbone=geneformer_small", "backbone.generation=v2", "backbone.d_model=16", "backbone.n_heads=2",
        "backbone.d_ff=24", "backbone.n_layers=5",
    ],
}
TINY_BACKBONE = BACKBONES["scgpt"]

STRATEGIES = {
    "full": ["peft=full"],
    "head_only": ["peft=head_only"],
    "linear_probe": ["peft=linear_probe"],
    "token_prompt": ["peft=token_prompt"],
    "encoder_prompt": ["peft=encoder_prompt"],
    "encoder_prompt_package": ["peft=encoder_prompt", "peft.variant=package"],
    "prefix": ["peft=prefix", "peft.n_tokens=3"],
    "prefix_some_layers": ["peft=prefix", "peft.n_tokens=2", "peft.layers=[1,3]"],
    "lora": ["peft=lora", "peft.alpha=8"],
    "lora_all_targets": ["peft=lora", "peft.targets=[q,k,v,out_proj,linear1,linear2]"],
    "hf_lora": ["peft=hf", "peft.method=lora"],
    "hf_dora": ["peft=hf", "peft.method=dora"],
    "hf_ia3": ["peft=hf", "peft.method=ia3", "peft.targets=[qkv,linear2]"],
    "hybrid": ["peft=combo", "peft.parts=[token_prompt,encoder_prompt]"],
    "lora_prefix": ["peft=combo", "peft.parts=[lora,prefix]", "+peft.options.prefix.n_tokens=2"],
}
# Prompts add attended tokens, so no initialisation makes them a no-op at step 0.
NOT_IDENTITY_AT_INIT = {"prefix", "prefix_some_layers", "lora_prefix"}
BACKBONE_FROZEN = set(STRATEGIES) - {"full"}


# Geneformer V2 differs from V1 only in its special tokens (<cls> first, <eos> last): the strategies that see
# token positions, the embedding-only ones and one layer strategy run on it.
V2_CASES = {"full", "head_only", "token_prompt", "prefix", "prefix_some_layers", "lora", "hybrid"}


def matrix(cases) -> list[tuple[str, str]]:
    """(backbone, strategy) pairs of the contract matrix, for `cases`."""
    return [(b, c) for b in BACKBONES for c in cases if b != "geneformer_v2" or c in V2_CASES]


@pytest.fixture(params=list(BACKBONES))
def backbone(request):
    """Tests not parametrized over the matrix run once per backbone preset."""
    return request.param


def _builder(compose_config, backbone: str):
    def _build(case: str, seed: int = 0):
        cfg = compose_config([*BACKBONES[backbone], *STRATEGIES[case], f"seed={seed}"])
        return cfg, assemble(cfg, head_settings={"n_classes": N_CLASSES}, cells=CELLS)

    return _build


@pytest.fixture
def build(compose_config, backbone):
    return _builder(compose_config, backbone)


@pytest.fixture
def build_scgpt(compose_config):
    return _builder(compose_config, "scgpt")


def _batch(parts) -> dict[str, torch.Tensor]:
    tokenizer = parts.backbone.tokenizer
    tokens = tokenize_cells(tokenizer, CELLS, seed=0)
    out = tokenizer.collate([tokens.cell(i) for i in range(len(tokens))])
    out["labels"] = torch.tensor([0, 1, 2, 3, 0, 1])
    return out


@pytest.fixture
def batch(build):
    return _batch(build("head_only")[1])


@pytest.fixture
def batch_scgpt(build_scgpt):
    return _batch(build_scgpt("head_only")[1])


def perturb_trainables(model: nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor random values, so zero-initialised adapters act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


def cls_logits(model, batch):
    return model(batch)[0]


@pytest.mark.parametrize("backbone,case", matrix(STRATEGIES))
def test_exactly_the_strategy_and_head_train(build, case):
    _, parts = build(case)
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.") for n in trainable)
    backbone_trainable = {n for n in trainable if n.startswith("backbone.")}
    unused = {f"backbone.{n}" for n in parts.model.backbone.unused_parameter_names()}
    assert not trainable & unused, "parameters the forward pass never reads must not train"
    if case == "full":
        assert trainable == {n for n, _ in parts.model.named_parameters()} - unused
    elif case in {"head_only", "linear_probe"}:
        assert not backbone_trainable
    else:
        assert backbone_trainable, "a PEFT strategy must add trainable tensors"
        _, plain = build("head_only")
        plain_names = {n for n, _ in plain.model.named_parameters()}
        # every trained backbone tensor is one the strategy added, none of the pretrained ones
        assert not backbone_trainable & plain_names


@pytest.mark.parametrize("backbone,case", matrix(STRATEGIES))
def test_every_trainable_gets_a_gradient_and_frozen_tensors_stay_bit_identical(build, batch, case):
    _, parts = build(case)
    model = parts.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):  # after the first step, zero-initialised adapter halves are non-zero too
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(cls_logits(model, batch), batch["labels"])
        loss.backward()
        optimizer.step()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    if case == "full":  # rows of tokens absent from the batch get no gradient: that is correct
        no_grad = [n for n in no_grad if n != "backbone.encoder.embedding.weight"]
    assert not no_grad, f"no gradient reached {no_grad}"
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed


@pytest.mark.parametrize("backbone,case", matrix(sorted(BACKBONE_FROZEN - NOT_IDENTITY_AT_INIT)))
def test_zero_init_adapted_backbone_equals_the_plain_backbone(build, batch, case):
    _, adapted = build(case)
    _, plain = build("head_only")
    adapted.model.eval(), plain.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted.model.backbone(batch), plain.model.backbone(batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone,case", matrix(sorted(NOT_IDENTITY_AT_INIT)))
def test_prompts_change_the_output_even_at_zero_init(build, batch, case):
    _, adapted = build(case)
    _, plain = build("head_only")
    adapted.model.eval(), plain.model.eval()
    with torch.no_grad():
        out, ref = adapted.model.backbone(batch), plain.model.backbone(batch)
    assert out.shape == ref.shape  # prompt positions are stripped at the end
    assert not torch.allclose(out, ref)


@pytest.mark.parametrize("backbone,case", matrix(STRATEGIES))
def test_train_mode_without_dropout_equals_eval_mode(build, batch, case):
    _, parts = build(case)
    perturb_trainables(parts.model)
    set_dropout(parts.model, 0.0)
    with torch.no_grad():
        parts.model.train()
        train_out = cls_logits(parts.model, batch)
        parts.model.eval()
        eval_out = cls_logits(parts.model, batch)
        eval_again = cls_logits(parts.model, batch)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(eval_out, eval_again, rtol=0, atol=0)


def test_keeping_qkv_instead_of_recomputing_changes_memory_only(build_scgpt, batch_scgpt):
    """`trainer.recompute_frozen_qkv` (the backbone's switch): same loss and gradients, q/k/v kept when off."""
    build, batch = build_scgpt, batch_scgpt
    _, parts = build("token_prompt")
    model = parts.model.train()
    perturb_trainables(model)

    def forward_and_backward(recompute: bool):
        model.backbone.recompute_frozen_qkv = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        with LiveTensorMemory() as memory:
            logits, _ = model(batch)
        parts.task.loss(logits, batch["labels"]).backward()
        return memory.end_megabytes, logits.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    held_recomputing, logits, grads = forward_and_backward(True)
    held_keeping, logits_kept, grads_kept = forward_and_backward(False)
    assert torch.equal(logits, logits_kept)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_kept, strict=True))
    n_cells, length = batch["gene_ids"].shape
    d_model, n_layers = model.backbone.d_model, len(model.backbone.layers)
    # recomputing keeps the first layer's input (the embedding) instead of its q/k/v; every later layer's input
    # is a LayerNorm output, recomputed from the LayerNorm's input, which that LayerNorm keeps anyway
    qkv_minus_first_input_mb = (n_layers * 3 - 1) * n_cells * length * d_model * 4 / 2**20
    assert held_keeping - held_recomputing == pytest.approx(qkv_minus_first_input_mb, rel=1e-9)


@pytest.mark.parametrize("backbone,case", matrix(STRATEGIES))
def test_save_and_load_in_a_fresh_model_gives_identical_predictions(build, batch, case, tmp_path):
    cfg, parts = build(case)
    perturb_trainables(parts.model)
    parts.model.eval()
    with torch.no_grad():
        expected = cls_logits(parts.model, batch)
    from omegaconf import OmegaConf

    saved = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "peft", "task")}
    save_adapter(parts.model, tmp_path, config={**saved, "seed": cfg.seed, "classes": list("abcd")})
    parts.backbone.tokenizer.save(tmp_path)  # a random backbone's gene tables, as a run saves them

    reloaded, _ = load_trained(tmp_path)
    reloaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cls_logits(reloaded.model, batch), expected, rtol=0, atol=0)

    stored = load_file(tmp_path / WEIGHTS_FILE)
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable, "the adapter file must hold exactly the trained tensors"
    # what `describe` reports trains is what the adapter holds
    assert parameter_counts(parts.model)["trainable_params"] == sum(t.numel() for t in stored.values())
    assert parts.strategy.placement(parts.model.backbone)


def test_lora_update_counts_once_in_eval_and_after_reload(build):
    _, parts = build("lora")
    perturb_trainables(parts.model)
    parts.model.eval()
    wrapped = parts.model.backbone.layers[0].self_attn.qkv
    assert isinstance(wrapped, LoRALinear)
    x = torch.randn(2, 5, wrapped.base_layer.in_features)
    d = wrapped.base_layer.in_features
    expected = wrapped.base_layer(x).clone()
    for (start, stop), a, b in zip(wrapped.blocks, wrapped.scpeft_lora_A, wrapped.scpeft_lora_B, strict=True):
        expected[..., start:stop] += wrapped.scaling * (x @ a.T @ b.T)
    assert wrapped.blocks == [(0, d), (2 * d, 3 * d)]  # query and value rows, not key
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected)
        torch.testing.assert_close(wrapped(x), expected)  # eval() merged nothing: still counted once


def test_encoder_prompt_sits_in_the_first_half_of_the_layers(build):
    _, parts = build("encoder_prompt")
    layers = parts.model.backbone.active_layers
    assert [not isinstance(layer.scpeft_attn_adapter, nn.Identity) for layer in layers] == [True, True, False, False]
    assert [layer.scpeft_ffn_adapter is not None for layer in layers] == [True, True, False, False]
    _, package = build("encoder_prompt_package")
    assert all(layer.scpeft_ffn_adapter is None for layer in package.model.backbone.active_layers)


def test_two_strategies_on_one_insertion_point_is_an_error(compose_config):
    cfg = compose_config([*TINY_BACKBONE, "peft=combo", "peft.parts=[encoder_prompt,encoder_prompt]"])
    with pytest.raises(UserError, match="already used"):
        assemble(cfg, head_settings={"n_classes": N_CLASSES}, cells=CELLS)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["peft=lora", "peft.r=0"], "rank"),
        (["peft=token_prompt", "peft.ratio=1.5"], r"peft.ratio must be in \(0, 1\]"),
        (["peft=encoder_prompt", "peft.ratio=0"], r"peft.ratio must be in \(0, 1\]"),
        (["peft=encoder_prompt", "peft.variant=other"], "peft.variant"),
        (["peft=prefix", "peft.n_tokens=5000"], "peft.n_tokens"),
        (["peft=encoder_prompt", "peft.layers=[7]"], "peft.layers"),
        (["peft=hf", "peft.method=prompt"], "peft.method"),
        (["peft=combo", "peft.parts=[token_prompt,nonsense]"], "not a combinable strategy"),
        (["peft=token_prompt", "peft.init=gaussian"], "peft.init"),
    ],
)
def test_invalid_hyperparameters_are_clear_errors(compose_config, overrides, message):
    cfg = compose_config([*TINY_BACKBONE, *overrides])
    with pytest.raises(UserError, match=message):
        assemble(cfg, head_settings={"n_classes": N_CLASSES}, cells=CELLS)


def test_a_strategy_or_setting_the_backbone_cannot_honour_is_one_clear_error(build_scgpt):
    from scpeft_cli.assembly import build_backbone
    from scpeft_cli.peft.prefix import Prefix
    from scpeft_cli.peft.token_prompt import TokenPrompt

    cfg, _ = build_scgpt("head_only")
    backbone = build_backbone(cfg, cells=CELLS).model
    backbone.supports = frozenset({"recompute_frozen_qkv"})  # a backbone offering no prompt points
    with pytest.raises(UserError, match="peft=TokenPrompt needs the backbone's token_adapter, which scGPT does not offer"):
        TokenPrompt().attach(backbone)
    with pytest.raises(UserError, match="needs the backbone's prompts"):
        Prefix().attach(backbone)
    with pytest.raises(UserError, match="trainer.grad_checkpointing needs the backbone's grad_checkpointing"):
        backbone.set_memory_options(grad_checkpointing=True, recompute_frozen_qkv=True)
