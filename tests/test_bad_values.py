"""Every option of the scripts users launch, given a value it does not allow (issue 20): each must end the script with
exit status 2, no traceback, and one line that names the option.

One table per script: ``TRAIN`` (recipes/grpo_forking.py: the forking options, the GRPO / DAPO loss and sampling
fields, batch and step counts, the optimizer, vLLM, paths, rewards, dataset, model), ``EVALUATE`` (eval_aime.py),
``ABLATE`` (ablation.py) and ``CLI`` (the numeric options of ``trl-forking analyze / render / overlap / compare``).
The ``test_every_*`` tests keep the tables complete: every key a recipe YAML sets, every field of the scripts' own
dataclasses, every entry of the ``trl_forking.scripts.allowed`` tables and every numeric CLI option has a row, or is
listed in ``UNCHECKED`` with the reason it has no bad value. The runs are processes forked from one interpreter that
has done the scripts' imports (``warm_python``), so the ~200 rows take about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os

import pytest
import torch
import yaml
from warm_python import WarmPython, script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "train": os.path.join(ROOT, "recipes", "grpo_forking.py"),
    "evaluate": os.path.join(ROOT, "recipes", "eval_aime.py"),
    "ablate": os.path.join(ROOT, "recipes", "ablation.py"),
}
VLLM_USABLE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
MAX_MESSAGE_CHARS = 320  # as in test_bad_input: anything longer is not one short line
# Messages that a library writes and the scripts pass on whole: one line that names the option and what it allows,
# longer than ours (transformers lists every attention implementation).
LIBRARY_MESSAGES = {("train", "attn_implementation")}

# (option, the flags after the script's own base flags, parts the message must hold besides the option's name).
# {tmp} is the test's folder, {tiny} a tiny local model. Train rows run on top of the demo recipe with the tiny model,
# one step and no evaluation, so that a row whose value were accepted would train for a second and fail the test.
TRAIN = [
    # forking options
    ("top_entropy_quantile", ["--top_entropy_quantile", "0"], ["(0, 1]"]),
    ("top_entropy_quantile", ["--top_entropy_quantile", "1.5"], ["1.5"]),
    ("top_entropy_quantile", ["--top_entropy_quantile", "abc"], ["'abc'"]),
    ("forking_selection", ["--forking_selection", "best"], ["'best'", "'top'"]),
    ("forking_selection", ["--forking_selection", "bottom", "--top_entropy_quantile", "1.0"], ["bottom"]),
    ("forking_scope", ["--forking_scope", "batch"], ["'batch'", "'micro_batch'"]),
    ("forking_loss_normalization", ["--forking_loss_normalization", "tokens"], ["'tokens'", "'selected'"]),
    ("forking_ignore_zero_advantage", ["--forking_ignore_zero_advantage", "maybe"], ["maybe"]),
    ("forking_refresh_entropies", ["--forking_refresh_entropies", "maybe"], ["maybe"]),
    ("forking_compact_lm_head", ["--forking_compact_lm_head", "2"], ["2"]),
    ("forking_trim_padding", ["--forking_trim_padding", "maybe"], ["maybe"]),
    # sampling of the rollouts
    ("temperature", ["--temperature", "0"], ["0.0", "> 0"]),
    ("temperature", ["--temperature", "nan"], ["nan"]),
    ("top_p", ["--top_p", "0"], ["(0, 1]"]),
    ("top_p", ["--top_p", "1.5"], ["1.5", "(0, 1]"]),
    ("top_k", ["--top_k", "-1"], ["-1", ">= 0"]),
    ("min_p", ["--min_p", "2"], ["2.0", "[0, 1]"]),
    ("repetition_penalty", ["--repetition_penalty", "0"], ["> 0"]),
    ("num_generations", ["--num_generations", "1"], ["1", ">= 2"]),
    ("num_generations", ["--num_generations", "0"], [">= 2"]),
    ("max_completion_length", ["--max_completion_length", "0"], [">= 1"]),
    ("generation_batch_size", ["--generation_batch_size", "0"], [">= 1"]),
    ("generation_batch_size", ["--generation_batch_size", "7"], ["(7)", "divisible"]),
    ("steps_per_generation", ["--steps_per_generation", "0"], [">= 1"]),
    # the loss
    ("loss_type", ["--loss_type", "ppo"], ["'ppo'", "'dapo'"]),
    ("beta", ["--beta", "-1"], ["-1.0", ">= 0", "KL"]),
    ("epsilon", ["--epsilon", "-0.2"], ["-0.2", ">= 0"]),
    ("epsilon_high", ["--epsilon_high", "-1"], ["-1.0", ">= 0"]),
    ("delta", ["--delta", "0.5"], ["0.5", "> 1"]),
    ("scale_rewards", ["--scale_rewards", "std"], ["'std'", "'group'"]),
    ("importance_sampling_level", ["--importance_sampling_level", "word"], ["'word'", "'token'"]),
    ("multi_objective_aggregation", ["--multi_objective_aggregation", "max"], ["'max'"]),
    ("num_iterations", ["--num_iterations", "0"], [">= 1"]),
    ("mask_truncated_completions", ["--mask_truncated_completions", "maybe"], ["maybe"]),
    ("reward_weights", ["--reward_weights", "1.0", "2.0"], ["2 weight(s)", "1 reward function(s)"]),
    ("reward_weights", ["--reward_weights", "x"], ["'x'"]),
    # batches and steps
    ("per_device_train_batch_size", ["--per_device_train_batch_size", "0"], [">= 1"]),
    ("per_device_train_batch_size", ["--per_device_train_batch_size", "2.5"], ["'2.5'"]),
    ("gradient_accumulation_steps", ["--gradient_accumulation_steps", "0"], [">= 1"]),
    ("max_steps", ["--max_steps", "0"], ["no step"]),
    ("max_steps", ["--max_steps", "1.5"], ["'1.5'"]),
    ("num_train_epochs", ["--num_train_epochs", "0"], ["> 0"]),
    ("logging_steps", ["--logging_steps", "0"], ["> 0"]),
    ("save_steps", ["--save_steps", "-1"], ["> 0"]),
    ("save_strategy", ["--save_strategy", "sometimes"], ["'sometimes'"]),
    ("save_total_limit", ["--save_total_limit", "0"], [">= 1"]),
    ("warmup_steps", ["--warmup_steps", "-1"], [">= 0"]),
    ("dataloader_num_workers", ["--dataloader_num_workers", "-1"], [">= 0"]),
    ("lr_scheduler_type", ["--lr_scheduler_type", "triangle"], ["'triangle'"]),
    ("logging_strategy", ["--logging_strategy", "often"], ["'often'"]),
    # the optimizer and the seeds
    ("learning_rate", ["--learning_rate", "-1"], ["-1.0", ">= 0"]),
    ("weight_decay", ["--weight_decay", "-1"], [">= 0"]),
    ("max_grad_norm", ["--max_grad_norm", "-1"], [">= 0"]),
    ("adam_beta1", ["--adam_beta1", "1"], ["[0, 1)"]),
    ("adam_beta2", ["--adam_beta2", "-0.1"], ["[0, 1)"]),
    ("adam_epsilon", ["--adam_epsilon", "-1"], [">= 0"]),
    ("seed", ["--seed", "-1"], ["-1", "[0, 4294967295]"]),
    ("data_seed", ["--data_seed", "4294967296"], ["4294967296"]),
    # precision and memory switches
    ("bf16", ["--bf16", "maybe"], ["maybe"]),
    ("gradient_checkpointing", ["--gradient_checkpointing", "maybe"], ["maybe"]),
    ("log_completions", ["--log_completions", "maybe"], ["maybe"]),
    ("report_to", ["--report_to", "tensorbored"], ["'tensorbored'", "'tensorboard'"]),
    # vLLM
    ("vllm_mode", ["--vllm_mode", "remote"], ["'remote'", "'server'"]),
    ("vllm_server_port", ["--vllm_server_port", "0"], ["[1, 65535]"]),
    ("vllm_server_port", ["--vllm_server_port", "70000"], ["70000"]),
    ("vllm_group_port", ["--vllm_group_port", "-1"], ["[1, 65535]"]),
    ("vllm_server_timeout", ["--vllm_server_timeout", "0"], ["> 0"]),
    ("vllm_gpu_memory_utilization", ["--vllm_gpu_memory_utilization", "1.5"], ["(0, 1]"]),
    ("vllm_tensor_parallel_size", ["--vllm_tensor_parallel_size", "0"], [">= 1"]),
    ("vllm_importance_sampling_mode", ["--vllm_importance_sampling_mode", "clip"], ["'clip'"]),
    ("vllm_importance_sampling_correction", ["--vllm_importance_sampling_correction", "maybe"], ["maybe"]),
    # paths
    ("output_dir", ["--output_dir", "/proc/nope"], ["'/proc/nope'", "cannot create"]),
    ("output_dir", ["--output_dir", "{tmp}/a-file"], ["a-file", "is a file"]),
    ("output_dir", ["--output_dir", "{tmp}/a-file/run"], ["cannot create"]),
    ("overwrite_output_dir", ["--overwrite_output_dir", "maybe"], ["maybe"]),
    ("resume_from_checkpoint", ["--resume_from_checkpoint", "{tmp}/no-checkpoint"], ["no such folder"]),
    ("config", ["--config", "{tmp}/no.yaml"], ["'{tmp}/no.yaml'"]),
    # rewards
    ("reward_funcs", ["--reward_funcs", "accuracy"], ["'accuracy'", "math_accuracy"]),
    ("overlong_buffer", ["--overlong_buffer", "-1"], ["[0, max_completion_length=48]"]),
    ("overlong_buffer", ["--overlong_buffer", "100"], ["100"]),
    # dataset
    ("dataset_name", ["--dataset_name", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    ("dataset_name", ["--dataset_name", "{tmp}/one-row.jsonl"], ["1 prompt(s)", "generation batch", "no step"]),
    ("dataset_train_split", ["--dataset_train_split", "dev"], ["'dev'", "'train'"]),
    ("dataset_config", ["--dataset_config", "main"], ["'main'"]),
    ("dataset_streaming", ["--dataset_streaming", "true"], ["not supported"]),
    ("dataset_streaming", ["--dataset_streaming", "maybe"], ["maybe"]),
    ("ignore_bias_buffers", ["--ignore_bias_buffers", "maybe"], ["maybe"]),
    ("max_train_samples", ["--max_train_samples", "0"], [">= 1"]),
    ("max_train_samples", ["--max_train_samples", "3"], ["3 prompt(s)", "no step"]),
    ("eval_num_samples", ["--eval_num_samples", "-1"], [">= 0"]),
    # model
    ("model_name_or_path", ["--model_name_or_path", "/no/such/model"], ["'/no/such/model'"]),
    ("model_name_or_path", ["--model_name_or_path", "{tmp}"], ["config.json"]),
    ("base_model_recipe", ["--base_model_recipe", '{"layers": 2}'], ["'layers'"]),
    ("dtype", ["--dtype", "float8"], ["'float8'"]),
    ("attn_implementation", ["--attn_implementation", "fastest"], ["fastest"]),
    ("use_peft", ["--use_peft", "maybe"], ["maybe"]),
    ("lora_r", ["--use_peft", "true", "--lora_r", "0"], [">= 1"]),
    ("lora_alpha", ["--use_peft", "true", "--lora_alpha", "0"], ["> 0"]),
    ("lora_dropout", ["--use_peft", "true", "--lora_dropout", "1"], ["[0, 1)"]),
    ("lora_task_type", ["--use_peft", "true", "--lora_task_type", "LM"], ["'LM'", "CAUSAL_LM"]),
    ("lora_target_modules", ["--use_peft", "true", "--lora_target_modules", "no_such_layer"], ["no_such_layer"]),
    ("use_rslora", ["--use_rslora", "maybe"], ["maybe"]),
    ("use_dora", ["--use_dora", "maybe"], ["maybe"]),
    ("bnb_4bit_quant_type", ["--bnb_4bit_quant_type", "int3"], ["'int3'", "'nf4'"]),
    ("use_bnb_nested_quant", ["--use_bnb_nested_quant", "maybe"], ["maybe"]),
    ("load_in_4bit", ["--load_in_4bit", "true"], ["--use_peft true"]),
    ("load_in_8bit", ["--load_in_8bit", "true"], ["--use_peft true"]),
    # the dry run's launch
    ("num_processes", ["--dry_run", "--num_processes", "0"], [">= 1"]),
    ("num_machines", ["--dry_run", "--num_machines", "0"], [">= 1"]),
    ("vllm_server_tensor_parallel_size", ["--dry_run", "--vllm_server_tensor_parallel_size", "0"], [">= 1"]),
    ("launch_config_file", ["--dry_run", "--launch_config_file", "{tmp}/no.yaml"], ["no.yaml"]),
    ("num_machines", ["--num_machines", "2"], ["only with --dry_run"]),
]
if not VLLM_USABLE:
    TRAIN.append(("use_vllm", ["--use_vllm", "true"], ["vLLM is not available"]))
# The train rows whose option selects the model: they run without the base flags' tiny model.
WITHOUT_TINY_MODEL = {"base_model_recipe"}

EVALUATE = [
    ("model_name_or_path", ["--model_name_or_path", "/no/such/model"], ["'/no/such/model'"]),
    ("datasets", ["--datasets", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    ("num_samples", ["--num_samples", "0"], [">= 1"]),
    ("k", ["--num_samples", "4", "--k", "1", "8"], ["[8]", "num_samples=4"]),
    ("k", ["--k", "0"], ["[0]"]),
    ("temperature", ["--temperature", "0"], ["> 0"]),
    ("top_p", ["--top_p", "1.5"], ["(0, 1]"]),
    ("max_new_tokens", ["--max_new_tokens", "0"], [">= 1"]),
    ("backend", ["--backend", "sglang"], ["'sglang'"]),
    ("batch_size", ["--batch_size", "0"], [">= 1"]),
    ("tensor_parallel_size", ["--tensor_parallel_size", "0"], [">= 1"]),
    ("limit", ["--limit", "0"], [">= 1"]),
    ("seed", ["--seed", "-1"], ["[0, 4294967295]"]),
    ("output_dir", ["--output_dir", "/proc/nope"], ["cannot create"]),
    ("run_dir", ["--run_dir", "{tmp}"], ["forking_run.json"]),
    ("config", ["--config", "{tmp}/no.yaml"], ["no.yaml"]),
]
if not VLLM_USABLE:
    EVALUATE.append(("backend", ["--backend", "vllm"], ["--backend transformers"]))

ABLATE = [
    ("arms", ["--arms", "top:0.2", "best:0.2"], ["'best:0.2'"]),
    ("arms", ["--arms", "top:1.5"], ["'top:1.5'"]),
    ("seeds", ["--seeds", "-1"], ["-1", "[0, 4294967295]"]),
    ("seeds", ["--seeds", "one"], ["'one'"]),
    ("model_name_or_path", ["--model_name_or_path", "/no/such/model"], ["'/no/such/model'"]),
    ("eval_every", ["--eval_every", "-5"], [">= 0"]),
    ("eval_num_problems", ["--eval_num_problems", "0"], [">= 1"]),
    ("eval_num_samples", ["--eval_num_samples", "0"], [">= 1"]),
    ("eval_seed", ["--eval_seed", "-1"], ["[0, 4294967295]"]),
    ("quick", ["--quick", "maybe"], ["maybe"]),
    ("max_steps", ["--max_steps", "0"], [">= 1", "same steps"]),
    ("max_steps", ["--max_steps", "-1"], [">= 1"]),
    ("temperature", ["--temperature", "0"], ["> 0"]),
    ("per_device_train_batch_size", ["--per_device_train_batch_size", "80000"], ["generation batch", "no step"]),
    ("top_entropy_quantile", ["--top_entropy_quantile", "0"], ["(0, 1]"]),
    ("output_dir", ["--output_dir", "/proc/nope"], ["cannot create"]),
    ("config", ["--config", "{tmp}/no.yaml"], ["no.yaml"]),
]

_COMPLETIONS = ["--model", "{tiny}", "--completions", "{tmp}/completions.jsonl", "-o", "{tmp}/cli"]
_PAIR = ["--model-a", "{tiny}", "--model-b", "{tiny}", "--completions", "{tmp}/completions.jsonl", "-o", "{tmp}/cli"]
CLI = [
    ("num-samples", ["analyze", *_COMPLETIONS, "--num-samples", "0"], [">= 1"]),
    ("index", ["analyze", *_COMPLETIONS, "--index", "-1"], [">= 0"]),
    ("batch-size", ["analyze", *_COMPLETIONS, "--batch-size", "0"], [">= 1"]),
    ("temperature", ["analyze", *_COMPLETIONS, "--temperature", "0"], ["> 0"]),
    ("temperature", ["analyze", *_COMPLETIONS, "--temperature", "nan"], ["nan"]),
    ("num-generations", ["analyze", *_COMPLETIONS, "--num-generations", "0"], [">= 1"]),
    ("max-new-tokens", ["analyze", *_COMPLETIONS, "--max-new-tokens", "x"], ["'x'"]),
    ("top-p", ["analyze", *_COMPLETIONS, "--top-p", "1.5"], ["(0, 1]"]),
    ("seed", ["analyze", *_COMPLETIONS, "--seed", "-1"], ["[0, 4294967295]"]),
    ("rho", ["analyze", *_COMPLETIONS, "--rho", "0"], ["(0, 1]"]),
    ("top-tokens", ["analyze", *_COMPLETIONS, "--top-tokens", "0"], [">= 1"]),
    ("width", ["render", *_COMPLETIONS, "--width", "0"], [">= 1"]),
    ("buckets", ["overlap", *_PAIR, "--buckets", "0"], [">= 1"]),
    ("metric", ["compare", "{tmp}", "--metric", "pass@0"], ["'pass@0'", "pass@K"]),
]

# Options with no value to refuse, and why.
UNCHECKED = {
    "vllm_server_host": "any string is a host name; a wrong one fails when TRL connects, naming the host",
    "model_revision": "any string is a Hub revision; a wrong one fails when the model is fetched, naming it (a local "
    "folder has none, and transformers ignores it there)",
    "dataset_test_split": "the recipe script trains only and reads no test split",
    "lora_target_parameters": "peft matches these names in the model; a name that matches nothing adds no adapter",
    "lora_modules_to_save": "peft matches these names in the model; a name that matches nothing saves nothing more",
    "bnb_4bit_quant_storage": "read only with load_in_4bit, where bitsandbytes checks it (CUDA only)",
}


def _expand(parts: list[str], tmp, tiny) -> list[str]:
    return [part.replace("{tmp}", str(tmp)).replace("{tiny}", str(tiny)) for part in parts]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Returns the rows' working folder with the files they name."""
    tmp = tmp_path_factory.mktemp("bad-values")
    (tmp / "a-file").write_text("")
    (tmp / "one-row.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp / "completions.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "completion": " 2"}) + "\n")
    (tmp / "cli.py").write_text(  # the trl-forking command, as a script the warm interpreter can run
        "import sys\nfrom trl_forking.scripts.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )
    return tmp


def _base(script: str, option: str, tmp, tiny, row: int) -> list[str]:
    """Returns the flags every row of ``script`` starts with: a quick run of the tiny model into its own folder."""
    out = ["--output_dir", f"{tmp}/out/{script}-{row}"]
    if script == "train":
        model = [] if option in WITHOUT_TINY_MODEL else ["--model_name_or_path", tiny]
        return [*model, "--max_steps", "1", "--eval_num_samples", "0", *out]
    if script == "evaluate":
        return ["--model_name_or_path", tiny, "--datasets", "arithmetic-chains", "--limit", "1", *out]
    if script == "ablate":  # not --quick, which would replace the rows' arms and evaluation options
        quick = ["--seeds", "0", "--eval_every", "0", "--eval_num_problems", "2", "--eval_num_samples", "1"]
        return ["--model_name_or_path", tiny, *quick, "--max_steps", "1", *out]
    return []


ROWS = [
    (script, index, row)
    for script, table in (("train", TRAIN), ("evaluate", EVALUATE), ("ablate", ABLATE), ("cli", CLI))
    for index, row in enumerate(table)
]


@pytest.fixture(scope="module")
def finished(workdir, tiny_model_dir):
    """Returns {(script, row index): its finished process}, every row forked from one warm interpreter."""
    cli = str(workdir / "cli.py")
    with WarmPython([*SCRIPTS.values(), cli], script_env(workdir), workdir) as python:
        done = {}
        for script, index, (option, flags, _) in ROWS:
            argv = _base(script, option, workdir, tiny_model_dir, index) + _expand(flags, workdir, tiny_model_dir)
            done[script, index] = python.run(SCRIPTS.get(script, cli), argv, workdir, timeout=180)
        return done


@pytest.mark.parametrize(
    ("script", "index"), [(script, index) for script, index, _ in ROWS], ids=[f"{s}-{r[0]}-{i}" for s, i, r in ROWS]
)
def test_a_bad_value_ends_with_one_line_naming_the_option(finished, workdir, script, index):
    option, _, expect = dict(TRAIN=TRAIN, EVALUATE=EVALUATE, ABLATE=ABLATE, CLI=CLI)[script.upper()][index]
    done = finished[script, index]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:], done.stdout[-2000:])
    (line,) = done.stderr.strip().splitlines()
    if script != "cli":
        prog = os.path.basename(SCRIPTS[script])
        assert line.startswith(f"{prog}: error: "), line
    else:
        assert line.startswith("trl-forking ") and ": error: " in line, line
    if (script, option) not in LIBRARY_MESSAGES:
        assert len(line) <= MAX_MESSAGE_CHARS, line
    assert option in line, (option, line)
    for part in _expand(expect, workdir, ""):
        assert part in line, (part, line)


def _recipe_keys(pattern: str) -> set[str]:
    keys = set()
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
        with open(path) as f:
            keys |= set(yaml.safe_load(f))
    return keys


def _names(table) -> set[str]:
    return {option for option, _, _ in table}


def test_every_option_a_training_recipe_sets_has_a_row():
    keys = _recipe_keys("recipes/qwen3-*/*.yaml") | _recipe_keys("recipes/demo.yaml")
    assert keys - _names(TRAIN) - set(UNCHECKED) == set()


def test_every_option_of_the_ablation_recipe_has_a_row():
    from trl_forking.scripts.ablate import AblationArguments

    keys = _recipe_keys("recipes/ablation.yaml") | {spec.name for spec in dataclasses.fields(AblationArguments)}
    assert keys - _names(ABLATE) - _names(TRAIN) == set()
    assert {spec.name for spec in dataclasses.fields(AblationArguments)} - _names(ABLATE) == set()


def test_every_option_the_training_script_checks_or_defines_has_a_row():
    from trl import ModelConfig

    from trl_forking.config import ForkingOptions
    from trl_forking.scripts.train import ForkingScriptArguments, allowed_options

    names = {spec.name for spec in dataclasses.fields(ForkingScriptArguments)}
    names |= {spec.name for spec in dataclasses.fields(ForkingOptions)}
    names |= {rule.name for rule in allowed_options()}
    names |= {spec.name for spec in dataclasses.fields(ModelConfig)} - {"model_name_or_path"}
    assert names - _names(TRAIN) - set(UNCHECKED) == set()


def test_every_option_of_the_evaluation_script_has_a_row():
    from trl_forking.scripts.evaluate import ALLOWED, EvalArguments

    names = {spec.name for spec in dataclasses.fields(EvalArguments)} | {rule.name for rule in ALLOWED}
    assert names - _names(EVALUATE) == set()


def test_every_numeric_option_of_the_cli_has_a_row():
    from trl_forking.scripts.cli import build_parser

    numeric = set()
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for parser in subparsers.choices.values():
        for action in parser._actions:
            if action.type is not None:
                numeric.add(action.option_strings[0].lstrip("-") if action.option_strings else action.dest)
    assert numeric - _names(CLI) == set()
