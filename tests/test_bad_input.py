"""Bad input to the recipe scripts, as a user meets it: each case runs the script in a fresh Python and must end with
exit status 2 and one short line on stderr that names the field and the bad value, never a traceback.

The cases are those of issue 10 (the scripts used to answer them with tracebacks of 9 to 71 lines, or a 212-line usage
block). Most of a case's time is importing torch and TRL, so they run two at a time in one fixture; the checks behind
them, and the cases that need no fresh process to be believed, are tested in-process (test_usage.py, test_run_dir.py,
test_launch.py, test_recipes.py).
"""

import concurrent.futures
import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "recipes", "grpo_forking.py")
EVAL = os.path.join(ROOT, "recipes", "eval_aime.py")
VLLM_USABLE = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
# A script's whole answer to bad input; anything longer is not "short".
MAX_MESSAGE_CHARS = 320


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the script, its arguments (``{tmp}`` is the case folder, ``{tiny}`` the tiny model) and the
    parts the one-line message must contain."""

    script: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]


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


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> dict[str, subprocess.CompletedProcess]:
    """Returns {case: its finished subprocess} for every case of ``CASES``, run two at a time."""
    tmp = tmp_path_factory.mktemp("bad-input")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "unknown_key.yaml").write_text("learning_rat: 1.0e-6\n")
    (tmp / "bad_value.yaml").write_text("learning_rate: abc\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "XDG_CACHE_HOME": str(tmp / "cache"),
        # Progress bars (weights loading, dataset maps) are not messages; keep stderr to what the script says.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)

    def run(case: Case) -> subprocess.CompletedProcess:
        argv = [arg.format(tmp=tmp, tiny=tiny_model_dir) for arg in case.argv]
        return subprocess.run(
            [sys.executable, case.script, *argv],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(run, CASES.values()), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_with_one_line_naming_the_field_and_exit_status_2(finished, case):
    if case == "eval_vllm_unusable" and VLLM_USABLE:
        pytest.skip("vLLM and a GPU are here: --backend vllm is valid")
    done, prog = finished[case], os.path.basename(CASES[case].script)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{prog}: error: ") and len(line) <= MAX_MESSAGE_CHARS, line
    for part in CASES[case].expect:
        assert part in line, (part, line)
