"""On-disk cache of tokenised cells, keyed by content: sweep jobs on the same data and backbone
tokenise once. The key covers the tokenizer's input matrix and totals, the gene names, every
setting the tokenizer declares (`cache_settings`, its vocabulary included) and the seed, so a stale
entry cannot be hit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpeft_cli.console import info
from scpeft_cli.tokenizers.base import TokenizedCells, Tokenizer, tokenizer_input


def content_key(tokenizer: Tokenizer, X: sp.spmatrix, genes, totals: np.ndarray | None, seed: int) -> str:
    X = sp.csr_matrix(X)
    digest = hashlib.blake2b(digest_size=20)
    for part in (X.data, X.indices, X.indptr, np.asarray(X.shape), np.asarray([] if totals is None else totals)):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update("\0".join(map(str, genes)).encode())
    digest.update(repr((tokenizer.cache_settings(), seed)).encode())
    return digest.hexdigest()


def tokenize_cells(tokenizer: Tokenizer, adata, *, seed: int, cache_dir: str | Path | None = None) -> TokenizedCells:
    """Tokenise a prepared AnnData from the matrix the tokenizer needs; read from / written to `cache_dir`."""
    X, totals = tokenizer_input(adata, tokenizer)
    genes = list(adata.var_names)
    if cache_dir is None:
        return tokenizer.tokenize(X, genes, seed=seed, totals=totals)
    path = Path(cache_dir).expanduser() / "tokens" / f"{content_key(tokenizer, X, genes, totals, seed)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            tokens = TokenizedCells.from_arrays(stored)
        info(f"tokens read from cache {path.name[:12]}: gene overlap {tokens.genes_matched} / {tokens.genes_total}")
        return tokens
    tokens = tokenizer.tokenize(X, genes, seed=seed, totals=totals)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **tokens.arrays())
    os.replace(tmp, path)
    return tokens
