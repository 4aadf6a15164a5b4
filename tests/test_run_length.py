"""The run length the recipe script announces and checks (``trl_forking.scripts.run_length``) against what TRL's
sampler and transformers' ``Trainer`` do: the step count of an epoch-based run, compared with transformers' own
count on the trainer's real dataloader over odd dataset sizes, accumulation, generation and iteration settings; and
the refusal of a run that would train no step."""

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer
from trl_forking.scripts.run_length import check_max_steps, check_run_length, epoch_steps, prompts_per_generation
from trl_forking.scripts.usage import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **fields) -> ForkingGRPOConfig:
    defaults = dict(output_dir=str(tmp_path), max_completion_length=4, report_to="none", use_cpu=True, bf16=False)
    return ForkingGRPOConfig(**{**defaults, **fields})


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    ("num_prompts", "fields"),
    [
        (16, dict(per_device_train_batch_size=8, num_generations=4, num_train_epochs=1)),
        (
            17,
            dict(per_device_train_batch_size=4, num_generations=2, gradient_accumulation_steps=2, num_train_epochs=1.5),
        ),
        (
            23,
            dict(per_device_train_batch_size=6, num_generations=3, gradient_accumulation_steps=2)
            | dict(steps_per_generation=3, num_iterations=2, num_train_epochs=2),
        ),
        (40, dict(per_device_train_batch_size=8, num_generations=8, steps_per_generation=4, num_train_epochs=0.5)),
        (9, dict(per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=3, num_iterations=3)),
    ],
)
def test_epoch_steps_are_what_transformers_counts_on_the_trainers_dataloader(
    tmp_path, tiny_model_dir, num_prompts, fields
):
    args = _args(tmp_path, max_steps=-1, **fields)
    dataset = Dataset.from_dict({"prompt": [f"{i} + 1 =" for i in range(num_prompts)]})
    trainer = ForkingGRPOTrainer(model=tiny_model_dir, reward_funcs=_reward, args=args, train_dataset=dataset)
    *_, max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    assert epoch_steps(num_prompts, args) == max_steps


def test_a_dataset_smaller_than_one_generation_batch_is_refused_naming_the_option(tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=10)
    assert prompts_per_generation(args) == 2
    assert check_run_length(2, args, "dataset_name", "'x.jsonl'") is None  # max_steps > 0: nothing to say
    with pytest.raises(UsageError, match=r"^max_train_samples: 'x.jsonl' has 1 prompt\(s\), fewer than one generation"):
        check_run_length(1, args, "max_train_samples", "'x.jsonl'")


def test_max_steps_zero_is_refused_and_a_negative_one_announces_the_epochs(tmp_path):
    with pytest.raises(UsageError, match=r"^max_steps: 0 would train no step"):
        check_max_steps(0)
    args = _args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=-3, num_train_epochs=2)
    notice = check_run_length(17, args, "dataset_name", "'x.jsonl'")
    assert notice.startswith("max_steps: -3 (<= 0) trains num_train_epochs = 2 epoch(s) of the 17 prompts: 16 ")


def test_the_script_announces_the_steps_an_epoch_based_run_then_trains(tmp_path, tiny_model_dir):
    argv = ["--model_name_or_path", tiny_model_dir, "--max_steps", "-3", "--num_train_epochs", "1"]
    argv += ["--max_train_samples", "12", "--per_device_train_batch_size", "8", "--num_generations", "4"]
    argv += ["--max_completion_length", "4", "--eval_num_samples", "0", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "grpo_forking.py"), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_steps: -3 (<= 0) trains num_train_epochs = 1 epoch(s) of the 12 prompts: 6 optimizer step(s)" in (
        done.stdout
    )
    with open(tmp_path / "out" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 6
