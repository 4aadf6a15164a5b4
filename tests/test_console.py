"""The console log: one short line per log, under the logged names, and transformers' printing swapped for it."""

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from trl_forking.scripts.console import CompactPrinterCallback, CompactProgressCallback, format_log, use_compact_log

# One logging step as GRPOTrainer reports it with two reward functions (abridged: 35 keys in all).
LOGS = {
    "loss": 0.07142,
    "grad_norm": 1.231,
    "completions/mean_length": 23.05,
    "rewards/math_accuracy_reward/mean": 0.0,
    "rewards/math_accuracy_reward/std": 0.0,
    "rewards/numeric_closeness_reward/mean": 0.04358,
    "reward": 0.04358,
    "reward_std": 0.06178,
    "frac_reward_zero_std": 0.25,
    "forking/threshold": 6.225,
    "forking/selected_fraction": 0.2005,
    "forking/entropy_selected_mean": 6.226,
    "forking/entropy_p50": 6.2251,
    "forking/entropy_p80": 6.225,
    "forking/entropy_p95": 6.2262,
    "entropy": 6.225,
    "step_time": 0.2485,
    "epoch": 0.02,
}


def test_a_training_log_is_one_line_of_the_watched_figures_under_their_logged_names():
    line = format_log(LOGS, 10, 100)
    assert line == (
        "step 10/100  reward 0.0436  math_accuracy_reward 0.000  numeric_closeness_reward 0.044  "
        "frac_reward_zero_std 0.25  threshold 6.225  selected_fraction 0.2005  entropy_p50 6.225  "
        "entropy_p95 6.226  step_time 0.25s"
    )


def test_one_reward_function_is_not_repeated_and_missing_figures_are_left_out():
    logs = {"reward": 1.0, "rewards/dapo_accuracy_reward/mean": 1.0, "forking/threshold": float("nan")}
    assert format_log(logs, 3, 5) == "step 3/5  reward 1.0000"


def test_evaluation_end_of_training_and_unknown_logs():
    assert format_log({"eval_reward": 0.5, "eval_forking/entropy_p50": 1.0}, 8, 9) == (
        "eval step 8/9  reward 0.5000  entropy_p50 1.000"
    )
    assert format_log({"train_runtime": 25.04, "train_loss": 0.0459, "epoch": 1.0}, 100, 100) == (
        "done: 100 steps in 25.0 s, mean loss 0.0459"
    )
    # Whatever else a callback logs is shown, not dropped.
    assert format_log({"my_metric": 0.123456, "total_flos": 1.0}, 1, 2) == "step 1/2  my_metric 0.1235"


class _Trainer:
    """The two methods of transformers.Trainer that use_compact_log calls."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def pop_callback(self, cls):
        for callback in self.callbacks:
            if isinstance(callback, cls):
                self.callbacks.remove(callback)
                return callback
        return None

    def add_callback(self, cls):
        self.callbacks.append(cls())


def test_use_compact_log_swaps_transformers_printing_and_keeps_the_other_callbacks():
    other = TrainerCallback()
    trainer = use_compact_log(_Trainer([other, ProgressCallback()]))
    assert [type(c) for c in trainer.callbacks] == [TrainerCallback, CompactProgressCallback]
    trainer = use_compact_log(_Trainer([PrinterCallback()]))  # disable_tqdm
    assert [type(c) for c in trainer.callbacks] == [CompactPrinterCallback]
