"""How many optimizer steps a GRPO run trains, counted from the dataset's size before the trainer is built.

TRL's ``RepeatSampler`` draws ``P = generation_batch_size / num_generations`` distinct prompts per generation batch and
drops the last incomplete one, so an epoch of ``N`` prompts holds ``G = floor(N / P)`` generation batches. Each is
served ``num_iterations x steps_per_generation`` times as one batch of the training dataloader, and transformers'
``Trainer`` counts ``ceil(L / gradient_accumulation_steps)`` optimizer steps per epoch of ``L`` such batches:

    steps per epoch = max(ceil(G * num_iterations * steps_per_generation / gradient_accumulation_steps), 1)
    steps           = max_steps                                         if max_steps > 0
                      ceil(num_train_epochs * steps per epoch)          if max_steps < 0 (TRL's "no step limit")

With ``G = 0`` the dataloader is empty and the run trains nothing, whatever ``max_steps`` says; so does ``max_steps =
0``. ``check_max_steps`` refuses the second before anything loads, ``check_run_length`` the first once the dataset
is loaded, and says what an epoch-based run will do.
"""

from __future__ import annotations

import math

from .usage import UsageError

__all__ = ["check_max_steps", "check_run_length", "epoch_steps", "prompts_per_generation"]


def prompts_per_generation(args) -> int:
    """Returns the distinct prompts of one generation batch (``generation_batch_size / num_generations``) of
    ``args``, a built ``GRPOConfig`` (which derives ``generation_batch_size`` for the run's world size)."""
    return args.generation_batch_size // args.num_generations


def epoch_steps(num_prompts: int, args) -> int:
    """Returns the optimizer steps of ``num_train_epochs`` epochs over ``num_prompts`` prompts, as transformers
    counts them for a run with ``max_steps < 0`` (the module's formula)."""
    batches = num_prompts // prompts_per_generation(args) * args.num_iterations * args.steps_per_generation
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def check_max_steps(max_steps: int) -> None:
    """Raises ``UsageError`` for ``max_steps = 0``, a run of no step (negative values train epochs)."""
    if max_steps == 0:
        raise UsageError(
            "max_steps: 0 would train no step; use an integer >= 1, or a negative one (TRL's -1) to train "
            "num_train_epochs epochs"
        )


def check_run_length(num_prompts: int, args, field: str, dataset: str) -> str | None:
    """Returns a one-line notice of what an epoch-based run (``max_steps < 0``) trains, None for a run of
    ``max_steps > 0`` steps; raises ``UsageError`` naming ``field`` for a run that would train no step.

    ``dataset`` names the training data in the messages (``"the bundled task's train split"``).
    """
    check_max_steps(args.max_steps)
    per_generation = prompts_per_generation(args)
    if num_prompts < per_generation:
        raise UsageError(
            f"{field}: {dataset} has {num_prompts} prompt(s), fewer than one generation batch takes "
            f"({per_generation} = generation_batch_size {args.generation_batch_size} / num_generations "
            f"{args.num_generations}), so the run would train no step; give more prompts or a smaller "
            "per_device_train_batch_size"
        )
    if args.max_steps > 0:
        return None
    steps = epoch_steps(num_prompts, args)
    return (
        f"max_steps: {args.max_steps} (<= 0) trains num_train_epochs = {args.num_train_epochs:g} epoch(s) of the "
        f"{num_prompts} prompts: {steps} optimizer step(s); give --max_steps N to stop after N"
    )
