"""A tiny GPT-2 and a tokenizer built locally: the embedded default for demos, tests and docs (no Hub download).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a generated corpus of short math
problems and answers, so that ``\\boxed{...}`` and ``Answer: ...`` tokenize into a few pieces. The model is a
randomly initialized ``GPT2LMHeadModel``; it is small enough to train for a few GRPO steps on a laptop CPU.
"""

from __future__ import annotations

import os
import random

__all__ = ["DEFAULT_TINY_MODEL_DIR", "build_tiny_model", "math_corpus"]

DEFAULT_TINY_MODEL_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "trl-forking", "tiny-gpt2-v1"
)
SPECIAL_TOKENS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Plain role markers: the tiny model has no chat training, the template only has to be valid and reversible.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|endoftext|>\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def math_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Returns ``num_lines`` short generated math problems with worked answers (the tokenizer's training text)."""
    rng = random.Random(seed)
    words = ["Wait", "so", "thus", "since", "assume", "then", "therefore", "check", "maybe", "hence", "first"]
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(
            f"What is {a} {op} {b}? {rng.choice(words)} we compute {a} {op} {b} = {result}. "
            f"The answer is $\\boxed{{{result}}}$.\nAnswer: {result}"
        )
        lines.append(f"Simplify \\frac{{{a}}}{{{b}}}. {rng.choice(words)}, the result is $\\frac{{{a}}}{{{b}}}$.")
    return lines


def build_tiny_model(
    output_dir: str = DEFAULT_TINY_MODEL_DIR,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Returns ``output_dir`` after saving a random tiny GPT-2 and its locally trained tokenizer there.

    The directory has the layout of a Hub model repository (``config.json``, ``model.safetensors``,
    ``tokenizer.json``, ...), so ``AutoModelForCausalLM.from_pretrained(output_dir)`` and every code path that takes
    a model name accept it. An existing build is reused unless ``overwrite``.

    Args:
        output_dir: where to save.
        vocab_size: BPE vocabulary size (special tokens included).
        hidden_size, num_layers, num_heads, max_positions: GPT-2 dimensions.
        seed: seeds the corpus and the weights, so a build is reproducible.
        overwrite: rebuild even if ``output_dir`` already holds a model.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if not overwrite and os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    os.makedirs(output_dir, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(math_corpus(seed=seed), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS["eos"],
        bos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"]],
        model_max_length=max_positions,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(hf_tokenizer),
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_positions=max_positions,
        # Like Qwen3 and most current LLMs: no dropout, so two forwards over the same tokens agree.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = hf_tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    hf_tokenizer.save_pretrained(output_dir)
    return output_dir
