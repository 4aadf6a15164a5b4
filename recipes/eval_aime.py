"""AIME avg@n and pass@k of a model, scored with math-verify: the paper's evaluation (AIME'24 / '25, avg@32).

    python recipes/eval_aime.py --model_name_or_path outputs/qwen3-8b/forking_dapo \\
        --datasets aime24 aime25 --num_samples 32 --k 1 8 32 --temperature 1.0 --top_p 0.7 --max_new_tokens 20480

Samples ``num_samples`` completions per problem (vLLM when it is installed and a GPU is there, else transformers'
``generate``), grades each with ``trl_forking.rewards.math_accuracy_reward`` (``\\boxed{}`` or DAPO's ``Answer:``
line) and writes, per dataset, ``<name>.jsonl`` (one line per problem: completions, verdicts, pass@k) and
``<name>_summary.json``. Datasets are ``EVAL_SETS`` keys, their Hub names, or local files with ``problem`` (or
``question``) and ``answer`` columns. ``--config eval.yaml`` reads the same fields from YAML. It will not overwrite
another model's results in ``output_dir``. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

from trl_forking.data import load_math_eval
from trl_forking.recipe_args import RecipeParser
from trl_forking.rewards import math_accuracy_reward
from trl_forking.usage import UsageError, check_data_source, check_model, exit_on_usage_error, input_errors

BACKENDS = ("auto", "vllm", "transformers")


@dataclass
class EvalArguments:
    """What to evaluate and how to sample; defaults are the paper's validation settings."""

    model_name_or_path: str = field(metadata={"help": "Model to evaluate: Hub name or local folder."})
    datasets: list[str] = field(
        default_factory=lambda: ["aime24", "aime25"],
        metadata={"help": "Eval sets: aime24, aime25, aime25-opencompass, a Hub name of those, or local files."},
    )
    num_samples: int = field(default=32, metadata={"help": "Completions per problem, n of avg@n (paper: 32)."})
    k: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "pass@k values; each k <= n."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling (paper's validation: 0.7)."})
    max_new_tokens: int = field(default=20480, metadata={"help": "Longest completion, in tokens (paper: 20,480)."})
    backend: str = field(default="auto", metadata={"help": "auto (vLLM if usable), vllm or transformers."})
    batch_size: int = field(default=8, metadata={"help": "transformers backend: completions generated at once."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend: GPUs per model replica."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems (smoke tests)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where the JSONL and summaries go."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not allowed; use one of {list(BACKENDS)}.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples: {self.num_samples} must be >= 1.")
        bad = [k for k in self.k if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"k: {bad} not allowed; each k must be in [1, num_samples={self.num_samples}].")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Returns the unbiased pass@k estimate ``1 - C(n - c, k) / C(n, k)`` from ``c`` correct of ``n`` samples.

    The chance that at least one of ``k`` samples drawn without replacement from the ``n`` is correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", Eq. 1); exact in integers.
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_problem(completions: list[str], answer: str, ks: list[int]) -> dict:
    """Returns the verdicts of ``completions`` against ``answer`` and the problem's accuracy and pass@k.

    ``accuracy`` and ``pass@k`` are None when math-verify cannot parse the gold answer (the problem is unscored).
    """
    rewards = math_accuracy_reward(completions, [answer] * len(completions))
    if any(r is None for r in rewards):
        return {"correct": None, "num_correct": None, "accuracy": None, "pass@k": None}
    correct = [r == 1.0 for r in rewards]
    n, c = len(correct), sum(correct)
    return {
        "correct": correct,
        "num_correct": c,
        "accuracy": c / n,
        "pass@k": {str(k): pass_at_k(n, c, k) for k in ks},
    }


def summarize(rows: list[dict], ks: list[int], num_samples: int) -> dict:
    """Returns avg@n (mean per-problem accuracy) and mean pass@k over the scored problems of ``rows``."""
    scored = [row for row in rows if row["accuracy"] is not None]
    mean = (lambda values: sum(values) / len(values)) if scored else (lambda values: None)
    return {
        "num_problems": len(rows),
        "num_unscored": len(rows) - len(scored),
        f"avg@{num_samples}": mean([row["accuracy"] for row in scored]),
        "pass@k": {str(k): mean([row["pass@k"][str(k)] for row in scored]) for k in ks},
    }


def result_stem(name: str) -> str:
    """Returns the file stem of a dataset's results in ``output_dir``: ``data/aime_2024.jsonl`` -> ``aime_2024``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(name))[0])


def check_inputs(args: EvalArguments) -> None:
    """Raises ``UsageError`` for a model, dataset or backend the run would fail on later, or for an ``output_dir``
    holding another model's results on the same datasets; prints a line for each of this model's it overwrites."""
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


def _use_vllm(backend: str) -> bool:
    """Returns whether to generate with vLLM: asked for, or ``auto`` with vLLM installed and a GPU present."""
    if backend != "auto":
        return backend == "vllm"
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def generate_vllm(args: EvalArguments, prompts: list[list[dict]]) -> list[list[str]]:
    """Returns ``num_samples`` completions per prompt from vLLM's offline engine (chat template applied)."""
    from vllm import LLM, SamplingParams

    llm = LLM(args.model_name_or_path, tensor_parallel_size=args.tensor_parallel_size, seed=args.seed)
    params = SamplingParams(
        n=args.num_samples, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens
    )
    return [[o.text for o in out.outputs] for out in llm.chat(prompts, params)]


def generate_transformers(args: EvalArguments, prompts: list[list[dict]]) -> list[list[str]]:
    """Returns ``num_samples`` completions per prompt from ``model.generate``, ``batch_size`` at a time."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    results = []
    for prompt in tqdm(prompts, desc="problems"):
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        completions = []
        while len(completions) < args.num_samples:
            count = min(args.batch_size, args.num_samples - len(completions))
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=count,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            completions += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        results.append(completions)
    return results


def main(args: EvalArguments) -> dict[str, dict]:
    """Returns each dataset's summary after writing ``<name>.jsonl`` and ``<name>_summary.json`` to ``output_dir``."""
    os.makedirs(args.output_dir, exist_ok=True)
    use_vllm = _use_vllm(args.backend)
    generate = generate_vllm if use_vllm else generate_transformers
    summaries = {}
    for name in args.datasets:
        with input_errors("datasets"):
            dataset = load_math_eval(name)
        if args.limit is not None:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        samples = generate(args, dataset["prompt"])
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
        print(f"{name}: avg@{args.num_samples} = {summary[f'avg@{args.num_samples}']}, pass@k = {summary['pass@k']}")
        summaries[name] = summary
    print(f"Per-problem JSONL and summaries saved in {os.path.abspath(args.output_dir)}")
    return summaries


if __name__ == "__main__":
    with exit_on_usage_error(os.path.basename(__file__)):
        (eval_args,) = RecipeParser(EvalArguments).parse_recipe(sys.argv[1:])
        check_inputs(eval_args)
        main(eval_args)
