"""The cheaper training step is the same step: the compact LM head (selected tokens only) and the trimmed
micro-batches give the gradients of the full path, for every loss type, both normalizations and the entropy bonus.

A real model (the tiny GPT-2) and the trainer's real ``_prepare_inputs`` and ``compute_loss``; generation is scripted
(tests/fixed_batch.py), so every path trains on the same completions, of ragged lengths (right padding to trim).
"""

import dataclasses
import math

import pytest
import torch
from fixed_batch import OFFLINE_CPU, distinct_tokens_reward, scripted_generate
from trl import GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
ACCUMULATION = 2


def make_trainer(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, **overrides):
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUMULATION,
        steps_per_generation=ACCUMULATION,
        num_generations=4,
        max_completion_length=12,
        **OFFLINE_CPU,
    )
    settings.update(overrides)
    if settings.get("loss_type") == "luspo":
        settings["importance_sampling_level"] = "sequence"
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=distinct_tokens_reward,
        args=ForkingGRPOConfig(**settings),
        train_dataset=prompt_dataset,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ACCUMULATION
    return trainer


def micro_batches(trainer, prompt_dataset, trim):
    """Returns the optimizer step's micro-batches from the trainer's real _prepare_inputs, trimmed or not."""
    trainer.forking = dataclasses.replace(trainer.forking, forking_trim_padding=trim)
    generation_batch = [{"prompt": p} for p in prompt_dataset["prompt"][: 4 * ACCUMULATION // 4]] * 4
    trainer._buffered_inputs, trainer._step = None, 0
    torch.manual_seed(0)  # TRL shuffles the generation batch before splitting it: the same split every call
    batches = []
    for _ in range(ACCUMULATION):
        batches.append(trainer._prepare_inputs(generation_batch))
        trainer._step += 1
    trainer._step = 0
    return batches


def step_gradient(trainer, batches, compact):
    """Returns (losses, gradient of every trainable parameter) of one accumulated step over ``batches``."""
    trainer._forking_compacts = compact
    trainer.model.zero_grad(set_to_none=True)
    losses = []
    for index, inputs in enumerate(batches):
        trainer._step = index
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
    trainer._step = 0
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads


def assert_same(a, b, rtol=1e-5, atol=1e-7):
    losses_a, grads_a = a
    losses_b, grads_b = b
    torch.testing.assert_close(losses_a, losses_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("coef", [0.0, 0.1])
@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_compact_head_gives_the_full_heads_values_and_gradients(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization, coef
):
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type=loss_type,
        forking_loss_normalization=normalization, entropy_coef=coef,
    )  # fmt: skip
    # On by default exactly where nothing reads an unselected token's log-prob: off for the sequence-level ratios.
    assert trainer._forking_compacts == (loss_type not in ("luspo", "vespo"))
    if not trainer._forking_compacts:
        return
    batches = micro_batches(trainer, prompt_dataset, trim=True)
    calls = []
    original = trainer._compact_logps_and_entropies
    trainer._compact_logps_and_entropies = lambda *a: calls.append(1) or original(*a)
    compact = step_gradient(trainer, batches, compact=True)
    assert len(calls) == ACCUMULATION  # the compact head did run, once per micro-batch
    full = step_gradient(trainer, batches, compact=False)
    assert len(calls) == ACCUMULATION
    assert_same(compact, full)
    assert any(g.abs().max() > 0 for g in full[1].values())


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo"])
def test_trimmed_micro_batches_give_the_untrimmed_gradients(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization
):
    # dr_grpo divides by B * max_completion_length, a constant: trimming must not turn it into B * the new width.
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type=loss_type,
        forking_loss_normalization=normalization,
    )  # fmt: skip
    full_width = micro_batches(trainer, prompt_dataset, trim=False)
    trimmed = micro_batches(trainer, prompt_dataset, trim=True)
    pairs = list(zip(full_width, trimmed, strict=True))
    widths = [(f["completion_ids"].size(1), t["completion_ids"].size(1)) for f, t in pairs]
    assert all(t <= f for f, t in widths) and any(t < f for f, t in widths), widths  # something was cut
    for f, t in pairs:
        width = t["completion_ids"].size(1)
        for key in ("completion_ids", "completion_mask", "forking_mask", "forking_entropies"):
            assert torch.equal(f[key][:, :width], t[key]), key  # the kept columns, unchanged
        assert not f["completion_mask"][:, width:].bool().any()  # only padding was cut
    assert_same(step_gradient(trainer, trimmed, False), step_gradient(trainer, full_width, False))


def test_tokens_the_compact_head_skips_cannot_overflow_the_importance_ratio(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # exp(log pi - log pi_old) with a log pi of 0 for the unprojected tokens would be exp(90) = inf where the old
    # log-prob is -90 (a token the rollout policy found very unlikely): they get the old log-prob, a ratio of 1.
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type="dapo", num_iterations=2)
    batches = micro_batches(trainer, prompt_dataset, trim=True)
    for inputs in batches:
        unselected = ~inputs["forking_mask"] & inputs["completion_mask"].bool()
        inputs["old_per_token_logps"] = inputs["old_per_token_logps"].masked_fill(unselected, -90.0)
    losses, grads = step_gradient(trainer, batches, compact=True)
    assert all(math.isfinite(v) for v in losses.tolist())
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize(
    "overrides",
    [{"beta": 0.1}, {"forking_scope": "micro_batch"}, {"forking_scope": "local"}, {"forking_selection": "all"},
     {"forking_compact_lm_head": False}, {"off_policy_mask_threshold": 0.5}],
)  # fmt: skip
def test_the_compact_head_is_off_where_it_would_not_be_exact(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, overrides
):
    # KL reads every token's log-prob; micro_batch / local select on the training forward itself; "all" has nothing
    # to skip; the off-policy mask reads every token's log-ratio.
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, **overrides)
    assert not trainer._forking_compacts
