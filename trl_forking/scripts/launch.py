"""How many processes a launch trains on: defaults that let a multi-process launch on a machine without CUDA form one
gloo group, and a stop, before anything loads, when a launch asked for several processes would train on one.

Without them, ``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2`` on CPU set up
``DistributedType.NO`` (accelerate forms a DDP group only for an accelerator) and crashed on rank 1, and the same
launch with ``--cpu`` started a single process that trained alone without a word.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .usage import UsageError

__all__ = ["check_launch", "check_world_size", "cpu_defaults", "world_size"]


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Returns the number of processes the launcher started (``WORLD_SIZE``, as torchrun sets it; 1 if unset)."""
    return int(environ.get("WORLD_SIZE") or 1)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def cpu_defaults(environ: Mapping[str, str] = os.environ) -> dict:
    """Returns the ``TrainingArguments`` defaults for a machine without CUDA.

    ``bf16`` off (transformers refuses it on CPU) and ``dataloader_pin_memory`` off (there is nothing to pin to; torch
    warns on every dataloader). Under a multi-process launch, ``ddp_backend="gloo"`` and, for plain data parallel,
    ``use_cpu=True`` (accelerate then forms a MULTI_CPU group over gloo) and ``ddp_find_unused_parameters=False``
    (transformers' default, True without gradient checkpointing, costs an extra graph traversal per step and makes
    DDP warn on every rank; a model with unused parameters makes DDP raise, naming the flag). DeepSpeed brings its
    own CPU accelerator and needs only the backend.
    """
    defaults = {"bf16": False, "dataloader_pin_memory": False}
    if world_size(environ) > 1:
        defaults["ddp_backend"] = "gloo"
        if not _true(environ.get("ACCELERATE_USE_DEEPSPEED")):
            defaults.update(use_cpu=True, ddp_find_unused_parameters=False)
    return defaults


def check_launch(environ: Mapping[str, str] = os.environ) -> None:
    """Raises ``UsageError`` when ``accelerate launch --cpu`` was asked for several processes but started one.

    accelerate's ``--cpu`` path runs the script once (more processes need ``mpirun``) and still exports the
    ``MASTER_ADDR`` it sets only for ``num_processes > 1`` or several machines: that, without ``WORLD_SIZE``, is the
    sign.
    """
    asked_several = "MASTER_ADDR" in environ and "MASTER_PORT" in environ
    if _true(environ.get("ACCELERATE_USE_CPU")) and asked_several and "WORLD_SIZE" not in environ:
        raise UsageError(
            "launch: accelerate launch --cpu with more than one process starts this script once (it needs mpirun "
            "for more), so it would train alone; drop --cpu: on a machine without CUDA the script trains every "
            "process on the CPU over gloo (or unset MASTER_ADDR for a deliberate single-process run)"
        )


def check_world_size(state, environ: Mapping[str, str] = os.environ) -> None:
    """Raises ``UsageError`` when the launcher started ``WORLD_SIZE > 1`` processes but ``state`` (accelerate's
    ``PartialState``) does not train them as one group."""
    from accelerate.utils import DistributedType

    asked = world_size(environ)
    if asked > 1 and (state.num_processes != asked or state.distributed_type == DistributedType.NO):
        raise UsageError(
            f"launch: the launcher started {asked} processes but accelerate set up {state.num_processes} as "
            f"{state.distributed_type}, so each would train alone; launch with a config from recipes/accelerate/"
        )
