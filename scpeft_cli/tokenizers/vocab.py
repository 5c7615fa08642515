"""Gene vocabularies: the symbol -> token id map that ties a dataset's genes to a model's embedding rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scpeft_cli.console import info, warn
from scpeft_cli.errors import UserError

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)


@dataclass(frozen=True)
class GeneVocab:
    """Token ids by symbol; `size` is the number of embedding rows the ids index into."""

    token_to_id: dict[str, int]

    @classmethod
    def from_json(cls, path: str | Path) -> GeneVocab:
        try:
            mapping = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read vocabulary {path}: {err}; expected a JSON object {{gene: index}}") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise UserError(f"vocabulary {path} is not a JSON object mapping gene symbols to integer ids")
        vocab = cls({str(k): int(v) for k, v in mapping.items()})
        missing = [t for t in (PAD_TOKEN, CLS_TOKEN) if t not in vocab.token_to_id]
        if missing:
            raise UserError(f"vocabulary {path} lacks the special tokens {missing}; is it a scGPT vocab.json?")
        return vocab

    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> GeneVocab:
        """A vocabulary laid out like scGPT's: genes in alphabetical order, then the special tokens."""
        tokens = sorted(set(genes)) + list(SPECIAL_TOKENS)
        return cls({token: index for index, token in enumerate(tokens)})

    @property
    def size(self) -> int:
        return max(self.token_to_id.values()) + 1

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self.token_to_id[CLS_TOKEN]

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.token_to_id))

    def map_genes(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Column indices of the genes found in the vocabulary, and their token ids; logs the overlap."""
        ids = np.array([self.token_to_id.get(g, -1) for g in genes], dtype=np.int64)
        is_special = np.isin(np.asarray(genes, dtype=object), SPECIAL_TOKENS)
        columns = np.flatnonzero((ids >= 0) & ~is_special)
        n, total = len(columns), len(genes)
        if n == 0:
            raise UserError(
                f"none of the {total} genes are in the model vocabulary (examples: {list(genes[:3])}); "
                "scGPT expects gene symbols: set data.gene_key to the var column that holds them"
            )
        info(f"gene overlap with vocabulary: {n} / {total} genes ({100 * n / total:.1f}%)")
        if n < 0.5 * total:
            warn(f"only {100 * n / total:.1f}% of the genes are in the vocabulary; the rest are ignored")
        return columns, ids[columns]
