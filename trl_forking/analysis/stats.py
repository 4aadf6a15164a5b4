"""Entropy statistics of forking tokens: pure functions on tensors, no model.

The statistics the training callback also logs (``forking_token_table``, ``log_histogram``, the default percentiles)
live in the library, ``trl_forking.entropy_stats``, and are re-exported here.

Every statistic is over the *valid* tokens of a (B, T) entropy matrix (``mask == 1``). Percentiles and the top-rho
selection come from ``trl_forking.selection`` (exact nearest-rank, exactly ``ceil(rho * N)`` tokens), so what the
analysis reports is what training selects.
"""

from __future__ import annotations

import math

import torch

from ..defaults import DEFAULT_ENTROPY_BUCKETS
from ..entropy_stats import (
    DEFAULT_HISTOGRAM_FLOOR,
    DEFAULT_LOW_ENTROPY,
    DEFAULT_PERCENTILES,
    forking_token_table,
    log_histogram,
)
from ..selection import check_quantile, entropy_quantiles, forking_mask, num_selected

__all__ = [
    "DEFAULT_HISTOGRAM_FLOOR",
    "DEFAULT_LOW_ENTROPY",
    "DEFAULT_PERCENTILES",
    "average_ranks",
    "bucket_labels",
    "check_buckets",
    "entropy_change_by_bucket",
    "entropy_summary",
    "forking_token_table",
    "log_histogram",
    "spearman",
    "top_rho_overlap",
    "top_rho_threshold",
]


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


def check_buckets(buckets: int) -> int:
    """Returns ``buckets`` after checking that it is an integer >= 1."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an integer >= 1, got {buckets!r}.")
    return buckets


def bucket_labels(buckets: int) -> list[str]:
    """Returns the percentile range of each of ``buckets`` equal buckets: "0-10%", ..., "90-100%" for 10."""
    return [f"{100 * j / buckets:g}-{100 * (j + 1) / buckets:g}%" for j in range(buckets)]


def entropy_change_by_bucket(
    entropies_a: torch.Tensor, entropies_b: torch.Tensor, buckets: int = DEFAULT_ENTROPY_BUCKETS
) -> list[dict]:
    """Returns one dict per percentile bucket of model A's entropy: how model B's entropy differs from A's on the
    tokens of that bucket (the paper: RLVR mostly changes the entropy of high-entropy tokens, low ones barely move).

    With N tokens, the boundaries are the exact nearest-rank percentiles of A pooled over all tokens,
    ``v_j = the ceil(j * N / buckets)-th smallest`` for j = 1 .. buckets - 1 (``selection.entropy_quantiles``, so
    for deciles they are ``entropy_summary``'s p10 ... p90). A token whose A entropy is h falls in bucket
    ``#{j : v_j < h}``: bucket 0 is ``h <= v_1``, bucket j is ``v_j < h <= v_{j+1}``, the last is ``h > v_{buckets-1}``.

    Ties: the bucket depends on the value only, so equal entropies always share one: the bucket of the lowest rank
    the value occupies. Without ties bucket j holds exactly the tokens of ranks ``ceil(j * N / buckets) + 1`` to
    ``ceil((j + 1) * N / buckets)``; with ties a bucket can hold more, and the buckets a run of equal values spans
    beyond its first are empty (when 60% of the tokens have H = 0, "0-10%" holds all of them and "10-20%" to
    "50-60%" none).

    Keys of each dict: ``bucket`` (``bucket_labels``), ``num_tokens``; then, None for an empty bucket,
    ``entropy_a_min`` and ``entropy_a_max`` (the range of A's entropy in the bucket), ``mean_entropy_a``,
    ``mean_entropy_b``, ``mean_change`` (mean of B - A) and ``mean_abs_change`` (mean of |B - A|), in float64.

    Args:
        entropies_a: (N,) entropies of the tokens under model A (any shape; flattened).
        entropies_b: entropies of the same tokens under model B, same shape.
        buckets: number of buckets (10: deciles).
    """
    if entropies_a.shape != entropies_b.shape:
        raise ValueError(
            f"entropies_a and entropies_b must have the same shape, got {tuple(entropies_a.shape)} and "
            f"{tuple(entropies_b.shape)}."
        )
    buckets = check_buckets(buckets)
    a = entropies_a.detach().float().reshape(-1).cpu()  # (N,) float32, as the selection compares
    b = entropies_b.detach().float().reshape(-1).cpu()  # (N,)
    index = torch.zeros(a.numel(), dtype=torch.long)  # (N,) bucket of each token; all in bucket 0 when buckets == 1
    if a.numel() and buckets > 1:
        everything = torch.ones_like(a, dtype=torch.bool)
        boundaries = entropy_quantiles(a, everything, [j / buckets for j in range(1, buckets)])  # (buckets - 1,)
        # searchsorted's left insertion point is the number of boundaries strictly below each value.
        index = torch.searchsorted(boundaries.cpu(), a, right=False)
    a64, change = a.double(), b.double() - a.double()  # (N,)

    def per_bucket(values: torch.Tensor, reduce: str) -> list[float]:
        initial = {"sum": 0.0, "amin": math.inf, "amax": -math.inf}[reduce]
        out = torch.full((buckets,), initial, dtype=torch.float64)
        return out.scatter_reduce_(0, index, values, reduce).tolist()

    counts = torch.bincount(index, minlength=buckets).tolist()
    sum_a, sum_b = per_bucket(a64, "sum"), per_bucket(b.double(), "sum")
    sum_change, sum_abs = per_bucket(change, "sum"), per_bucket(change.abs(), "sum")
    low, high = per_bucket(a64, "amin"), per_bucket(a64, "amax")
    rows = []
    for j, label in enumerate(bucket_labels(buckets)):
        n = counts[j]
        rows.append(
            {
                "bucket": label,
                "num_tokens": n,
                "entropy_a_min": low[j] if n else None,
                "entropy_a_max": high[j] if n else None,
                "mean_entropy_a": sum_a[j] / n if n else None,
                "mean_entropy_b": sum_b[j] / n if n else None,
                "mean_change": sum_change[j] / n if n else None,
                "mean_abs_change": sum_abs[j] / n if n else None,
            }
        )
    return rows


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
