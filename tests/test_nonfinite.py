"""Non-finite entropies in the trainer: recomputed where the distribution is defined (a masked vocabulary), refused
with the cause by a top selection, counted and trained through by the full-token baseline, as TRL does."""

import math

import pytest
import torch
from fixed_batch import OFFLINE_CPU, distinct_tokens_reward, make_batch, run_step
from transformers import AutoModelForCausalLM
from trl import GRPOConfig

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer


def make_trainer(model, prompt_dataset, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=6,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        **OFFLINE_CPU,
    )
    settings.update(overrides)
    return ForkingGRPOTrainer(
        model=model,
        reward_funcs=distinct_tokens_reward,
        args=ForkingGRPOConfig(**settings),
        train_dataset=prompt_dataset,
    )


def nan_batch():
    batch = make_batch(rows=6, cols=5, seed=12)
    batch.entropies[1, 2] = float("nan")
    batch.entropies[2, 0] = float("inf")
    return batch


@pytest.mark.parametrize("scope", ["step", "micro_batch"])
def test_a_top_selection_refuses_nonfinite_entropies_naming_the_cause(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, scope
):
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, forking_scope=scope)
    with pytest.raises(ValueError, match=r"2 NaN or infinite value\(s\).*huggingface/trl#7221"):
        run_step(trainer, nan_batch(), monkeypatch)


def test_the_full_token_baseline_trains_through_nonfinite_entropies_and_counts_them(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # forking_selection="all" (full_dapo.yaml) needs no entropy to select; TRL trains on, so must it.
    batch = nan_batch()
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, forking_selection="all")
    logps, _, losses, _ = run_step(trainer, batch, monkeypatch)
    assert math.isfinite(losses[0].item()) and torch.isfinite(logps.grad).all()
    assert (logps.grad[batch.mask.bool() & (batch.advantages != 0).unsqueeze(1)] != 0).any()
    metrics = trainer._metrics["train"]
    assert metrics["forking/entropy_nonfinite"] == [2.0]
    assert all(math.isfinite(v) for v in metrics["forking/entropy_p50"])  # the finite ones, still measured


def test_random_selection_needs_no_entropy(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, forking_selection="random")
    _, _, losses, micro_batches = run_step(trainer, nan_batch(), monkeypatch)
    assert math.isfinite(losses[0].item()) and int(micro_batches[0]["forking_mask"].sum()) > 0


@pytest.mark.parametrize("scope", ["step", "micro_batch", "sequence"])
def test_a_model_that_masks_part_of_its_vocabulary_trains_with_finite_entropies(
    tiny_model_dir, prompt_dataset, tmp_path, scope
):
    # -inf logits make TRL's fused head return NaN entropies (huggingface/trl#7221); the trainer recomputes them, so
    # the top-20% selection works and logs nothing non-finite.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bias = torch.zeros(model.config.vocab_size)
    bias[model.config.vocab_size // 2 :] = float("-inf")
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    trainer = make_trainer(model, prompt_dataset, tmp_path, forking_scope=scope)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "forking/threshold" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["forking/entropy_nonfinite"] == 0
        assert math.isfinite(entry["forking/threshold"]) and math.isfinite(entry["entropy"])
    # TRL's own trainer, on the same model, logs no entropy (NaN, which its log turns into None): the recomputation
    # is what made the difference.
    plain = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=6, num_generations=2,
        max_completion_length=8, max_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
    )  # fmt: skip
    from trl import GRPOTrainer

    baseline = GRPOTrainer(model=model, reward_funcs=distinct_tokens_reward, args=plain, train_dataset=prompt_dataset)
    baseline.train()
    value = next(e["entropy"] for e in baseline.state.log_history if "entropy" in e)
    assert value is None or math.isnan(value)
