"""The input pipeline of ``analyze``, ``render`` and ``overlap``: read the prompts or completions, load each model in
turn, sample completions from the first one when given prompts, and score every completion token under each model.

The three subcommands pass their input, sampling and compute options to ``score_inputs``, so that every option means
the same in all of them.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

from ..defaults import DEFAULT_ENTROPY_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from .inputs import COMPLETIONS_FILE, ensure_output_dir, read_inputs, write_jsonl
from .sampling import ensure_model, load_tokenizer, sample_completions
from .scoring import ScoredCompletions, score_completions

__all__ = ["ScoredInputs", "model_name", "pick", "score_inputs"]


@dataclass
class ScoredInputs:
    """The completions an analysis runs on, with the entropy of every completion token under each model.

    Attributes:
        output_dir: the output directory, created and checked to be writable (``~`` expanded).
        scores: one ``ScoredCompletions`` per model, in the order the models were given. All hold the same records
            and the same token ids; only the entropies differ.
        tokenizers: one tokenizer per model.
        names: one printable name per model (the name or path it was loaded from, or a loaded model's
            ``name_or_path``).
        temperature: T of the entropies ``softmax(z / T)`` (and of sampling).
        files: ``{"completions": path}`` when completions were sampled and saved there, else empty.
    """

    output_dir: str
    scores: list[ScoredCompletions]
    tokenizers: list
    names: list[str]
    temperature: float
    files: dict[str, str]

    @property
    def records(self) -> list[dict]:
        """Returns the scored completion records (``prompt``, ``completion``, and ``completion_ids`` when sampled)."""
        return self.scores[0].records


def model_name(model) -> str:
    """Returns a printable name of ``model``: itself when it is a name or path, else its ``name_or_path``."""
    return model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)


def pick(records: list[dict], indices: list[int] | None) -> list[dict]:
    """Returns the records at ``indices``, in that order (all records when None).

    Raises:
        ValueError: an index is outside ``0 .. len(records) - 1`` (the message lists those indices).
    """
    if indices is None:
        return records
    bad = [i for i in indices if not 0 <= i < len(records)]
    if bad:
        raise ValueError(f"index: {bad} out of range: there are {len(records)} completions, indexed from 0")
    return [records[i] for i in indices]


def _tokenizers(models, tokenizers, names) -> list:
    """Returns one tokenizer per model (loaded for a model given by name) after checking that they share a vocabulary,
    so that every model can score the same token ids."""
    out = []
    for model, tokenizer, name in zip(models, tokenizers, names, strict=True):
        if tokenizer is None:
            if not isinstance(model, str):
                raise ValueError(f"model {name!r} is a loaded model: pass its tokenizer too")
            tokenizer = load_tokenizer(model)
        out.append(tokenizer)
    if any(t.get_vocab() != out[0].get_vocab() for t in out[1:]):
        raise ValueError(
            f"the models have different vocabularies ({', '.join(names)}); each must score the same token ids"
        )
    return out


def score_inputs(
    models: list,
    output_dir: str,
    tokenizers: list | None = None,
    *,
    prompts=None,
    completions=None,
    num_samples: int | None = None,
    split: str = "train",
    dataset_config: str | None = None,
    prompt_column: str | None = None,
    indices: list[int] | None = None,
    num_generations: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    chat_template: bool = False,
    batch_size: int = DEFAULT_ENTROPY_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> ScoredInputs:
    """Returns the completions to analyze and the entropy of each of their tokens under each of ``models``.

    In order, so that bad input fails before any expensive work: the output directory is checked, the prompts or
    completions are read (and ``indices`` checked against the completions), every tokenizer is loaded and the
    vocabularies compared; then each model is loaded in turn, the first one samples the completions when given
    prompts (saved to ``output_dir/completions.jsonl`` with their token ids), and each model scores exactly the same
    completion tokens. A model given by name is released before the next one loads, so peak memory is one model.

    Args:
        models: names or paths (loaded with ``load_model``), or loaded causal LMs; at least one.
        output_dir: created if needed.
        tokenizers: one per model, or None each; needed for a loaded model, loaded from the name otherwise.
        prompts: a dataset (JSONL file, saved dataset directory or Hub name) or a list of prompts to sample from.
        completions: a completions JSONL path, or a list of ``{"prompt", "completion"}``; exclusive with prompts.
        num_samples: use the first ``num_samples`` prompts or completions (all when None).
        split, dataset_config, prompt_column: which split, configuration and column of the ``prompts`` dataset.
        indices: which completions to score, 0-based after ``num_samples`` (and after sampling); all when None.
        num_generations: completions sampled per prompt.
        max_new_tokens, top_p, seed: sampling parameters.
        temperature: sampling temperature, also T in the entropy ``softmax(z / T)``.
        chat_template: wrap string prompts in a user turn of the tokenizer's chat template.
        batch_size: rows per forward, for sampling and for entropies (the memory bound).
        device, dtype: where and in what precision to load a model given by name.
        progress: show progress bars.

    Raises:
        ValueError, OSError: bad input; the message names the file, field or value.
    """
    if not models:
        raise ValueError("models must hold at least one model, got none")
    tokenizers = [None] * len(models) if tokenizers is None else list(tokenizers)
    if len(tokenizers) != len(models):
        raise ValueError(f"tokenizers must hold one entry per model ({len(models)}), got {len(tokenizers)}")
    output_dir = ensure_output_dir(output_dir)
    inputs = read_inputs(prompts, completions, num_samples, split, dataset_config, prompt_column)
    records = None if inputs.records is None else pick(inputs.records, indices)  # a bad index fails before loading
    names = [model_name(m) for m in models]
    tokenizers = _tokenizers(models, tokenizers, names)
    files, scores = {}, []
    for model, tokenizer in zip(models, tokenizers, strict=True):
        loaded, tokenizer = ensure_model(model, tokenizer, device, dtype)
        if records is None:  # only the first model samples; the others score what it sampled
            sampled = sample_completions(
                loaded,
                tokenizer,
                inputs.prompts,
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                batch_size=batch_size,
                chat_template=chat_template,
                seed=seed,
                progress=progress,
            )
            files["completions"] = os.path.join(output_dir, COMPLETIONS_FILE)
            write_jsonl(files["completions"], sampled)
            records = pick(sampled, indices)
        scores.append(score_completions(loaded, tokenizer, records, temperature, batch_size, chat_template, progress))
        if isinstance(model, str):
            del loaded
            gc.collect()
    return ScoredInputs(output_dir, scores, tokenizers, names, temperature, files)
