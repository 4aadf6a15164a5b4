"""Benchmark c: median time of a GRPO training step, ForkingGRPOTrainer (each scope) against TRL's GRPOTrainer.

Model: a random GPT-2 body (hidden 64, 2 layers) with Qwen3's vocabulary (151,936), so the LM head (where the
entropies come from) weighs as it does in real runs; the tokenizer is the package's tiny one (ids beyond it decode
to nothing, which does not matter for timing). Same seed, data and config for every run; the reward reads the
completion ids so that advantages are non-zero.

Two settings:
- ``no_old_logps``: steps_per_generation = gradient_accumulation_steps, num_iterations = 1, so TRL runs no no-grad
  forward; scope "step" adds one (its extra cost is reported);
- ``old_logps``: steps_per_generation = 2 * gradient_accumulation_steps, so TRL computes old log-probs in a no-grad
  forward and scope "step" takes the entropies from that same pass; ``forking_step_refresh`` re-selects the second
  step of each rollout on the current policy (``forking_refresh_entropies``: one no-grad forward per such step).

Step time: a callback records the wall time and the process CPU time of every optimizer step; after the warm-up
steps, steps are grouped into generation cycles (``steps_per_generation`` steps, one generation each) and the
median cycle time divided by the cycle length is reported, so that cycles with and without generation are not mixed
by the median. Every run is repeated in ``rounds`` round-robin passes (A B C .. A B C ..), so a slow spell of a
shared machine does not land on one run only. With one torch thread the CPU time is the steadier figure on a shared
machine (other processes do not inflate it), so the ratios use it; the wall times are reported beside it.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import tempfile
import time

import torch

__all__ = ["FULL", "QUICK", "VOCAB_SIZE", "run"]

VOCAB_SIZE = 151_936
# (name, trainer, config overrides): TRL's built-in selection at rho 0.2, TRL training on all tokens, our scopes.
RUNS = (
    ("trl_q0.2", "trl", {"top_entropy_quantile": 0.2}),
    ("trl_q1.0", "trl", {"top_entropy_quantile": 1.0}),
    ("forking_step", "forking", {"forking_scope": "step"}),
    ("forking_micro_batch", "forking", {"forking_scope": "micro_batch"}),
    ("forking_local", "forking", {"forking_scope": "local"}),
    ("forking_sequence", "forking", {"forking_scope": "sequence"}),
    ("forking_step_refresh", "forking", {"forking_scope": "step", "forking_refresh_entropies": True}),
)
SETTINGS = {"no_old_logps": 1, "old_logps": 2}  # steps_per_generation per gradient_accumulation_steps
# Methods in which each trainer selects tokens (for ours also the entropy forward and the metrics they call).
SELECTION_METHODS = {
    "trl": ("get_high_entropy_mask",),
    "forking": ("get_high_entropy_mask", "_select_generation_batch", "_entropy_forward"),
}
CLOCKS = ("wall", "cpu", "selection_wall", "selection_cpu")
FULL = {
    "runs": {
        "no_old_logps": [name for name, _, _ in RUNS if name != "forking_step_refresh"],
        "old_logps": ["trl_q0.2", "forking_step", "forking_step_refresh"],
    },
    "batch": 8,
    "completion_tokens": 32,
    "warmup_cycles": 1,
    "cycles": 2,
    "rounds": 2,
}
QUICK = {
    "runs": {"no_old_logps": ["trl_q0.2", "forking_step"]},
    "batch": 4,
    "completion_tokens": 4,
    "warmup_cycles": 0,
    "cycles": 1,
    "rounds": 1,
}


def ids_reward(completions, completion_ids=None, **kwargs):
    """Returns a reward per completion that varies within a group: the sum of its token ids modulo 7."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def build_model_dir(path: str) -> str:
    """Returns ``path`` after saving there a random GPT-2 (hidden 64, 2 layers) with vocabulary 151,936 and the
    package's tiny tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    from trl_forking.testing import build_tiny_model

    tiny = build_tiny_model()
    config = AutoConfig.from_pretrained(tiny)
    config.vocab_size = VOCAB_SIZE
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


class _Stopwatch:
    """Wraps methods of a class and adds up the (wall, CPU) seconds spent in them, outermost calls only."""

    def __init__(self, cls, names):
        self.seconds, self._depth, self._cls = [0.0, 0.0], 0, cls
        self._originals = {name: cls.__dict__[name] for name in names}
        for name, original in self._originals.items():
            setattr(cls, name, self._wrap(original))

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[0] += time.perf_counter() - wall
                self.seconds[1] += time.process_time() - cpu

        return timed

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(self._cls, name, original)


class _StepTimer:
    """A TrainerCallback that records, per optimizer step, (wall, CPU) seconds of the step and of the selection."""

    def __init__(self, stopwatch: _Stopwatch):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = (time.perf_counter(), time.process_time(), *stopwatch.seconds)

            def on_step_end(self, args, state, control, **kwargs):
                now = (time.perf_counter(), time.process_time(), *stopwatch.seconds)
                timer.seconds.append(tuple(b - a for a, b in zip(timer.start, now, strict=True)))

        self.seconds: list[tuple[float, ...]] = []
        self.callback = Callback()


def _train(model_dir: str, dataset, kind: str, overrides: dict, spg: int, plan: dict, out_dir: str) -> list[tuple]:
    """Returns, for every step of one training run, its seconds on each of ``CLOCKS``."""
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

    config_class, trainer_class = (
        (GRPOConfig, GRPOTrainer) if kind == "trl" else (ForkingGRPOConfig, ForkingGRPOTrainer)
    )
    args = config_class(
        output_dir=out_dir,
        per_device_train_batch_size=plan["batch"],
        num_generations=4,
        steps_per_generation=spg,
        max_completion_length=plan["completion_tokens"],
        max_steps=(plan["warmup_cycles"] + plan["cycles"]) * spg,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        **overrides,
    )
    stopwatch = _Stopwatch(trainer_class, SELECTION_METHODS[kind])
    try:
        timer = _StepTimer(stopwatch)
        trainer = trainer_class(model=model_dir, reward_funcs=ids_reward, args=args, train_dataset=dataset)
        trainer.add_callback(timer.callback)
        trainer.remove_callback(PrinterCallback)  # the per-step log dicts would drown the benchmark's own output
        trainer.train()
    finally:
        stopwatch.restore()
    return timer.seconds


def _cycle_times(seconds: list[tuple], spg: int, warmup_cycles: int) -> list[tuple[float, ...]]:
    """Returns the seconds per step on each of ``CLOCKS``, averaged over each generation cycle after the warm-up."""
    kept = seconds[warmup_cycles * spg :]
    return [
        tuple(sum(step[i] for step in kept[j : j + spg]) / spg for i in range(len(CLOCKS)))
        for j in range(0, len(kept), spg)
    ]


def run(plan=FULL, log=print) -> dict:
    """Returns {clock: {setting: {run name: median seconds per step}}} for each of ``CLOCKS``, the spread
    {clock: {setting: {run name: (min, max)}}} over cycles, and the plan it ran."""
    from datasets import Dataset

    for name in ("transformers", "trl", "trl_forking"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "disabled")
    runs = {name: (kind, overrides) for name, kind, overrides in RUNS}
    dataset = Dataset.from_dict({"prompt": [f"What is {a} + {a + 3}? Answer:" for a in range(256)]})
    cycles = {setting: {name: [] for name in names} for setting, names in plan["runs"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"))
        for round_index in range(plan["rounds"]):
            for setting, names in plan["runs"].items():
                spg = SETTINGS[setting]
                for name in names:
                    kind, overrides = runs[name]
                    out_dir = os.path.join(tmp, f"{setting}-{name}-{round_index}")
                    seconds = _train(model_dir, dataset, kind, overrides, spg, plan, out_dir)
                    cycles[setting][name] += _cycle_times(seconds, spg, plan["warmup_cycles"])
                    wall, cpu, _, selection_cpu = cycles[setting][name][-1]
                    log(
                        f"  c. round {round_index} {setting:12s} {name:20s} {wall:.3f} s/step wall, {cpu:.3f} CPU, "
                        f"selection {selection_cpu:.3f} CPU"
                    )

    def summary(reduce):
        return {
            clock: {
                setting: {name: reduce([c[i] for c in times]) for name, times in by_name.items()}
                for setting, by_name in cycles.items()
            }
            for i, clock in enumerate(CLOCKS)
        }

    return {
        "seconds_per_step": summary(statistics.median),
        "spread": summary(lambda values: (min(values), max(values))),
        "plan": {k: v for k, v in plan.items() if k != "runs"},
    }
