"""Ablation study of "Beyond the 80/20 Rule" on your model: several arms of the forking selection (top 20% vs all
tokens vs bottom 80% vs random 20%, other ratios), each with several seeds, from one base model, compared on held-out
problems with error bars.

    python recipes/ablation.py                                        # the default grid (recipes/ablation.yaml)
    python recipes/ablation.py --quick --output_dir /tmp/ablation     # 4 arms, 1 seed, a few steps: under a minute
    python recipes/ablation.py --arms top:0.2 all --seeds 0 1 2 3 4 --max_steps 100

One YAML (``recipes/ablation.yaml``, or ``--config``) holds the grid, the evaluation and the training settings; flags
override it. Every run starts from the same model with its seed's data order and sampling, so that arms differ only
by which tokens train. Each run writes ``output_dir/runs/<arm>/seed-<s>/`` (``forking_run.json``,
``forking_eval.jsonl``, ``trainer_state.json``); at the end ``output_dir`` gets ``results.json`` (one record per run
and evaluation point: arm, seed, step, accuracy figures, forking metrics) and the table and plots of
``trl-forking compare``, which gives the same from any set of run directories (e.g. Qwen3 arms trained as separate
multi-GPU jobs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PrinterCallback, TrainerCallback

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer
from trl_forking.analysis.study import compare_runs, format_table
from trl_forking.evaluation.callback import HeldOutEvaluationCallback
from trl_forking.evaluation.records import Arm, write_run_info
from trl_forking.rewards import get_reward_funcs
from trl_forking.scripts.allowed import GRPO_OPTIONS, at_least, one_of, report_to_names, seed_value
from trl_forking.scripts.console import quiet_known_noise
from trl_forking.scripts.launch import cpu_defaults, world_size
from trl_forking.scripts.recipe_args import RecipeParser
from trl_forking.scripts.run_dir import make_output_dir
from trl_forking.scripts.run_length import check_run_length
from trl_forking.scripts.usage import UsageError, check_model, exit_on_usage_error, input_errors
from trl_forking.selection import SELECTIONS, check_quantile

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ablation.yaml")
PROG = "trl-forking ablate"
QUICK = {
    "arms": ["top:0.2", "all", "bottom:0.2", "random:0.2"],
    "seeds": [0],
    "eval_every": 0,
    "eval_num_problems": 32,
    "eval_num_samples": 2,
    "max_steps": 3,
}


@dataclass
class AblationArguments:
    """The grid and the held-out evaluation of the study."""

    arms: list[str] = field(
        default_factory=lambda: ["top:0.2", "all", "bottom:0.2", "random:0.2", "top:0.1", "top:0.5"],
        metadata={"help": "Arms as selection:rho (top, bottom, random) or all; bottom:0.2 trains the bottom 80%."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds run by every arm."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model every arm starts from; unset: the bundled task's base model."}
    )
    eval_every: int = field(
        default=20, metadata={"help": "Evaluate every N optimizer steps (0: only before and after training)."}
    )
    eval_num_problems: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N test problems (unset: the whole test split)."}
    )
    eval_num_samples: int = field(default=4, metadata={"help": "n of avg@n: completions per test problem."})
    eval_seed: int = field(
        default=1234, metadata={"help": "Sampling seed of every evaluation, the same for every run and step."}
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "Reduced grid for a smoke test, for the options not given with it: "
            + ", ".join(f"{k}={v}" for k, v in QUICK.items())
        },
    )


def parse_arms(specs: list[str]) -> list[Arm]:
    """Returns the arms of ``specs`` ("top:0.2", "all", ...), in order; raises ``UsageError`` naming a bad one."""
    arms = []
    for spec in specs:
        selection, _, rho = spec.partition(":")
        if selection not in SELECTIONS or (selection != "all" and not rho):
            raise UsageError(
                f"arms: {spec!r} is not allowed; use selection:rho with selection in {list(SELECTIONS)} "
                "(e.g. top:0.2, bottom:0.2) or all"
            )
        with input_errors(f"arms: {spec!r}", ValueError):
            arm = Arm.of(selection, check_quantile(float(rho), "rho") if rho else 1.0)
        if arm.selection == "bottom" and arm.rho == 1.0:
            raise UsageError(f"arms: {spec!r} selects nothing (the bottom of rho = 1); use rho in (0, 1)")
        if arm in arms:
            raise UsageError(f"arms: {spec!r} is listed twice")
        arms.append(arm)
    if not arms:
        raise UsageError("arms: none given")
    return arms


def slug(arm: Arm) -> str:
    return "all" if arm.selection == "all" else f"{arm.selection}-{arm.rho:g}"


def _figure(value: float | None) -> str:
    """Returns a logged metric as printed: three decimals, or n/a for None (nothing to average) or NaN."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


class StudyProgress(TrainerCallback):
    """Prints one line per logging step and per evaluation: run, arm, seed, step, reward or accuracy, time left.

    Time left extrapolates the seconds per optimizer step of the study so far to the steps still to train.
    """

    def __init__(self, total_steps: int):
        self.started, self.total_steps, self.done_steps = time.time(), total_steps, 0
        self.run_label, self.run_steps = "", 0

    def start_run(self, label: str) -> None:
        self.run_label = label
        self.done_steps += self.run_steps
        self.run_steps = 0

    def _clock(self) -> str:
        elapsed = time.time() - self.started
        done = self.done_steps + self.run_steps
        left = elapsed / done * (self.total_steps - done) if done else float("nan")
        return f"{_duration(elapsed)} elapsed" + (f", ~{_duration(left)} left" if done else "")

    def on_step_end(self, args, state, control, **kwargs):
        self.run_steps = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            # A metric with nothing to average is logged as None: the threshold of a step whose groups all had equal
            # rewards (no completion selected), for one.
            reward, threshold = (_figure(logs.get(name)) for name in ("reward", "forking/threshold"))
            print(
                f"{self.run_label} step {state.global_step}/{state.max_steps}  reward {reward}  "
                f"threshold {threshold}  | {self._clock()}",
                flush=True,
            )

    def report(self, record: dict) -> None:
        print(
            f"{self.run_label} step {record['step']}: held-out accuracy {100 * record['accuracy']:.1f}% "
            f"+- {100 * (record['stderr'] or 0):.1f}  | {self._clock()}",
            flush=True,
        )


def base_evaluation(model_path: str, problems, callback_kwargs: dict) -> dict:
    """Returns the step-0 record every run shares: the starting model evaluated once with the study's sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    return HeldOutEvaluationCallback(problems, **callback_kwargs).evaluate(model, tokenizer)


def forking_metrics_at(log_history: list[dict], step: int) -> dict:
    """Returns the ``forking/*`` metrics of the last log entry at or before ``step`` ({} before the first)."""
    latest = {}
    for entry in log_history:
        if entry.get("step", 0) <= step and any(key.startswith("forking/") for key in entry):
            latest = {key: value for key, value in entry.items() if key.startswith("forking/")}
    return latest


def run_study(
    study: AblationArguments, training: ForkingGRPOConfig, run_args: Callable[..., ForkingGRPOConfig]
) -> dict:
    """Returns the ``compare_runs`` summary after training every arm x seed and writing the study's files.

    ``training`` holds the settings shared by every run; ``run_args(**overrides)`` returns them with one run's
    overrides (parsed again: a ``TrainingArguments`` derives fields when built and cannot be copied with changes).
    """
    import torch
    from transformers.utils import logging as transformers_logging

    from trl_forking.tasks.arithmetic_chains.base_model import build_base_model
    from trl_forking.tasks.arithmetic_chains.task import load_task

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per run; the study prints its own lines
    arms = parse_arms(study.arms)
    model_path = study.model_name_or_path or build_base_model()
    if study.model_name_or_path is None and not torch.cuda.is_available():
        torch.set_num_threads(1)  # a 0.2M-parameter model gains nothing from intra-op threads (see the demo)
    train, test = load_task("train"), load_task("test")
    if study.eval_num_problems is not None:
        test = test.select(range(min(study.eval_num_problems, len(test))))
    sampling = dict(
        num_samples=study.eval_num_samples,
        max_new_tokens=training.max_completion_length,
        temperature=training.temperature,
        top_p=training.top_p,
        seed=study.eval_seed,
    )
    reward_funcs = get_reward_funcs(["math_accuracy"], training.max_completion_length)
    runs = [(arm, seed) for arm in arms for seed in study.seeds]
    progress = StudyProgress(total_steps=len(runs) * training.max_steps)
    print(
        f"Ablation: {len(arms)} arms x {len(study.seeds)} seeds = {len(runs)} runs of {training.max_steps} steps "
        f"from {model_path}; evaluation: avg@{study.eval_num_samples} on {len(test)} test problems",
        flush=True,
    )
    initial = base_evaluation(model_path, test, sampling)
    print(f"step 0 (every run's starting model): held-out accuracy {100 * initial['accuracy']:.1f}%", flush=True)
    run_dirs = []
    for index, (arm, seed) in enumerate(runs, start=1):
        run_dir = os.path.join(training.output_dir, "runs", slug(arm), f"seed-{seed}")
        if os.path.exists(os.path.join(run_dir, "forking_eval.jsonl")):
            os.remove(os.path.join(run_dir, "forking_eval.jsonl"))  # a re-run of the study replaces its runs
        args = run_args(
            output_dir=run_dir,
            seed=seed,
            data_seed=seed,
            forking_selection=arm.selection,
            top_entropy_quantile=arm.rho if arm.selection != "all" else training.top_entropy_quantile,
            disable_tqdm=True,
            save_strategy="no",
            report_to="none",
        )
        write_run_info(
            run_dir,
            arm.selection,
            arm.rho,
            seed,
            model=model_path,
            loss_type=args.loss_type,
            forking_scope=args.forking_scope,
            max_steps=args.max_steps,
        )
        progress.start_run(f"[run {index}/{len(runs)}] {arm.label} seed {seed}")
        evaluation = HeldOutEvaluationCallback(
            test, every_n_steps=study.eval_every, initial=dict(initial), on_result=progress.report, **sampling
        )
        trainer = ForkingGRPOTrainer(
            model=model_path,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train,
            callbacks=[evaluation, progress],
        )
        trainer.pop_callback(PrinterCallback)  # the study prints its own line per log
        trainer.train()
        trainer.save_state()
        run_dirs.append(run_dir)
    summary = compare_runs(run_dirs, training.output_dir)
    results = []
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "forking_run.json")) as f:
            info = json.load(f)
        with open(os.path.join(run_dir, "trainer_state.json")) as f:
            history = json.load(f)["log_history"]
        with open(os.path.join(run_dir, "forking_eval.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                results.append(
                    {
                        "arm": Arm.of(info["selection"], info["rho"]).label,
                        **info,
                        **record,
                        "forking": forking_metrics_at(history, record["step"]),
                        "run_dir": run_dir,
                    }
                )
    with open(os.path.join(training.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(summary))
    print(f"Runs, results.json, compare.md and the plots in {os.path.abspath(training.output_dir)}")
    return summary


def with_quick(study: AblationArguments, argv: list[str]) -> tuple[AblationArguments, list[str]]:
    """Returns ``study`` and ``argv`` with the ``QUICK`` values of the options the command line leaves unset (flags
    given with ``--quick`` win: ``--quick --arms top:0.2 all`` keeps those two arms)."""
    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    quick = {name: value for name, value in QUICK.items() if name not in given}
    if "max_steps" in quick:
        argv = [*argv, "--max_steps", str(quick.pop("max_steps"))]
    return dataclasses.replace(study, **quick), argv


def allowed_options() -> tuple:
    """Returns the ``trl_forking.scripts.allowed`` table of the study's options: the training options of
    recipes/grpo_forking.py, a positive ``max_steps`` (arms are compared at fixed steps) and the evaluation's."""
    return (
        *GRPO_OPTIONS,
        one_of("report_to", report_to_names()),
        at_least("max_steps", 1, "every run trains this many steps; the arms are compared at the same steps"),
        seed_value("seeds"),
        at_least("eval_every", 0, "0 evaluates before and after training only"),
        at_least("eval_num_problems", 1, unset="the whole test split"),
        at_least("eval_num_samples", 1, "completions per test problem"),
        seed_value("eval_seed"),
    )


def main(argv: list[str]) -> dict:
    import torch

    if world_size() > 1:
        raise UsageError(
            f"launch: ablation.py trains its runs one after another on one process, not {world_size()}; run it with "
            "python, or train multi-GPU arms with recipes/grpo_forking.py and compare them (docs/ablation.md)"
        )
    parser = RecipeParser((AblationArguments, ForkingGRPOConfig), allowed=allowed_options())
    if not torch.cuda.is_available():
        parser.set_defaults(**cpu_defaults())  # bf16 and pinned memory off, as in recipes/grpo_forking.py
    study, training = parser.parse_recipe(argv, DEFAULT_CONFIG)
    if study.quick:
        study, argv = with_quick(study, argv)
        training = parser.parse_recipe(argv, DEFAULT_CONFIG)[1]

    def run_args(**overrides) -> ForkingGRPOConfig:
        flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
        return parser.parse_recipe([*argv, *flags], DEFAULT_CONFIG)[1]

    if not study.seeds:
        raise UsageError("seeds: none given")
    parse_arms(study.arms)  # bad arms are reported before anything loads
    if study.model_name_or_path is not None:
        check_model(study.model_name_or_path)
    from trl_forking.tasks.arithmetic_chains.task import TASK_NAME, load_task

    train_split = f"the {TASK_NAME} train split"
    check_run_length(len(load_task("train")), training, "per_device_train_batch_size", train_split)
    make_output_dir(training.output_dir)
    return run_study(study, training, run_args)


def run(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line ``trl-forking ablate`` (``prog`` names it in errors) on ``argv`` (``sys.argv[1:]`` when
    None); bad input ends the process with one line on stderr and exit status 2. Returns 0."""
    quiet_known_noise()
    with exit_on_usage_error(prog):
        main(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(run())
