"""Shared helpers of the benchmarks: timing, peak-memory probes, entropy-like data, exactness checks, free ports."""

from __future__ import annotations

import importlib.util
import math
import re
import socket
import time

import torch

__all__ = [
    "PAPER_P80",
    "load_selection",
    "best_time",
    "entropy_like",
    "free_port",
    "is_exact_top_k",
    "peak_rss_delta",
    "reset_peak_rss",
]

# The paper's Qwen3-8B statistic: the 80th percentile of token entropies is 0.672, and over half are below 0.01.
PAPER_P80 = 0.672
# Share of near-deterministic tokens in ``entropy_like`` and their mean entropy.
NEAR_ZERO_SHARE = 0.5
NEAR_ZERO_MEAN = 0.003


def load_selection():
    """Returns the ``trl_forking.selection`` module loaded from its file, without running the package ``__init__``.

    The package imports TRL (about 5-10 s here); the selection benchmarks and their child processes only need this
    pure-torch module, so loading it alone keeps ``--quick`` and every spawned worker fast.
    """
    package = importlib.util.find_spec("trl_forking")
    path = f"{package.submodule_search_locations[0]}/selection.py"
    spec = importlib.util.spec_from_file_location("trl_forking_selection", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entropy_like(n: int, seed: int = 0) -> torch.Tensor:
    """Returns (n,) float32 entropies shaped like the paper's: half near zero, the rest exponential, p80 = 0.672.

    H = Exp(mean 0.003) with probability 1/2, else Exp(mean mu) with ``0.5 * exp(-0.672 / mu) = 0.2``
    (so P(H > 0.672) = 0.2, the top-20% threshold the paper reports for Qwen3-8B).
    """
    generator = torch.Generator().manual_seed(seed)
    mu = PAPER_P80 / math.log((1 - NEAR_ZERO_SHARE) / 0.2)
    scale = torch.where(torch.rand(n, generator=generator) < NEAR_ZERO_SHARE, NEAR_ZERO_MEAN, mu)
    return (torch.empty(n).exponential_(generator=generator) * scale).float()


def best_time(fn, repeats: int) -> float:
    """Returns the smallest wall time in seconds of ``repeats`` calls of ``fn`` (the least disturbed run)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def reset_peak_rss() -> int:
    """Returns the resident set size in bytes after resetting the kernel's peak-RSS mark (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_delta(fn) -> tuple[int, object]:
    """Returns ``(bytes, result)``: the peak resident memory ``fn()`` added above the memory resident before it.

    Torch's CPU allocations do not show in tracemalloc, so this reads the process's peak RSS (``VmHWM``). Run it in a
    process started with ``MALLOC_MMAP_THRESHOLD_`` set low, so that freed buffers go back to the kernel and one
    measurement does not hide in pages an earlier one left mapped.
    """
    before = reset_peak_rss()
    result = fn()
    return _status_kib("VmHWM") * 1024 - before, result


def is_exact_top_k(values: torch.Tensor, selected: torch.Tensor, k: int, threshold: float) -> bool:
    """Returns whether ``selected`` is the stable top-k of the 1-D ``values``, in O(N) without sorting.

    The stable top-k is characterized by: exactly k selected, every selected value >= the k-th largest value
    ``threshold`` (from an independent method, e.g. torch.kthvalue), every unselected value <= it, and the selected
    ties at the threshold are the first ones in index order.
    """
    if int(selected.sum()) != k:
        return False
    if k and bool((values[selected] < threshold).any()):
        return False
    if bool((values[~selected] > threshold).any()):
        return False
    ties = (values == threshold).nonzero().squeeze(1)
    taken = selected[ties]
    # A prefix of True then False: no False is followed by a True.
    return not bool((~taken[:-1] & taken[1:]).any()) if ties.numel() > 1 else True


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
