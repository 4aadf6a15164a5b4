"""Reading what the analysis runs on: prompts (a JSONL file, a saved dataset or a Hub dataset name), completions
(JSONL with ``prompt`` and ``completion``), and checking the output directory before any expensive work.

Every error is a ``ValueError`` or ``OSError`` whose message names the file, the line or field, and what is allowed,
so that the command line can print it on one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

__all__ = [
    "COMPLETIONS_FILE",
    "PROMPT_COLUMNS",
    "Inputs",
    "completion_text",
    "ensure_output_dir",
    "load_completions",
    "load_prompts",
    "read_inputs",
    "looks_like_path",
    "iter_jsonl",
    "write_jsonl",
]

# Where sampled completions are saved, in the format ``load_completions`` reads.
COMPLETIONS_FILE = "completions.jsonl"
# Tried in order when no column is named: TRL's "prompt", then the columns of common math sets (AIME, MATH).
PROMPT_COLUMNS = ("prompt", "problem", "question")


def looks_like_path(name: str) -> bool:
    """Returns True when ``name`` can only be a local path (not a Hub id such as ``org/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(("/", ".json", ".jsonl")) or name.count("/") > 1


def iter_jsonl(path: str):
    """Yields ``(line_number, object)`` for each non-blank line of a JSONL file (line numbers from 1).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object; the message gives ``path:line``.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: malformed JSON line ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def write_jsonl(path: str, rows) -> None:
    """Writes ``rows`` (dicts) to ``path``, one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _prompt_column(columns, column: str | None, source: str) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(f"prompt column {column!r} not in {source}; columns are {sorted(columns)}")
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"no prompt column in {source}: expected one of {list(PROMPT_COLUMNS)}, got {sorted(columns)}")


def _check_prompt(prompt, where: str):
    """Returns ``prompt`` if it is a non-empty string or a list of chat messages; raises otherwise."""
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return prompt
    raise ValueError(f"{where}: a prompt must be a non-empty string or a list of chat messages, got {prompt!r:.80}")


def load_prompts(
    source: str,
    split: str = "train",
    config: str | None = None,
    column: str | None = None,
    num_samples: int | None = None,
) -> list:
    """Returns the first ``num_samples`` prompts (strings or chat-message lists) of a dataset.

    ``source`` is a JSONL file, a directory written by ``Dataset.save_to_disk``, or a Hub dataset name (loaded with
    ``datasets.load_dataset(source, config, split=split)``). The prompt column is ``column`` or the first of
    ``PROMPT_COLUMNS`` present.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: the dataset is empty, has no prompt column, or a prompt is not a string / message list.
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        rows = [row for _, row in iter_jsonl(source)]
        if not rows:
            raise ValueError(f"dataset {source} is empty")
        name = _prompt_column(set().union(*rows), column, source)
        prompts = []
        for number, row in enumerate(rows[:num_samples], start=1):
            prompts.append(_check_prompt(row.get(name), f"{source}: row {number}"))
        return prompts
    if os.path.isdir(source):
        import datasets

        try:
            dataset = datasets.load_from_disk(source)
        except IndexError:
            # A dataset saved with no rows has no data shards, and load_from_disk fails on the empty shard list.
            raise ValueError(f"dataset {source} is empty") from None
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"split {split!r} not in {source}; splits are {sorted(dataset)}")
            dataset = dataset[split]
    elif looks_like_path(source):
        raise FileNotFoundError(f"prompts not found: {source}")
    else:
        import datasets

        dataset = datasets.load_dataset(source, config, split=split)
    if len(dataset) == 0:
        raise ValueError(f"dataset {source} is empty")
    name = _prompt_column(dataset.column_names, column, source)
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    return [_check_prompt(p, f"{source}: row {i + 1}") for i, p in enumerate(dataset[name])]


def completion_text(completion, where: str) -> str:
    """Returns the text of a completion given as a string or as chat messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion)
    raise ValueError(f"{where}: 'completion' must be a string or a list of chat messages, got {completion!r:.80}")


def load_completions(path: str, num_samples: int | None = None) -> list[dict]:
    """Returns the first ``num_samples`` records ``{"prompt", "completion", ...}`` of a completions JSONL file.

    Each line is an object with ``prompt`` (string or chat messages) and ``completion`` (string or chat messages);
    an optional ``completion_ids`` list (written by ``analyze`` when it samples) is kept so that scoring uses the
    sampled tokens rather than a re-tokenization of the text.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, or a line is malformed or lacks a field (the message gives ``path:line``).
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"completions file not found: {path}")
    records = []
    for number, row in iter_jsonl(path):
        where = f"{path}:{number}"
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"{where}: expected an object with 'prompt' and 'completion', got keys {sorted(row)}")
        record = {"prompt": _check_prompt(row["prompt"], where)}
        record["completion"] = completion_text(row["completion"], where)
        if "completion_ids" in row:
            ids = row["completion_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"{where}: 'completion_ids' must be a list of non-negative integers")
            record["completion_ids"] = ids
        records.append(record)
        if num_samples is not None and len(records) == num_samples:
            break
    if not records:
        raise ValueError(f"no completions in {path}")
    return records


def ensure_output_dir(path: str) -> str:
    """Returns ``path`` (with ``~`` expanded) after creating it and checking that a file can be written there.

    Raises:
        OSError: the directory cannot be created or written (the message names it).
    """
    path = os.path.expanduser(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"cannot write to output directory {path}: {error.strerror or error}") from None
    return path


@dataclass
class Inputs:
    """What to analyze: prompts to sample from, or existing completion records (exactly one is set)."""

    prompts: list | None = None
    records: list[dict] | None = None


def read_inputs(
    prompts=None,
    completions=None,
    num_samples: int | None = None,
    split: str = "train",
    config: str | None = None,
    column: str | None = None,
) -> Inputs:
    """Returns the validated ``Inputs`` from exactly one of ``prompts`` and ``completions``.

    Args:
        prompts: a dataset source for ``load_prompts`` or a list of prompts.
        completions: a completions JSONL path for ``load_completions`` or a list of ``{"prompt", "completion"}``.
        num_samples: keep the first ``num_samples`` prompts or completions.
        split, config, column: passed to ``load_prompts``.
    """
    if (prompts is None) == (completions is None):
        raise ValueError("give exactly one of prompts (to sample completions from) and completions")
    if completions is not None:
        if isinstance(completions, str):
            return Inputs(records=load_completions(completions, num_samples))
        records = [dict(r) for r in completions][:num_samples]
        if not records:
            raise ValueError("completions is empty")
        return Inputs(records=records)
    if isinstance(prompts, str):
        return Inputs(prompts=load_prompts(prompts, split, config, column, num_samples))
    prompts = list(prompts)[:num_samples]
    if not prompts:
        raise ValueError("prompts is empty")
    return Inputs(prompts=[_check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)])
