"""Benchmark a: one-process selection of the top-rho of N entropies, forking_mask against the torch primitives.

Methods, each on the same entropy-like float32 input of N tokens (all valid):
- ``forking_mask``: this package, exact top-k mask (``trl_forking.forking_mask``);
- ``torch.quantile``: what TRL's ``get_high_entropy_mask`` calls for the threshold (raises above 2**24 elements);
- ``torch.topk``: what the authors' verl fork calls;
- ``torch.kthvalue``: the k-th largest value alone, the cheapest exact threshold torch offers.

Time: best wall time of a few calls in this process. Peak memory: in a child process per N (started with a low
``MALLOC_MMAP_THRESHOLD_`` so freed buffers leave the process), the peak RSS each call adds over the input.
Exactness: the forking mask must be the stable top-k (``common.is_exact_top_k``, threshold from kthvalue).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from common import best_time, entropy_like, is_exact_top_k, load_selection, peak_rss_delta

_selection = load_selection()
forking_mask, num_selected = _selection.forking_mask, _selection.num_selected

__all__ = ["FULL_SIZES", "METHODS", "QUICK_SIZES", "RHO", "run"]

RHO = 0.2
FULL_SIZES = (10**5, 10**6, 10**7, 2**24, 2**25, 2**27)
QUICK_SIZES = (10**4, 10**5)
METHODS = ("forking_mask", "torch.quantile", "torch.topk", "torch.kthvalue")
# Repeats per size: the best of several calls at small N, fewer where one call takes seconds.
REPEATS_SMALL, REPEATS_LARGE, LARGE_N = 5, 2, 2**25
# Freed buffers above this size are unmapped at once, so the peak-RSS probe sees each call's own allocations.
MALLOC_MMAP_THRESHOLD = 65536
MEMORY_TIMEOUT_S = 900


def _calls(values: torch.Tensor, k: int) -> dict:
    """Returns the zero-argument call of each method on the 1-D ``values``."""
    n = values.numel()
    entropies, mask = values.view(1, n), torch.ones(1, n, dtype=torch.bool)
    return {
        "forking_mask": lambda: forking_mask(entropies, mask, RHO),
        "torch.quantile": lambda: torch.quantile(values, 1 - RHO),
        "torch.topk": lambda: torch.topk(values, k),
        "torch.kthvalue": lambda: torch.kthvalue(values, n - k + 1),
    }


def _raises(fn) -> str | None:
    """Returns the error message of ``fn()`` when it raises a RuntimeError (torch.quantile above 2**24), else None."""
    try:
        fn()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def _measure_memory(sizes) -> dict:
    """Returns {N: {method: peak bytes added by one call, or None if it raises}} (run in a child process)."""
    result = {}
    for n in sizes:
        values = entropy_like(n)
        peaks = {}
        for name, call in _calls(values, num_selected(n, RHO)).items():
            if _raises(call):
                peaks[name] = None
                continue
            # Measured on the second call: the first one also pages in code and lazily built tables.
            peaks[name], _ = peak_rss_delta(call)
        result[n] = peaks
        del values
    return result


def _memory_in_child(sizes, timeout: float) -> dict:
    """Returns ``_measure_memory(sizes)`` computed in a fresh Python process with a low mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--memory", *map(str, sizes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return {int(n): peaks for n, peaks in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def run(sizes=FULL_SIZES, memory: bool = True, log=print) -> list[dict]:
    """Returns one row per N: time (s) and peak memory (bytes) of each method, whether torch.quantile raises,
    whether forking_mask is exact, and how many tokens TRL's ``>= quantile`` rule keeps against k."""
    rows = []
    for n in sizes:
        values = entropy_like(n)
        k = num_selected(n, RHO)
        calls = _calls(values, k)
        repeats = REPEATS_SMALL if n < LARGE_N else REPEATS_LARGE
        quantile_error = _raises(calls["torch.quantile"])
        times = {}
        for name, call in calls.items():
            if name == "torch.quantile" and quantile_error:
                times[name] = None
                continue
            if n < LARGE_N:
                call()  # warm-up: lazy initialization is not the steady state (at large N it is noise)
            times[name] = best_time(call, repeats)
        mask = calls["forking_mask"]().view(-1)
        threshold = float(calls["torch.kthvalue"]().values)
        top_values = calls["torch.topk"]().values
        row = {
            "n": n,
            "k": k,
            "time_s": times,
            "quantile_raises": quantile_error,
            "exact": is_exact_top_k(values, mask, k, threshold),
            "topk_agrees": bool(top_values.min() == threshold),
            "trl_rule_selects": None if quantile_error else int((values >= torch.quantile(values, 1 - RHO)).sum()),
        }
        del mask, top_values, calls
        rows.append(row)
        log(f"  a. N={n:>11,}: " + ", ".join(f"{m} {t if t is None else round(t, 4)}" for m, t in times.items()))
    if memory:
        peaks = _memory_in_child(sizes, timeout=MEMORY_TIMEOUT_S)
        for row in rows:
            row["peak_bytes"] = peaks[row["n"]]
    return rows


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--memory":
    torch.set_num_threads(1)
    print(json.dumps(_measure_memory([int(n) for n in sys.argv[2:]])))
