"""Benchmark b: selection across 2 and 4 CPU processes (gloo on 127.0.0.1): time and bytes communicated.

- ``forking_mask``: this package's radix select, ``forking_mask(..., group=WORLD)``;
- ``trl``: TRL 1.16's own ``GRPOTrainer.get_high_entropy_mask`` with an accelerate ``Accelerator`` on the same
  group: ``pad_across_processes`` (all_gather of each rank's length, pad with -1e9), ``gather`` (all_gather of the
  padded entropies), drop the sentinels, ``torch.quantile``, ``entropies >= threshold``.

Bytes: every torch.distributed collective a method calls is wrapped and counted as the bytes of the result each
rank holds afterwards: ``tensor.nbytes`` for all_reduce, the sum of the output tensors' nbytes for all_gather (world
size times the input). Counting stops outside the method, so the benchmark's own bookkeeping is not counted. Time:
the slowest rank's wall time, best of a few calls after a barrier. Each process uses one thread: 4 processes on 2
cores are already oversubscribed.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import entropy_like, free_port, load_selection

_selection = load_selection()
forking_mask, num_selected = _selection.forking_mask, _selection.num_selected

__all__ = ["FULL_SIZES", "QUICK_SIZES", "WORLD_SIZES", "run"]

RHO = 0.2
WORLD_SIZES = (2, 4)
FULL_SIZES = (10**5, 10**6, 10**7)
QUICK_SIZES = (10**3, 10**4)
REPEATS = 3
# Seconds a world of workers may take before it is killed and reported as failed (no hang).
WORLD_TIMEOUT_S = 900


class _ByteCounter:
    """Wraps dist.all_reduce and dist.all_gather and adds up the bytes of their results while ``active``."""

    def __init__(self):
        self.active, self.bytes, self.calls = False, 0, 0
        self._all_reduce, self._all_gather = dist.all_reduce, dist.all_gather

        def all_reduce(tensor, *args, **kwargs):
            self._count(tensor.nbytes)
            return self._all_reduce(tensor, *args, **kwargs)

        def all_gather(tensor_list, tensor, *args, **kwargs):
            self._count(sum(t.nbytes for t in tensor_list))
            return self._all_gather(tensor_list, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather

    def _count(self, nbytes: int) -> None:
        if self.active:
            self.bytes += nbytes
            self.calls += 1

    def measure(self, fn):
        """Returns ``(result, bytes, calls)`` of one call of ``fn``."""
        self.active, self.bytes, self.calls = True, 0, 0
        try:
            result = fn()
        finally:
            self.active = False
        return result, self.bytes, self.calls


def trl_high_entropy_mask():
    """Returns ``select(entropies, mask, rho)``: TRL 1.16's own ``GRPOTrainer.get_high_entropy_mask`` on this group.

    The method runs unmodified with an accelerate ``Accelerator`` (MULTI_CPU, on the process group already
    initialized here), so its ``pad_across_processes``, ``gather`` and ``torch.quantile`` are the real ones; it raises
    RuntimeError from torch.quantile when the gathered tokens exceed 2**24. TRL is imported only in the workers (see
    ``_worker`` for when): the rest of the benchmark needs none of it.
    """
    from accelerate import Accelerator
    from trl import GRPOTrainer

    trainer = types.SimpleNamespace(accelerator=Accelerator(cpu=True))
    return lambda entropies, mask, rho: GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, 1 - rho)


def _gloo_threads() -> list[str]:
    """Returns the names of this process's gloo threads (empty where /proc is not there to tell)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # the thread ended while we looked
    return sorted(name for name in names if "gloo" in name)


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _total(count: int) -> int:
    value = torch.tensor([count], dtype=torch.long)
    dist.all_reduce(value)
    return int(value)


def _timed(fn, counter: _ByteCounter) -> dict:
    """Returns time (slowest rank, best of REPEATS), bytes and calls of ``fn``, or the error it raises."""
    dist.barrier()
    try:
        result, nbytes, calls = counter.measure(fn)
    except RuntimeError as error:
        # The collectives ran before torch.quantile raised: their bytes are real, the time is not reported.
        return {"time_s": None, "bytes": counter.bytes, "calls": counter.calls, "raises": str(error).splitlines()[0]}
    best = float("inf")
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        fn()
        best = min(best, _slowest(time.perf_counter() - start))
    return {"time_s": best, "bytes": nbytes, "calls": calls, "raises": None, "result": result}


def _worker(rank: int, world: int, port: int, sizes, out_path: str) -> None:
    # accelerate reads the rank layout from the environment, as under torchrun.
    layout = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{k: str(v) for k, v in layout.items()})
    torch.set_num_threads(1)
    # TRL (with transformers, DeepSpeed and torch._dynamo) is imported before the process group exists. Imported
    # after, torch._dynamo keeps references to the group, destroy_process_group() no longer frees it, and its gloo
    # threads live into interpreter shutdown, where one that releases the last collective's tensors must take the
    # GIL: the thread is ended inside a noexcept frame, std::terminate, exit code -6 (1 world in 15 here).
    import accelerate  # noqa: F401
    import trl.trainer.grpo_trainer  # noqa: F401

    dist.init_process_group("gloo", rank=rank, world_size=world)
    trl_select = trl_high_entropy_mask()
    counter = _ByteCounter()
    rows = []
    for n in sizes:
        entropies = entropy_like(n, seed=1000 * world + rank).view(1, n)
        mask = torch.ones(1, n, dtype=torch.bool)
        ours = _timed(lambda e=entropies, m=mask: forking_mask(e, m, RHO, group=dist.group.WORLD), counter)
        trl = _timed(lambda e=entropies, m=mask: trl_select(e, m, RHO), counter)
        k = num_selected(n * world, RHO)
        ours["exact_count"] = _total(int(ours.pop("result").sum())) == k
        if trl["raises"] is None:
            trl["selects"] = _total(int(trl.pop("result").sum()))
        rows.append({"world": world, "n_per_rank": n, "k": k, "forking_mask": ours, "trl": trl})
    if rank == 0:
        with open(out_path, "w") as out:
            json.dump(rows, out)
    dist.destroy_process_group()
    gc.collect()
    left = _gloo_threads()
    if left:  # the race above, caught every time instead of once in a while
        raise RuntimeError(f"rank {rank}: the process group outlived destroy_process_group (threads {left})")


def run(worlds=WORLD_SIZES, sizes=FULL_SIZES, log=print) -> list[dict]:
    """Returns one row per (world size, N per rank) with each method's time, bytes, collective calls and errors."""
    rows = []
    context = mp.get_context("spawn")
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out_path = os.path.join(tmp, "rows.json")
            port = free_port()
            procs = [context.Process(target=_worker, args=(r, world, port, sizes, out_path)) for r in range(world)]
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + WORLD_TIMEOUT_S
            for proc in procs:
                proc.join(timeout=max(1.0, deadline - time.monotonic()))
            stuck = [proc for proc in procs if proc.is_alive()]
            for proc in stuck:
                proc.kill()
                proc.join(timeout=10)
            if stuck or any(proc.exitcode != 0 for proc in procs) or not os.path.exists(out_path):
                raise RuntimeError(f"b. world {world}: workers failed (exit codes {[p.exitcode for p in procs]}).")
            with open(out_path) as out:
                world_rows = json.load(out)
        for row in world_rows:
            ours, trl = row["forking_mask"], row["trl"]
            log(
                f"  b. world={world} N/rank={row['n_per_rank']:>10,}: forking_mask {ours['time_s']:.4f}s "
                f"{ours['bytes']:,} B | trl {trl['time_s'] if trl['raises'] is None else 'raises'} {trl['bytes']:,} B"
            )
        rows.extend(world_rows)
    return rows
