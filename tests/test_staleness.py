"""Scope "step" with several optimizer steps per rollout: the mask of a later step is the rollout policy's unless
``forking_refresh_entropies`` re-selects it on the current one, and ``forking/mask_overlap_current`` says how far
apart the two are."""

from fixed_batch import OFFLINE_CPU, distinct_tokens_reward, scripted_generate
from trl import GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

STEPS_PER_ROLLOUT = 4


def train(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, **overrides):
    """Returns (trainer, per-step overlaps, extra entropy forwards) of one rollout trained in 4 optimizer steps."""
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        steps_per_generation=STEPS_PER_ROLLOUT,
        num_generations=4,
        max_completion_length=12,
        max_steps=STEPS_PER_ROLLOUT,
        learning_rate=3e-2,  # a policy that moves within one rollout
        logging_steps=1,
        **OFFLINE_CPU,
        **overrides,
    )
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=distinct_tokens_reward, args=args, train_dataset=prompt_dataset
    )
    calls = []
    original = trainer._entropy_forward
    trainer._entropy_forward = lambda batch: calls.append(1) or original(batch)
    trainer.train()
    overlaps = [e.get("forking/mask_overlap_current") for e in trainer.state.log_history if "forking/threshold" in e]
    return trainer, overlaps, len(calls)


def test_a_later_step_of_a_rollout_selects_on_older_entropies_and_the_overlap_shows_it(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    _, overlaps, extra = train(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch)
    assert len(overlaps) == STEPS_PER_ROLLOUT
    # Step 1 trains the weights that generated the rollout: nothing stale to measure.
    assert overlaps[0] is None
    # Later steps select on entropies one or more updates old; the metric is a share and moves off 1.
    assert all(0.0 <= value <= 1.0 for value in overlaps[1:]) and min(overlaps[1:]) < 1.0
    # The selection's entropies came with TRL's old-log-prob pass (spg > GA); the current ones, which the compact
    # head does not compute, cost one no-grad forward per logged stale step.
    assert extra == STEPS_PER_ROLLOUT - 1


def test_with_the_full_head_the_overlap_costs_no_forward(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch):
    _, overlaps, extra = train(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, forking_compact_lm_head=False)
    assert overlaps[0] is None and all(0.0 <= value <= 1.0 for value in overlaps[1:])
    assert extra == 0  # the training forward's own entropies


def test_refreshing_reselects_every_later_step_on_the_current_policy(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    stale, _, _ = train(tiny_model_dir, prompt_dataset, tmp_path / "stale", monkeypatch)
    trainer, overlaps, extra = train(
        tiny_model_dir, prompt_dataset, tmp_path / "fresh", monkeypatch, forking_refresh_entropies=True
    )
    assert overlaps == [None] * STEPS_PER_ROLLOUT  # no step trains a mask an older policy chose
    assert extra == STEPS_PER_ROLLOUT - 1  # one no-grad forward per step after the first of the rollout

    def logged(run, name):
        return [e[name] for e in run.state.log_history if "forking/threshold" in e]

    # The same rollout, so the same counts (exactly ceil(rho * N) per step) and denominators; other tokens.
    assert logged(trainer, "forking/selected_fraction") == logged(stale, "forking/selected_fraction")
    assert logged(trainer, "forking/threshold")[1:] != logged(stale, "forking/threshold")[1:]


def test_refreshing_is_a_no_op_where_every_step_has_its_own_rollout(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # spg == GA: each step's entropies are already the current policy's.
    args = dict(steps_per_generation=1, forking_refresh_entropies=True)
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    config = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
        max_steps=2, report_to="none", save_strategy="no", use_cpu=True, bf16=False, **args,
    )  # fmt: skip
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=distinct_tokens_reward, args=config, train_dataset=prompt_dataset
    )
    assert not trainer._refreshes_entropies()
