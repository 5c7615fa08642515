"""Task heads that start from a checkpoint's pretraining heads (`LoadedBackbone.heads`), matched by module name."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.backbones.base import check_tensors
from scpeft_cli.console import info, warn

DECODERS = ("decoder", "mvc_decoder")  # scGPT's expression decoders: a checkpoint that lacks them is worth a warning


def load_pretrained_heads(head: nn.Module, heads: dict[str, dict[str, torch.Tensor]], *, source: str | None) -> None:
    """Copy the checkpoint's heads into the head's modules of the same name (names and shapes checked: a
    mismatch is an error, never a silent skip) and say which modules were loaded and which start random."""
    loaded, random = [], []
    for name, module in head.named_children():
        tensors = heads.get(name, {})
        expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
        present = {key: shape for key, shape in expected.items() if key in tensors}
        check_tensors(tensors, present, source=f"the checkpoint's {name}.*", against=f"this run's {name}")
        module.load_state_dict(tensors, strict=False)
        if not present:
            random.append(name)
            continue
        loaded.append(name)
        random += sorted({f"{name}.{key.split('.')[0]}" for key in expected if key not in present})
    if loaded:
        info(f"heads loaded from the checkpoint: {', '.join(loaded)}")
    if random:
        decoder_missing = source is not None and any(n.split(".")[0] in DECODERS for n in random)
        (warn if decoder_missing else info)(
            f"heads starting random: {', '.join(random)}" + ("" if source else " (randomly initialised backbone)")
        )
