"""AIME avg@n and pass@k of a model, scored with math-verify: the paper's evaluation (AIME'24 / '25, avg@32).

    python recipes/eval_aime.py --model_name_or_path outputs/qwen3-8b/forking_dapo \\
        --datasets aime24 aime25 --num_samples 32 --k 1 8 32 --temperature 1.0 --top_p 0.7 --max_new_tokens 20480

Samples ``num_samples`` completions per problem (vLLM when it is installed and a GPU is there, else transformers'
``generate`` through ``trl_forking.evaluation``), grades each with ``trl_forking.rewards.math_accuracy_reward``
(``\\boxed{}`` or DAPO's ``Answer:`` line) and writes, per dataset, ``<name>.jsonl`` (one line per problem:
completions, verdicts, pass@k) and ``<name>_summary.json`` (avg@n with its standard error, pass@k). Datasets are
``EVAL_SETS`` keys, their Hub names, local files with ``problem`` (or ``question``) and ``answer`` columns, or
``arithmetic-chains``: the bundled task's test split, posed with the task's own prompt (AIME problems get DAPO's
instruction). ``--run_dir RUN`` evaluates a training run of ``recipes/grpo_forking.py`` at its start, checkpoints and
end for ``trl-forking compare`` (docs/ablation.md), each step in a process of its own under vLLM (one engine per
process). ``--config eval.yaml`` reads the same fields from YAML. It will not overwrite another model's results in
``output_dir``. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from trl_forking.data import load_math_eval
from trl_forking.evaluation import generate_completions, score_problem, summarize
from trl_forking.scripts.allowed import above, at_least, between, seed_value
from trl_forking.scripts.recipe_args import RecipeParser
from trl_forking.scripts.run_dir import make_output_dir
from trl_forking.scripts.usage import (
    EXIT_USAGE,
    UsageError,
    check_data_source,
    check_model,
    exit_on_usage_error,
    input_errors,
)

PROG = "trl-forking evaluate"

BACKENDS = ("auto", "vllm", "transformers")
# What each option may hold, checked as the command line is parsed (trl_forking.scripts.allowed); num_samples, k and
# backend are checked by EvalArguments itself.
ALLOWED = (
    above("temperature", 0, "the sampling temperature"),
    between("top_p", "(0, 1]", "nucleus sampling; 1 turns it off"),
    at_least("max_new_tokens", 1, "tokens per completion"),
    at_least("batch_size", 1, "completions generated at once"),
    at_least("tensor_parallel_size", 1, "GPUs per vLLM replica"),
    at_least("limit", 1, unset="every problem"),
    seed_value("seed"),
)


@dataclass
class EvalArguments:
    """What to evaluate and how to sample; defaults are the paper's validation settings."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model to evaluate: Hub name or local folder (with --run_dir: the run's starting model)."},
    )
    datasets: list[str] = field(
        default_factory=lambda: ["aime24", "aime25"],
        metadata={
            "help": "Eval sets: aime24, aime25, aime25-opencompass, a Hub name of those, local files, or "
            "arithmetic-chains (the bundled task's test split)."
        },
    )
    num_samples: int = field(default=32, metadata={"help": "Completions per problem, n of avg@n (paper: 32)."})
    k: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "pass@k values; each k <= n."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling (paper's validation: 0.7)."})
    max_new_tokens: int = field(default=20480, metadata={"help": "Longest completion, in tokens (paper: 20,480)."})
    backend: str = field(default="auto", metadata={"help": "auto (vLLM if usable), vllm or transformers."})
    batch_size: int = field(
        default=8, metadata={"help": "transformers backend: completions (prompt x sample) generated at once."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend: GPUs per model replica."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems (smoke tests)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the JSONL and summaries go."})
    run_dir: str | None = field(
        default=None,
        metadata={
            "help": "A run of recipes/grpo_forking.py to evaluate for `trl-forking compare`: its starting model (step "
            "0; --model_name_or_path, else the model its forking_run.json names), every checkpoint-N and its final "
            "model, on the first of --datasets. Each result is appended to RUN_DIR/forking_eval.jsonl (steps already "
            "there are skipped); per-step files go to RUN_DIR/eval/step-N."
        },
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.run_dir is None:
            raise ValueError("model_name_or_path: missing; give the model to evaluate (or --run_dir, a training run).")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not allowed; use one of {list(BACKENDS)}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples: {self.num_samples} must be >= 1.")
        bad = [k for k in self.k if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"k: {bad} not allowed; each k must be in [1, num_samples={self.num_samples}].")


def result_stem(name: str) -> str:
    """Returns the file stem of a dataset's results in ``output_dir``: ``data/aime_2024.jsonl`` -> ``aime_2024``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(name))[0])


def check_inputs(args: EvalArguments) -> None:
    """Raises ``UsageError`` for a model, dataset or backend the run would fail on later, or for an ``output_dir``
    holding another model's results on the same datasets; prints a line for each of this model's it overwrites."""
    if args.run_dir is not None:
        check_run_dir(args)
        return
    check_model(args.model_name_or_path)
    for name in args.datasets:
        check_data_source(name, "datasets")
    if args.backend == "vllm":
        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise UsageError(
                "backend: 'vllm' needs the vllm package and a CUDA GPU (pip install -e '.[vllm]'); use --backend "
                "transformers, or auto to take vLLM when it is usable"
            )
    make_output_dir(args.output_dir)
    for name in args.datasets:
        path = os.path.join(args.output_dir, f"{result_stem(name)}_summary.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f, input_errors(f"output_dir: {path}"):
            previous = json.load(f).get("model")
        if os.path.normpath(str(previous)) != os.path.normpath(args.model_name_or_path):
            raise UsageError(
                f"output_dir: {args.output_dir!r} holds results of another model ({previous!r}) on {name!r}; "
                "choose another --output_dir"
            )
        print(f"output_dir {args.output_dir!r}: overwriting the earlier results of this model on {name!r}")


def check_run_dir(args: EvalArguments) -> None:
    """Raises ``UsageError`` for a ``run_dir`` that is not a run of recipes/grpo_forking.py or a starting model that
    is not there; fills ``args.model_name_or_path`` from the run's ``forking_run.json`` when it is unset."""
    from trl_forking.evaluation.records import RUN_FILE

    info_path = os.path.join(args.run_dir, RUN_FILE)
    if not os.path.isfile(info_path):
        raise UsageError(
            f"run_dir: no {RUN_FILE} in {args.run_dir!r}; give the output_dir of a run of recipes/grpo_forking.py "
            "(it writes that file when training starts)"
        )
    with open(info_path) as f, input_errors(f"run_dir: {info_path}"):
        info = json.load(f)
    if args.model_name_or_path is None:
        args.model_name_or_path = info.get("model")
        if args.model_name_or_path is None:
            raise UsageError(f"run_dir: {info_path} names no starting model; give --model_name_or_path")
    check_model(args.model_name_or_path)


def run_points(args: EvalArguments) -> list[tuple[int, str]]:
    """Returns the (step, model folder) pairs of a training run: the starting model at step 0, each ``checkpoint-N``
    holding a model at step N, and the run's final model (a ``config.json`` in ``run_dir``) at the last step of its
    ``trainer_state.json``."""
    points = {0: args.model_name_or_path}
    for name in os.listdir(args.run_dir):
        folder = os.path.join(args.run_dir, name)
        found = re.fullmatch(r"checkpoint-(\d+)", name)
        if found and os.path.isfile(os.path.join(folder, "config.json")):
            points[int(found.group(1))] = folder
    state = os.path.join(args.run_dir, "trainer_state.json")
    if os.path.isfile(os.path.join(args.run_dir, "config.json")) and os.path.isfile(state):
        with open(state) as f:
            points[int(json.load(f)["global_step"])] = args.run_dir
    return sorted(points.items())


def point_argv(point: EvalArguments) -> list[str]:
    """Returns the command-line flags that parse back into ``point`` (``RecipeParser(EvalArguments)``): the child
    process of ``evaluate_run`` evaluates exactly what the parent would have."""
    argv = []
    for spec in fields(EvalArguments):
        value = getattr(point, spec.name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{spec.name}", *(str(v) for v in values)]
    return argv


def _evaluate_in_child(point: EvalArguments, name: str, eval_path: str) -> dict:
    """Returns the summary of ``point`` on dataset ``name`` after evaluating it in a Python process of its own (one
    vLLM engine per process, freed with the process); exits with the child's status when it fails."""
    done = subprocess.run([sys.executable, "-m", __spec__.name, *point_argv(point)], check=False)
    if done.returncode == EXIT_USAGE:
        sys.exit(EXIT_USAGE)  # the child said why, in its one line
    if done.returncode != 0:
        print(
            f"{PROG}: error: evaluating {point.model_name_or_path!r} stopped with exit status "
            f"{done.returncode} (its output is above); the steps before it are in {eval_path}",
            file=sys.stderr,
        )
        sys.exit(done.returncode)
    with open(os.path.join(point.output_dir, f"{result_stem(name)}_summary.json")) as f:
        return json.load(f)


def evaluate_run(args: EvalArguments) -> list[dict]:
    """Returns the evaluation records appended to ``run_dir/forking_eval.jsonl``, one per step not yet there.

    With vLLM each step (the starting model, a checkpoint, the final model) is evaluated in a child process of its own
    (``_evaluate_in_child``), as ``make_generator`` explains; with transformers in this process, one model at a time.
    """
    from trl_forking.evaluation.records import EVAL_FILE, append_evaluation

    eval_path = os.path.join(args.run_dir, EVAL_FILE)
    done = set()
    if os.path.isfile(eval_path):
        with open(eval_path) as f:
            done = {json.loads(line)["step"] for line in f if line.strip()}
    use_vllm = _use_vllm(args.backend)
    name, records = args.datasets[0], []
    for step, folder in run_points(args):
        if step in done:
            print(f"step {step}: already in {eval_path}, skipped")
            continue
        point = EvalArguments(
            **{**asdict(args), "model_name_or_path": folder, "datasets": [name], "run_dir": None},
        )
        point.output_dir = os.path.join(args.run_dir, "eval", f"step-{step}")
        if use_vllm:
            point.backend = "vllm"  # as decided here: the child must not fall back to another backend
            summary = _evaluate_in_child(point, name, eval_path)
        else:
            summary = main(point)[name]
        n = args.num_samples
        record = {
            "step": step,
            "accuracy": summary[f"avg@{n}"],
            "stderr": summary["stderr"],
            "pass@k": summary["pass@k"],
            "num_problems": summary["num_problems"] - summary["num_unscored"],
            "num_samples": n,
            "dataset": name,
            "model": folder,
        }
        append_evaluation(args.run_dir, record)
        records.append(record)
    return records


def _use_vllm(backend: str) -> bool:
    """Returns whether to generate with vLLM: asked for, or ``auto`` with vLLM installed and a GPU present."""
    if backend != "auto":
        return backend == "vllm"
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_generator(args: EvalArguments, use_vllm: bool) -> Callable[[list[list[dict]]], list[list[str]]]:
    """Returns ``generate(prompts)``: ``num_samples`` completions per prompt (chat template applied) from one engine
    that serves every dataset of this process, vLLM's offline engine or the model loaded once by transformers.

    One per process: vLLM does not reliably free GPU memory and its worker processes when a second ``LLM`` is
    created in the same process (tensor parallel especially), so ``evaluate_run`` runs each checkpoint in a process
    of its own when it generates with vLLM.
    """
    if use_vllm:
        from vllm import LLM, SamplingParams

        llm = LLM(args.model_name_or_path, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed)
        params = SamplingParams(
            n=args.num_samples, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens
        )
        return lambda prompts: [[o.text for o in out.outputs] for out in llm.chat(prompts, params)]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return lambda prompts: generate_completions(
        model,
        tokenizer,
        prompts,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )


def _format_summary(summary: dict, num_samples: int) -> str:
    """Returns ``avg@n = 63.4% (standard error 1.6%), pass@1 = 63.4%, pass@8 = 99.5%, 200 problems``."""

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    parts = [f"avg@{num_samples} = {pct(summary[f'avg@{num_samples}'])} (standard error {pct(summary['stderr'])})"]
    parts += [f"pass@{k} = {pct(v)}" for k, v in summary["pass@k"].items()]
    unscored = f" ({summary['num_unscored']} unscored)" if summary["num_unscored"] else ""
    return ", ".join(parts) + f", {summary['num_problems']} problems{unscored}"


def main(args: EvalArguments) -> dict[str, dict]:
    """Returns each dataset's summary after writing ``<name>.jsonl`` and ``<name>_summary.json`` to ``output_dir``."""
    os.makedirs(args.output_dir, exist_ok=True)
    use_vllm = _use_vllm(args.backend)
    generate = None  # built at the first dataset, so that a dataset that cannot be read fails before a model loads
    summaries = {}
    for name in args.datasets:
        with input_errors("datasets"):
            dataset = load_math_eval(name)
        if args.limit is not None:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        if generate is None:
            generate = make_generator(args, use_vllm)
        samples = generate(dataset["prompt"])
        rows = []
        for problem, completions in zip(dataset, samples, strict=True):
            rows.append(
                {
                    "id": problem["id"],
                    "problem": problem["problem"],
                    "answer": problem["answer"],
                    "completions": completions,
                    **score_problem(completions, problem["answer"], args.k),
                }
            )
        stem = result_stem(name)
        with open(os.path.join(args.output_dir, f"{stem}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        summary = {
            "model": args.model_name_or_path,
            "dataset": name,
            "backend": "vllm" if use_vllm else "transformers",
            **summarize(rows, args.k, args.num_samples),
            "settings": asdict(args),
        }
        with open(os.path.join(args.output_dir, f"{stem}_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"{name}: {_format_summary(summary, args.num_samples)}")
        summaries[name] = summary
    print(f"Per-problem JSONL and summaries saved in {os.path.abspath(args.output_dir)}")
    return summaries


def run(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line ``trl-forking evaluate`` (``prog`` names it in errors) on ``argv`` (``sys.argv[1:]`` when
    None); bad input ends the process with one line on stderr and exit status 2. Returns 0."""
    with exit_on_usage_error(prog):
        parser = RecipeParser(EvalArguments, allowed=ALLOWED)
        (eval_args,) = parser.parse_recipe(sys.argv[1:] if argv is None else argv)
        check_inputs(eval_args)
        if eval_args.run_dir is not None:
            evaluate_run(eval_args)
        else:
            main(eval_args)
    return 0


if __name__ == "__main__":
    sys.exit(run())
