"""Run a function on several CPU processes joined in a gloo process group on localhost."""

import datetime
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args) -> list:
    """Returns ``[fn(rank, world, *args) for rank in range(world)]``, each run in its own gloo process.

    ``fn`` must be importable (module level); its module is imported before the process group exists, and so must be
    whatever it imports that pulls in torch._dynamo (TRL, transformers' Trainer, DeepSpeed): imported after, it keeps
    the group alive past ``destroy_process_group`` and a process can abort at exit (benchmarks/bench_distributed.py
    has the details). A collective that never completes fails after ``TIMEOUT``.
    """
    results = mp.Manager().dict()
    mp.start_processes(_entry, args=(world, _free_port(), fn, args, results), nprocs=world, start_method="spawn")
    return [results[rank] for rank in range(world)]
