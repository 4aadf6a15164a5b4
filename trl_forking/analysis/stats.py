"""Entropy statistics of forking tokens: pure functions on tensors, no model.

Every statistic is over the *valid* tokens of a (B, T) entropy matrix (``mask == 1``). Percentiles and the top-rho
selection come from ``trl_forking.selection`` (exact nearest-rank, exactly ``ceil(rho * N)`` tokens), so what the
analysis reports is what training selects.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..selection import check_quantile, entropy_quantiles, forking_mask, num_selected

__all__ = [
    "DEFAULT_HISTOGRAM_FLOOR",
    "DEFAULT_LOW_ENTROPY",
    "DEFAULT_PERCENTILES",
    "average_ranks",
    "entropy_summary",
    "forking_token_table",
    "log_histogram",
    "spearman",
    "top_rho_overlap",
    "top_rho_threshold",
]

# p10 to p99; p80 is the paper's headline (0.672 for Qwen3-8B), so that the top-20% threshold reads off directly.
DEFAULT_PERCENTILES = (10, 25, 50, 75, 80, 90, 95, 99)
# The paper: over 50% of Qwen3-8B's chain-of-thought tokens have entropy below 0.01.
DEFAULT_LOW_ENTROPY = 0.01
# Entropies can be exactly 0; a log axis needs a positive lower edge. 1e-5 nats is far below any forking token.
DEFAULT_HISTOGRAM_FLOOR = 1e-5


def _valid(entropies: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Returns the (N,) float32 entropies at ``mask == 1`` (all of them when ``mask`` is None)."""
    entropies = entropies.detach().float()
    return entropies.reshape(-1) if mask is None else entropies[mask.bool()]


def top_rho_threshold(entropies: torch.Tensor, mask: torch.Tensor, rho: float) -> float | None:
    """Returns the smallest entropy among the top ``ceil(rho * N)`` valid tokens (None when N == 0).

    Tokens with entropy >= this value are forking tokens, except ties at the value that ``forking_mask`` leaves out
    to keep exactly ``ceil(rho * N)``.

    Args:
        entropies: (B, T) entropies.
        mask: (B, T) 1 for valid tokens.
        rho: share of tokens kept, in (0, 1].
    """
    selected = forking_mask(entropies, mask, rho)
    if not selected.any():
        return None
    return float(entropies.detach().float()[selected].min())


def entropy_summary(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    rho: float,
    percentiles=DEFAULT_PERCENTILES,
    low: float = DEFAULT_LOW_ENTROPY,
) -> dict:
    """Returns a JSON-ready dict of the entropy distribution of the valid tokens.

    Keys: ``num_tokens`` N; ``num_selected`` k = ceil(rho * N) as ``selection.num_selected`` rounds it (the number
    of tokens ``forking_mask`` selects); ``rho``; ``mean``; ``percentiles`` {"p10": ..., ...}, the nearest-rank p-th
    percentile being the ceil(p/100 * N)-th smallest; ``share_below`` {"0.01": share of tokens with H < low};
    ``threshold`` (``top_rho_threshold``). With N == 0 every value is None.

    Args:
        entropies: (B, T) entropies.
        mask: (B, T) 1 for valid tokens.
        rho: share of tokens kept, in (0, 1].
        percentiles: numbers in [0, 100].
        low: the "near-deterministic" cut-off for ``share_below``.
    """
    rho = check_quantile(rho, "rho")
    values = _valid(entropies, mask)
    n = values.numel()
    quantiles = entropy_quantiles(entropies, mask, [p / 100 for p in percentiles])
    return {
        "num_tokens": n,
        "num_selected": num_selected(n, rho),
        "rho": rho,
        "mean": float(values.mean()) if n else None,
        "percentiles": {
            f"p{p:g}": (float(quantiles[i]) if quantiles is not None else None) for i, p in enumerate(percentiles)
        },
        "share_below": {f"{low:g}": float((values < low).float().mean()) if n else None},
        "threshold": top_rho_threshold(entropies, mask, rho),
    }


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


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Returns (N,) float64 1-based ranks of ``values`` (N,), ties sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(values.detach().double(), sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    # A run of c equal values ending at rank e occupies ranks e - c + 1 .. e, whose mean is e - (c - 1) / 2.
    return (counts.cumsum(0) - (counts - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Returns Spearman's rank correlation of two (N,) tensors: Pearson's r of their average ranks.

    None when N < 2 or either side is constant (the correlation is undefined).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.numel() < 2:
        return None
    ra, rb = average_ranks(a.reshape(-1)), average_ranks(b.reshape(-1))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(torch.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return None
    return float((ra * rb).sum()) / denominator


def top_rho_overlap(selected_a: torch.Tensor, selected_b: torch.Tensor) -> float | None:
    """Returns |A ∩ B| / |A| for two masks of top-rho positions (None when A is empty).

    Both masks select ceil(rho * N) of the same N tokens, so |A| == |B| and the value is symmetric: the share of
    forking positions the two models have in common (the paper's "over 86%").
    """
    a, b = selected_a.bool(), selected_b.bool()
    size = int(a.sum())
    if size == 0:
        return None
    return int((a & b).sum()) / size
