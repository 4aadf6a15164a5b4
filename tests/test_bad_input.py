"""Bad input to the recipe scripts, as a user meets it: each case runs the script in its own process and must end with
exit status 2 and one short line on stderr that names the field and the bad value, never a traceback.

The cases are those of issue 10 (the scripts used to answer them with tracebacks of 9 to 71 lines, or a 212-line usage
block) and the refusals added since. A fresh Python spends ~6 s importing torch and TRL before it answers, so the
cases run in processes forked from one interpreter that has done the scripts' imports (``warm_python``); one case of
each script also runs in a fresh ``python script.py`` and must give the same answer.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from warm_python import WarmPython, script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "recipes", "grpo_forking.py")
EVAL = os.path.join(ROOT, "recipes", "eval_aime.py")
VLLM_USABLE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
BITSANDBYTES_USABLE = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()
# A script's whole answer to bad input; anything longer is not "short".
MAX_MESSAGE_CHARS = 320


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the script, its arguments (``{tmp}`` is the case folder, ``{tiny}`` the tiny model), the parts
    the one-line message must contain, and environment a launcher would add."""

    script: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


CASES = {
    "model_folder_missing": Case(
        TRAIN, ("--model_name_or_path", "/no/such/model"), ("model_name_or_path", "'/no/such/model'")
    ),
    "empty_dataset_file": Case(
        TRAIN, ("--dataset_name", "{tmp}/empty.jsonl"), ("dataset_name", "empty.jsonl", "is empty")
    ),
    "quantile_above_1": Case(TRAIN, ("--top_entropy_quantile", "1.5"), ("top_entropy_quantile", "1.5", "(0, 1]")),
    "unknown_yaml_key": Case(TRAIN, ("--config", "{tmp}/unknown_key.yaml"), ("learning_rat:", "'learning_rate'")),
    "bad_yaml_value": Case(TRAIN, ("--config", "{tmp}/bad_value.yaml"), ("learning_rate:", "float", "'abc'")),
    "missing_config_file": Case(TRAIN, ("--config", "nope.yaml"), ("--config", "'nope.yaml'")),
    "unknown_choice": Case(TRAIN, ("--forking_scope", "foo"), ("--forking_scope", "'foo'", "'step', 'micro_batch'")),
    "resume_with_no_checkpoint": Case(
        TRAIN,
        ("--resume_from_checkpoint", "true", "--output_dir", "{tmp}/fresh"),
        ("resume_from_checkpoint", "'true'", "has none"),
    ),
    "fresh_run_over_checkpoints": Case(
        TRAIN, ("--output_dir", "{tmp}/old"), ("output_dir", "checkpoint-2", "--resume_from_checkpoint true")
    ),
    # What `accelerate launch --cpu --num_processes 2` exports to the one process it starts.
    "cpu_launch_of_two": Case(
        TRAIN,
        ("--output_dir", "{tmp}/out"),
        ("launch", "--cpu", "drop --cpu"),
        {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
    ),
    # TRL refused it only when it built the trainer: 2 weights for the demo's 1 reward function.
    "reward_weights_for_another_number_of_functions": Case(
        TRAIN,
        ("--model_name_or_path", "{tiny}", "--reward_weights", "1.0", "2.0", "--output_dir", "{tmp}/out"),
        ("reward_weights", "2 weight(s)", "1 reward function(s)"),
    ),
    # A library refusal met while the trainer is built (peft wrapping the model), led by the option it concerns.
    "refused_while_the_trainer_is_built": Case(
        TRAIN,
        ("--model_name_or_path", "{tiny}", "--use_peft", "true", "--lora_target_modules", "no_such_layer")
        + ("--output_dir", "{tmp}/lora"),
        ("lora_target_modules: ", "no_such_layer", "TRL_FORKING_TRACEBACK=1"),
    ),
    # QLoRA on a machine where bitsandbytes cannot run (not installed, or no CUDA): refused before the model loads,
    # where it used to train bf16 LoRA without a word.
    "load_in_4bit_where_bitsandbytes_cannot_run": Case(
        TRAIN,
        ("--model_name_or_path", "{tiny}", "--load_in_4bit", "true", "--use_peft", "true", "--output_dir", "{tmp}/q"),
        ("load_in_4bit", "bitsandbytes"),
    ),
    # --dry_run: TRL's batch check at the planned world size (1 x 3 x 8 = 24 completions, not groups of 16).
    "dry_run_refused_by_trl_at_the_planned_world_size": Case(
        TRAIN,
        (
            "--config",
            os.path.join(ROOT, "recipes", "qwen3-8b", "forking_dapo.yaml"),
            "--dry_run",
            "--num_processes",
            "3",
        )
        + ("--steps_per_generation", "8", "--gradient_accumulation_steps", "8"),
        ("generation_batch_size (24)", "num_generations (16)", "3 process(es) of the planned launch"),
    ),
    "launch_flag_without_dry_run": Case(TRAIN, ("--num_machines", "2"), ("num_machines", "only with --dry_run")),
    "eval_model_folder_missing": Case(
        EVAL, ("--model_name_or_path", "/no/such/model"), ("model_name_or_path", "'/no/such/model'")
    ),
    "eval_k_above_num_samples": Case(
        EVAL, ("--model_name_or_path", "{tiny}", "--num_samples", "4", "--k", "1", "8"), ("k:", "[8]", "num_samples=4")
    ),
    "eval_vllm_unusable": Case(
        EVAL, ("--model_name_or_path", "{tiny}", "--backend", "vllm"), ("backend", "'vllm'", "--backend transformers")
    ),
}
# Run in a fresh `python script.py` too: the warm interpreter must answer as a cold one does.
COLD = ("model_folder_missing", "eval_k_above_num_samples")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Returns the cases' working folder, with the files they name."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "unknown_key.yaml").write_text("learning_rat: 1.0e-6\n")
    (tmp / "bad_value.yaml").write_text("learning_rate: abc\n")
    (tmp / "old" / "checkpoint-2").mkdir(parents=True)
    (tmp / "old" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return tmp


def _argv(case: Case, workdir, tiny_model_dir) -> list[str]:
    return [arg.format(tmp=workdir, tiny=tiny_model_dir) for arg in case.argv]


@pytest.fixture(scope="module")
def finished(workdir, tiny_model_dir) -> dict[str, subprocess.CompletedProcess]:
    """Returns {case: its finished process} for every case of ``CASES``, each forked from one warm interpreter."""
    with WarmPython([TRAIN, EVAL], script_env(workdir), workdir) as python:
        return {
            name: python.run(case.script, _argv(case, workdir, tiny_model_dir), workdir, case.env)
            for name, case in CASES.items()
        }


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_with_one_line_naming_the_field_and_exit_status_2(finished, case):
    if case == "eval_vllm_unusable" and VLLM_USABLE:
        pytest.skip("vLLM and a GPU are here: --backend vllm is valid")
    if case == "load_in_4bit_where_bitsandbytes_cannot_run" and BITSANDBYTES_USABLE:
        pytest.skip("bitsandbytes and a GPU are here: --load_in_4bit is valid")
    done, prog = finished[case], os.path.basename(CASES[case].script)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{prog}: error: ") and len(line) <= MAX_MESSAGE_CHARS, line
    for part in CASES[case].expect:
        assert part in line, (part, line)


@pytest.mark.parametrize("case", COLD)
def test_a_fresh_python_answers_as_the_warm_one(finished, workdir, tiny_model_dir, case):
    script, env = CASES[case].script, {**script_env(workdir), **CASES[case].env}
    argv = [sys.executable, script, *_argv(CASES[case], workdir, tiny_model_dir)]
    cold = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert (cold.returncode, cold.stderr) == (finished[case].returncode, finished[case].stderr)
