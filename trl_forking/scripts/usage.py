"""Usage errors of the scripts users launch: one line on stderr naming the field, the bad value and what is allowed,
exit status 2, no traceback.

A script runs its body inside ``exit_on_usage_error(prog)``. Its own checks raise ``UsageError``; errors that a library
raises for bad input (a model folder that is not there, a dataset on a Hub that cannot be reached, a trainer refusing
a combination of options) become ``UsageError`` at the one call that meets them, through ``input_errors``. Everything
else keeps its traceback, so that a bug stays visible; ``TRL_FORKING_TRACEBACK=1`` shows the traceback of a translated
error too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time

__all__ = [
    "DATA_EXTENSIONS",
    "EXIT_USAGE",
    "UsageError",
    "check_data_source",
    "check_lora",
    "check_model",
    "check_quantization",
    "exit_on_usage_error",
    "input_errors",
    "one_line",
]

EXIT_USAGE = 2
TRACEBACK_ENV = "TRL_FORKING_TRACEBACK"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
# Under a multi-process launch every rank usually meets the same bad input. Ranks other than each node's first wait
# this long before they report: the launcher stops every rank as soon as one fails, so a node shows one message, not
# one per rank, while an error only a later rank meets is still reported.
OTHER_RANKS_DELAY_S = 3.0


class UsageError(Exception):
    """Bad input to a script; the message is the one line the user reads."""


def one_line(text) -> str:
    """Returns ``str(text)`` with every run of whitespace, newlines included, turned into one space."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def input_errors(
    what: str | None, *types: type[BaseException], traceback_hint: bool = False, fields: dict[str, str] | None = None
):
    """Re-raises the listed exception types (default ``OSError``, ``ValueError``) as ``UsageError``.

    The message is ``"{what}: {error}"``, or the error alone when ``what`` is None (for library messages that name the
    field already); ``fields`` maps a phrase of a library message that names a value but not its option to that
    option, which then leads the message. Wrap only calls whose failures with these types come from the user's input.
    ``traceback_hint`` ends the message with how to see the traceback, for calls deep enough that a bug could raise
    the same types.
    """
    caught = types or (OSError, ValueError)
    try:
        yield
    except caught as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        message = one_line(error) or type(error).__name__
        if what is None:
            what = next((name for phrase, name in (fields or {}).items() if phrase in message), None)
        message = message if what is None else f"{what}: {message}"
        hint = f" ({TRACEBACK_ENV}=1 shows where it was raised)" if traceback_hint else ""
        raise UsageError(message + hint) from error


@contextlib.contextmanager
def exit_on_usage_error(prog: str):
    """Ends the process with ``EXIT_USAGE`` and one line ``"{prog}: error: {message}"`` on a ``UsageError``."""
    try:
        yield
    except UsageError as error:
        local_rank = int(os.environ.get("LOCAL_RANK") or 0)
        if local_rank > 0:
            time.sleep(OTHER_RANKS_DELAY_S)
        rank = f" (rank {os.environ['RANK']})" if local_rank > 0 and "RANK" in os.environ else ""
        print(f"{prog}: error{rank}: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def check_model(name: str, field: str = "model_name_or_path", revision: str | None = None) -> str:
    """Returns ``name`` after checking that it names a model: a local folder with a ``config.json``, or a Hub
    repository whose config can be fetched (or is cached). Raises ``UsageError`` naming ``field`` otherwise.

    Only the config is read: minutes before the weights would be, and without loading them.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{field}: the folder {name!r} has no config.json; give a saved model folder or a Hub id")
        return name
    if os.path.exists(path):
        raise UsageError(f"{field}: {name!r} is a file; give a model folder (with config.json) or a Hub id")
    parent = os.path.dirname(path.rstrip("/"))
    if parent and os.path.isdir(parent):
        # "outputs/forking-demo" before the demo ran: the folder it sits in is here, so it is a path, not a Hub id.
        raise UsageError(f"{field}: no folder {name!r} (from {os.getcwd()}); {parent!r} has no such model folder")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(
            f"{field}: no folder {name!r} (from {os.getcwd()}), and it is not a Hub id of the form 'namespace/name'"
        ) from None
    from transformers import AutoConfig

    with input_errors(f"{field}: no folder {name!r} (from {os.getcwd()}), and the Hub did not give it", OSError):
        AutoConfig.from_pretrained(name, revision=revision)
    return name


def _blank(path: str, probe_bytes: int = 1 << 16) -> bool:
    """Returns whether the file at ``path`` holds nothing but whitespace (read up to ``probe_bytes``)."""
    with open(path, "rb") as f:
        head = f.read(probe_bytes)
    return not head.strip() and len(head) < probe_bytes


def check_data_source(name: str, field: str) -> str:
    """Returns ``name`` after checking that a local data source exists and is not empty. Raises ``UsageError`` naming
    ``field`` for a missing file that looks local (a path or a data-file extension) or a file with no content.

    A Hub name passes unchecked: its loader reports, and ``input_errors`` turns that into one line.
    """
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        if _blank(path):
            raise UsageError(f"{field}: the file {name!r} is empty; it needs one row per problem")
        return name
    if os.path.isdir(path):
        return name
    if name.startswith((".", "/", "~")) or name.lower().endswith(DATA_EXTENSIONS):
        raise UsageError(
            f"{field}: no file {name!r} (from {os.getcwd()}); give a {'/'.join(DATA_EXTENSIONS)} file, a saved "
            "dataset folder or a Hub dataset name"
        )
    return name


def check_quantization(model_args, hardware: bool = True) -> None:
    """Returns None after checking that the bitsandbytes quantization ``model_args`` (TRL's ``ModelConfig``) asks for,
    ``load_in_4bit`` or ``load_in_8bit``, can be trained; raises ``UsageError`` naming the field otherwise.

    A quantized model trains only through adapters (transformers refuses a purely quantized one, after loading it),
    so ``use_peft`` must be on. With ``hardware``, bitsandbytes must also be installed and a CUDA device present: the
    recipes' quantization runs on CUDA only, and without these checks the failure came minutes later, deep in
    ``from_pretrained``. A dry run plans on a machine without the GPUs and passes ``hardware=False``.
    """
    field = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if field is None:
        return
    if not model_args.use_peft:
        raise UsageError(
            f"{field}: a quantized model trains only through adapters (transformers refuses to fine-tune a purely "
            "quantized model); add --use_peft true (QLoRA), or drop the flag"
        )
    if not hardware:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"{field}: needs the bitsandbytes package, which is not installed (pip install -e '.[quantization]')"
        )
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"{field}: bitsandbytes quantization needs a CUDA GPU and torch sees none; drop the flag "
            "(--use_peft true alone trains bf16 LoRA adapters anywhere)"
        )


def check_lora(model_args) -> None:
    """Returns None after checking the ``lora_task_type`` of ``model_args`` (TRL's ``ModelConfig``) against peft's
    task types when ``use_peft`` is on and peft is installed; raises ``UsageError`` naming the field otherwise (peft's
    own message names the value only, and comes when the trainer is built)."""
    if not model_args.use_peft or importlib.util.find_spec("peft") is None:
        return
    from peft import TaskType

    allowed = [task.value for task in TaskType]
    if model_args.lora_task_type not in allowed:
        raise UsageError(
            f"lora_task_type: {model_args.lora_task_type!r} is not allowed; use one of {allowed} (CAUSAL_LM for the "
            "language models GRPO trains)"
        )
