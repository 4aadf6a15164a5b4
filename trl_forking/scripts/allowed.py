"""The allowed values of the scripts' options, one table per script, checked as soon as the command line is parsed.

argparse checks types and ``choices``; the dataclasses of TRL and transformers check some values when they are built,
others only when training meets them (a traceback from the optimizer, from ``generate``, or minutes into the run), and
some never (a negative KL coefficient trains). An ``Allowed`` names an option, what it may hold and what the value
means; ``RecipeParser(..., allowed=...)`` checks every one against the parsed values before any dataclass is built, so
the first bad value ends the script with one line:

    temperature: 0.0 is not allowed; use a number > 0 (the rollouts' sampling temperature)

Numbers must also be finite (NaN and infinity are refused); a list option is checked element by element.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "GRPO_OPTIONS",
    "MODEL_OPTIONS",
    "SEED_RANGE",
    "Allowed",
    "above",
    "at_least",
    "between",
    "one_of",
    "problem",
    "report_to_names",
    "seed_value",
]

SEED_RANGE = (0, 2**32 - 1)  # numpy's seed range, which transformers' set_seed passes every seed to


@dataclass(frozen=True)
class Allowed:
    """What option ``name`` may hold: a number in ``[low, high]`` (``open_low`` / ``open_high`` exclude the ends;
    None: no bound) or one of ``choices``; None as well when ``unset`` says what None means."""

    name: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()
    unset: str | None = None
    meaning: str = ""
    integer: bool = False

    def describe(self) -> str:
        """Returns the allowed values in words: ``a number > 0``, ``an integer in [1, 65535]``, ``one of 'a', 'b'``."""
        kind = "an integer" if self.integer else "a number"
        if self.choices:
            text = "one of " + ", ".join(repr(choice) for choice in self.choices)
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.open_low else '>='} {_number(self.low)}"
        else:
            text = f"{kind} {'<' if self.open_high else '<='} {_number(self.high)}"
        return text + (f", or unset: {self.unset}" if self.unset else "")

    def accepts(self, value) -> bool:
        """Returns whether ``value`` (one element of a list option) is allowed."""
        if value is None:
            return self.unset is not None
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        above_low = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below_high = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above_low and below_high

    def message(self, value) -> str:
        """Returns the one line that refuses ``value``: the option, the value and what is allowed."""
        meaning = f" ({self.meaning})" if self.meaning else ""
        return f"{self.name}: {value!r} is not allowed; use {self.describe()}{meaning}"

    def argparse_type(self, kind: type = float):
        """Returns an argparse ``type`` that converts a string with ``kind`` and refuses what is not allowed, naming
        the option (argparse prefixes ``argument --name:``)."""

        rule = replace(self, integer=kind is int)

        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not allowed; use {rule.describe()}") from None
            if not rule.accepts(value):
                raise argparse.ArgumentTypeError(rule.message(value).split(": ", 1)[1])
            return value

        return parse


def _number(bound: float) -> str:
    """Returns ``bound`` as written in a message: ``4294967295``, ``0.5``, ``1``."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def at_least(name: str, low: float, meaning: str = "", unset: str | None = None) -> Allowed:
    return Allowed(name, low=low, meaning=meaning, unset=unset)


def above(name: str, low: float, meaning: str = "", unset: str | None = None) -> Allowed:
    return Allowed(name, low=low, open_low=True, meaning=meaning, unset=unset)


def between(name: str, interval: str, meaning: str = "", unset: str | None = None) -> Allowed:
    """``interval`` as written in mathematics: ``"(0, 1]"``, ``"[1, 65535]"``."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    return Allowed(name, low, high, interval[0] == "(", interval[-1] == ")", meaning=meaning, unset=unset)


def one_of(name: str, choices: Iterable, meaning: str = "") -> Allowed:
    return Allowed(name, choices=tuple(choices), meaning=meaning)


def seed_value(name: str, unset: str | None = None) -> Allowed:
    """A seed: an integer in ``SEED_RANGE``."""
    return Allowed(name, *SEED_RANGE, unset=unset, integer=True)


def problem(allowed: Iterable[Allowed], values: dict) -> tuple[str, str] | None:
    """Returns ``(name, message)`` for the first option of ``allowed`` whose value in ``values`` (a mapping of name
    to parsed value; a list is checked element by element) is not allowed, or None when every one is."""
    for rule in allowed:
        if rule.name not in values:
            continue
        value = values[rule.name]
        for element in value if isinstance(value, (list, tuple)) else [value]:
            if not rule.accepts(element):
                return rule.name, rule.message(element)
    return None


def report_to_names() -> tuple[str, ...]:
    """Returns the values ``report_to`` takes: transformers' integrations, ``all`` and ``none``."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("all", "none", *INTEGRATION_TO_CALLBACK)


# Options of TRL's GRPOConfig / transformers' TrainingArguments that the recipes set or that TRL only checks when
# training meets them; the forking options check themselves (ForkingOptions), and so do the rest.
GRPO_OPTIONS = (
    # sampling of the rollouts
    above("temperature", 0, "the rollouts' sampling temperature"),
    between("top_p", "(0, 1]", "nucleus sampling; 1 turns it off"),
    at_least("top_k", 0, "0 turns top-k sampling off"),
    between("min_p", "[0, 1]", unset="no min-p sampling"),
    above("repetition_penalty", 0, "1 turns it off"),
    at_least("num_generations", 2, "completions per prompt: a group's advantages need at least 2"),
    at_least("max_completion_length", 1, "tokens per completion"),
    # the loss
    at_least("beta", 0, "the KL coefficient; 0 turns the KL term off"),
    at_least("epsilon", 0, "the clip range below: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"),
    at_least("epsilon_high", 0, "the clip range above, DAPO's clip-higher", unset="the same as epsilon"),
    above("delta", 1, "two-sided clipping's upper bound on the ratio", unset="no two-sided clipping"),
    one_of("scale_rewards", ("group", "batch", "none", True, False), "how advantages are scaled by the std"),
    one_of("importance_sampling_level", ("token", "sequence")),
    one_of("multi_objective_aggregation", ("sum_then_normalize", "normalize_then_sum")),
    at_least("num_iterations", 1, "optimizer passes over each generation batch"),
    # batches and steps
    at_least("per_device_train_batch_size", 1, "completions per device per micro-batch"),
    at_least("gradient_accumulation_steps", 1),
    at_least("steps_per_generation", 1, unset="the same as gradient_accumulation_steps"),
    at_least("generation_batch_size", 1, unset="derived from steps_per_generation"),
    above("num_train_epochs", 0),
    above("logging_steps", 0, "a fraction below 1 is a share of the run's steps"),
    above("save_steps", 0, "a fraction below 1 is a share of the run's steps"),
    at_least("save_total_limit", 1, unset="every checkpoint is kept"),
    at_least("warmup_steps", 0, "a fraction below 1 is a share of the run's steps"),
    at_least("dataloader_num_workers", 0, "0 loads in the main process"),
    # the optimizer
    at_least("learning_rate", 0),
    at_least("weight_decay", 0),
    at_least("max_grad_norm", 0, "0 turns gradient clipping off"),
    between("adam_beta1", "[0, 1)"),
    between("adam_beta2", "[0, 1)"),
    at_least("adam_epsilon", 0),
    seed_value("seed"),
    seed_value("data_seed", unset="the seed"),
    # vLLM
    one_of("vllm_mode", ("colocate", "server")),
    one_of("vllm_importance_sampling_mode", ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")),
    between("vllm_server_port", "[1, 65535]"),
    between("vllm_group_port", "[1, 65535]"),
    above("vllm_server_timeout", 0, "seconds to wait for the server"),
    between("vllm_gpu_memory_utilization", "(0, 1]"),
    at_least("vllm_tensor_parallel_size", 1),
)

# TRL's ModelConfig: the LoRA adapter's shape.
MODEL_OPTIONS = (
    at_least("lora_r", 1, "the adapters' rank"),
    above("lora_alpha", 0),
    between("lora_dropout", "[0, 1)"),
)
