"""scpeft-cli: parameter-efficient fine-tuning of single-cell foundation models from the command line."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _with_checkpoint(checkpoint, pretrained_value, random_value):
    """`${with_checkpoint:${backbone.checkpoint},A,B}`: A when a checkpoint is set, B for a random backbone."""
    return pretrained_value if checkpoint else random_value


OmegaConf.register_new_resolver("with_checkpoint", _with_checkpoint, replace=True)
