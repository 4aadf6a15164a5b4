"""TRL's contract: code written against GRPOTrainer keeps working with ForkingGRPOTrainer, and the TRL internals the
trainer relies on are still what it assumes (a TRL upgrade that changes one fails here, loudly, by name)."""

import inspect
import re
from unittest.mock import Mock

import pytest
import torch
import trl
from trl import GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

# --- TRL's own tests of get_high_entropy_mask, with the class swapped -----------------------------------------------
# tests/test_grpo_trainer.py::TestGetHighEntropyMask in huggingface/trl calls the method unbound on a Mock(spec=...)
# trainer; these are its six cases, each run on our class the way TRL runs them on its own.

ENTROPIES = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
PADDED = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def trl_style_call(trainer_class, entropies, mask, threshold):
    accelerator = Mock()
    accelerator.num_processes = 1
    trainer = Mock(spec=trainer_class)
    trainer.accelerator = accelerator
    trainer.accelerator.gather = lambda x: x
    trainer.accelerator.pad_across_processes = lambda x, dim, pad_index: x
    return trainer_class.get_high_entropy_mask(trainer, entropies, mask, threshold)


TRL_CASES = {
    # 10 valid tokens, top 20%: 0.9 and 1.0 (1.1 and 1.2 are padding).
    "mask_0": (ENTROPIES, PADDED, 0.8, [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]),
    "mask_1": (
        torch.tensor([[0.1, 0.2, 0.3, 1.4, 0.5, 0.14], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]),
        torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]),
        0.8,
        [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]],
    ),
    "lower_threshold": (ENTROPIES, PADDED, 0.5, [[0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 0, 0]]),
    "threshold_0": (ENTROPIES, PADDED, 0.0, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    "threshold_1": (ENTROPIES, PADDED, 1.0, [[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]),
    "all_masked": (ENTROPIES, torch.zeros(2, 6, dtype=torch.long), 0.5, [[0] * 6, [0] * 6]),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trls_own_get_high_entropy_mask_tests_pass_with_the_class_swapped(case):
    entropies, mask, threshold, expected = TRL_CASES[case]
    got = trl_style_call(ForkingGRPOTrainer, entropies, mask, threshold)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.bool))
    torch.testing.assert_close(got, trl_style_call(GRPOTrainer, entropies, mask, threshold))


def test_get_high_entropy_mask_outside_compute_loss_is_trls_on_a_real_trainer(tiny_model_dir, prompt_dataset, tmp_path):
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to="none", use_cpu=True
    )
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
        train_dataset=prompt_dataset,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for rows, cols, threshold in [(3, 7, 0.8), (5, 2, 0.5), (1, 9, 0.25)]:
        entropies = torch.rand(rows, cols, generator=generator)
        mask = (torch.rand(rows, cols, generator=generator) > 0.3).long()
        got = trainer.get_high_entropy_mask(entropies, mask, threshold)
        assert got.dtype == torch.bool
        assert torch.equal(got, GRPOTrainer.get_high_entropy_mask(trainer, entropies, mask, threshold))


# --- the TRL internals ForkingGRPOTrainer relies on -----------------------------------------------------------------


def _source(function) -> str:
    return re.sub(r"\s+", " ", inspect.getsource(function))


def _require(function, fragment: str, why: str) -> None:
    assert re.sub(r"\s+", " ", fragment) in _source(function), (
        f"TRL {trl.__version__} changed {function.__qualname__}: it no longer contains {fragment!r}. "
        f"ForkingGRPOTrainer relies on it: {why}"
    )


def test_trl_is_the_version_the_trainer_was_written_against():
    assert trl.__version__.startswith("1.16."), (
        f"trl {trl.__version__}: ForkingGRPOTrainer is tested against TRL 1.16 (pyproject pins it); re-check the "
        "contract tests below before widening the pin."
    )


def test_the_hook_keeps_its_signature():
    assert list(inspect.signature(GRPOTrainer.get_high_entropy_mask).parameters) == [
        "self",
        "entropies",
        "mask",
        "threshold",
    ]
    parameters = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert {"model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy"} <= set(
        parameters
    )


def test_the_loss_multiplies_its_policy_term_by_the_hooks_weights():
    loss = GRPOTrainer._compute_loss
    why = "the forking weights enter TRL's loss only through this hook"
    _require(loss, "if self.top_entropy_quantile < 1.0:", why)
    _require(loss, "self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)", why)
    _require(loss, "per_token_loss = per_token_loss * entropy_mask", why)
    _require(loss, "effective_mask = mask if entropy_mask is None else mask * entropy_mask", "the bonus correction")


@pytest.mark.parametrize(
    ("fragment", "why"),
    [
        (
            "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
            "grpo / sapo: per-sequence token means (the n_i / s_i ratio)",
        ),
        ("loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)", "bnpo: micro-batch token mean"),
        (
            'normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes',
            "dapo / cispo / vespo: the generation batch's tokens per rank",
        ),
        (
            "normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation",
            "dapo / cispo / vespo: scaled to one optimizer step",
        ),
        (
            "loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)",
            "dr_grpo: no token count",
        ),
        ("loss = (per_token_loss * mask).sum(-1).mean()", "luspo: no token count"),
    ],
)
def test_the_loss_denominators_are_those_the_ratios_assume(fragment, why):
    _require(GRPOTrainer._compute_loss, fragment, why)


def test_the_old_log_prob_pass_is_the_first_policy_forward_of_a_generation_batch():
    why = "scope 'step' reads the generation policy's entropies from this pass instead of running another forward"
    generate = GRPOTrainer._generate_and_score_completions
    _require(generate, "if self.args.gradient_accumulation_steps % generate_every != 0 or (", why)
    _require(generate, "old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies( self.model,", why)
    _require(
        GRPOTrainer._prepare_inputs,
        "inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]",
        "the micro-step -> micro-batch map that groups micro-batches into optimizer steps",
    )


def test_the_entropy_bonus_state_the_correction_reads_exists(tiny_model_dir, prompt_dataset, tmp_path):
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to="none", use_cpu=True,
        use_adaptive_entropy=True,
    )  # fmt: skip
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
        train_dataset=prompt_dataset,
    )  # fmt: skip
    for name in ("_entropy_bonus_enabled", "use_adaptive_entropy", "_last_world_entropy", "_entropy_window_stats"):
        assert hasattr(trainer, name), f"TRL {trl.__version__} no longer has GRPOTrainer.{name}"
    _require(
        GRPOTrainer._compute_loss,
        "apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0",
        "ForkingGRPOTrainer._entropy_bonus_coef mirrors this gate",
    )
    _require(
        GRPOTrainer._compute_loss,
        "stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()",
        "the adaptive controller's window is pre-corrected by the difference of these statistics",
    )


def test_with_liger_kernels_the_loss_still_goes_through_the_hook(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch):
    # Canary: an older TRL's Liger loss ignored top_entropy_quantile altogether. TRL 1.16 applies only Liger's layer
    # kernels (which need a GPU; stubbed here, recording the config it is asked for) and refuses the fused linear
    # cross-entropy; the policy gradient must still be weighted by our hook.
    import transformers.trainer
    from fixed_batch import scripted_generate

    applied = []
    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", lambda model, config: applied.append(config))
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    common = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, use_liger_kernel=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        ForkingGRPOTrainer(
            model=tiny_model_dir, reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
            args=ForkingGRPOConfig(**common, liger_kernel_config={"fused_linear_cross_entropy": True}),
            train_dataset=prompt_dataset,
        )  # fmt: skip
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=lambda completions, **k: [float(len(set(c))) for c in completions],
        args=ForkingGRPOConfig(**common), train_dataset=prompt_dataset,
    )  # fmt: skip
    weights = []
    original = trainer._policy_gradient_weights
    trainer._policy_gradient_weights = lambda *a: weights.append(original(*a)) or weights[-1]
    trainer.train()
    assert applied and all(config.get("fused_linear_cross_entropy") is False for config in applied)
    assert weights and 0 < int((weights[0] > 0).sum()) < weights[0].numel()  # a top-rho share, weighted by us
