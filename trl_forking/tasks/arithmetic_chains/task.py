"""The bundled reasoning task: chains of two-digit additions and subtractions, solved one step per line.

A problem is a start number and three operations, all two-digit, every running total in [10, 99], no carries or
borrows::

    prompt:     Compute 59 - 14 - 22 - 11 step by step.
    completion: 59 - 14 = 45
                45 - 22 = 23
                23 - 11 = 12
                Answer: 12

With digits one per token (as in Qwen's tokenizer and this package's ``base_model``), a worked solution is 39 tokens
(EOS included), and all but the six result digits are fixed by what came before: operands copied from the prompt or
the line above, operators, ``=``, line breaks, ``Answer:`` and its number. The six result digits are the decisions:
where a model's entropy is high and a wrong token makes the answer wrong. Every number has two digits, so every
solution has the same layout, and without carries each result digit is the sum or difference of the two digits above
it: a 0.18M-parameter model learns the task in about a minute of CPU. ``docs/task.md`` explains the choice.

The splits are files in the package (``data/{train,validation,test}.jsonl`` next to this module), written by
``write_splits`` from ``make_splits(seed=0)``: no problem (its expression) is in two splits. Each row has ``id``,
``problem`` (the expression), ``prompt`` (one user message, ``PROMPT_TEMPLATE``), ``completion`` (the worked solution)
and ``solution`` (the answer), the columns TRL's ``GRPOTrainer`` and ``SFTTrainer`` and ``trl_forking.rewards`` read.
``python -m trl_forking.tasks.arithmetic_chains.task`` rewrites the files.
"""

from __future__ import annotations

import json
import os
import random

__all__ = [
    "NUM_OPERATIONS",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "SPLIT_SIZES",
    "TASK_DIR",
    "TASK_NAME",
    "format_prompt",
    "generate_problems",
    "load_task",
    "make_splits",
    "read_split",
    "split_path",
    "worked_solution",
    "write_splits",
]

TASK_NAME = "arithmetic-chains"
TASK_DIR = os.path.join(os.path.dirname(__file__), "data")
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 8000, "validation": 200, "test": 200}
DEFAULT_SEED = 0
NUM_OPERATIONS = 3
# Every number of a problem (start, operands, running totals) is two-digit: one layout for every solution.
LOW, HIGH = 10, 99
# The one prompt: training, the demo's before/after evaluation and ``trl-forking evaluate`` all pose problems this way.
PROMPT_TEMPLATE = "Compute {expression} step by step."


def format_prompt(expression: str) -> list[dict[str, str]]:
    """Returns the conversational prompt of ``expression``: one user message, ``PROMPT_TEMPLATE`` filled in."""
    return [{"role": "user", "content": PROMPT_TEMPLATE.format(expression=expression)}]


def worked_solution(start: int, operations: list[tuple[str, int]]) -> tuple[str, int]:
    """Returns ``(completion, answer)``: one line ``a op b = c`` per operation, then ``Answer: <answer>``."""
    lines, total = [], start
    for op, operand in operations:
        if op not in ("+", "-"):
            raise ValueError(f"operations: operator {op!r} is not allowed; use '+' or '-'.")
        result = total + operand if op == "+" else total - operand
        lines.append(f"{total} {op} {operand} = {result}")
        total = result
    lines.append(f"Answer: {total}")
    return "\n".join(lines), total


def _random_problem(rng: random.Random, num_operations: int) -> tuple[int, list[tuple[str, int]]]:
    """Returns a start and ``num_operations`` operations with two-digit numbers and no carry or borrow.

    The start is uniform in [10, 99]. Each step picks + or - uniformly among those possible from the running total
    ``10 t + u``, then the operand ``10 b_t + b_u`` digit by digit: for +, ``b_t`` in [1, 9 - t] and ``b_u`` in
    [0, 9 - u]; for -, ``b_t`` in [1, t - 1] and ``b_u`` in [0, u]. Every number stays two-digit and each result
    digit is the sum or difference of the two digits above it.
    """
    total = rng.randint(LOW, HIGH)
    start, operations = total, []
    for _ in range(num_operations):
        tens, units = divmod(total, 10)
        op = rng.choice([op for op, ok in (("+", tens <= 8), ("-", tens >= 2)) if ok])
        if op == "+":
            operand = 10 * rng.randint(1, 9 - tens) + rng.randint(0, 9 - units)
        else:
            operand = 10 * rng.randint(1, tens - 1) + rng.randint(0, units)
        operations.append((op, operand))
        total = total + operand if op == "+" else total - operand
    return start, operations


def generate_problems(num_problems: int, seed: int = DEFAULT_SEED, num_operations: int = NUM_OPERATIONS) -> list[dict]:
    """Returns ``num_problems`` distinct problems as ``{"problem", "completion", "solution"}`` dicts, in order.

    ``problem`` is the expression (``"63 + 18 - 35 - 25"``), ``completion`` its worked solution, ``solution`` the
    answer as a string. Deterministic in ``seed`` (Python's ``random.Random``); a repeated expression is drawn again.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems: {num_problems} is not allowed; use an integer >= 0.")
    if num_operations < 1:
        raise ValueError(f"num_operations: {num_operations} is not allowed; use an integer >= 1.")
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < num_problems:
        start, operations = _random_problem(rng, num_operations)
        expression = " ".join([str(start), *(f"{op} {operand}" for op, operand in operations)])
        if expression in seen:
            continue
        seen.add(expression)
        completion, answer = worked_solution(start, operations)
        problems.append({"problem": expression, "completion": completion, "solution": str(answer)})
    return problems


def make_splits(seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Returns the rows of each split: ``{"train": [...], "validation": [...], "test": [...]}``.

    One stream of distinct problems is cut in the order test, validation, train, so no problem is in two splits and a
    larger train split leaves the test split as it is. Rows are ``{"id", "problem", "prompt", "completion",
    "solution"}`` with ``id`` = ``"<split>-<index>"``.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"sizes: unknown split {unknown}; allowed: {list(SPLITS)}.")
    order = ("test", "validation", "train")
    problems = generate_problems(sum(sizes.get(s, 0) for s in order), seed)
    splits, start = {}, 0
    for split in order:
        chunk = problems[start : start + sizes.get(split, 0)]
        start += len(chunk)
        splits[split] = [
            {"id": f"{split}-{i:05d}", "problem": p["problem"], "prompt": format_prompt(p["problem"]), **p}
            for i, p in enumerate(chunk)
        ]
    return {split: splits[split] for split in SPLITS}


def split_path(split: str, directory: str = TASK_DIR) -> str:
    """Returns the path of one split's JSONL file; ``split`` is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not allowed; use one of {list(SPLITS)}.")
    return os.path.join(directory, f"{split}.jsonl")


def write_splits(directory: str = TASK_DIR, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None) -> str:
    """Returns ``directory`` after writing ``make_splits(seed, sizes)`` there, one ``<split>.jsonl`` per split."""
    os.makedirs(directory, exist_ok=True)
    for split, rows in make_splits(seed, sizes).items():
        with open(split_path(split, directory), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return directory


def read_split(split: str = "train", directory: str = TASK_DIR) -> list[dict]:
    """Returns the rows of one bundled split as dicts (``id``, ``problem``, ``prompt``, ``completion``,
    ``solution``), read from its JSONL file in order."""
    with open(split_path(split, directory), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(split: str = "train", directory: str = TASK_DIR):
    """Returns one bundled split as a ``datasets.Dataset`` with ``id``, ``problem``, ``prompt``, ``completion`` and
    ``solution`` columns (``prompt`` a one-message conversation, ``completion`` the worked solution text)."""
    from datasets import Dataset

    return Dataset.from_list(read_split(split, directory))


if __name__ == "__main__":
    print(f"wrote {write_splits()}")
