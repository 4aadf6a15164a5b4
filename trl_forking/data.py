"""Math datasets in GRPO form: DAPO-Math-17k for training, AIME 2024 / 2025 for evaluation, and the bundled task.

Every loader returns a ``datasets.Dataset`` with a conversational ``prompt`` (one user message) and a ``solution``
string, the columns ``trl_forking.rewards`` and TRL's ``GRPOTrainer`` read; evaluation sets also keep ``problem``,
``answer`` and ``id``. A source is a Hub name (``BytedTsinghua-SIA/DAPO-Math-17k``) or a local file or folder with the
same columns (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, a saved dataset), so that everything runs offline. The
bundled task (``arithmetic-chains``, ``trl_forking.tasks.arithmetic_chains``) is the default training set and an
evaluation set.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

__all__ = [
    "DAPO_PROMPT_TEMPLATE",
    "EVAL_SETS",
    "load_dapo_math",
    "load_math_eval",
    "load_train_dataset",
    "to_dapo_format",
]

# DAPO-Math-17k's own instruction (its prompts carry it already); used to pose the evaluation problems the same way.
DAPO_PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class EvalSet:
    """Where an evaluation set lives on the Hub: repository, configs to concatenate, split, column names."""

    hub_name: str
    configs: tuple[str | None, ...]
    split: str
    problem_column: str
    answer_column: str


EVAL_SETS = {
    "aime24": EvalSet("HuggingFaceH4/aime_2024", (None,), "train", "problem", "answer"),
    "aime25": EvalSet("yentinglin/aime_2025", (None,), "train", "problem", "answer"),
    "aime25-opencompass": EvalSet("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test", "question", "answer"),
}
_EVAL_BY_HUB_NAME = {spec.hub_name: spec for spec in EVAL_SETS.values()}


def _load(name_or_path: str, config: str | None, split: str):
    """Returns one split of a dataset given by Hub name, local data file or local folder."""
    from datasets import load_dataset, load_from_disk

    if os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(
                f"dataset file {name_or_path!r}: extension {ext!r} not allowed; use {list(_FILE_BUILDERS)}."
            )
        return load_dataset(_FILE_BUILDERS[ext], data_files=name_or_path, split="train")
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_info.json")):
        dataset = load_from_disk(name_or_path)
        return dataset[split] if hasattr(dataset, "keys") else dataset
    return load_dataset(name_or_path, config, split=split)


def _user(content: str) -> list[dict[str, str]]:
    """Returns a one-message conversation, the prompt format GRPOTrainer applies the chat template to."""
    return [{"role": "user", "content": content}]


def to_dapo_format(dataset):
    """Returns ``dataset`` with columns ``prompt`` (conversation) and ``solution`` (gold answer string) only.

    Accepts the layouts of BytedTsinghua-SIA/DAPO-Math-17k (``prompt`` a list of messages, answer in
    ``reward_model.ground_truth``), open-r1/DAPO-Math-17k-Processed (``prompt`` the instruction string, ``solution``)
    and plain ``problem`` / ``answer`` tables (the problem is wrapped in DAPO's instruction).
    """
    columns = set(dataset.column_names)
    if {"prompt", "reward_model"} <= columns:

        def convert(row):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else _user(row["prompt"])
            return {"prompt": prompt, "solution": str(row["reward_model"]["ground_truth"])}

    elif {"prompt", "solution"} <= columns:

        def convert(row):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else _user(row["prompt"])
            return {"prompt": prompt, "solution": str(row["solution"])}

    elif {"problem", "answer"} <= columns or {"question", "answer"} <= columns:
        problem_column = "problem" if "problem" in columns else "question"

        def convert(row):
            return {
                "prompt": _user(DAPO_PROMPT_TEMPLATE.format(problem=row[problem_column])),
                "solution": str(row["answer"]),
            }

    else:
        raise ValueError(
            f"dataset columns {sorted(columns)} match no known layout; allowed: prompt + reward_model "
            "(BytedTsinghua-SIA/DAPO-Math-17k), prompt + solution (open-r1/DAPO-Math-17k-Processed), "
            "problem + answer, question + answer."
        )
    return dataset.map(convert, remove_columns=dataset.column_names)


def load_dapo_math(
    name_or_path: str = "BytedTsinghua-SIA/DAPO-Math-17k",
    config: str | None = None,
    split: str = "train",
    deduplicate: bool = True,
):
    """Returns DAPO-Math-17k as ``prompt`` / ``solution`` rows, each distinct prompt once if ``deduplicate``.

    The BytedTsinghua-SIA release repeats each of its ~17k problems about 100 times (1.79M rows); deduplicating keeps
    an epoch one pass over the problems, and ``num_train_epochs`` or ``max_steps`` sets how long to train. open-r1's
    processed copy is deduplicated already (configs ``all``, ``en``, ``cn``).
    """
    dataset = to_dapo_format(_load(name_or_path, config, split))
    if deduplicate:
        seen = set()

        def first_time(row) -> bool:
            key = hashlib.sha1(row["prompt"][-1]["content"].encode()).hexdigest()
            if key in seen:
                return False
            seen.add(key)
            return True

        dataset = dataset.filter(first_time)  # one process: ``seen`` must be shared across rows
    return dataset


def load_math_eval(name_or_path: str, config: str | None = None, split: str | None = None):
    """Returns an evaluation set as rows with ``id``, ``problem``, ``answer``, ``prompt`` and ``solution``.

    ``name_or_path`` is a key of ``EVAL_SETS`` (``aime24``, ``aime25``, ``aime25-opencompass``), one of their Hub
    names, or a local file / folder with ``problem`` (or ``question``) and ``answer`` columns. The prompt is the
    problem in DAPO's instruction, so evaluation asks for answers the way training did. ``"arithmetic-chains"`` is
    the bundled task's ``test`` split (or ``split``), posed with the task's own prompt, the one training uses.
    """
    from datasets import Features, Value, concatenate_datasets

    from .tasks.arithmetic_chains.task import TASK_NAME, load_task

    if name_or_path == TASK_NAME:
        task = load_task(split or "test")
        return task.map(lambda row: {"answer": row["solution"]}).select_columns(
            ["id", "problem", "answer", "prompt", "solution"]
        )
    spec = EVAL_SETS.get(name_or_path) or _EVAL_BY_HUB_NAME.get(name_or_path)
    if spec is not None:
        configs = (config,) if config is not None else spec.configs
        dataset = concatenate_datasets([_load(spec.hub_name, c, split or spec.split) for c in configs])
    elif os.path.exists(name_or_path):
        dataset = _load(name_or_path, config, split or "train")
    else:
        raise ValueError(
            f"eval dataset {name_or_path!r} is neither a local path nor a known set; allowed: "
            f"{sorted([*EVAL_SETS, TASK_NAME])}, "
            f"{sorted(_EVAL_BY_HUB_NAME)} or a local .jsonl/.json/.parquet/.csv file."
        )
    columns = set(dataset.column_names)
    problem_column = "problem" if "problem" in columns else "question"
    if problem_column not in columns or "answer" not in columns:
        raise ValueError(
            f"eval dataset {name_or_path!r} has columns {sorted(columns)}; it needs 'problem' (or 'question') and "
            "'answer'."
        )

    def convert(row, index):
        problem, answer = str(row[problem_column]), str(row["answer"])
        prompt = _user(DAPO_PROMPT_TEMPLATE.format(problem=problem))
        return {
            "id": str(row.get("id", index)),
            "problem": problem,
            "answer": answer,
            "prompt": prompt,
            "solution": answer,
        }

    text = Value("string")
    # Explicit features: an integer ``id`` column (HuggingFaceH4/aime_2024) would otherwise keep its int type.
    features = Features(
        {"id": text, "problem": text, "answer": text, "prompt": [{"role": text, "content": text}], "solution": text}
    )
    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, features=features)


def load_train_dataset(name_or_path: str | None, config: str | None = None, split: str = "train"):
    """Returns the training set a recipe names: the bundled task's train split (``prompt`` / ``solution``) when None
    or ``"arithmetic-chains"``, else a DAPO-Math layout (Hub name or local file)."""
    from .tasks.arithmetic_chains.task import TASK_NAME, load_task

    if name_or_path is None or name_or_path == TASK_NAME:
        return load_task(split).select_columns(["prompt", "solution"])
    return load_dapo_math(name_or_path, config, split)
