"""Forking-token metrics logged every logging step: exact, pooled over the ranks without gathering entropies."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .selection import entropy_quantiles, num_selected

__all__ = ["EXCLUDED_FRACTION", "LOW_ENTROPY", "METRIC_NAMES", "PERCENTILES", "forking_metrics"]

PERCENTILES = (50, 80, 95)
# The paper's statistic: over half of Qwen3-8B's chain-of-thought tokens have entropy below 0.01.
LOW_ENTROPY = 0.01
METRIC_NAMES = (
    "forking/threshold",
    "forking/selected_fraction",
    "forking/entropy_selected_mean",
    "forking/entropy_unselected_mean",
    *(f"forking/entropy_p{p}" for p in PERCENTILES),
    f"forking/frac_entropy_below_{LOW_ENTROPY}",
    "forking/entropy_nonfinite",
)
# With ``completion_mask``: the share of completion tokens outside the selection population.
EXCLUDED_FRACTION = "forking/excluded_fraction"


def forking_metrics(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    selected: torch.Tensor,
    quantile: float,
    group=None,
    completion_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Returns the forking metrics of the valid tokens of ``entropies``, pooled over ``group``.

    With ``N`` the valid tokens whose entropy is finite:

    - ``forking/threshold``: entropy of the ``ceil(rho * N)``-th highest token, the cut-off of a top-rho selection;
    - ``forking/selected_fraction``: ``|selected| / N``;
    - ``forking/entropy_selected_mean`` / ``_unselected_mean``: mean entropy of the selected / other valid tokens;
    - ``forking/entropy_p{50,80,95}``: nearest-rank percentiles (the ``ceil(q * N)``-th smallest);
    - ``forking/frac_entropy_below_0.01``: share of tokens with ``H < 0.01``;
    - ``forking/entropy_nonfinite``: how many valid tokens have a NaN or infinite entropy (left out of the figures
      above; a top / bottom selection refuses them, see ``forking_mask``);
    - with ``completion_mask``, ``forking/excluded_fraction``: ``1 - |mask| / |completion_mask|``, the share of
      completion tokens left out of the selection population (the trainer leaves out completions whose advantage
      is 0).

    A value with nothing to average (e.g. N == 0) is NaN, which TRL's logger skips.

    Args:
        entropies: (B, T) per-token entropies.
        mask: (B, T) 1 for the valid tokens (the selection population).
        selected: (B, T) bool, the tokens that enter the policy gradient (a subset of ``mask``).
        quantile: rho.
        group: process group to pool over (every rank must call), or None.
        completion_mask: (B, T) 1 for every completion token, a superset of ``mask``; None: no excluded fraction.

    Communication: one all_reduce of 7 float64, then (N > 0) those of ``entropy_quantiles`` for 4 quantiles.
    """
    values = entropies.detach().float()
    finite = torch.isfinite(values)
    valid = mask.bool() & finite
    chosen = selected.bool() & valid
    sums = torch.stack(
        [
            valid.sum().double(),
            chosen.sum().double(),
            values[chosen].double().sum(),
            values[valid & ~chosen].double().sum(),
            (values[valid] < LOW_ENTROPY).sum().double(),
            (mask.bool() & ~finite).sum().double(),
            (mask.bool().sum() if completion_mask is None else completion_mask.bool().sum()).double(),
        ]
    )
    if group is not None:
        dist.all_reduce(sums, group=group)
    total, num_chosen, sum_chosen, sum_other, num_low, num_nonfinite, num_completion = sums.tolist()

    cut = [math.nan] * (1 + len(PERCENTILES))
    if total:
        # The k-th highest of N is the (N - k + 1)-th smallest: a nearest-rank quantile of (N - k + 1) / N.
        top_rank = total - num_selected(int(total), quantile, "top") + 1
        qs = [top_rank / total, *(p / 100 for p in PERCENTILES)]
        cut = entropy_quantiles(values, valid, qs, group).tolist()

    def ratio(a, b):
        return a / b if b else math.nan

    metrics = dict(
        zip(
            METRIC_NAMES,
            [
                cut[0],
                ratio(num_chosen, total),
                ratio(sum_chosen, num_chosen),
                ratio(sum_other, total - num_chosen),
                *cut[1:],
                ratio(num_low, total),
                num_nonfinite,
            ],
            strict=True,
        )
    )
    if completion_mask is not None:
        metrics[EXCLUDED_FRACTION] = ratio(num_completion - (total + num_nonfinite), num_completion)
    return metrics
