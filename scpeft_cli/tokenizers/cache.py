"""On-disk cache of tokenised cells, keyed by content: sweep jobs on the same data and backbone
tokenise once. The key covers the expression matrix, the gene names, the vocabulary, every
tokenizer setting and the seed, so a stale entry cannot be hit."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scpeft_cli.console import info
from scpeft_cli.tokenizers.scgpt import ScGPTTokenizer, TokenizedCells

FORMAT_VERSION = "2"  # 2: float32 data binned against float64 edges, as np.quantile gives them


def content_key(tokenizer: ScGPTTokenizer, X: sp.spmatrix, genes: Sequence[str], seed: int) -> str:
    X = sp.csr_matrix(X)
    digest = hashlib.blake2b(digest_size=20)
    for part in (X.data, X.indices, X.indptr, np.asarray(X.shape)):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update("\0".join(map(str, genes)).encode())
    digest.update("\0".join(f"{k}={v}" for k, v in sorted(tokenizer.vocab.token_to_id.items())).encode())
    settings = (FORMAT_VERSION, type(tokenizer).__name__, tokenizer.n_bins, tokenizer.max_seq_len, tokenizer.pad_value, tokenizer.cls_value, seed)
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def tokenize_cached(tokenizer: ScGPTTokenizer, X: sp.spmatrix, genes: Sequence[str], *, seed: int, cache_dir: str | Path | None) -> TokenizedCells:
    """`tokenizer.tokenize`, read from / written to `cache_dir` when one is given."""
    if cache_dir is None:
        return tokenizer.tokenize(X, genes, seed=seed)
    path = Path(cache_dir).expanduser() / "tokens" / f"{content_key(tokenizer, X, genes, seed)}.npz"
    if path.is_file():
        with np.load(path) as stored:
            tokens = TokenizedCells(**{key: stored[key] for key in ("indptr", "gene_ids", "values")},
                                    genes_matched=int(stored["genes_matched"]), genes_total=int(stored["genes_total"]))
        info(f"tokens read from cache {path.name[:12]}: gene overlap {tokens.genes_matched} / {tokens.genes_total}")
        return tokens
    tokens = tokenizer.tokenize(X, genes, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, indptr=tokens.indptr, gene_ids=tokens.gene_ids, values=tokens.values,
             genes_matched=tokens.genes_matched, genes_total=tokens.genes_total)
    os.replace(tmp, path)
    return tokens
