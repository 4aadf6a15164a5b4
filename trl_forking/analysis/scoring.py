"""Per-token entropies of completions under a model, in chunks of rows with a progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..entropy import DEFAULT_ENTROPY_BATCH_SIZE, token_entropies
from .sampling import encode_prompt, max_positions

__all__ = ["ScoredCompletions", "completion_ids", "score_completions"]


@dataclass
class ScoredCompletions:
    """Completions with the entropy of every completion token.

    Attributes:
        records: the input records (``prompt``, ``completion``, ...), one per completion.
        token_ids: one (T_i,) LongTensor of completion token ids per record.
        entropies: one (T_i,) float32 tensor per record; entry t is the entropy of the distribution that predicted
            completion token t (given the prompt and the completion tokens before it).
    """

    records: list[dict]
    token_ids: list[torch.Tensor]
    entropies: list[torch.Tensor]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(token_ids, entropies, mask)``, each (B, T) right-padded to the longest completion."""
        width = max((ids.numel() for ids in self.token_ids), default=0)
        ids = torch.zeros(len(self.token_ids), width, dtype=torch.long)  # (B, T)
        entropies = torch.zeros(len(self.token_ids), width)  # (B, T)
        mask = torch.zeros(len(self.token_ids), width, dtype=torch.bool)  # (B, T)
        for row, (t, h) in enumerate(zip(self.token_ids, self.entropies, strict=True)):
            ids[row, : t.numel()], entropies[row, : t.numel()], mask[row, : t.numel()] = t, h, True
        return ids, entropies, mask


def completion_ids(tokenizer, record: dict) -> list[int]:
    """Returns the completion's token ids: the sampled ``completion_ids`` when present, else the text tokenized."""
    if "completion_ids" in record:
        return list(record["completion_ids"])
    return tokenizer(record["completion"], add_special_tokens=False)["input_ids"]


def score_completions(
    model,
    tokenizer,
    records: list[dict],
    temperature: float = 1.0,
    batch_size: int = DEFAULT_ENTROPY_BATCH_SIZE,
    chat_template: bool = False,
    progress: bool = True,
) -> ScoredCompletions:
    """Returns the entropy of every completion token of ``records`` under ``model``.

    Each record's prompt and completion are encoded separately (the prompt as in ``encode_prompt``) and joined, so
    the completion boundary is exact. ``batch_size`` rows of similar length go through ``token_entropies`` at a time,
    right-padded to that chunk's longest row: memory is bounded by one chunk and TRL's fused LM head never materializes
    (rows, length, vocab) logits.

    Args:
        model, tokenizer: from ``load_model``.
        records: dicts with ``prompt`` and ``completion`` (and optionally ``completion_ids``).
        temperature: T in ``softmax(z / T)``; use the sampling temperature.
        batch_size: rows per forward.
        chat_template: wrap string prompts in a user turn (as when sampling).
        progress: show a progress bar.

    Raises:
        ValueError: a token id is outside the model's vocabulary, or a sequence is longer than the model allows.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = model.get_input_embeddings().num_embeddings
    limit = max_positions(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = []
    for index, record in enumerate(records):
        prompt, completion = (
            encode_prompt(tokenizer, record["prompt"], chat_template),
            completion_ids(tokenizer, record),
        )
        if any(i >= vocab for i in completion):
            raise ValueError(f"completion {index}: token id {max(completion)} is outside the vocabulary ({vocab})")
        if limit is not None and len(prompt) + len(completion) > limit:
            raise ValueError(
                f"completion {index}: prompt + completion is {len(prompt) + len(completion)} tokens, "
                f"longer than the model's {limit} positions"
            )
        pairs.append((prompt, completion))
    token_ids: list[torch.Tensor | None] = [None] * len(pairs)
    entropies: list[torch.Tensor | None] = [None] * len(pairs)
    # Rows of similar length share a chunk, so little of each forward is spent on padding.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in tqdm(range(0, len(order), batch_size), desc="entropy", unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (b, L)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            p, c = pairs[i]
            input_ids[row, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[row, : len(p) + len(c)] = 1
        h = token_entropies(model, input_ids, attention_mask, temperature=temperature, batch_size=batch_size)  # (b, L)
        for row, i in enumerate(chunk):
            p, c = pairs[i]
            token_ids[i] = torch.tensor(c, dtype=torch.long)
            entropies[i] = h[row, len(p) : len(p) + len(c)].clone()
    return ScoredCompletions(records=list(records), token_ids=token_ids, entropies=entropies)
