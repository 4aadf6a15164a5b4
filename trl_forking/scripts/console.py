"""What a training run prints: one short line per logging step instead of transformers' ~1,500-character dict, and the
known-noise warnings of the recipe scripts silenced.

The line keeps the figures a user watches, under the names they have in ``trainer_state.json`` and the trackers
(``forking/threshold`` shows as ``threshold``, ``rewards/<func>/mean`` as ``<func>``)::

    step 10/100  reward 0.0468  math_accuracy_reward 0.000  numeric_closeness_reward 0.047  frac_reward_zero_std 0.00
    threshold 6.221  selected_fraction 0.2005  entropy_p50 6.220  entropy_p95 6.222  step_time 0.19s

(one line on the console: the demo's 10th step). Every metric still goes to ``trainer_state.json`` and
``report_to``; only the printing changes. The library never calls ``quiet_known_noise``: the scripts do.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

from transformers import PrinterCallback, ProgressCallback

__all__ = [
    "CompactPrinterCallback",
    "CompactProgressCallback",
    "format_log",
    "quiet_deepspeed_accelerator_notice",
    "quiet_known_noise",
    "use_compact_log",
]

# (logged name, label, format): the order of the line. Reward components are added between reward and the rest.
FIELDS = (
    ("reward", "reward", "{:.4f}"),
    ("frac_reward_zero_std", "frac_reward_zero_std", "{:.2f}"),
    ("forking/threshold", "threshold", "{:.3f}"),
    ("forking/selected_fraction", "selected_fraction", "{:.4f}"),
    ("forking/entropy_p50", "entropy_p50", "{:.3f}"),
    ("forking/entropy_p95", "entropy_p95", "{:.3f}"),
    ("step_time", "step_time", "{:.2f}s"),
)


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _reward_components(logs: dict, prefix: str) -> list[tuple[str, str, str]]:
    """Returns the fields of the per-function reward means, when there are several functions (one equals reward)."""
    names = [k for k in logs if k.startswith(f"{prefix}rewards/") and k.endswith("/mean")]
    if len(names) < 2:
        return []
    return [(name[len(prefix) :], name[len(prefix) + len("rewards/") : -len("/mean")], "{:.3f}") for name in names]


def format_log(logs: dict, step: int, max_steps: int) -> str:
    """Returns the one console line of a ``logs`` dict that the trainer reports at ``step`` of ``max_steps``.

    Training logs give the ``FIELDS`` that are present (and the reward of each function when there are several);
    evaluation logs (``eval_*`` keys) the same figures after ``eval``; the end-of-training summary its runtime; any
    other dict all its numbers, so that nothing a callback logs goes unseen.
    """
    if "train_runtime" in logs:
        loss = _number(logs.get("train_loss"))
        return f"done: {step} step{'s' * (step != 1)} in {float(logs['train_runtime']):.1f} s" + (
            f", mean loss {loss:.4g}" if loss is not None else ""
        )
    prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
    fields = list(FIELDS[:1]) + _reward_components(logs, prefix) + list(FIELDS[1:])
    parts = []
    for name, label, fmt in fields:
        value = _number(logs.get(prefix + name))
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    if not parts:
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos"]
    head = f"{'eval ' if prefix else ''}step {step}/{max_steps}"
    return "  ".join([head, *parts])


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, writing ``format_log``'s line for each log instead of the whole dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state.global_step, state.max_steps))


class CompactPrinterCallback(PrinterCallback):
    """transformers' printer (``disable_tqdm``), printing ``format_log``'s line instead of the whole dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_log(logs, state.global_step, state.max_steps))


def use_compact_log(trainer):
    """Returns ``trainer`` after swapping its ``ProgressCallback`` / ``PrinterCallback`` for the compact ones."""
    for default, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        if trainer.pop_callback(default) is not None:
            trainer.add_callback(compact)
    return trainer


def quiet_known_noise() -> None:
    """Silences warnings that say nothing about the user's run; the recipe scripts call it before anything loads."""
    # TRL 1.16 still calls `gradient_checkpointing` / `is_gradient_checkpointing`, renamed in transformers 5: a
    # FutureWarning about TRL's code, repeated at every parse and every training start, whatever the user sets.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
    # DeepSpeed 0.19's ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, deprecated in
    # torch 2.13: a FutureWarning on every rank about DeepSpeed's code.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    if int(os.environ.get("LOCAL_RANK") or 0) > 0:
        # DeepSpeed's accelerator detection logs "Setting accelerator to CPU" in every process; the node's first rank
        # still shows it once (it matters on a GPU machine whose CUDA failed), the other ranks only repeat it.
        quiet_deepspeed_accelerator_notice()


def quiet_deepspeed_accelerator_notice() -> None:
    """Drops DeepSpeed's "Setting accelerator to CPU" log line in this process (for processes other than a run's
    first, where it only repeats what the first said)."""
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
    )
