"""Exact, distributed selection of forking tokens: which completion tokens enter the policy gradient.

"Beyond the 80/20 Rule" (Wang et al., 2025, arXiv 2506.01939) trains only on the top-rho highest-entropy tokens.
This module picks exactly ``k = ceil(rho * N)`` of the ``N`` valid tokens, where ``N`` may be spread over the ranks
of a process group, without gathering the entropies anywhere:

1. each entropy becomes a 32-bit integer key whose order is the float order (``float_to_ordered_key``);
2. a radix select finds the key of the k-th largest token with three ``all_reduce`` calls of fixed-size
   histograms (2,048 + 2,048 + 1,024 counters per target, whatever N is); the data is streamed in chunks, read
   once for the first histogram and once to keep the few keys that share the threshold's first digit (or, when
   that digit holds most tokens, once per later digit, without copying them);
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
# Tokens per chunk of the first-digit histogram, the only pass that computes a key per token. On CPU, 2**15 keeps
# each int32 temporary (128 KiB) in L2 cache and at PyTorch's intra-op grain size, so a chunk runs on one thread:
# the pass is memory-bound, and OpenMP hand-offs per chunk cost more than a second core saves.
CPU_HISTOGRAM_CHUNK_SIZE = 2**15
# Tokens per chunk of the comparison passes (and of the histogram on accelerators): caps their bool and int32
# temporaries at 4 and 16 MiB whatever N is, while keeping the number of kernel launches small.
SCAN_CHUNK_SIZE = 2**22
# A first-digit bin holding more than this share of a rank's tokens is not copied out as candidates: rounds 2 and 3
# then read every token in a histogram pass each, which costs less than copying and filtering most of them (e.g.
# when most entropies are equal).
DENSE_CANDIDATE_SHARE = 1 / 4
# Key given to padding: the smallest int32. It lands in first-digit bin 0, which otherwise holds only -inf and
# negative NaNs, so padding is subtracted from that bin before it could count as a selected or non-finite token.
_PAD_KEY = -(2**31)
# First-digit bins holding only non-finite floats: exponent all ones is the top 8 bits after the sign, so with the
# first digit at shift 21 the 2**(23 - 21) lowest bins are -inf and negative NaNs and as many highest +inf and NaNs.
_NONFINITE_BINS = 1 << (23 - RADIX_DIGITS[0][0])
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
    the ceiling so that ``0.28 * 25`` (7.000000000000001 in floating point) gives 7, not 8, while any rho > 0 still
    keeps at least one of N > 0 tokens. This is the one rounding rule: the selection, the metrics and the analysis
    all count through this function.
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
    keys = bits >> 31  # in place from here: one temporary instead of three
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


def ordered_key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of ``float_to_ordered_key``: the float32 values of int32 keys."""
    keys = keys.to(torch.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _key_float(key: int) -> float:
    """Returns the float32 value (as a Python float) whose ordered key is ``key``."""
    return float(ordered_key_to_float(torch.tensor([key], dtype=torch.int32))[0])


def _in_key_range(values: torch.Tensor, low: int, high: int | None) -> torch.Tensor:
    """Returns a bool mask of the ``values`` whose ordered key lies in [low, high) (no upper bound when None).

    Floats compare in key order except that ``-0.0 == +0.0``, so when neither bound is a zero the comparison runs
    on the floats directly (one op per bound, no key computation); otherwise on the keys. NaN is never in range.

    Args:
        values: (C,) float32 values.
        low: smallest key in range, the key of a finite float.
        high: first key out of range, or None.
    """
    bounds = [_key_float(low)] + ([] if high is None else [_key_float(high)])
    if all(bound != 0.0 for bound in bounds):
        inside = values >= bounds[0]
        return inside if high is None else inside & (values < bounds[1])
    keys = float_to_ordered_key(values)
    inside = keys >= low
    return inside if high is None else inside & (keys < high)


def _scan(values: torch.Tensor, valid: torch.Tensor | None, chunk: int):
    """Yields ``(start, piece, piece_valid)``: float32 slices of the (M,) ``values`` and of the (M,) bool ``valid``
    (None when every position is valid), ``chunk`` tokens at a time."""
    for start in range(0, values.numel(), chunk):
        piece = values[start : start + chunk].float()
        yield start, piece, None if valid is None else valid[start : start + chunk]


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def _pick_bin(hists: torch.Tensor, remaining: torch.Tensor):
    """Returns ``(chosen, strictly_above, in_bin)``, each (Q,): the bin of each histogram row that holds the
    ``remaining[q]``-th largest element, the count in higher bins and the count in that bin.

    Args:
        hists: (Q, 2**bits) counts per digit, lowest digit first.
        remaining: (Q,) 1-based ranks from the top, each at most the row's total.
    """
    count_ge = hists.flip(-1).cumsum(-1).flip(-1)  # count_ge[q, b]: elements whose digit is >= b
    chosen = (count_ge >= remaining.unsqueeze(-1)).sum(-1) - 1
    in_bin = hists.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    strictly_above = count_ge.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - in_bin
    return chosen, strictly_above, in_bin


def _prefix_histogram(values: torch.Tensor, valid: torch.Tensor | None, prefix: int, shift: int, bits: int):
    """Returns the (2**bits,) local histogram of the digit ``(key >> shift) & (2**bits - 1)`` of the valid keys whose
    higher bits ``key >> (shift + bits)`` equal the signed ``prefix``, from one pass over all (M,) ``values``."""
    size = 1 << bits
    hist = torch.zeros(2 * size, dtype=torch.long, device=values.device)
    chunk = CPU_HISTOGRAM_CHUNK_SIZE if values.device.type == "cpu" else SCAN_CHUNK_SIZE
    for _, piece, piece_valid in _scan(values, valid, chunk):
        keys = float_to_ordered_key(piece)
        if piece_valid is not None:
            keys.masked_fill_(~piece_valid, _PAD_KEY)
        digits = (keys >> shift) & (size - 1)
        # Keys outside the prefix count in the upper half, which is dropped (cheaper than a masked fill).
        digits |= ((keys >> (shift + bits)) != prefix).to(torch.int32) << bits
        hist += torch.bincount(digits, minlength=2 * size)
    return hist[:size]


def _radix_select(values: torch.Tensor, valid: torch.Tensor | None, ranks_fn, group=None):
    """Returns ``(N, ks, threshold_keys, above, ties, local_ties)`` for the k-th largest valid value over ``group``.

    Two streaming passes over the local data: (1) the first-digit histogram of the keys, in chunks of
    ``CPU_HISTOGRAM_CHUNK_SIZE`` tokens on CPU (``SCAN_CHUNK_SIZE`` elsewhere), which also counts the non-finite
    values (they have bins of their own); (2) the keys in the chosen first-digit bin are kept as candidates, usually
    a few percent of the tokens. Rounds 2 and 3 read only the candidates, unless the bin holds more than
    ``DENSE_CANDIDATE_SHARE`` of this rank's tokens: then each round is a histogram pass over all of them instead.

    Args:
        values: (M,) float local values, flattened.
        valid: (M,) bool, False at padding (ignored); None when all M are valid.
        ranks_fn: maps the global count N (int) to a LongTensor (Q,) of 1-based ranks ``k`` from the top, each in
            [1, N]; called only when N > 0.
        group: process group over which the values are pooled, or None for this process only.

    Returns:
        N (int), ks (Q,), threshold keys (Q,) int64, ``above`` (Q,) the global count of keys strictly greater than the
        threshold, ``ties`` (Q,) the global count of keys equal to it and ``local_ties`` (Q,) this rank's count. For
        N == 0 every tensor is empty.

    Raises:
        ValueError: on every rank of the group together if any rank holds a valid NaN or infinite value.

    Communication: one all_reduce of 2,048 int64 then, per target, 2,048 and 1,024 int64; independent of N.
    """
    device = values.device
    shift, bits = RADIX_DIGITS[0]
    offset = 1 << (bits - 1)  # makes the signed top digit a non-negative bin index
    hist = torch.zeros(1 << bits, dtype=torch.long, device=device)
    chunk = CPU_HISTOGRAM_CHUNK_SIZE if device.type == "cpu" else SCAN_CHUNK_SIZE
    for _, piece, piece_valid in _scan(values, valid, chunk):
        digits = float_to_ordered_key(piece)
        if piece_valid is not None:
            digits.masked_fill_(~piece_valid, _PAD_KEY)
        digits >>= shift
        digits += offset
        hist += torch.bincount(digits, minlength=1 << bits)
    if valid is not None:
        hist[0] -= valid.numel() - valid.count_nonzero()
    local_first = hist.clone()
    hist = _all_reduce(hist, group)
    bad = int(hist[:_NONFINITE_BINS].sum() + hist[-_NONFINITE_BINS:].sum())
    if bad:
        raise ValueError(_nonfinite_message(bad))
    total = int(hist.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return 0, empty, empty, empty, empty, empty
    ks = ranks_fn(total).to(device)
    chosen, above, in_bin = _pick_bin(hist.unsqueeze(0).expand(ks.numel(), -1), ks)
    remaining = ks - above
    prefix = chosen
    # A local decision: every rank still sends the same histograms, whichever way it computes its own.
    dense = (local_first[chosen] > DENSE_CANDIDATE_SHARE * values.numel()).tolist()

    # Pass 2: the candidates of each target are the local keys in its chosen first-digit bin (never padding: its
    # bin holds only non-finite values, rejected above). Targets sharing a bin share one comparison.
    first_digits = (chosen - offset).tolist()
    parts = {
        digit: [torch.zeros(0, dtype=torch.int32, device=device)]
        for digit, is_dense in zip(first_digits, dense, strict=True)
        if not is_dense
    }
    for _, piece, piece_valid in _scan(values, valid, SCAN_CHUNK_SIZE):
        for digit, found in parts.items():
            inside = _in_key_range(piece, digit << shift, (digit + 1) << shift)
            if piece_valid is not None:
                inside &= piece_valid
            found.append(float_to_ordered_key(piece[inside]))
    pooled = {digit: torch.cat(found) for digit, found in parts.items()}
    candidates = [None if is_dense else pooled[d] for d, is_dense in zip(first_digits, dense, strict=True)]

    for round_index, (shift, bits) in enumerate(RADIX_DIGITS[1:], start=1):
        digits = [None if c is None else (c >> shift) & ((1 << bits) - 1) for c in candidates]
        signed_prefix = (prefix - (1 << (31 - shift - bits))).tolist()  # the chosen higher bits of the keys
        local = torch.stack(
            [
                _prefix_histogram(values, valid, signed_prefix[q], shift, bits)
                if d is None
                else torch.bincount(d, minlength=1 << bits)
                for q, d in enumerate(digits)
            ]
        )
        hists = _all_reduce(local.clone(), group)
        chosen, strictly_above, in_bin = _pick_bin(hists, remaining)
        remaining = remaining - strictly_above
        above = above + strictly_above
        prefix = (prefix << bits) | chosen
        if round_index + 1 < len(RADIX_DIGITS):
            candidates = [
                None if c is None else c[d == chosen[q]]
                for q, (c, d) in enumerate(zip(candidates, digits, strict=True))
            ]
    local_ties = local.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    # Undo the unsigned offset of the top digit to get back signed int32 keys.
    threshold = prefix - (1 << 31)
    return total, ks, threshold, above, in_bin, local_ties


def _nonfinite_message(count: int) -> str:
    """Returns the error for ``count`` valid tokens (over all ranks) whose entropy is NaN or infinite."""
    return (
        f"entropies contain {count} NaN or infinite value(s) among the valid tokens (mask == 1), over all ranks; a "
        "top or bottom selection needs finite entropies. Usual causes: logits of -inf (a masked vocabulary: TRL's "
        "fused LM head computes 0 * log 0 as NaN there, huggingface/trl#7221; trl_forking.entropy recomputes those "
        "positions), NaN or inf logits (an fp16 overflow, a diverged model), or padding not masked out."
    )


def _prefix_over_ranks(count: torch.Tensor, group) -> torch.Tensor:
    """Returns the sum of ``count`` over the ranks of ``group`` that come before this one (0 without a group)."""
    if group is None:
        return torch.zeros_like(count)
    world = dist.get_world_size(group)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    rank = dist.get_rank(group)
    return torch.stack(counts[:rank]).sum(0) if rank > 0 else torch.zeros_like(count)


def _top_k_mask(values: torch.Tensor, valid: torch.Tensor | None, k_fn, group=None) -> torch.Tensor:
    """Returns a (M,) bool mask of the global top-k valid ``values`` (k = ``k_fn(N)``), ties taken in global order.

    Memory: the M-byte result, temporaries of at most ``SCAN_CHUNK_SIZE`` tokens and the radix-select candidates.
    """
    selected = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)

    def ranks_fn(total):
        return torch.tensor([max(k_fn(total), 1)], dtype=torch.long)

    total, _, threshold, above, ties, local_ties = _radix_select(values, valid, ranks_fn, group)
    if total == 0:
        return selected
    k = k_fn(total)
    if k <= 0:
        return selected
    threshold = int(threshold[0])
    take = k - int(above[0])  # ties at the threshold still to select, in 1..ties
    # All ties are taken unless they straddle k; decided from reduced counts, so every rank enters the all_gather.
    quota = None
    if take < int(ties[0]):
        quota = take - int(_prefix_over_ranks(local_ties, group)[0])  # ties this rank takes, in row-major order
    for start, piece, piece_valid in _scan(values, valid, SCAN_CHUNK_SIZE):
        out = _in_key_range(piece, threshold if quota is None else threshold + 1, None)
        if quota is not None and quota > 0:
            is_tie = _in_key_range(piece, threshold, threshold + 1)
            if piece_valid is not None:
                is_tie &= piece_valid
            positions = is_tie.nonzero().squeeze(1)  # ties are few unless many tokens share the threshold
            out[positions[:quota]] = True
            quota -= positions.numel()
        if piece_valid is not None:
            out &= piece_valid
        selected[start : start + piece.numel()] = out
    return selected


def _flatten(entropies: torch.Tensor, valid: torch.Tensor):
    """Returns ``(values, valid)`` flattened to (M,), ``valid`` None when nothing is padded (passes skip the mask)."""
    valid = valid.reshape(-1)
    return entropies.detach().reshape(-1), (None if int(valid.count_nonzero()) == valid.numel() else valid)


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
            independent, so ``group`` serves only to raise on every rank together on a non-finite entropy.
        group: a ``torch.distributed`` process group to pool the tokens of, or None for this process only. Every rank
            of the group must call this function; a rank with no valid tokens passes an empty or all-zero mask.
        generator: random source for ``"random"`` (on CPU); the default generator when None.

    Raises:
        ValueError: on a bad ``quantile`` or ``selection``, mismatched shapes, or a NaN/inf entropy at a valid
            position (raised on every rank of the group, so no rank is left waiting).

    Communication with a group: three all_reduce calls of at most 2,048 int64 and, only when ties straddle the
    threshold, one all_gather of one int64 per rank; nothing grows with N.

    Cost (not for ``per_sequence``, which sorts each row): three streaming passes over the entropies, in chunks of
    at most ``SCAN_CHUNK_SIZE`` tokens (four when over ``DENSE_CANDIDATE_SHARE`` of them share the threshold's top
    11 bits); extra memory is the (B, T) result, chunk-sized temporaries and the keys that share those bits when
    they are fewer (usually a few percent of the tokens).
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
    if per_sequence:
        if selection == "random":
            scores = torch.rand(entropies.shape, generator=generator).to(entropies.device)
        else:
            scores = entropies.detach().float()
            # Counted over the group so that every rank raises together (rows are independent otherwise).
            nonfinite = _all_reduce((~torch.isfinite(scores) & valid).sum().reshape(1), group)
            if int(nonfinite):
                raise ValueError(_nonfinite_message(int(nonfinite)))
        return _per_sequence_top(scores, valid, quantile, selection)
    values, flat_valid = _flatten(entropies, valid)
    if selection == "random":
        # One draw per valid token, in row-major order: the same scores whatever the padding layout.
        scores = torch.rand(int(valid.count_nonzero()), generator=generator).to(values.device)
        values = torch.zeros(values.shape, device=values.device)
        values[valid.reshape(-1)] = scores
    top = _top_k_mask(values, flat_valid, lambda n: num_selected(n, quantile, "top"), group)
    if selection == "bottom":
        top = ~top if flat_valid is None else flat_valid & ~top
    return top.view(valid.shape)


def entropy_quantiles(entropies: torch.Tensor, mask: torch.Tensor, quantiles, group=None) -> torch.Tensor | None:
    """Returns the exact nearest-rank quantiles of the valid entropies, pooled over ``group``, as a float32 (Q,).

    The q-quantile is the ``max(1, ceil(q * N))``-th smallest of the N valid values (``torch.quantile`` with
    ``interpolation="higher"`` differs only by its index convention). Returns None when N == 0 on every rank.

    Args:
        entropies: (B, T) or (M,) entropies.
        mask: same shape as ``entropies``; 1 for valid tokens.
        quantiles: sequence of Q floats in [0, 1].
        group: process group to pool over, or None.

    Communication: three all_reduce calls, of at most 2,048 * Q int64; independent of N.
    """
    qs = torch.as_tensor(list(quantiles), dtype=torch.float64)
    if ((qs < 0) | (qs > 1)).any():
        raise ValueError(f"quantiles must lie in [0, 1], got {qs.tolist()}.")
    values, valid = _flatten(entropies, mask.bool())

    def ranks_fn(total):
        from_bottom = torch.ceil(torch.round(qs * total, decimals=6)).long().clamp(min=1, max=total)
        return total - from_bottom + 1  # rank from the top

    total, _, threshold, _, _, _ = _radix_select(values, valid, ranks_fn, group)
    if total == 0:
        return None
    return ordered_key_to_float(threshold).to(entropies.device)
