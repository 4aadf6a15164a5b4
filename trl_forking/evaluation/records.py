"""The files a training run writes for the study (``trl_forking.analysis.study``, ``trl-forking compare``).

A run directory holds ``forking_run.json`` (its arm and seed, ``write_run_info``), ``forking_eval.jsonl`` (one
held-out evaluation per line, ``append_evaluation``: the ``HeldOutEvaluationCallback`` during training, or
``trl-forking evaluate --run_dir`` afterwards) and transformers' ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = ["EVAL_FILE", "RUN_FILE", "Arm", "append_evaluation", "write_run_info"]

RUN_FILE = "forking_run.json"
EVAL_FILE = "forking_eval.jsonl"


@dataclass(frozen=True, order=True)
class Arm:
    """One setting of the forking selection: ``selection`` ("top", "bottom", "random", "all") and rho."""

    selection: str
    rho: float

    @property
    def label(self) -> str:
        """Returns the arm as the paper names it: "top 20%", "bottom 80%", "random 20%", "all"."""
        if self.selection == "all":
            return "all"
        share = 1 - self.rho if self.selection == "bottom" else self.rho
        return f"{self.selection} {100 * share:g}%"

    @classmethod
    def of(cls, selection: str, rho: float) -> Arm:
        """Returns the arm; rho does not matter for "all" (every token trains), so it is set to 1."""
        return cls(selection, 1.0 if selection == "all" else float(rho))


def write_run_info(output_dir: str, selection: str, rho: float, seed: int, **extra) -> str:
    """Returns the path of ``output_dir/forking_run.json`` after writing the run's arm and seed (and ``extra``)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_FILE)
    arm = Arm.of(selection, rho)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"selection": arm.selection, "rho": arm.rho, "seed": int(seed), **extra}, f, indent=2)
    return path


def append_evaluation(output_dir: str, record: dict) -> None:
    """Appends one evaluation (``step`` plus its metrics) to ``output_dir/forking_eval.jsonl``."""
    if "step" not in record:
        raise ValueError(f"an evaluation record needs a 'step', got keys {sorted(record)}")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, EVAL_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
