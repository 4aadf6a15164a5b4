"""A training run's output directory: which checkpoint to resume from, and what a new run would overwrite.

Policy (the recipe script applies it before loading anything):

- ``--resume_from_checkpoint true`` (or ``last``) resumes from the newest complete ``checkpoint-N`` of ``output_dir``;
  a path resumes from that checkpoint. Either is an error when there is nothing to resume.
- A fresh run refuses an ``output_dir`` that holds checkpoints: they are the resumable state of a run that may have
  taken days, and a new run would overwrite or rotate them away. ``--overwrite_output_dir true`` deletes them first.
- A fresh run in an ``output_dir`` that holds only a finished run (a saved model, ``trainer_state.json``) goes ahead
  after one line saying what it will overwrite: re-running a command is the common case, and nothing resumable is lost.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil

from .usage import UsageError

__all__ = ["RESUME_LAST", "checkpoints", "check_output_dir", "make_output_dir", "newest_checkpoint", "resolve_resume"]

RESUME_LAST = ("true", "last")
_NO_RESUME = ("", "false", "none", "no")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written after the model, optimizer and RNG states (transformers' _save_checkpoint): its presence marks a complete one.
_STATE_FILE = "trainer_state.json"
_FINISHED_FILES = ("trainer_state.json", "model.safetensors", "config.json")


def checkpoints(output_dir: str) -> list[str]:
    """Returns the ``checkpoint-N`` folders of ``output_dir`` (paths), oldest step first; [] if there are none."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name)))
    paths = [os.path.join(output_dir, name) for _, name in found]
    return [path for path in paths if os.path.isdir(path)]


def newest_checkpoint(output_dir: str) -> str | None:
    """Returns the newest complete checkpoint of ``output_dir`` (one with ``trainer_state.json``), or None."""
    complete = [path for path in checkpoints(output_dir) if os.path.isfile(os.path.join(path, _STATE_FILE))]
    return complete[-1] if complete else None


def resolve_resume(value: str | bool | None, output_dir: str) -> str | None:
    """Returns the checkpoint folder that ``--resume_from_checkpoint value`` names, or None for a fresh run.

    ``true`` / ``last`` (any case) name the newest complete checkpoint of ``output_dir``; ``false``, ``none`` or
    empty name none; anything else is a checkpoint folder. Raises ``UsageError`` when it names nothing resumable.
    """
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in _NO_RESUME:
        return None
    if value is True or text.lower() in RESUME_LAST:
        newest = newest_checkpoint(output_dir)
        if newest is None:
            found = checkpoints(output_dir)
            detail = f"only incomplete ones ({os.path.basename(found[-1])} has no {_STATE_FILE})" if found else "none"
            raise UsageError(
                f"resume_from_checkpoint: {text!r} resumes the newest checkpoint-N of output_dir {output_dir!r}, and "
                f"it has {detail}; start a fresh run without the flag, or give a checkpoint folder"
            )
        return newest
    if not os.path.isfile(os.path.join(text, _STATE_FILE)):
        what = "a folder without trainer_state.json" if os.path.isdir(text) else "no such folder"
        raise UsageError(
            f"resume_from_checkpoint: {text!r} is {what}; give a checkpoint-N folder, or true / last for the newest "
            f"in output_dir"
        )
    return text


def _finished_run(output_dir: str) -> str | None:
    """Returns a short description of the finished run saved in ``output_dir`` ("100 steps, saved 2025-..."), or
    None when it holds none."""
    present = [name for name in _FINISHED_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if not present:
        return None
    newest = max(os.path.getmtime(os.path.join(output_dir, name)) for name in present)
    saved = datetime.datetime.fromtimestamp(newest).strftime("%Y-%m-%d %H:%M")
    try:
        with open(os.path.join(output_dir, _STATE_FILE)) as f:
            step = json.load(f)["global_step"]
        steps = f"{step} step{'s' * (step != 1)}, "
    except (OSError, ValueError, KeyError):
        steps = ""
    return f"{steps}saved {saved}"


def make_output_dir(output_dir: str, field: str = "output_dir") -> None:
    """Creates ``output_dir`` (with its parents) now, so that a folder the run could not write fails before anything
    loads, not when the first checkpoint or the model is saved; raises ``UsageError`` naming ``field`` otherwise."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"{field}: {output_dir!r} is a file; give a folder to write the run to")
    problem = None
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        problem = f"cannot create {output_dir!r} ({error.strerror or type(error).__name__})"
    if problem is None and not os.access(output_dir, os.W_OK | os.X_OK):
        problem = f"{output_dir!r} is not writable"
    if problem is not None:
        raise UsageError(f"{field}: {problem}; give a folder the run can write to")


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool, is_main_process: bool = True) -> str | None:
    """Returns a one-line notice when a fresh run will overwrite a finished run in ``output_dir`` (None otherwise).

    Raises ``UsageError`` when ``output_dir`` holds checkpoints and the run neither resumes nor ``overwrite``s. With
    ``overwrite`` the checkpoints are deleted, by the main process only, and the notice says so.
    """
    if resuming:
        return None
    found = checkpoints(output_dir)
    if found and not overwrite:
        raise UsageError(
            f"output_dir: {output_dir!r} holds {len(found)} checkpoint(s) of an earlier run (newest "
            f"{os.path.basename(found[-1])}); continue it with --resume_from_checkpoint true, start over with "
            "--overwrite_output_dir true (deletes them), or choose another --output_dir"
        )
    if found:
        if is_main_process:
            for path in found:
                shutil.rmtree(path)
        return f"output_dir {output_dir!r}: deleted {len(found)} checkpoint(s) of an earlier run (overwrite_output_dir)"
    finished = _finished_run(output_dir)
    if finished is not None:
        return f"output_dir {output_dir!r} holds a finished run ({finished}); this run overwrites it"
    return None
