"""Geneformer (a post-LayerNorm BERT over rank-value-encoded cells): the module, its exact loader for
the official model folders, and the reader of its four gene dictionaries.

`backbone=geneformer` (V1 gf-12L-30M-i2048, the model scPEFT adapted), `geneformer_6l` (V1-10M),
`geneformer_v2` (V2-104M), `geneformer_small` (random, for CPU tests and demos).
"""

from scpeft_cli.backbones.geneformer.checkpoint import build_geneformer, convert_state_dict
from scpeft_cli.backbones.geneformer.dictionaries import GeneDictionaries, find_dictionary_files, read_dictionaries
from scpeft_cli.backbones.geneformer.model import Geneformer, GeneformerArchitecture

__all__ = [
    "GeneDictionaries",
    "Geneformer",
    "GeneformerArchitecture",
    "build_geneformer",
    "convert_state_dict",
    "find_dictionary_files",
    "read_dictionaries",
]
