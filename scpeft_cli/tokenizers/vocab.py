"""Gene vocabularies: the symbol -> token id map that ties a dataset's genes to a model's embedding rows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scpeft_cli.artifacts import write_text
from scpeft_cli.console import info, warn
from scpeft_cli.errors import UserError

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)
# Below this share of the data's genes in the vocabulary a run is refused; below WARN_OVERLAP it is flagged.
MIN_OVERLAP = 0.1
WARN_OVERLAP = 0.5

# Ensembl gene ids (ENSG00000141510, ENSMUSG00000059552.3, ...): prefix, "G", 6+ digits, optional version.
ENSEMBL_GENE_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(?:\.\d+)?(?:_PAR_Y)?$")
GENE_ID_KIND_MAJORITY = 0.9
GENE_ID_KIND_WORDS = {"ensembl": "Ensembl ids", "symbol": "gene symbols", "mixed": "a mix of Ensembl ids and gene symbols"}


def is_special_token(name: str) -> bool:
    """Special tokens such as <pad>, <cls> are not genes."""
    return name.startswith("<") and name.endswith(">")


def _ensembl_counts(genes: Iterable[str]) -> tuple[int, int]:
    """(identifiers that look like Ensembl gene ids, all identifiers), special <tokens> excluded."""
    names = [str(g).strip() for g in genes]
    names = [g for g in names if not is_special_token(g)]
    return sum(bool(ENSEMBL_GENE_ID.match(g)) for g in names), len(names)


def ensembl_fraction(genes: Iterable[str]) -> float:
    """Share of the gene identifiers (special <tokens> excluded) that look like Ensembl gene ids."""
    n_ensembl, n = _ensembl_counts(genes)
    return n_ensembl / n if n else 0.0


def gene_id_kind(genes: Iterable[str]) -> str:
    """"ensembl" when >= 90% look like Ensembl gene ids, "symbol" when >= 90% do not, otherwise "mixed"."""
    n_ensembl, n = _ensembl_counts(genes)
    needed = GENE_ID_KIND_MAJORITY * n - 1e-9
    if n and n_ensembl >= needed:
        return "ensembl"
    if n - n_ensembl >= needed:
        return "symbol"
    return "mixed"


def gene_id_hint(data_kind: str, vocab_kind: str) -> str:
    """What the identifier kinds of the data genes and of the vocabulary say about a poor overlap."""
    data_words, vocab_words = GENE_ID_KIND_WORDS[data_kind], GENE_ID_KIND_WORDS[vocab_kind]
    if data_kind == vocab_kind == "mixed":
        return f"data genes and the vocabulary are both {data_words}: check that they name genes the same way"
    if data_kind == vocab_kind:
        return (
            f"data genes and the vocabulary both look like {data_words}: check the species and the naming "
            "(e.g. upper/lower case), or set data.gene_key to another var column"
        )
    wanted = {"ensembl": "Ensembl ids", "symbol": "symbols"}.get(vocab_kind, "the vocabulary's identifiers")
    data_text = f"look like {data_words}" if data_kind != "mixed" else f"are {data_words}"
    vocab_text = f"uses {vocab_words}" if vocab_kind != "mixed" else f"holds {vocab_words}"
    return f"data genes {data_text}, the vocabulary {vocab_text}: set data.gene_key to a var column with {wanted}"


def map_genes(vocab, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the data genes a vocabulary knows (`vocab.lookup`), and their token ids.

    Logs the overlap; too small an overlap is a UserError saying which identifiers to use instead.
    """
    genes = [str(g) for g in genes]
    ids = np.asarray(vocab.lookup(genes), dtype=np.int64)
    columns = np.flatnonzero(ids >= 0)
    n, total = len(columns), len(genes)
    hint = gene_id_hint(gene_id_kind(genes), gene_id_kind(vocab.genes))
    if n == 0:
        raise UserError(f"none of the {total} genes are in the model vocabulary (examples: {genes[:3]}); {hint}")
    if n < MIN_OVERLAP * total:
        raise UserError(
            f"only {n} of {total} genes ({100 * n / total:.1f}%) are in the model vocabulary, below the "
            f"{100 * MIN_OVERLAP:.0f}% minimum; {hint}"
        )
    info(f"gene overlap with vocabulary: {n} / {total} genes ({100 * n / total:.1f}%)")
    if n < WARN_OVERLAP * total:
        warn(f"only {100 * n / total:.1f}% of the genes are in the vocabulary; the rest are ignored; {hint}")
    return columns, ids[columns]


@dataclass(frozen=True)
class GeneVocab:
    """Token ids by gene identifier; `size` is the number of embedding rows the ids index into."""

    token_to_id: dict[str, int]

    @classmethod
    def from_json(cls, path: str | Path, *, required: Sequence[str] = ()) -> GeneVocab:
        """A JSON object {gene: index}; `required` names special tokens the model needs."""
        try:
            mapping = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read vocabulary {path}: {err}; expected a JSON object {{gene: index}}") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise UserError(f"vocabulary {path} is not a JSON object mapping gene identifiers to integer ids")
        vocab = cls({str(k): int(v) for k, v in mapping.items()})
        missing = [t for t in required if t not in vocab.token_to_id]
        if missing:
            raise UserError(f"vocabulary {path} lacks the special tokens {missing}")
        return vocab

    @classmethod
    def from_genes(cls, genes: Iterable[str], *, first: Sequence[str] = (), last: Sequence[str] = SPECIAL_TOKENS) -> GeneVocab:
        """Special tokens `first`, the genes in alphabetical order, then the special tokens `last`
        (by default scGPT's layout: genes, then `<pad>`, `<cls>`, `<eoc>`)."""
        tokens = [*first, *sorted(set(genes) - set(first) - set(last)), *last]
        return cls({token: index for index, token in enumerate(tokens)})

    @property
    def size(self) -> int:
        return max(self.token_to_id.values()) + 1

    @property
    def genes(self) -> list[str]:
        return [t for t in self.token_to_id if not is_special_token(t)]

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self.token_to_id[CLS_TOKEN]

    def to_json(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.token_to_id))

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene, -1 where the vocabulary lacks it (special tokens never match a gene)."""
        return np.array([-1 if is_special_token(g) else self.token_to_id.get(g, -1) for g in genes], dtype=np.int64)

    def map_genes(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return map_genes(self, genes)
