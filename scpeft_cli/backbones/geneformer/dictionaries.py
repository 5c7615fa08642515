"""Geneformer's four gene dictionaries: found in a folder by name, read without running code, validated.

Upstream they ship with the geneformer package, not in the model folders (per generation:
`token_dictionary_gc104M.pkl`, `gene_median_dictionary_gc104M.pkl`, `gene_name_id_dict_gc104M.pkl`,
`ensembl_mapping_dict_gc104M.pkl` for V2, `*_gc30M.pkl` for V1, `*_gc95M.pkl` or no suffix in older
releases). Users copy them next to the weights or name their folder (`backbone.dictionary_dir`).
They are pickles of plain dicts holding numpy scalars: read through `safe_pickle`'s allow-list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scpeft_cli.errors import UserError
from scpeft_cli.safe_pickle import load_pickled_data

# The four dictionaries, by the stem every release's file name starts with.
STEMS = ("token_dictionary", "gene_median_dictionary", "gene_name_id_dict", "ensembl_mapping_dict")
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")


@dataclass(frozen=True)
class GeneDictionaries:
    """The contents of one set of dictionary files (same release), converted to plain Python types."""

    token_to_id: dict[str, int]
    medians: dict[str, float]
    gene_name_id: dict[str, str]
    ensembl_mapping: dict[str, str]
    files: dict[str, Path]

    @property
    def is_v2(self) -> bool:
        """V2 dictionaries hold `<cls>` and `<eos>` (each cell is `<cls>` genes `<eos>`)."""
        return "<cls>" in self.token_to_id and "<eos>" in self.token_to_id

    @property
    def size(self) -> int:
        return len(self.token_to_id)


def _suffix(path: Path, stem: str) -> str:
    """`token_dictionary_gc104M.pkl` -> `_gc104M`; `token_dictionary.pkl` -> ``."""
    return path.name[len(stem) : -len(".pkl")]


def candidates(folder: Path) -> dict[str, list[Path]]:
    """Every file in `folder` matching each dictionary's name pattern (`STEM*.pkl`), sorted."""
    return {stem: sorted(p for p in folder.glob(f"{stem}*.pkl") if p.is_file()) for stem in STEMS}


def find_dictionary_files(folder: str | Path, *, vocab_size: int | None = None) -> dict[str, Path]:
    """The four dictionary files of one release in `folder`, chosen as described in the module docstring.

    One candidate per pattern: those. Several: the set whose suffix is the same across the four and, when
    `vocab_size` is given, whose token dictionary has `vocab_size` entries; no unique such set is an error
    listing the candidates.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"Geneformer dictionary folder not found: {folder}; set backbone.dictionary_dir to the folder holding them"
        )
    found = candidates(folder)
    if not any(found.values()):
        raise UserError(
            f"no Geneformer gene dictionaries in {folder}: copy the four dictionaries that ship with the geneformer "
            "package (token_dictionary*.pkl, gene_median_dictionary*.pkl, gene_name_id_dict*.pkl, "
            "ensembl_mapping_dict*.pkl, of the model's generation) next to the weights, or set backbone.dictionary_dir"
        )
    absent = [f"{stem}*.pkl" for stem, paths in found.items() if not paths]
    if absent:
        raise UserError(
            f"Geneformer dictionary folder {folder} lacks {', '.join(absent)}; it must hold all four dictionaries "
            "that ship with the geneformer package for the model's generation (or set backbone.dictionary_dir)"
        )
    if all(len(paths) == 1 for paths in found.values()):
        return {stem: paths[0] for stem, paths in found.items()}
    suffixes = [{_suffix(path, stem) for path in paths} for stem, paths in found.items()]
    complete = sorted(set.intersection(*suffixes))
    sets = [{stem: folder / f"{stem}{suffix}.pkl" for stem in STEMS} for suffix in complete]
    if vocab_size is not None:
        sets = [files for files in sets if len(_read_token_dictionary(files["token_dictionary"])) == vocab_size]
    if len(sets) == 1:
        return sets[0]
    listing = "; ".join(f"{stem}: {', '.join(p.name for p in paths)}" for stem, paths in found.items())
    size = f" with {vocab_size} tokens (the model's vocab_size)" if vocab_size is not None else ""
    reason = "several sets" if sets else "no set"
    raise UserError(
        f"ambiguous Geneformer dictionaries in {folder}: {reason} of four files with one suffix{size} ({listing}); "
        "keep only the model's own four, or point backbone.dictionary_dir at a folder holding them"
    )


def read_dictionaries(folder: str | Path, *, vocab_size: int | None = None) -> GeneDictionaries:
    """Find, read and validate the four dictionaries in `folder` (see `find_dictionary_files`)."""
    files = find_dictionary_files(folder, vocab_size=vocab_size)
    return GeneDictionaries(
        token_to_id=_read_token_dictionary(files["token_dictionary"]),
        medians=_read_medians(files["gene_median_dictionary"]),
        gene_name_id=_read_mapping(files["gene_name_id_dict"]),
        ensembl_mapping=_read_mapping(files["ensembl_mapping_dict"]),
        files=files,
    )


# ----------------------------------------------------------------------------------------- readers


def _load_dict(path: Path) -> Mapping:
    data = load_pickled_data(path)
    if not isinstance(data, Mapping):
        raise UserError(f"{path} holds a {type(data).__name__}, not a dictionary; is it a Geneformer gene dictionary?")
    if not data:
        raise UserError(f"{path} is an empty dictionary")
    return data


def _bad(path: Path, what: str, pairs: list[tuple[object, object]]) -> UserError:
    shown = ", ".join(f"{key!r}: {value!r}" for key, value in pairs[:3])
    return UserError(f"{path} is not a Geneformer gene dictionary: {what} (e.g. {shown})")


def _read_token_dictionary(path: Path) -> dict[str, int]:
    """{token: id}; ids are ints (numpy int16 upstream), distinct and non-negative; `<pad>` present."""
    data = _load_dict(path)
    wrong = [(k, v) for k, v in data.items() if not isinstance(k, str) or not _is_integer(v)]
    if wrong:
        raise _bad(path, "token dictionaries map token strings to integer ids", wrong)
    tokens = {key: int(value) for key, value in data.items()}
    negative = [(k, v) for k, v in tokens.items() if v < 0]
    if negative:
        raise _bad(path, "token ids must be non-negative", negative)
    if len(set(tokens.values())) != len(tokens):
        seen: dict[int, str] = {}
        shared = [(k, v) for k, v in tokens.items() if seen.setdefault(v, k) != k]
        raise _bad(path, "two tokens share an id", shared)
    if "<pad>" not in tokens:
        raise UserError(f"{path} has no <pad> token; is it a Geneformer token dictionary?")
    return tokens


def _read_medians(path: Path) -> dict[str, float]:
    """{Ensembl id: median of the gene's non-zero normalised expression}; positive finite floats."""
    data = _load_dict(path)
    wrong = [(k, v) for k, v in data.items() if not isinstance(k, str) or not _is_real(v)]
    if wrong:
        raise _bad(path, "gene medians map gene ids to numbers", wrong)
    medians = {key: float(value) for key, value in data.items()}
    invalid = [(k, v) for k, v in medians.items() if not (math.isfinite(v) and v > 0)]
    if invalid:
        raise _bad(path, "gene medians must be positive finite numbers", invalid)
    return medians


def _read_mapping(path: Path) -> dict[str, str]:
    """{gene symbol or id: Ensembl id}, strings to strings."""
    data = _load_dict(path)
    wrong = [(k, v) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, str)]
    if wrong:
        raise _bad(path, "gene mappings map strings to Ensembl id strings", wrong)
    return {str(key): str(value) for key, value in data.items()}


def _is_integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
