"""scPEFT's attention marker scores (tutorial_peft/Tutorial_MarkerGeneDetection.ipynb, `extract_attention`).

Per cell and head, with the raw scores s = q·k^T of the last layer (no 1/sqrt(d), no softmax: both keep
each row's order, and only ranks are used):
1. rows: each query row's scores over the cell's keys are replaced by their ranks, divided by M (the
   number of the cell's tokens);
2. columns: each entry of that matrix is replaced by its rank within its column (over the M query rows);
3. the reader's row (`Backbone.pooling_weights`: the `<cls>` row on scGPT) over the gene columns, averaged over heads.
Only the reader's row of step 2 is needed: its entry in column j is the number of query rows whose step-1
rank of key j is below the reader's, divided by M. Ties are broken by position (stable sorts), so scores
are deterministic (upstream's unstable argsort breaks them arbitrarily). Padding is neither a row nor a
key, and prompt keys are not the cell's (`capture.query_key`).
Per cell state, the score of a gene is its mean in the state minus its mean in the background.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from scpeft_cli.apply import cell_loader
from scpeft_cli.assembly import Assembly
from scpeft_cli.console import console
from scpeft_cli.errors import UserError
from scpeft_cli.markers.capture import attention_of, last_layer_qkv, query_key
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.training.runtime import Runtime

CHUNK_ELEMENTS = 1 << 24  # scores ranked at once: bounds memory whatever the cell length
BACKGROUNDS = ("rest", "none")  # or the name of a cell state


def _row_ranks(scores: torch.Tensor, pad_keys: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row (0 = lowest); padding keys rank above every real key."""
    order = scores.masked_fill(pad_keys, float("inf")).sort(dim=-1, stable=True).indices
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def rank_normalised_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, reader: torch.Tensor) -> torch.Tensor:
    """(batch, length) score of every key for the reader query, averaged over heads; 0 at padding.

    q, k: (batch, heads, length, head_dim); valid: (batch, length) real tokens; reader: (batch, length)
    weights of the pooled query (`Backbone.pooling_weights`).
    """
    batch, heads, length, _ = q.shape
    pad_keys = ~valid[:, None, None, :]
    keys = k.transpose(-1, -2)
    query = torch.einsum("bl,bhld->bhd", reader.to(q.dtype), q).unsqueeze(2)
    reader_ranks = _row_ranks(query @ keys, pad_keys)
    below = torch.zeros(batch, heads, length, device=q.device)
    step = max(1, CHUNK_ELEMENTS // (batch * heads * length))
    for start in range(0, length, step):
        rows = slice(start, start + step)
        ranks = _row_ranks(q[:, :, rows] @ keys, pad_keys)
        below += ((ranks < reader_ranks) & valid[:, None, rows, None]).sum(dim=2)
    n_tokens = valid.sum(dim=1).clamp(min=1)[:, None, None]
    return (below / n_tokens).mean(dim=1).masked_fill(~valid, 0.0)


def state_sums(
    parts: Assembly, tokens: TokenizedCells, *, collate, token_column: np.ndarray, n_genes: int, states: np.ndarray, n_states: int,
    inputs: dict[str, np.ndarray], runtime: Runtime, batch_size: int,
) -> np.ndarray:
    """(n_states, n_genes) sums over each state's cells of their gene scores.

    `token_column`: the output gene column of each token id (-1: not a gene); `states`: each cell's state
    index. A gene that is not a token of a cell (not expressed, or beyond the input length) adds 0 there.
    """
    backbone, model = parts.backbone.model, parts.model
    n_heads = attention_of(backbone).n_heads
    sums = np.zeros((n_states, n_genes))
    loader = cell_loader(tokens, collate, batch_size=batch_size, inputs=inputs)
    model.to(runtime.device).eval()
    progress = Progress(
        TextColumn("[bold]attention scores"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    done = 0
    with last_layer_qkv(backbone) as captured, torch.no_grad(), progress:
        task = progress.add_task("cells", total=len(tokens))
        for batch in loader:
            batch = runtime.to_device(batch)
            with runtime.autocast():
                model.embed(batch)
            valid = ~batch["padding_mask"]
            q, k = query_key(captured["qkv"], n_heads=n_heads, n_tokens=valid.shape[1])
            scores = rank_normalised_scores(q, k, valid, backbone.pooling_weights(batch)).cpu().numpy()
            real = valid.cpu().numpy()
            columns = np.where(real, token_column[np.where(real, batch["gene_ids"].cpu().numpy(), 0)], -1)  # padding ids may lie beyond
            rows = np.broadcast_to(states[done : done + len(scores), None], columns.shape)
            keep = columns >= 0
            np.add.at(sums, (rows[keep], columns[keep]), scores[keep])
            done += len(scores)
            progress.update(task, completed=done)
    return sums


def check_background(background: str, states: list[str]) -> None:
    if background not in (*BACKGROUNDS, *states):
        raise UserError(
            f"markers.background={background} is not a cell state; use rest, none or one of: {', '.join(states)}"
        )
    if background == "rest" and len(states) < 2:
        raise UserError(f"markers.background=rest needs at least two cell states, the data has one ({states[0]}); use markers.background=none")


def contrast(means: pd.DataFrame, n_cells: pd.Series, background: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(score, background mean) per target state x gene: the state's mean minus the background's.

    background: "rest" (every other cell), "none" (the state's mean alone: upstream's 'target' setting)
    or a state (the others are compared with it; it is no target itself).
    """
    if background == "none":
        return means, pd.DataFrame(np.nan, index=means.index, columns=means.columns)
    if background == "rest":
        sums = means.mul(n_cells, axis=0)
        rest = (sums.sum() - sums).div(n_cells.sum() - n_cells, axis=0)
        return means - rest, rest
    targets = means.drop(index=background)
    reference = pd.DataFrame(np.tile(means.loc[background].to_numpy(), (len(targets), 1)), index=targets.index, columns=means.columns)
    return targets - reference, reference


def top_genes(scores: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k highest-scoring genes of each state (ties in gene order): state, gene, score, rank (1 = top)."""
    rows = []
    for state, values in scores.iterrows():
        order = np.argsort(-values.to_numpy(), kind="stable")[:k]
        rows += [(state, scores.columns[j], values.iloc[j], rank) for rank, j in enumerate(order, start=1)]
    return pd.DataFrame(rows, columns=["state", "gene", "score", "rank"])
