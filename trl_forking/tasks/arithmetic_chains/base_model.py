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

The result is cached in ``$XDG_CACHE_HOME/trl-forking/base-<hash>`` (``~/.cache`` when unset). ``<hash>`` covers
everything the weights depend on (``build_key``): the recipe, the build code itself (this module and the task module,
as syntax trees without docstrings or comments), the bytes of the train split, the versions of the libraries the build
runs and the CPU's vector instruction set that torch dispatches to. The last matters: float results of matrix
products and reductions depend on the kernels chosen for the CPU (AVX2 or AVX-512), and SFT turns those last-bit
differences into other weights (``docs/task.md`` has the experiment). The recipe is made to converge, so that every
such build reasons the same way; ``build.json`` records the key and the sha256 of the weights.

A build runs in a child process on the CPU with ``num_threads`` torch threads and a clean environment (no
distributed launcher variables, no visible GPU), so it is the same build whether it is called from a notebook, a
training script on a GPU node or one rank of ``accelerate launch``, and it leaves the caller's torch, accelerate and
random state as they were. It is written to a temporary directory next to the target and renamed into place, so an
interrupted or concurrent build never leaves a directory that looks finished. The directory has a Hub model
repository's layout (``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) plus
``build.json``. ``python -m trl_forking.scripts.base_model`` builds it and prints the path.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "BaseModelRecipe",
    "base_model_dir",
    "build_base_model",
    "build_code_fingerprint",
    "build_environment",
    "build_key",
    "build_tokenizer",
]

SPECIAL_TOKENS = {"pad": "<|endoftext|>", "start": "<|im_start|>", "end": "<|im_end|>"}
# Qwen's ChatML layout without the system-prompt and tool branches: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILD_FILE = "build.json"
# The command line of a build process (and of users: it builds or finds the model and prints its path).
BUILD_SCRIPT = "trl_forking.scripts.base_model"
# The files whose sha256 build.json records: what two builds must share to be the same model.
WEIGHT_FILES = ("model.safetensors", "tokenizer.json")
# The distributions whose code runs during a build; their versions are part of the cache key.
# MKL's conditional numerical reproducibility: another code path for the same CPU, hence other last bits.
MKL_VARIABLES = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
BUILD_LIBRARIES = ("torch", "transformers", "trl", "tokenizers", "accelerate", "datasets", "numpy", "safetensors")
# Variables a launcher (torchrun, accelerate, DeepSpeed, Slurm's srun through them) sets for its processes; a build
# must not see them, or its SFTTrainer would join (and then tear down) the caller's process group.
_LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "CROSS_RANK",
    "CROSS_SIZE",
    "LOCAL_SIZE",
)
_LAUNCHER_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "FSDP_", "TORCH_NCCL_", "NCCL_")


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
    # Four heads of 16: with two of 32 the same model learned the task in about twice the steps (docs/task.md).
    num_heads: int = 4
    num_kv_heads: int = 4
    max_positions: int = 256
    # SFT (TRL SFTTrainer, completion-only loss, AdamW). Twice the steps the task takes to learn, so that every seed
    # and every machine's build ends converged (docs/task.md).
    sft_steps: int = 1600
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
    # torch threads of the build process (its own process: the caller's setting is not touched). Part of the recipe:
    # a matrix product split over another number of threads rounds differently.
    num_threads: int = 2

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
        """Returns 10 hex digits of the SHA-256 of ``build_key(self)``: the name of the cache directory."""
        payload = json.dumps(build_key(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _syntax_tree(source: str) -> str:
    """Returns ``ast.dump`` of the module ``source`` without its docstrings: what runs, not how it is written."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def build_code_fingerprint() -> str:
    """Returns the SHA-256 of the build code: this module and the task module, as syntax trees without docstrings.

    Any change to what the build runs (a default, a line of ``_build``, the noise of the SFT targets) gives a new
    fingerprint, hence a new cache directory; comments, docstrings and formatting do not.
    """
    from . import task

    digest = hashlib.sha256()
    for module_file in (__file__, task.__file__):
        with open(module_file, encoding="utf-8") as f:
            digest.update(_syntax_tree(f.read()).encode())
    return digest.hexdigest()


def build_environment() -> dict:
    """Returns what of the machine and its software a build's weights depend on.

    ``versions``: each distribution of ``BUILD_LIBRARIES``; ``cpu_capability``: the vector instruction set torch's CPU
    kernels dispatch to (``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX2``, ``AVX512``; the environment
    variable ``ATEN_CPU_CAPABILITY`` lowers it), which also selects MKL's code path; ``mkl``: the variables that
    pin MKL to another code path (``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``; set ones only); ``machine``: the
    architecture.
    """
    import torch

    return {
        "versions": {name: metadata.version(name) for name in BUILD_LIBRARIES},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": {name: os.environ[name] for name in MKL_VARIABLES if name in os.environ},
        "machine": platform.machine(),
    }


def build_key(recipe: BaseModelRecipe) -> dict:
    """Returns everything the weights of ``recipe``'s build depend on: the recipe's fields, the build code's
    fingerprint, the SHA-256 of the train split file and ``build_environment()``."""
    from .task import split_path

    return {
        "recipe": dataclasses.asdict(recipe),
        "code": build_code_fingerprint(),
        "train_data": _file_sha256(split_path("train")),
        **build_environment(),
    }


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


def build_here(recipe: BaseModelRecipe, output_dir: str, progress: bool, on_trainer=None) -> dict:
    """Trains the tokenizer and the SFT model of ``recipe`` into ``output_dir`` in this process, on the CPU with
    ``recipe.num_threads`` threads; returns the build record. ``build_base_model`` runs it in a child process
    (``python -m trl_forking.scripts.base_model --build-into``), which passes ``on_trainer``: a function called with
    the ``SFTTrainer`` before training when ``progress`` is on (the script's compact log lines)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .task import read_split

    started = time.time()
    torch.set_num_threads(recipe.num_threads)
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
        use_cpu=True,  # the same weights on a GPU node as on a laptop of the same CPU family
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=max(1, recipe.sft_steps // 10),
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=not progress,
    )
    dataset = _sft_dataset(rows, recipe.digit_noise, recipe.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if progress:
        if on_trainer is not None:
            on_trainer(trainer)
    else:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # no progress bar, so no log lines either
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
        "hash": recipe.short_hash(),
        **build_key(recipe),  # recipe, code, train_data, versions, cpu_capability, mkl, machine
        "sha256": {name: _file_sha256(os.path.join(output_dir, name)) for name in WEIGHT_FILES},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sft_log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "sft_seconds": round(sft_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
    }


def _build_environ(recipe: BaseModelRecipe) -> dict[str, str]:
    """Returns the environment of a build process: the caller's, without launcher variables or visible GPUs, with
    ``recipe.num_threads`` OpenMP threads and this package importable."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if name not in _LAUNCHER_VARIABLES and not name.startswith(_LAUNCHER_PREFIXES)
    }
    import trl_forking

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(trl_forking.__file__)))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environ.get("PYTHONPATH")]))
    environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(recipe.num_threads))
    return environ


def _build_in_subprocess(recipe: BaseModelRecipe, output_dir: str, progress: bool) -> None:
    """Runs ``_build`` of ``recipe`` into ``output_dir`` (with its ``build.json``) in a child process.

    Raises:
        RuntimeError: the build process failed; its output (inherited stdout and stderr) says why.
    """
    command = [sys.executable, "-m", BUILD_SCRIPT, "--build-into", output_dir, "--recipe-json"]
    command.append(json.dumps(dataclasses.asdict(recipe)))
    if not progress:
        command.append("--no-progress")
    done = subprocess.run(command, env=_build_environ(recipe), check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"building the base model base-{recipe.short_hash()} failed (exit status {done.returncode}); the "
            "build process's output above says why"
        )


def build_base_model(
    recipe: BaseModelRecipe | None = None,
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Returns the directory of the base model of ``recipe``, building it first unless it is cached.

    The directory is ``base_model_dir(recipe, cache_dir)``; a build runs in a child process (module docstring), goes
    to a temporary sibling and is renamed into place when complete, so a directory with that name is always a
    finished model. When two processes build at once, the first rename wins and the other discards its copy.
    ``overwrite`` rebuilds a cached model.

    Args:
        recipe: what to build (``BaseModelRecipe()``: the demo's model).
        cache_dir: parent directory; default ``$XDG_CACHE_HOME/trl-forking`` (``~/.cache/trl-forking``).
        overwrite: rebuild even if the model is cached.
        progress: show TRL's SFT progress bar.
    """
    recipe = recipe or BaseModelRecipe()
    target = base_model_dir(recipe, cache_dir)
    if os.path.isdir(target) and not overwrite:
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.building-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would keep a shared cache from the rest of a group
    started = time.time()
    if progress:
        print(
            f"Building the base model {os.path.basename(target)} ({recipe.sft_steps} SFT steps on {recipe.task}; "
            f"about 1.5 minutes on 2 CPU cores, once: cached in {parent})",
            flush=True,
        )
    try:
        _build_in_subprocess(recipe, staging, progress)
        if overwrite and os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            # Another process finished the same build first: keep its copy, drop ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        with open(os.path.join(target, BUILD_FILE)) as f:
            weights = json.load(f).get("sha256", {}).get("model.safetensors", "?")
        print(
            f"Base model built in {time.time() - started:.0f} s: {target} (weights sha256 {weights[:12]})", flush=True
        )
    return target
