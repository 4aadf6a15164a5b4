"""``--dry_run``: the plan of each Qwen3 recipe on the launch its header assumes, against figures computed by hand from
the recipe and the model's dimensions (tests/data: the Qwen3 configs as published, never downloaded), and the
combinations TRL, accelerate, DeepSpeed or vLLM would refuse, refused before a GPU is allocated."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from test_recipes import QWEN_RECIPES, ROOT, _script

from trl_forking.scripts.plan import NOT_IN_TRL
from trl_forking.scripts.usage import UsageError

ACCELERATE = os.path.join(ROOT, "recipes", "accelerate")
RECIPE_8B = os.path.join(ROOT, "recipes", "qwen3-8b", "forking_dapo.yaml")
# What each experiment trains on, of the N completion tokens of an optimizer step: ceil(0.2 N), N - ceil(0.2 N), N.
SELECTED = {"forking_dapo.yaml": lambda n: math.ceil(0.2 * n), "bottom80_dapo.yaml": lambda n: n - math.ceil(0.2 * n)}
SELECTED["full_dapo.yaml"] = lambda n: n
ARM_LINES = {
    "forking_dapo.yaml": [],
    "full_dapo.yaml": ["forking_selection: 'all' (paper: 'top'): the paper's full-token DAPO baseline"],
    "bottom80_dapo.yaml": ["forking_selection: 'bottom' (paper: 'top'): the paper's bottom-80% ablation"],
}


def _header_launch(path: str) -> tuple[list[str], dict]:
    """Returns the dry-run flags of the launch a recipe's header assumes, and its numbers."""
    text = open(path).read()
    found = re.search(r"(\d+) training node\(s\) x 8 x 80 GB GPUs = (\d+) ranks with\s*#\s*(\S+),", text)
    nodes, ranks, config = int(found.group(1)), int(found.group(2)), found.group(3)
    tp = int(re.search(r"\(tensor parallel (\d+),", text).group(1))
    flags = ["--launch_config_file", os.path.join(ROOT, config), "--num_processes", str(ranks)]
    flags += ["--num_machines", str(nodes), "--vllm_server_tensor_parallel_size", str(tp)]
    return flags, {"nodes": nodes, "ranks": ranks, "tp": tp}


def _config(model: str) -> dict:
    with open(os.path.join(ROOT, "tests", "data", model.split("/")[1], "config.json")) as f:
        return json.load(f)


def _qwen3_parameters(c: dict) -> tuple[int, int]:
    """Returns (parameters, largest layer) of a Qwen3 decoder from its config's dimensions, by hand."""
    h, d, v = c["hidden_size"], c["head_dim"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h + 2 * d  # q, k, v, o projections without bias; q_norm and k_norm
    layer = attention + 3 * h * c["intermediate_size"] + 2 * h  # gate, up, down; two RMSNorms
    embeddings = v * h * (1 if c["tie_word_embeddings"] else 2)  # the input embedding and the untied lm_head
    return embeddings + c["num_hidden_layers"] * layer + h, v * h  # ... and the final norm; largest: the embedding


def _dry_run(*argv) -> dict:
    return _script().cli(["--dry_run", *argv, "--output_dir", os.path.join("/nonexistent-dry-run", "out")])


@pytest.fixture
def no_weights(monkeypatch):
    """Makes loading any weights or building a trainer fail: a dry run must do neither."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights or built a trainer")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(_script(), "ForkingGRPOTrainer", refuse)


@pytest.mark.parametrize("path", QWEN_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_dry_run_plans_each_qwen3_recipe_on_the_launch_its_header_assumes(path, qwen3_hub_cache, no_weights, capsys):
    from transformers.integrations import is_deepspeed_zero3_enabled

    flags, launch = _header_launch(path)
    plan = _dry_run("--config", path, *flags)
    printed = capsys.readouterr().out
    assert printed.startswith(f"Dry run of {path}: nothing loaded, nothing trained.\n")
    batch, tokens, memory, checkpoints = plan["batch"], plan["tokens"], plan["memory"], plan["checkpoints"]
    # 512 prompts x 16 completions per rollout in 16 optimizer steps of 32 prompts, on any of the three launches.
    assert (batch["completions_per_rollout"], batch["prompts_per_rollout"]) == (8192, 512)
    assert (batch["completions_per_step"], batch["prompts_per_step"], batch["steps_per_rollout"]) == (512, 32, 16)
    assert tokens["tokens"] == 512 * 20480 == 10_485_760
    assert tokens["selected"] == SELECTED[os.path.basename(path)](10_485_760)
    config = _config(plan["model"]["name"])
    parameters, largest = _qwen3_parameters(config)
    assert (plan["model"]["parameters"], plan["model"]["largest_layer"]) == (parameters, largest)
    assert plan["model"]["parameters"] / 1e9 == pytest.approx(
        {"8b": 8.19, "14b": 14.77, "32b": 32.76}[path.split(os.sep)[-2].split("-")[1]], abs=0.005
    )  # Qwen's own figures: 8.2B, 14.8B, 32.8B
    # DeepSpeed's ZeRO-3 estimate with zero_init and no offload: the largest layer gathered in fp32 plus 18 bytes
    # per parameter (16-bit weights and gradients, fp32 master weights, gradients and two moments) over the ranks.
    assert memory["estimator"] == "estimate_zero3_model_states_mem_needs" and memory["zero_init"]
    # The DeepSpeed config the run will hand to deepspeed.initialize: accelerate's, with transformers' "auto" values.
    deepspeed = plan["deepspeed_config"]
    assert deepspeed["train_batch_size"] == 512 and deepspeed["gradient_accumulation_steps"] == 512 // launch["ranks"]
    assert deepspeed["zero_optimization"]["stage"] == 3 and deepspeed["bf16"] == {"enabled": True}
    assert memory["gpu"] == 4 * largest + int(18 * parameters / launch["ranks"])
    assert memory["cpu"] == int(largest * 4 * 8 * 1.5)  # 8 GPUs per node, DeepSpeed's buffer factor 1.5
    assert plan["vllm"] == {**plan["vllm"], "mode": "server", "tensor_parallel_size": launch["tp"]}
    # A ZeRO-3 checkpoint: bf16 weights (2 bytes) + fp32 master weights and two Adam moments (12); 2 kept + 1.
    assert checkpoints["bytes"] == 14 * parameters and checkpoints["peak_bytes"] == 3 * 14 * parameters
    stated = re.search(r"^# ~(\d+) GB here\.", open(path).read(), re.MULTILINE).group(1)
    assert int(stated) == round(checkpoints["bytes"] / 1e9)  # what the recipe's own comment says
    assert plan["paper"] == ARM_LINES[os.path.basename(path)] + list(NOT_IN_TRL)
    assert plan["logging"]["rows_per_log"] == 0
    assert not is_deepspeed_zero3_enabled()  # the plan built a DeepSpeed config and left no process-wide trace


def test_flags_change_the_plan_and_the_differences_from_the_paper(qwen3_hub_cache, capsys):
    flags, _ = _header_launch(RECIPE_8B)
    argv = ["--config", RECIPE_8B, *flags, "--max_completion_length", "1001", "--overlong_buffer", "500"]
    argv += ["--learning_rate", "3e-6"]
    step = _dry_run(*argv)
    sequence = _dry_run(*argv, "--forking_scope", "sequence", "--log_completions", "true")
    # 512 completions of 1,001 tokens: ceil(0.2 x 512,512) = 102,503 over the step, 512 x ceil(200.2) = 102,912 when
    # each completion keeps its own top 20%.
    assert step["tokens"]["tokens"] == 512_512
    assert (step["tokens"]["selected"], sequence["tokens"]["selected"]) == (102_503, 102_912)
    assert step["paper"] == [
        "learning_rate: 3e-06 (paper: 1e-06)",
        "max_completion_length: 1001 (paper: 20480)",
        "overlong_buffer: 500 (paper: 4096)",
        *NOT_IN_TRL,
    ]
    assert "forking_scope: 'sequence' (paper: 'step')" in sequence["paper"]
    # TRL's completion log: the whole rollout at each of the rollout's 16 logging steps.
    assert (sequence["logging"]["rows_per_log"], sequence["logging"]["logs_per_rollout"]) == (8192, 16)
    assert "each of the 16 logging steps of a rollout writes the whole rollout, 8,192 rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("config", "stage", "expected"),
    [
        # ZeRO-2 without offload: 16-bit weights on every GPU plus 18 bytes per parameter over the 8 GPUs.
        ("zero2.yaml", 2, lambda p, big: (int(p * 4 * 8 * 1.5), 2 * p + int(18 * p / 8))),
        # ZeRO-3 with optimizer and weights in CPU memory: one gathered layer per GPU, 18 bytes per parameter on CPU.
        ("zero3_offload.yaml", 3, lambda p, big: (int(p * 18 * 1.5), 4 * big)),
    ],
)
def test_the_memory_estimate_follows_the_launchs_zero_stage_and_offload(qwen3_hub_cache, config, stage, expected):
    plan = _dry_run("--config", RECIPE_8B, "--launch_config_file", os.path.join(ACCELERATE, config))
    parameters, largest = _qwen3_parameters(_config(plan["model"]["name"]))
    assert plan["memory"]["stage"] == stage
    assert (plan["memory"]["cpu"], plan["memory"]["gpu"]) == expected(parameters, largest)
    # Under ZeRO-1/2 the module states file holds the 16-bit weights once more: 16 bytes per parameter.
    assert plan["checkpoints"]["bytes"] == (16 if stage == 2 else 14) * parameters


def test_plain_data_parallel_and_one_process_are_planned_without_deepspeed(qwen3_hub_cache):
    one = _dry_run("--config", RECIPE_8B, "--num_processes", "2", "--gradient_accumulation_steps", "256")
    parameters, _ = _qwen3_parameters(_config(one["model"]["name"]))
    assert one["launch"]["distributed_type"] == "MULTI_GPU" and one["batch"]["completions_per_step"] == 512
    # Every GPU holds bf16 weights, gradients and AdamW's two moments; a checkpoint the weights and the moments.
    assert one["memory"]["gpu"] == 4 * 2 * parameters and one["checkpoints"]["bytes"] == 3 * 2 * parameters


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # TRL's own check, at the planned world size: 1 x 3 x 8 = 24 completions per rollout are not groups of 16.
        (
            ["--num_processes", "3", "--steps_per_generation", "8", "--gradient_accumulation_steps", "8"],
            r"^generation_batch_size \(24\) must be divisible by num_generations \(16\)\. \(with the 3 process\(es\)",
        ),
        (
            ["--launch_config_file", "{zero3}", "--num_processes", "12", "--num_machines", "8"],
            r"^num_processes: 12 over 8 machines; accelerate starts num_processes // num_machines = 1 per machine",
        ),
        (["--launch_config_file", "/no/such.yaml"], r"^launch_config_file: no file '/no/such.yaml'"),
        (
            ["--launch_config_file", "{ga8}"],
            r"^launch_config_file: the DeepSpeed config of .* is refused with this recipe: Please correct the "
            r"following DeepSpeed config values that mismatch TrainingArguments values: - ds "
            r"gradient_accumulation_steps=8 vs hf gradient_accumulation_steps=64",
        ),
        (
            ["--vllm_server_tensor_parallel_size", "3"],
            r"^--vllm_server_tensor_parallel_size: 3 does not divide the model's 32 attention heads, which vLLM",
        ),
        (
            ["--num_processes", "8", "--vllm_mode", "colocate", "--vllm_tensor_parallel_size", "16"],
            r"^vllm_tensor_parallel_size: 16 must divide the 8 training processes \(TRL\)",
        ),
        (["--load_in_4bit", "true"], r"^load_in_4bit: a quantized model trains only through adapters"),
    ],
    ids=["trl_batch", "machines", "no_config", "deepspeed_mismatch", "vllm_heads", "colocate_tp", "qlora_no_peft"],
)
def test_a_combination_that_would_be_refused_on_the_cluster_is_refused_by_the_dry_run(
    qwen3_hub_cache, tmp_path, no_weights, flags, message
):
    # An accelerate config whose DeepSpeed section fixes 8 accumulation steps, where the recipe says 64.
    ga8 = tmp_path / "ga8.yaml"
    text = open(os.path.join(ACCELERATE, "zero3.yaml")).read()
    ga8.write_text(text.replace("  zero_stage: 3\n", "  zero_stage: 3\n  gradient_accumulation_steps: 8\n"))
    flags = [f.format(zero3=os.path.join(ACCELERATE, "zero3.yaml"), ga8=ga8) for f in flags]
    with pytest.raises(UsageError, match=message):
        _dry_run("--config", RECIPE_8B, *flags)


def test_launch_flags_without_dry_run_are_refused():
    with pytest.raises(UsageError, match=r"^num_processes: only with --dry_run; a training launch takes it from"):
        _script().cli(["--config", RECIPE_8B, "--num_processes", "8"])


def _docs_block(title: str) -> tuple[list[str], str]:
    """Returns (the command's arguments, its output) of the first ```bash / ```text pair after ``title`` in
    docs/recipes.md."""
    docs = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    section = docs[docs.index(title) :]
    command = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    output = re.search(r"```text\n(.*?)```", section, re.DOTALL).group(1)
    return command.replace("\\\n", " ").split(), output


def test_the_docs_show_what_the_dry_run_of_the_8b_recipe_prints(qwen3_hub_cache, tmp_path):
    command, output = _docs_block("## 8. Before your first GPU hour")
    recipe = "recipes/qwen3-8b/forking_dapo.yaml"
    assert command[:5] == ["python", "recipes/grpo_forking.py", "--config", recipe, "--dry_run"]
    # From a folder of its own whose recipes/ is the repository's: an outputs/ there cannot change what it prints.
    os.symlink(os.path.join(ROOT, "recipes"), tmp_path / "recipes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == output


def test_the_slurm_launcher_plans_its_own_launch_with_dry_run(qwen3_hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TP": "2", "NUM_NODES": "3", "PYTHON": sys.executable}
    for name in ("SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "GPUS_PER_NODE"):
        env.pop(name, None)
    recipe = "recipes/qwen3-14b/forking_dapo.yaml"
    # --dry_run false among the flags still plans: the launcher never turns a dry run into training on this node.
    argv = ["bash", "recipes/slurm/grpo_forking.slurm", recipe, "zero3", "--dry_run", "false"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "model Qwen/Qwen3-14B-Base | vLLM on node2 | training on node0,node1 (16 ranks)"
    assert lines[1] == f"Dry run of {recipe}: nothing loaded, nothing trained."
    assert lines[2].startswith("Launch      16 processes on 2 machines, 8 per machine, DeepSpeed ZeRO-3")
    assert "vLLM        server mode at node2:8000, tensor parallel 2" in done.stdout
    no_plan = subprocess.run(argv[:4], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert no_plan.returncode == 2
    assert no_plan.stderr.strip() == (
        "no Slurm allocation (SLURM_JOB_NODELIST is unset): submit with sbatch, or add --dry_run to plan"
    )
