"""Loading a model for analysis and sampling completions from it with ``transformers``' ``generate``."""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from ..defaults import DEFAULT_MAX_NEW_TOKENS
from ..evaluation import left_pad
from .inputs import looks_like_path

__all__ = [
    "DTYPES",
    "encode_prompt",
    "ensure_model",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "resolve_device",
    "sample_completions",
]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SAMPLING_BATCH_SIZE = 8


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for ``device`` ("auto": CUDA when available, else CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return target


def _first_line(error: Exception) -> str:
    # The Hub client's messages run over several lines; the first one says what was not found.
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(name_or_path: str):
    """Returns the tokenizer of a model directory or Hub model id, with a pad token (EOS when it has none).

    Raises:
        FileNotFoundError: ``name_or_path`` is a path that does not exist.
        ValueError: the tokenizer cannot be loaded.
    """
    name_or_path = os.path.expanduser(name_or_path)
    if not os.path.exists(name_or_path) and looks_like_path(name_or_path):
        raise FileNotFoundError(f"model path does not exist: {name_or_path}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(f"cannot load the tokenizer of {name_or_path!r}: {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", tokenizer=None):
    """Returns ``(model, tokenizer)``: a causal LM in eval mode on ``device`` and its tokenizer.

    Args:
        name_or_path: a local model directory or a Hub model id.
        device: "auto", "cpu", "cuda", "cuda:N".
        dtype: one of ``DTYPES`` ("auto" keeps the checkpoint's dtype).
        tokenizer: an already loaded tokenizer (``load_tokenizer(name_or_path)`` when None).

    Raises:
        FileNotFoundError: ``name_or_path`` is a path that does not exist.
        ValueError: a bad ``dtype`` or ``device``, or the model cannot be loaded.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    target = resolve_device(device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    name_or_path = os.path.expanduser(name_or_path)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except OSError as error:
        raise ValueError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None
    return model.to(target).eval(), tokenizer


def max_positions(model) -> int | None:
    """Returns the longest sequence the model's position embeddings allow (None when the config does not say)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def encode_prompt(tokenizer, prompt, chat_template: bool = False) -> list[int]:
    """Returns the token ids the model is conditioned on for ``prompt``.

    A list of chat messages goes through the tokenizer's chat template with the generation prompt; a string is
    tokenized as is (as TRL does for a non-conversational prompt) unless ``chat_template`` wraps it in a user turn.
    """
    if isinstance(prompt, str) and chat_template:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    num_generations: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = DEFAULT_SAMPLING_BATCH_SIZE,
    chat_template: bool = False,
    seed: int | None = 0,
    progress: bool = True,
) -> list[dict]:
    """Returns ``len(prompts) * num_generations`` records ``{"prompt", "completion", "completion_ids"}``.

    ``completion_ids`` are the sampled tokens up to and including the first EOS (TRL's completion mask);
    ``completion`` is their text without special tokens; ``prompt`` is the prompt as sampled from (a string prompt
    wrapped by ``chat_template`` is saved as that one-message conversation). Prompts are left-padded ``batch_size``
    at a time.

    Args:
        model, tokenizer: from ``load_model``.
        prompts: strings or chat-message lists.
        num_generations: completions per prompt.
        max_new_tokens: cap on completion length (also capped by the model's position limit).
        temperature, top_p: sampling parameters (temperature > 0).
        batch_size: prompts per ``generate`` call.
        chat_template: wrap string prompts in a user turn of the chat template.
        seed: seeds torch's generator for reproducible samples (None leaves it alone).
        progress: show a progress bar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    limit = max_positions(model)
    records = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        encoded = [encode_prompt(tokenizer, p, chat_template) for p in batch]
        width = max(len(ids) for ids in encoded)
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
        if new_tokens < 1:
            raise ValueError(f"a prompt of {width} tokens leaves no room for a completion (model limit {limit})")
        input_ids, attention_mask = left_pad(encoded, pad)  # (b, P) each
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=new_tokens,
            num_return_sequences=num_generations,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row, sequence in enumerate(output[:, width:].tolist()):  # (b * G, C)
            ids = sequence[: sequence.index(eos) + 1] if eos in sequence else sequence
            prompt = batch[row // num_generations]
            if chat_template and isinstance(prompt, str):
                # Saved as the conversation that was sampled from, so later scoring needs no chat_template flag.
                prompt = [{"role": "user", "content": prompt}]
            records.append(
                {
                    "prompt": prompt,
                    "completion": tokenizer.decode(ids, skip_special_tokens=True),
                    "completion_ids": ids,
                }
            )
    return records


def ensure_model(model, tokenizer=None, device: str = "auto", dtype: str = "auto"):
    """Returns ``(model, tokenizer)``: loaded with ``load_model`` when ``model`` is a name or path, else as given."""
    if isinstance(model, str):
        return load_model(model, device, dtype, tokenizer)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a loaded model; pass tokenizer=...")
    return model, tokenizer
