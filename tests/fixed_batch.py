"""Run ForkingGRPOTrainer's real ``_prepare_inputs`` + ``compute_loss`` over a fixed generation batch.

Generation and the model forward are replaced by fixed tensors: the policy's per-token log-probs and entropies are
leaf tensors, so the gradient of everything TRL's loss and our weights do with them can be compared with a reference
written by hand. Rows are identified by their first completion token (``ROW_TOKEN + row``), since TRL shuffles the
generation batch before splitting it into micro-batches.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch
from trl import GRPOTrainer

ROW_TOKEN = 100
PROMPT = [5, 6, 7]
# The settings every trainer of these tests shares: CPU, float32, nothing saved or reported, seed 0.
OFFLINE_CPU = dict(report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0)


def distinct_tokens_reward(completions, **kwargs):
    """A reward that differs across a group's completions: the number of distinct tokens, ties broken by length."""
    return [float(len(set(c))) + 0.01 * len(c) for c in completions]


@dataclass
class FixedBatch:
    """A generation batch: (B, T) float tensors, a (B, T) 0/1 mask and (B,) advantages."""

    logps: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    entropies: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor

    @property
    def shape(self):
        return tuple(self.mask.shape)


def make_batch(rows: int, cols: int, seed: int, ragged: bool = True) -> FixedBatch:
    """Returns a random batch with distinct, well separated entropies (no ties at any threshold) and ratios
    exp(log pi - log pi_old) in [0.6, 1.65], so that the clipped losses clip some tokens and not others."""
    generator = torch.Generator().manual_seed(seed)
    entropies = (torch.randperm(rows * cols, generator=generator).float().view(rows, cols) + 1) / (rows * cols)
    logps = -torch.rand(rows, cols, generator=generator) * 3 - 0.05
    log_ratio = torch.rand(rows, cols, generator=generator) - 0.5
    ref_gap = (torch.rand(rows, cols, generator=generator) - 0.5) * 0.6
    if ragged:
        lengths = torch.randint(1, cols + 1, (rows,), generator=generator)
        lengths[0] = cols
    else:
        lengths = torch.full((rows,), cols)
    mask = (torch.arange(cols) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(rows, generator=generator)
    advantages[-1] = 0.0  # a group whose rewards were all equal
    return FixedBatch(logps, logps - log_ratio, logps + ref_gap, entropies, mask, advantages)


def generation_output(batch: FixedBatch, rows: slice = slice(None)) -> dict:
    """Returns what TRL's ``_generate_and_score_completions`` would return for the ``rows`` of ``batch`` (one rank),
    each row tagged with its index in ``batch``."""
    index = torch.arange(batch.shape[0])[rows]
    count, cols = index.numel(), batch.shape[1]
    completion_ids = torch.zeros(count, cols, dtype=torch.long)
    completion_ids[:, 0] = ROW_TOKEN + index
    return {
        "prompt_ids": torch.tensor([PROMPT] * count),
        "prompt_mask": torch.ones(count, len(PROMPT), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": batch.mask[rows].clone(),
        "advantages": batch.advantages[rows].clone(),
        "num_items_in_batch": batch.mask[rows].sum(),
        "old_per_token_logps": batch.old_logps[rows].clone(),
        "ref_per_token_logps": batch.ref_logps[rows].clone(),
    }


def row_order(input_ids: torch.Tensor) -> list[int]:
    """Returns the batch row of each row of a micro-batch's (b, P + T) input ids."""
    return (input_ids[:, len(PROMPT)] - ROW_TOKEN).tolist()


def run_steps(trainer, batch: FixedBatch, monkeypatch, steps: int):
    """Returns ``(logps, entropies, losses, micro_batches)`` after ``steps`` optimizer steps of the trainer's
    ``gradient_accumulation_steps`` micro-steps each, through its real ``_prepare_inputs`` and ``compute_loss``.

    Each generation TRL asks for takes the next ``per_device_train_batch_size * steps_per_generation`` rows of
    ``batch``, in order, so any ``steps_per_generation`` consumes the same rows. ``losses`` has one entry per
    micro-step; the leaves' ``.grad`` holds the sum of every step's gradient (the leaves are fixed: the policy does
    not move between steps).
    """
    args = trainer.args
    accumulation, per_generation = args.gradient_accumulation_steps, args.per_device_train_batch_size
    per_generation *= args.steps_per_generation
    assert batch.shape[0] == steps * accumulation * args.per_device_train_batch_size
    assert batch.shape[0] % per_generation == 0
    outputs = iter(
        [
            generation_output(batch, slice(start, start + per_generation))
            for start in range(0, batch.shape[0], per_generation)
        ]
    )
    return _train(trainer, batch, monkeypatch, outputs, steps * accumulation, accumulation, count_optimizer_steps=True)


def run_step(trainer, batch: FixedBatch, monkeypatch, accumulation: int = 1):
    """Returns ``(logps, entropies, losses, micro_batches)`` after one optimizer step's micro-batches went through the
    trainer's real ``_prepare_inputs`` and ``compute_loss`` and each loss was back-propagated.

    ``logps`` and ``entropies`` are the (B, T) leaves (their ``.grad`` holds the step's gradient); ``micro_batches``
    are the inputs ``compute_loss`` received.
    """
    output = generation_output(batch)
    return _train(trainer, batch, monkeypatch, itertools.repeat(output), accumulation, accumulation)


def _train(trainer, batch, monkeypatch, outputs, micro_steps: int, accumulation: int, count_optimizer_steps=False):
    """Runs ``micro_steps`` micro-steps of the trainer's real ``_prepare_inputs`` + ``compute_loss`` + backward, each
    generation TRL asks for taking the next of ``outputs``, the forward replaced by the fixed leaves; returns
    ``(logps, entropies, losses, micro_batches)``. ``count_optimizer_steps`` advances ``state.global_step`` after every
    ``accumulation`` micro-steps, as the training loop would."""
    logps = batch.logps.clone().requires_grad_(True)
    entropies = batch.entropies.clone().requires_grad_(True)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(next(outputs)))
    monkeypatch.setattr(trainer, "_entropy_forward", lambda b: fixed_entropies(batch, b))

    def forward(model, input_ids, *args, **kwargs):
        order, width = row_order(input_ids), input_ids.size(1) - len(PROMPT)  # the completion columns it was given
        return logps[order, :width], entropies[order, :width], None

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", forward)
    trainer._buffered_inputs = None
    trainer._step = 0
    trainer.current_gradient_accumulation_steps = accumulation  # set by the training loop, bypassed here
    trainer.model.train()
    losses, micro_batches = [], []
    for micro_step in range(micro_steps):
        inputs = trainer._prepare_inputs([{}])
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        micro_batches.append(inputs)
        trainer._step += 1
        if count_optimizer_steps and (micro_step + 1) % accumulation == 0:
            trainer.state.global_step += 1
    return logps, entropies, losses, micro_batches


def row_order_of(generation_batch: dict) -> list[int]:
    """Returns the batch row of each row of a generation batch (before TRL's shuffle: in order)."""
    return (generation_batch["completion_ids"][:, 0] - ROW_TOKEN).tolist()


def fixed_entropies(batch: FixedBatch, inputs: dict) -> torch.Tensor:
    """Stands in for ``_entropy_forward``: the fixed entropies of ``inputs``' rows, as wide as its completions."""
    return batch.entropies[row_order_of(inputs), : inputs["completion_ids"].size(1)].clone()


def selected_rows(micro_batches: list[dict], shape) -> torch.Tensor:
    """Returns the (B, T) forking mask the trainer put on the micro-batches, in batch-row order."""
    selected = torch.zeros(shape, dtype=torch.bool)
    for inputs in micro_batches:
        order = (inputs["completion_ids"][:, 0] - ROW_TOKEN).tolist()
        mask = inputs["forking_mask"]  # trimmed to the micro-batch's longest completion
        selected[order, : mask.size(1)] = mask
    return selected


def scripted_generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """Stands in for ``GRPOTrainer._generate_single_turn``: completions that depend only on the prompt and its
    occurrence in the call (the k-th completion of a group), never on the global RNG, the rank or the batch split.

    Lengths vary from 2 to ``max_completion_length`` tokens (all of that length when ``self.scripted_equal_lengths``);
    there is no EOS, so every completion token counts.
    """
    seen: dict[tuple, int] = {}
    completions = []
    for ids in prompt_ids:
        key = tuple(int(i) for i in ids)
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        digest = hashlib.blake2b(f"{key}/{occurrence}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        longest = self.max_completion_length
        length = (
            longest
            if getattr(self, "scripted_equal_lengths", False)
            else int(torch.randint(2, longest + 1, (1,), generator=generator))
        )
        completions.append(torch.randint(10, 400, (length,), generator=generator).tolist())
    return completions, None
