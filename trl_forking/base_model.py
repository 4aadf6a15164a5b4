"""A tiny Qwen3 that reasons on the bundled task, built on CPU with no download: the demo's base model.

``build_base_model()`` trains a byte-level BPE tokenizer that splits digits one per token, as Qwen's does, with a
Qwen-style chat template (``<|im_start|>role ... <|im_end|>``, ``<|im_end|>`` the EOS), initializes a
``Qwen3ForCausalLM`` of about 0.18M parameters, and warm-starts it with TRL's ``SFTTrainer`` on the worked solutions
of the task's train split (prompt-completion data, loss on the completion only).

In the SFT targets, each result digit is written wrong with probability ``digit_noise`` (0.15; later lines continue
from the wrong value, as a solver who slipped would). The model learns the method (its greedy answers are right)
and also learns to slip: at temperature 1 it samples a wrong result digit now and then, so it solves about a third
of the test problems, the copying and formatting tokens are near-deterministic, and the result digits carry the
entropy. That is the regime the paper's RL works in, and GRPO groups get mixed rewards. Without the noise, a model
stopped part-way through learning the arithmetic has systematic errors that GRPO did not fix in a CPU budget
(``docs/task.md`` has the numbers).

The result is cached in ``$XDG_CACHE_HOME/trl-forking/base-<hash>`` (``~/.cache`` when unset), ``<hash>`` a short
hash of the recipe (task, sizes, SFT settings, seed): a second call returns the cached directory, a changed recipe
builds a new one. A build is written to a temporary directory next to it and renamed into place, so an interrupted or
concurrent build never leaves a directory that looks finished. The directory has a Hub model repository's layout
(``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) plus ``build.json`` (the recipe,
the SFT log and timings). ``python -m trl_forking.base_model`` builds it and prints the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "BaseModelRecipe",
    "base_model_dir",
    "build_base_model",
    "build_tokenizer",
    "main",
]

SPECIAL_TOKENS = {"pad": "<|endoftext|>", "start": "<|im_start|>", "end": "<|im_end|>"}
# Qwen's ChatML layout without the system-prompt and tool branches: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Bumped when the build code changes what a recipe produces, so that old caches are not reused.
BUILD_VERSION = 1
BUILD_FILE = "build.json"


@dataclass(frozen=True)
class BaseModelRecipe:
    """Everything a base model build depends on; its hash names the cache directory (``docs/task.md``)."""

    task: str = "arithmetic-chains"
    seed: int = 0
    # Tokenizer: byte-level BPE trained on the train split, digits split one per token.
    vocab_size: int = 320
    # Qwen3 dimensions.
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 3
    num_heads: int = 2
    num_kv_heads: int = 2
    max_positions: int = 256
    # SFT (TRL SFTTrainer, completion-only loss, AdamW).
    sft_steps: int = 800
    # Share of result digits written wrong in the SFT targets (later lines continue from the wrong value).
    digit_noise: float = 0.15
    # Train on the first N problems of the train split (None: all 8,000); small values make test builds fast.
    num_train_problems: int | None = None
    batch_size: int = 16
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    num_threads: int = 1

    def __post_init__(self):
        from .task import TASK_NAME

        if self.task != TASK_NAME:
            raise ValueError(f"task: {self.task!r} is not allowed; the bundled task is {TASK_NAME!r}.")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        for name in (*positive, "max_positions", "sft_steps", "batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} is not allowed; use an integer >= 1.")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} (with num_kv_heads={self.num_kv_heads}, hidden_size={self.hidden_size}) "
                "is not allowed; num_heads must divide hidden_size and be a multiple of num_kv_heads."
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: {self.learning_rate} is not allowed; use a value > 0.")
        if not 0 <= self.digit_noise < 1:
            raise ValueError(f"digit_noise: {self.digit_noise} is not allowed; use a value in [0, 1).")
        if self.num_train_problems is not None and self.num_train_problems < 1:
            raise ValueError(
                f"num_train_problems: {self.num_train_problems} is not allowed; use an integer >= 1 or None (all)."
            )

    def short_hash(self) -> str:
        """Returns 10 hex digits of the SHA-256 of the recipe, the build code's version and the train split's bytes
        (so that regenerated task files give a new model, not a stale cached one)."""
        from .task import split_path

        with open(split_path("train"), "rb") as f:
            data = hashlib.sha256(f.read()).hexdigest()
        payload = json.dumps(
            {"build_version": BUILD_VERSION, "train_data": data, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _cache_root() -> str:
    """Returns ``$XDG_CACHE_HOME/trl-forking`` (``~/.cache/trl-forking`` when unset), read at call time."""
    return os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "trl-forking"
    )


def base_model_dir(recipe: BaseModelRecipe | None = None, cache_dir: str | None = None) -> str:
    """Returns where the model of ``recipe`` is (or would be) cached: ``<cache_dir>/base-<recipe hash>``."""
    recipe = recipe or BaseModelRecipe()
    return os.path.join(cache_dir or _cache_root(), f"base-{recipe.short_hash()}")


def build_tokenizer(texts: list[str], vocab_size: int, max_positions: int):
    """Returns a ``PreTrainedTokenizerFast``: byte-level BPE trained on ``texts``, digits one per token, ChatML.

    Pre-tokenization splits every digit into its own piece before the byte-level split (Qwen's tokenizers do the
    same with ``\\p{N}`` in their regex), so no merge can join digits: ``"581"`` is ``5``, ``8``, ``1``. EOS is
    ``<|im_end|>``, which ends an assistant turn of ``CHAT_TEMPLATE``; the pad token is ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=SPECIAL_TOKENS["end"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS["start"]],
        model_max_length=max_positions,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def _carry_free(total: int, op: str, operand: int) -> bool:
    """Returns whether ``total op operand`` has no carry or borrow and stays in [10, 99]."""
    (t, u), (bt, bu) = divmod(total, 10), divmod(operand, 10)
    if op == "+":
        return t + bt <= 9 and u + bu <= 9
    return t - bt >= 1 and u - bu >= 0


def noisy_solution(problem: str, noise: float, rng) -> str:
    """Returns a worked solution of ``problem`` in which each result digit is, with probability ``noise``, a wrong
    digit; later lines continue from the written (wrong) result, so the solution stays self-consistent.

    A wrong digit is drawn among those that keep every later step carry-free and two-digit; when none does, the
    digit stays right. ``noise = 0`` gives the task's own worked solution.
    """
    from .task import worked_solution

    tokens = problem.split(" ")
    total, steps = int(tokens[0]), [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]
    lines = []
    for index, (op, operand) in enumerate(steps):
        result = total + operand if op == "+" else total - operand
        digits = [result // 10, result % 10]
        for place in (0, 1):
            if rng.random() >= noise:
                continue
            wrong = [d for d in range(1 if place == 0 else 0, 10) if d != digits[place]]
            rng.shuffle(wrong)
            for d in wrong:
                candidate = 10 * (d if place == 0 else digits[0]) + (d if place == 1 else digits[1])
                chain, ok = candidate, True
                for later_op, later in steps[index + 1 :]:
                    ok = ok and _carry_free(chain, later_op, later)
                    chain = chain + later if later_op == "+" else chain - later
                if ok:
                    digits = [candidate // 10, candidate % 10]
                    break
        written = 10 * digits[0] + digits[1]
        lines.append(f"{total} {op} {operand} = {written}")
        total = written
    if noise == 0:
        return worked_solution(int(tokens[0]), steps)[0]
    return "\n".join([*lines, f"Answer: {total}"])


def _sft_dataset(rows, noise: float, seed: int):
    """Returns the train rows as TRL conversational prompt-completion data (the completion one assistant turn),
    each worked solution passed through ``noisy_solution`` with its own seeded generator."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict(
        {
            "prompt": [row["prompt"] for row in rows],
            "completion": [
                [{"role": "assistant", "content": noisy_solution(row["problem"], noise, rng)}] for row in rows
            ],
        }
    )


def _build(recipe: BaseModelRecipe, output_dir: str, progress: bool) -> dict:
    """Trains the tokenizer and the SFT model of ``recipe`` into ``output_dir``; returns the build record."""
    import torch
    import transformers
    import trl
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .task import read_split

    started = time.time()
    rows = read_split("train")[: recipe.num_train_problems]
    tokenizer = build_tokenizer(
        [f"{row['prompt'][0]['content']}\n{row['completion']}" for row in rows] + ["user", "assistant"],
        recipe.vocab_size,
        recipe.max_positions,
    )
    torch.manual_seed(recipe.seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    args = SFTConfig(
        output_dir=os.path.join(output_dir, "sft"),
        max_steps=recipe.sft_steps,
        per_device_train_batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        adam_beta2=recipe.adam_beta2,
        max_grad_norm=recipe.max_grad_norm,
        completion_only_loss=True,
        max_length=recipe.max_positions,
        # A 64-wide model recomputes nothing worth saving; TRL turns checkpointing on by default, which is 3x slower.
        gradient_checkpointing=False,
        bf16=False,
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=max(1, recipe.sft_steps // 10),
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # else torch warns once per build
        disable_tqdm=not progress,
    )
    dataset = _sft_dataset(rows, recipe.digit_noise, recipe.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if progress:
        from .console import use_compact_log

        use_compact_log(trainer)  # one short line per log under the progress bar, not transformers' dicts
    sft_started = time.time()
    trainer.train()
    sft_seconds = time.time() - sft_started
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {
        "recipe": dataclasses.asdict(recipe),
        "hash": recipe.short_hash(),
        "build_version": BUILD_VERSION,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sft_log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "sft_seconds": round(sft_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }


def build_base_model(
    recipe: BaseModelRecipe | None = None,
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Returns the directory of the base model of ``recipe``, building it first unless it is cached.

    The directory is ``base_model_dir(recipe, cache_dir)``; a build goes to a temporary sibling and is renamed into
    place when complete, so a directory with that name is always a finished model. When two processes build at once,
    the first rename wins and the other discards its copy. ``overwrite`` rebuilds a cached model.

    Args:
        recipe: what to build (``BaseModelRecipe()``: the demo's model).
        cache_dir: parent directory; default ``$XDG_CACHE_HOME/trl-forking`` (``~/.cache/trl-forking``).
        overwrite: rebuild even if the model is cached.
        progress: show TRL's SFT progress bar.
    """
    import torch

    recipe = recipe or BaseModelRecipe()
    target = base_model_dir(recipe, cache_dir)
    if os.path.isdir(target) and not overwrite:
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.building-")
    started = time.time()
    if progress:
        print(
            f"Building the base model {os.path.basename(target)} ({recipe.sft_steps} SFT steps on {recipe.task}; "
            f"about a minute on 2 CPU cores, once: cached in {parent})",
            flush=True,
        )
    threads = torch.get_num_threads()
    # One thread by default: on 2 shared cores, two threads per process contend and the build ran 4x slower.
    torch.set_num_threads(recipe.num_threads)
    try:
        record = _build(recipe, staging, progress)
        with open(os.path.join(staging, BUILD_FILE), "w") as f:
            json.dump(record, f, indent=2)
        if overwrite and os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            # Another process finished the same build first: keep its copy, drop ours.
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"Base model built in {time.time() - started:.0f} s: {target}", flush=True)
    return target


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_forking.base_model",
        description="Build (or find in the cache) the tiny Qwen3 base model of the CPU demo and print its path.",
    )
    parser.add_argument("--cache-dir", default=None, help="Parent directory (default: $XDG_CACHE_HOME/trl-forking).")
    parser.add_argument("--overwrite", action="store_true", help="Rebuild even if the model is cached.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the SFT progress bar.")
    for field in dataclasses.fields(BaseModelRecipe):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=int if field.default is None else type(field.default),  # num_train_problems: int or None
            default=field.default,
            help=f"Recipe field (default: {field.default}).",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Builds the base model named by the command line ``argv`` and prints its directory; returns the exit status."""
    args = _parser().parse_args(argv)
    names = [field.name for field in dataclasses.fields(BaseModelRecipe)]
    try:
        recipe = BaseModelRecipe(**{name: getattr(args, name) for name in names})
    except ValueError as error:
        print(f"python -m trl_forking.base_model: error: {error}", file=sys.stderr)
        return 2
    print(build_base_model(recipe, args.cache_dir, overwrite=args.overwrite, progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
