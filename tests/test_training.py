"""The training loop's switches: balanced sampling, class weights, max_steps, best-epoch restore, monitors."""

import numpy as np
import pytest
import torch
from torch import nn

from scpeft_cli.backbones.base import Backbone
from scpeft_cli.errors import UserError
from scpeft_cli.peft.finetune import FullFineTuning
from scpeft_cli.peft.model import PeftModel
from scpeft_cli.tasks.annotation import AnnotationTask
from scpeft_cli.tasks.annotation.heads import LinearHead
from scpeft_cli.tasks.base import TaskData
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.trainer import Trainer


def toy_tokens(n_cells: int) -> TokenizedCells:
    """Cell i is the single token i % 7 with value 1 (enough for loader and loop tests)."""
    indptr = np.arange(n_cells + 1)
    return TokenizedCells(indptr=indptr, gene_ids=np.arange(n_cells) % 7, values=np.ones(n_cells, dtype=np.float32))


def collate(cells):
    ids = torch.tensor(np.stack([c[0] for c in cells]))
    return {"gene_ids": ids, "values": torch.tensor(np.stack([c[1] for c in cells])), "padding_mask": ids < 0}


class ToyBackbone(Backbone):
    d_model = 8

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 8)
        self.layers = nn.ModuleList()

    def embed(self, batch):
        return self.embedding(batch["gene_ids"])

    def cell_embedding(self, states, batch):
        return states[:, 0]


def make_trainer(**overrides):
    options = dict(
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr), scheduler=None, lr=0.5, max_epochs=5,
        max_steps=None, batch_size=8, eval_batch_size=16, grad_clip=1.0, patience=None, monitor="val_loss",
        precision="auto", device="cpu", class_weighted_loss=False, balanced_sampler=False, num_workers=0,
    )
    return Trainer(**{**options, **overrides})


def test_balanced_sampler_draws_classes_about_equally():
    labels = np.array([0] * 90 + [1] * 10)
    loader = make_loader(CellTokens(toy_tokens(100), {"labels": labels}, np.arange(100)), collate, batch_size=50, shuffle=True, seed=0, balanced=True)
    drawn = torch.cat([batch["labels"] for _ in range(20) for batch in loader]).numpy()
    assert 0.4 < drawn.mean() < 0.6  # class 1 is 10% of cells but about half of the draws


def test_loader_order_depends_only_on_the_seed():
    labels = np.zeros(40, dtype=int)
    data = CellTokens(toy_tokens(40), {"labels": labels}, np.arange(40))

    def order(seed):
        return torch.cat([b["gene_ids"][:, 0] for b in make_loader(data, collate, batch_size=8, shuffle=True, seed=seed)]).tolist()

    assert order(3) == order(3) and order(3) != order(4)


def test_class_weights_follow_one_minus_share_squared():
    weights = AnnotationTask.class_weights(np.array([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([0.0625, 0.5625, 1.0]))


def fit_toy(trainer, labels):
    """The annotation task's objective and validation scores on a toy model (every cell is train and val)."""
    model = PeftModel(ToyBackbone(), LinearHead(8, 2), FullFineTuning())
    cells = np.arange(len(labels))
    data = CellTokens(toy_tokens(len(labels)), {"labels": labels}, cells)
    train = make_loader(data, collate, batch_size=trainer.batch_size, shuffle=True, seed=0)
    val = make_loader(data, collate, batch_size=16, shuffle=False, seed=0)
    task = AnnotationTask()
    task_data = TaskData(adata=None, index={"train": cells, "val": cells}, targets={"labels": labels},
                         head_settings={"classes": ["a", "b"]})  # fmt: skip
    result = trainer.fit(
        model, train_loader=train, objective=task.objective(task_data, trainer),
        validate=task.validate(task_data, trainer, val), monitors=task.monitors,
    )
    return model, result, val


def test_max_steps_stops_training_and_best_state_is_restored():
    labels = (np.arange(32) % 7 > 3).astype(int)
    trainer = make_trainer(max_steps=5, max_epochs=10)
    model, result, val = fit_toy(trainer, labels)
    assert result.steps == 5 and len(result.history) == 2
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"]
    assert AnnotationTask().evaluate(model, val, trainer.runtime).loss == pytest.approx(best["val_loss"], rel=1e-6)


@pytest.mark.parametrize("recompute", [True, False])
def test_fit_hands_the_memory_switches_to_the_backbone(recompute):
    trainer = make_trainer(max_steps=1, max_epochs=1, grad_checkpointing=2, recompute_frozen_qkv=recompute)
    model, _, _ = fit_toy(trainer, (np.arange(16) % 2).astype(int))
    assert model.backbone.gradient_checkpointing == 2
    assert model.backbone.recompute_frozen_qkv is recompute


def test_early_stopping_and_monitor_direction():
    labels = (np.arange(32) % 7 > 3).astype(int)
    trainer = make_trainer(lr=0.0001, max_epochs=30, patience=2, monitor="val_macro_f1")
    _, result, _ = fit_toy(trainer, labels)
    assert len(result.history) < 30  # a learning rate this small cannot keep improving macro F1
    assert result.best_score == max(r["val_macro_f1"] for r in result.history)


def test_a_monitor_the_task_does_not_score_is_a_clear_error():
    with pytest.raises(UserError, match="trainer.monitor=val_auc is not one of this task's validation scores: val_loss, val_macro_f1"):
        fit_toy(make_trainer(monitor="val_auc"), (np.arange(16) % 2).astype(int))


BAD_SETTINGS = [
    ({"lr": -1.0}, "trainer.lr"),
    ({"max_epochs": 0}, "trainer.max_epochs must be a whole number >= 1"),
    ({"recompute_frozen_qkv": "sometimes"}, "trainer.recompute_frozen_qkv='sometimes': use true or false"),
]
if not torch.cuda.is_available():  # bf16 is refused only where the device lacks it
    BAD_SETTINGS.append(({"precision": "bf16"}, "bf16"))


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS)
def test_bad_trainer_settings_are_clear_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        make_trainer(**overrides)
