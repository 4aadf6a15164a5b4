"""Scope "step" across world sizes: the trainer's generation-batch selection run on 1 and 2 gloo ranks."""

import types

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from trl_forking.config import ForkingOptions
from trl_forking.trainer import ForkingGRPOTrainer

ROWS, COLS = 16, 7


def make_rows():
    """16 completions of up to 7 tokens with distinct entropies (no ties at any threshold) and ragged padding."""
    generator = torch.Generator().manual_seed(11)
    entropies = torch.randperm(ROWS * COLS, generator=generator).float().view(ROWS, COLS) / 10
    lengths = torch.randint(1, COLS + 1, (ROWS,), generator=generator)
    mask = (torch.arange(COLS) < lengths.unsqueeze(1)).long()
    mask[3] = 0  # one completion fully masked (e.g. truncated with mask_truncated_completions)
    return entropies, mask


def stub_trainer(rows, world, rank, accumulation, group):
    """The parts of ForkingGRPOTrainer that _select_generation_batch reads, with its real methods bound."""
    stub = types.SimpleNamespace(
        forking=ForkingOptions(top_entropy_quantile=0.2),
        args=types.SimpleNamespace(steps_per_generation=accumulation, gradient_accumulation_steps=accumulation),
        _step=0,
        _forking_group=group,
        state=types.SimpleNamespace(global_step=0),
        _forking_generator=lambda stream, index: None,
    )
    for name in (
        "_select",
        "_select_step",
        "_forking_metrics",
        "_step_windows",
        "_window_generator",
        "_masks",
        "_population",
    ):
        setattr(stub, name, getattr(ForkingGRPOTrainer, name).__get__(stub))
    entropies, mask = rows
    per_rank = ROWS // world
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    row_ids = torch.arange(ROWS)[local]
    advantages = torch.ones(ROWS)  # every completion informative: the population is the completion mask
    slices = [
        {"forking_entropies": e, "completion_mask": m, "advantages": a, "row_ids": r}
        for e, m, a, r in zip(
            entropies[local].chunk(accumulation),
            mask[local].chunk(accumulation),
            advantages[local].chunk(accumulation),
            row_ids.chunk(accumulation),
            strict=True,
        )
    ]
    ForkingGRPOTrainer._select_generation_batch(stub, slices)
    selected = {int(r): s["forking_mask"][i] for s in slices for i, r in enumerate(s["row_ids"])}
    step_selected = {int(s["forking_step_selected"]) for s in slices}
    assert {int(s["forking_step_valid"]) for s in slices} == {int(mask.sum())}
    metrics = [s["forking_step_metrics"] for s in slices if "forking_step_metrics" in s]
    return selected, step_selected, metrics


def _worker(rank, world, accumulation):
    return stub_trainer(make_rows(), world, rank, accumulation, dist.group.WORLD)


@pytest.mark.distributed
def test_step_scope_mask_is_independent_of_world_size_and_accumulation():
    reference, reference_count, reference_metrics = stub_trainer(make_rows(), 1, 0, 1, None)
    _, mask = make_rows()
    assert reference_count == {-(-int(mask.sum()) // 5)}  # ceil(0.2 * N) over the whole step

    accumulated, count, _ = stub_trainer(make_rows(), 1, 0, 4, None)
    assert count == reference_count
    assert all(torch.equal(accumulated[r], reference[r]) for r in reference)

    results = run_on_ranks(_worker, 2, 2)
    merged = {**results[0][0], **results[1][0]}
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[r], reference[r]) for r in reference)
    assert results[0][1] == results[1][1] == reference_count
    # One set of metrics per optimizer step, the same global values on every rank as in the single process.
    assert len(reference_metrics) == 1 and len(results[0][2]) == len(results[1][2]) == 1
    for name, value in reference_metrics[0].items():
        assert results[0][2][0][name] == pytest.approx(value, nan_ok=True)
        assert results[1][2][0][name] == pytest.approx(value, nan_ok=True)
