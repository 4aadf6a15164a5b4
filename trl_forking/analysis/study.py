"""Comparing training runs arm by arm: do the paper's claims hold on your model, and how sure is the answer?

A run directory holds what one training run wrote: ``trainer_state.json`` (transformers; its ``log_history`` carries
the ``forking/*`` metrics), ``forking_run.json`` (the arm and seed, ``write_run_info``) and ``forking_eval.jsonl``
(one held-out evaluation per line, ``append_evaluation``). Runs of one arm differ only by seed. For each arm:

- final accuracy: the metric at the run's last evaluation;
- area under the accuracy curve (AUC): ``trapezoid(metric, step) / (last step - first step)``, the mean accuracy over
  training, in accuracy units;
- mean and standard error over seeds, ``SE = sd / sqrt(n)`` (sd with n - 1 degrees of freedom);
- the difference to the "all" arm (every token, plain GRPO) with a 95% confidence interval: paired by seed when both
  arms ran the same seeds (same data order and sampling seed, so the seed's own luck cancels), ``mean(d) +- t(0.975,
  n - 1) * sd(d) / sqrt(n)``; otherwise Welch's interval.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from ..evaluation.records import EVAL_FILE, RUN_FILE, Arm, append_evaluation, write_run_info

__all__ = [
    "EVAL_FILE",
    "RUN_FILE",
    "Arm",
    "Run",
    "append_evaluation",
    "area_under_curve",
    "compare_runs",
    "difference",
    "find_runs",
    "format_table",
    "load_run",
    "mean_and_se",
    "summarize_runs",
    "write_run_info",
]

STATE_FILE = "trainer_state.json"
DEFAULT_METRIC = "accuracy"
CONFIDENCE = 0.95


@dataclass
class Run:
    """One training run: its arm, seed, held-out evaluations (by step) and logged metrics."""

    path: str
    arm: Arm
    seed: int
    evaluations: list[dict]
    log_history: list[dict] = field(default_factory=list)

    def curve(self, metric: str = DEFAULT_METRIC) -> tuple[list[int], list[float]]:
        """Returns ``(steps, values)`` of ``metric`` over the evaluations ("pass@k" keys read ``pass@k``)."""
        steps, values = [], []
        for record in self.evaluations:
            value = _metric(record, metric)
            if value is not None:
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values


def _metric(record: dict, metric: str):
    if metric in record:
        return record[metric]
    return record.get("pass@k", {}).get(metric.removeprefix("pass@")) if metric.startswith("pass@") else None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def load_run(path: str) -> Run:
    """Returns the run in directory ``path``.

    Raises:
        FileNotFoundError: ``path``, its ``forking_run.json`` or its ``forking_eval.jsonl`` is missing.
        ValueError: a file is malformed (the message names the file and the field).
    """
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run directory not found: {path}")
    info_path, eval_path = os.path.join(path, RUN_FILE), os.path.join(path, EVAL_FILE)
    for needed in (info_path, eval_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f"{needed} not found: a run directory needs {RUN_FILE} and {EVAL_FILE} (written by trl-forking "
                "ablate or, for a run of trl-forking train, by trl-forking evaluate --run_dir)"
            )
    info = _read_json(info_path)
    missing = [key for key in ("selection", "rho", "seed") if key not in info]
    if missing:
        raise ValueError(f"{info_path}: missing {missing}")
    evaluations = []
    with open(eval_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{eval_path}:{number}: malformed JSON line ({error.msg})") from None
                if "step" not in record:
                    raise ValueError(f"{eval_path}:{number}: an evaluation needs a 'step'")
                evaluations.append(record)
    if not evaluations:
        raise ValueError(f"{eval_path}: no evaluations")
    # A step evaluated twice (e.g. a resumed run) keeps its last record.
    by_step = {int(record["step"]): record for record in evaluations}
    state_path = os.path.join(path, STATE_FILE)
    history = _read_json(state_path).get("log_history", []) if os.path.isfile(state_path) else []
    arm = Arm.of(info["selection"], info["rho"])
    return Run(path, arm, int(info["seed"]), [by_step[s] for s in sorted(by_step)], history)


def area_under_curve(steps: list[int], values: list[float]) -> float | None:
    """Returns ``trapezoid(values, steps) / (steps[-1] - steps[0])``: the mean of the curve over the step range (None
    with fewer than two points)."""
    if len(steps) < 2 or steps[-1] == steps[0]:
        return None
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:], strict=False))
    return area / (steps[-1] - steps[0])


def mean_and_se(values: list[float]) -> tuple[float | None, float | None]:
    """Returns the mean and the standard error ``sd / sqrt(n)`` (sd with n - 1 degrees of freedom; None for n < 2)."""
    if not values:
        return None, None
    n, mean = len(values), sum(values) / len(values)
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _t_quantile(probability: float, dof: float) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def difference(arm_values: dict[int, float], base_values: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """Returns the difference of means (arm - base) with its standard error and confidence interval.

    ``arm_values`` and ``base_values`` map seed -> value. With the same seeds on both sides the difference is paired:
    ``d_s = arm_s - base_s``, ``SE = sd(d) / sqrt(n)``, ``t`` with n - 1 degrees of freedom. Otherwise Welch:
    ``SE = sqrt(s_a^2 / n_a + s_b^2 / n_b)`` with the Welch-Satterthwaite degrees of freedom. The interval is None when
    there are too few seeds to estimate a spread.
    """
    tail = 0.5 + confidence / 2
    if arm_values and set(arm_values) == set(base_values):
        diffs = [arm_values[s] - base_values[s] for s in sorted(arm_values)]
        mean, se = mean_and_se(diffs)
        dof = len(diffs) - 1
        paired = True
    else:
        (mean_a, se_a), (mean_b, se_b) = mean_and_se(list(arm_values.values())), mean_and_se(list(base_values.values()))
        if mean_a is None or mean_b is None:
            return {"mean": None, "se": None, "ci": None, "paired": False, "n": 0}
        mean, paired = mean_a - mean_b, False
        se, dof = None, None
        if se_a is not None and se_b is not None:
            se = math.sqrt(se_a**2 + se_b**2)
            numerator = se**4
            denominator = se_a**4 / (len(arm_values) - 1) + se_b**4 / (len(base_values) - 1)
            dof = numerator / denominator if denominator > 0 else len(arm_values) + len(base_values) - 2
    ci = None
    if se is not None and dof:
        half = _t_quantile(tail, dof) * se
        ci = [mean - half, mean + half]
    return {"mean": mean, "se": se, "ci": ci, "paired": paired, "n": len(arm_values)}


def summarize_runs(runs: list[Run], metric: str = DEFAULT_METRIC, confidence: float = CONFIDENCE) -> dict:
    """Returns the per-arm table of ``runs``: for each arm, the seeds, mean and SE of the final value and of the AUC of
    ``metric``, and their differences to the "all" arm (``difference``), which is absent when no run trained on all
    tokens. Arms are ordered "all" first, then by selection and rho."""
    by_arm: dict[Arm, dict[int, Run]] = {}
    for run in runs:
        seeds = by_arm.setdefault(run.arm, {})
        if run.seed in seeds:
            raise ValueError(
                f"two runs of arm {run.arm.label!r} with seed {run.seed}: {seeds[run.seed].path}, {run.path}"
            )
        seeds[run.seed] = run
    finals, aucs = {}, {}
    for arm, seeds in by_arm.items():
        finals[arm], aucs[arm] = {}, {}
        for seed, run in seeds.items():
            steps, values = run.curve(metric)
            if not values:
                raise ValueError(f"{run.path}: no evaluation reports {metric!r}")
            finals[arm][seed] = values[-1]
            area = area_under_curve(steps, values)
            if area is not None:
                aucs[arm][seed] = area
    base = next((arm for arm in by_arm if arm.selection == "all"), None)
    rows = []
    for arm in sorted(by_arm, key=lambda a: (a.selection != "all", a.selection, a.rho)):
        final_mean, final_se = mean_and_se(list(finals[arm].values()))
        auc_mean, auc_se = mean_and_se(list(aucs[arm].values()))
        row = {
            "arm": arm.label,
            "selection": arm.selection,
            "rho": arm.rho,
            "seeds": sorted(by_arm[arm]),
            "final": {"mean": final_mean, "se": final_se, "by_seed": finals[arm]},
            "auc": {"mean": auc_mean, "se": auc_se, "by_seed": aucs[arm]},
        }
        if base is not None and arm != base:
            row["final_vs_all"] = difference(finals[arm], finals[base], confidence)
            row["auc_vs_all"] = difference(aucs[arm], aucs[base], confidence)
        rows.append(row)
    return {"metric": metric, "confidence": confidence, "base_arm": None if base is None else base.label, "arms": rows}


def _pct(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _interval(diff: dict | None) -> str:
    if not diff or diff["mean"] is None:
        return "n/a"
    ci = diff["ci"]
    bounds = "" if ci is None else f" [{_pct(ci[0], True)}, {_pct(ci[1], True)}]"
    return f"{_pct(diff['mean'], True)}{bounds}"


def format_table(summary: dict) -> str:
    """Returns the summary as a Markdown table, in percentage points: mean +- SE, and differences to "all" with their
    confidence interval in brackets."""
    level = f"{100 * summary['confidence']:g}%"
    lines = [
        f"| arm | seeds | final {summary['metric']} (%) | AUC (%) | final - all [{level} CI] "
        f"| AUC - all [{level} CI] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["arms"]:
        final, auc = row["final"], row["auc"]
        lines.append(
            f"| {row['arm']} | {len(row['seeds'])} | {_pct(final['mean'])} +- {_pct(final['se'])} "
            f"| {_pct(auc['mean'])} +- {_pct(auc['se'])} | {_interval(row.get('final_vs_all'))} "
            f"| {_interval(row.get('auc_vs_all'))} |"
        )
    return "\n".join(lines)


def find_runs(paths: list[str]) -> list[str]:
    """Returns the run directories in ``paths``: a path holding ``forking_run.json`` is a run; any other directory is
    searched for runs below it (sorted), so the output directory of a whole study can be given.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no run.
    """
    found = []
    for path in paths:
        path = os.path.expanduser(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"run directory not found: {path}")
        if os.path.isfile(os.path.join(path, RUN_FILE)):
            found.append(path)
            continue
        below = sorted(root for root, _, files in os.walk(path) if RUN_FILE in files)
        if not below:
            raise FileNotFoundError(f"no run in {path}: no {RUN_FILE} in it or below it")
        found.extend(below)
    return found


def compare_runs(run_dirs: list[str], output_dir: str | None = None, metric: str = DEFAULT_METRIC) -> dict:
    """Returns the ``summarize_runs`` table of the runs in ``run_dirs`` after writing, to ``output_dir`` when given,
    ``compare.json``, ``compare.md`` and two plots: accuracy against step per arm (mean +- SE over seeds) and the
    entropy percentiles over training per arm (from each run's logged ``forking/entropy_p*``)."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    runs = [load_run(path) for path in find_runs(run_dirs)]
    summary = summarize_runs(runs, metric)
    summary["runs"] = [{"path": run.path, "arm": run.arm.label, "seed": run.seed} for run in runs]
    if output_dir is not None:
        from .inputs import ensure_output_dir
        from .plots import plot_accuracy_curves, plot_entropy_percentiles

        output_dir = ensure_output_dir(output_dir)
        files = {
            "table": os.path.join(output_dir, "compare.md"),
            "json": os.path.join(output_dir, "compare.json"),
            "accuracy": plot_accuracy_curves(runs, metric, os.path.join(output_dir, "accuracy_curves.png")),
            "entropy": plot_entropy_percentiles(runs, os.path.join(output_dir, "entropy_percentiles.png")),
        }
        summary["files"] = files
        with open(files["table"], "w", encoding="utf-8") as f:
            f.write(format_table(summary) + "\n")
        with open(files["json"], "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=asdict)
    return summary
