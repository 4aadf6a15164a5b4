"""Statistics of token entropies that the training callback logs and the analysis reports: pure functions, no model.

``forking_token_table`` (which tokens fork, how often), ``log_histogram`` (entropy histogram on log bins) and
``token_strings`` (the text of each token id). ``ForkingStatsCallback`` logs them during training;
``trl_forking.analysis`` builds its reports on them, so the two agree by construction.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "DEFAULT_HISTOGRAM_FLOOR",
    "DEFAULT_LOW_ENTROPY",
    "DEFAULT_PERCENTILES",
    "forking_token_table",
    "log_histogram",
    "token_strings",
]

# p10 to p99; p80 is the paper's headline (0.672 for Qwen3-8B), so that the top-20% threshold reads off directly.
DEFAULT_PERCENTILES = (10, 25, 50, 75, 80, 90, 95, 99)
# The paper: over 50% of Qwen3-8B's chain-of-thought tokens have entropy below 0.01.
DEFAULT_LOW_ENTROPY = 0.01
# Entropies can be exactly 0; a log axis needs a positive lower edge. 1e-5 nats is far below any forking token.
DEFAULT_HISTOGRAM_FLOOR = 1e-5


def forking_token_table(
    token_ids: torch.Tensor,
    entropies: torch.Tensor,
    selected: torch.Tensor,
    mask: torch.Tensor | None = None,
    top: int = 20,
    decode=None,
) -> list[dict]:
    """Returns the ``top`` token ids most often selected as forking tokens, one dict per token, most frequent first.

    For a token id v with ``c_v`` selected occurrences among ``k`` selected tokens and ``n_v`` valid occurrences:
    ``count`` = c_v, ``share`` = c_v / k (share of all forking positions), ``fork_rate`` = c_v / n_v (how often v
    forks when it appears), ``mean_entropy`` = mean H over its selected occurrences. Ties in count are broken by
    higher mean entropy, then by lower id.

    Args:
        token_ids: (B, T) token ids.
        entropies: (B, T) entropies.
        selected: (B, T) bool, the forking tokens (a subset of the valid ones).
        mask: (B, T) 1 for valid tokens; all positions when None.
        top: number of rows.
        decode: optional ``id -> str``; adds a ``token`` field.
    """
    valid = torch.ones_like(selected, dtype=torch.bool) if mask is None else mask.bool()
    selected = selected.bool() & valid
    ids_all = token_ids[valid].long()
    ids_sel = token_ids[selected].long()
    ent_sel = entropies.detach().float()[selected].double()
    k = ids_sel.numel()
    if k == 0:
        return []
    size = int(max(ids_all.max(), ids_sel.max())) + 1
    occurrences = torch.bincount(ids_all, minlength=size)
    counts = torch.bincount(ids_sel, minlength=size)
    sums = torch.zeros(size, dtype=torch.float64).index_add_(0, ids_sel, ent_sel)
    present = torch.nonzero(counts).squeeze(-1).tolist()
    means = {v: float(sums[v] / counts[v]) for v in present}
    order = sorted(present, key=lambda v: (-int(counts[v]), -means[v], v))[:top]
    rows = []
    for v in order:
        row = {
            "token_id": v,
            "count": int(counts[v]),
            "share": int(counts[v]) / k,
            "fork_rate": int(counts[v]) / int(occurrences[v]),
            "mean_entropy": means[v],
        }
        if decode is not None:
            row = {"token": decode(v), **row}
        rows.append(row)
    return rows


def log_histogram(values: torch.Tensor, bins: int = 50, floor: float = DEFAULT_HISTOGRAM_FLOOR) -> dict:
    """Returns ``{"edges": [bins + 1], "counts": [bins], "floor": floor}``: a histogram on log-spaced bins.

    The bins span ``[max(floor, min value), max value]`` evenly in log10; values below ``floor`` (e.g. exact zeros)
    are counted in the first bin so that the counts add up to ``values.numel()``.

    Args:
        values: (N,) entropies (any shape; flattened).
        bins: number of bins.
        floor: smallest positive edge.
    """
    x = values.detach().float().reshape(-1).cpu().numpy().astype(np.float64)
    if x.size == 0:
        return {"edges": [], "counts": [], "floor": floor}
    low = max(floor, float(x.min()))
    high = max(float(x.max()), low)
    if high <= low * (1 + 1e-9):
        # One distinct value: a narrow band around it keeps the edges strictly increasing.
        low, high = low / 1.01, high * 1.01
    edges = np.logspace(math.log10(low), math.log10(high), bins + 1)
    edges[0], edges[-1] = low, high  # exact ends: logspace's rounding can leave the maximum outside the last bin
    counts, _ = np.histogram(np.clip(x, low, high), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "floor": floor}


def token_strings(tokenizer, ids) -> list[str]:
    """Returns the text of each token id in ``ids`` decoded on its own (special tokens kept, e.g. EOS).

    Concatenated, the pieces give the completion text, except where a character spans several byte-level tokens:
    such a piece decodes to U+FFFD alone, so its vocabulary symbol is shown instead (distinct tokens stay distinct).
    """
    pieces = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        pieces.append(tokenizer.convert_ids_to_tokens(int(i)) if "\ufffd" in text else text)
    return pieces
