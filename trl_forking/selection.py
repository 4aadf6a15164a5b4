"""Exact, distributed selection of forking tokens: which completion tokens enter the policy gradient.

"Beyond the 80/20 Rule" (Wang et al., 2025, arXiv 2506.01939) trains only on the top-rho highest-entropy tokens.
This module picks exactly ``k = ceil(rho * N)`` of the ``N`` valid tokens, where ``N`` may be spread over the ranks
of a process group, without gathering the entropies anywhere:

1. each entropy becomes a 32-bit integer key whose order is the float order (``float_to_ordered_key``);
2. a radix select finds the key of the k-th largest token with three ``all_reduce`` calls of fixed-size
   histograms (2,049 + 2,048 + 1,024 counters per target, whatever N is);
3. tokens strictly above that key are selected, and ties at the key are taken in global order (rank by rank,
   row-major within a rank) after one ``all_gather`` of one counter per rank.

The result equals a single-process stable top-k over the rank-ordered concatenation of the valid tokens, with no
2**24 limit (``torch.quantile``'s) and no N-sized communication.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["SELECTIONS", "entropy_quantiles", "forking_mask", "num_selected"]

SELECTIONS = ("top", "bottom", "random", "all")
Selection = Literal["top", "bottom", "random", "all"]

# Radix digits of the 32-bit key, most significant first: (shift, bits). Three rounds keep each histogram small
# (at most 2,048 counters, 16 KiB) while the candidate set shrinks after the first round.
RADIX_DIGITS = ((21, 11), (10, 11), (0, 10))
# rho * N is shrunk by this factor before the ceiling, to absorb the float error of the product.
_CEIL_SHRINK = 1.0 - 1e-12


def check_quantile(quantile: float, name: str = "quantile") -> float:
    """Returns ``quantile`` as a float after checking that it lies in (0, 1]."""
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {quantile!r}.")
    return float(quantile)


def check_selection(selection: str, name: str = "selection") -> str:
    """Returns ``selection`` after checking that it is one of ``SELECTIONS``."""
    if selection not in SELECTIONS:
        raise ValueError(f"{name} must be one of {list(SELECTIONS)}, got {selection!r}.")
    return selection


def num_selected(num_valid: int | torch.Tensor, quantile: float, selection: str = "top") -> int | torch.Tensor:
    """Returns how many of ``num_valid`` tokens a selection keeps: ``k = ceil(rho * N)`` for "top" and "random",
    ``N - k`` for "bottom", ``N`` for "all".

    ``num_valid`` may be an int or an integer tensor (elementwise). ``rho * N`` is shrunk by a relative 1e-12 before
    the ceiling so that ``0.2 * 10`` (2.0000000000000004 in floating point) gives 2, not 3, while any rho > 0 still
    keeps at least one of N > 0 tokens.
    """
    check_selection(selection)
    if selection == "all":
        return num_valid
    if isinstance(num_valid, torch.Tensor):
        k = torch.ceil(num_valid.double() * (quantile * _CEIL_SHRINK)).long()
    else:
        k = math.ceil(num_valid * quantile * _CEIL_SHRINK)
    return num_valid - k if selection == "bottom" else k


def float_to_ordered_key(values: torch.Tensor) -> torch.Tensor:
    """Returns int32 keys whose signed integer order is the order of the float32 ``values``.

    IEEE-754 floats compare like sign-magnitude integers; flipping the 31 magnitude bits of negative numbers turns
    that into two's-complement order. ``-0.0`` sorts just below ``+0.0``.
    """
    bits = values.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def ordered_key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``float_to_ordered_key``: the float32 values of int32 keys."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _digit(keys: torch.Tensor, shift: int, bits: int, first: bool) -> torch.Tensor:
    """Returns the radix digit of each key as a non-negative int64 (the top digit is offset to unsigned)."""
    if first:
        return (keys >> shift).long() + (1 << bits) // 2
    return ((keys >> shift) & ((1 << bits) - 1)).long()


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def _radix_select(keys: torch.Tensor, ranks_fn, group=None, nonfinite: int = 0):
    """Returns ``(N, ks, threshold_keys, above, ties)`` for the k-th largest of ``keys`` over ``group``.

    Args:
        keys: (M,) int32 local keys of the valid tokens.
        ranks_fn: maps the global count N (int) to a LongTensor (Q,) of 1-based ranks ``k`` from the top, each in
            [1, N]; called only when N > 0.
        group: process group over which the keys are pooled, or None for this process only.
        nonfinite: number of local non-finite values, summed over the group in the first round so that every rank
            raises together instead of leaving the others waiting in a collective.

    Returns:
        N (int), ks (Q,), threshold keys (Q,) int64, ``above`` (Q,) the global count of keys strictly greater than the
        threshold, and ``ties`` (Q,) the global count of keys equal to it. For N == 0 every tensor is empty.

    Communication: one all_reduce of 2,049 int64 then, per target, 2,048 and 1,024 int64; independent of N.
    """
    device = keys.device
    shift, bits = RADIX_DIGITS[0]
    digits = _digit(keys, shift, bits, first=True)
    hist = torch.bincount(digits, minlength=1 << bits)
    hist = torch.cat([hist, torch.tensor([nonfinite], dtype=hist.dtype, device=device)])
    hist = _all_reduce(hist, group)
    bad, hist = int(hist[-1]), hist[:-1]
    if bad:
        raise ValueError(
            f"entropies contain {bad} NaN or infinite value(s) among the valid tokens (mask == 1); token entropies "
            "must be finite. Check the logits (e.g. an fp16 overflow) or mask those positions out."
        )
    total = int(hist.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return 0, empty, empty, empty, empty
    ks = ranks_fn(total).to(device)
    num_targets = ks.numel()

    remaining = ks.clone()
    prefix = torch.zeros(num_targets, dtype=torch.long, device=device)
    hists = hist.unsqueeze(0).expand(num_targets, -1)
    candidates = [keys] * num_targets
    above = torch.zeros(num_targets, dtype=torch.long, device=device)
    for round_index, (shift, bits) in enumerate(RADIX_DIGITS):
        if round_index > 0:
            local = torch.stack(
                [torch.bincount(_digit(c, shift, bits, first=False), minlength=1 << bits) for c in candidates]
            )
            hists = _all_reduce(local, group)
        # count_ge[q, b]: number of candidates whose digit is >= b
        count_ge = hists.flip(-1).cumsum(-1).flip(-1)
        chosen = (count_ge >= remaining.unsqueeze(-1)).sum(-1) - 1  # (Q,) highest bin holding the k-th largest
        in_bin = hists.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        strictly_above = count_ge.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - in_bin
        remaining = remaining - strictly_above
        above = above + strictly_above
        prefix = (prefix << bits) | chosen
        if round_index + 1 < len(RADIX_DIGITS):
            candidates = [
                c[_digit(c, shift, bits, first=round_index == 0) == chosen[q]] for q, c in enumerate(candidates)
            ]
    # Undo the unsigned offset of the top digit to get back signed int32 keys.
    threshold = prefix - (1 << 31)
    return total, ks, threshold, above, in_bin


def _prefix_over_ranks(count: torch.Tensor, group) -> torch.Tensor:
    """Returns the sum of ``count`` over the ranks of ``group`` that come before this one (0 without a group)."""
    if group is None:
        return torch.zeros_like(count)
    world = dist.get_world_size(group)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    rank = dist.get_rank(group)
    return torch.stack(counts[:rank]).sum(0) if rank > 0 else torch.zeros_like(count)


def _top_k_keys(keys: torch.Tensor, k_fn, group=None, nonfinite: int = 0) -> torch.Tensor:
    """Returns a (M,) bool mask of the global top-k of ``keys`` (k = ``k_fn(N)``), ties taken in global order."""
    selected = torch.zeros_like(keys, dtype=torch.bool)

    def ranks_fn(total):
        return torch.tensor([max(k_fn(total), 1)], dtype=torch.long)

    total, ks, threshold, above, ties = _radix_select(keys, ranks_fn, group, nonfinite)
    if total == 0:
        return selected
    k = k_fn(total)
    if k <= 0:
        return selected
    threshold = threshold[0].to(torch.int32)
    selected = keys > threshold
    take = k - int(above[0])  # ties at the threshold still to select, in 1..ties
    is_tie = keys == threshold
    if take >= int(ties[0]):
        return selected | is_tie
    # Decided from reduced counts only, so every rank enters this all_gather together.
    local_ties = is_tie.sum().reshape(1)
    before = _prefix_over_ranks(local_ties, group)
    order = torch.cumsum(is_tie.long(), 0)  # 1-based position of each tie on this rank
    return selected | (is_tie & (order + before <= take))


def _per_sequence_top(scores: torch.Tensor, valid: torch.Tensor, quantile: float, selection: str) -> torch.Tensor:
    """Returns a (B, T) bool mask with the top ceil(rho * n_i) scores of each row i (stable: earlier ties first)."""
    counts = valid.sum(-1)
    k = num_selected(counts, quantile, "top")  # (B,)
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank_of = torch.empty_like(order)
    rank_of.scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))
    top = (rank_of < k.unsqueeze(-1)) & valid
    return valid & ~top if selection == "bottom" else top


def forking_mask(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    quantile: float,
    selection: Selection = "top",
    per_sequence: bool = False,
    group=None,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """Returns the (B, T) bool mask of the forking tokens that enter the policy gradient.

    With ``N`` valid tokens (``mask == 1``, counted over every rank of ``group``) and ``k = ceil(rho * N)``:

    - ``"top"``: the ``k`` highest entropies (the paper's method);
    - ``"bottom"``: the other ``N - k`` valid tokens (the paper's bottom-80% ablation);
    - ``"random"``: ``k`` valid tokens drawn uniformly at random (the control);
    - ``"all"``: every valid token (plain GRPO).

    Ties at the threshold are taken in order (rank by rank, then row-major), so exactly ``k`` tokens are selected and
    the result equals a stable single-process top-k over the concatenation of all ranks' valid tokens. Padding is
    never selected.

    Args:
        entropies: (B, T) per-token entropies (any float dtype; compared in float32).
        mask: (B, T) 1 for valid completion tokens, 0 for padding.
        quantile: rho in (0, 1].
        selection: one of ``SELECTIONS``.
        per_sequence: select top-rho within each row (``k_i = ceil(rho * n_i)``) instead of over all rows; rows are
            independent, so ``group`` is not used.
        group: a ``torch.distributed`` process group to pool the tokens of, or None for this process only. Every rank
            of the group must call this function; a rank with no valid tokens passes an empty or all-zero mask.
        generator: random source for ``"random"`` (on CPU); the default generator when None.

    Raises:
        ValueError: on a bad ``quantile`` or ``selection``, mismatched shapes, or a NaN/inf entropy at a valid
            position (raised on every rank of the group, so no rank is left waiting).

    Communication with a group: three all_reduce calls of at most 2,049 int64 and, only when ties straddle the
    threshold, one all_gather of one int64 per rank; nothing grows with N.
    """
    quantile = check_quantile(quantile)
    check_selection(selection)
    if entropies.shape != mask.shape:
        raise ValueError(
            f"entropies and mask must have the same shape, got {tuple(entropies.shape)} and {tuple(mask.shape)}."
        )
    valid = mask.bool()
    if selection == "all":
        return valid.clone()
    values = entropies.detach()[valid].float()
    nonfinite = int((~torch.isfinite(values)).sum())
    if per_sequence:
        if nonfinite:
            raise ValueError(f"entropies contain {nonfinite} NaN or infinite value(s) among the valid tokens.")
        scores = entropies.detach().float()
        if selection == "random":
            scores = torch.rand(scores.shape, generator=generator).to(scores.device)
        return _per_sequence_top(scores, valid, quantile, selection)
    if selection == "random":
        values = torch.rand(values.shape, generator=generator).to(values.device)
    keys = float_to_ordered_key(values)
    top = _top_k_keys(keys, lambda n: num_selected(n, quantile, "top"), group, nonfinite)
    chosen = ~top if selection == "bottom" else top
    out = torch.zeros_like(valid)
    out[valid] = chosen
    return out


def entropy_quantiles(entropies: torch.Tensor, mask: torch.Tensor, quantiles, group=None) -> torch.Tensor | None:
    """Returns the exact nearest-rank quantiles of the valid entropies, pooled over ``group``, as a float32 (Q,).

    The q-quantile is the ``max(1, ceil(q * N))``-th smallest of the N valid values (``torch.quantile`` with
    ``interpolation="higher"`` differs only by its index convention). Returns None when N == 0 on every rank.

    Args:
        entropies: (B, T) or (M,) entropies.
        mask: same shape as ``entropies``; 1 for valid tokens.
        quantiles: sequence of Q floats in [0, 1].
        group: process group to pool over, or None.

    Communication: three all_reduce calls, of at most 2,049 * Q int64; independent of N.
    """
    qs = torch.as_tensor(list(quantiles), dtype=torch.float64)
    if ((qs < 0) | (qs > 1)).any():
        raise ValueError(f"quantiles must lie in [0, 1], got {qs.tolist()}.")
    values = entropies.detach()[mask.bool()].float()
    nonfinite = int((~torch.isfinite(values)).sum())
    keys = float_to_ordered_key(values)

    def ranks_fn(total):
        from_bottom = torch.ceil(torch.round(qs * total, decimals=6)).long().clamp(min=1, max=total)
        return total - from_bottom + 1  # rank from the top

    total, _, threshold, _, _ = _radix_select(keys, ranks_fn, group, nonfinite)
    if total == 0:
        return None
    return ordered_key_to_float(threshold).to(entropies.device)
