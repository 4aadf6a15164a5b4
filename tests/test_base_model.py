"""trl_forking.tasks.arithmetic_chains.base_model: the digit-per-token tokenizer, the noisy SFT targets, the cached
atomic build, and (slow) the documented properties of the default base model."""

import hashlib
import json
import os
import random
import re

import pytest

from trl_forking.scripts import base_model as build_script
from trl_forking.tasks.arithmetic_chains import base_model
from trl_forking.tasks.arithmetic_chains.base_model import (
    BaseModelRecipe,
    build_base_model,
    build_tokenizer,
    noisy_solution,
)
from trl_forking.tasks.arithmetic_chains.task import read_split

# A build that takes seconds: what the cache tests need, not a model that reasons.
TINY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_layers": 1,
    "num_heads": 1,
    "num_kv_heads": 1,
    "sft_steps": 2,
    "batch_size": 4,
    "num_train_problems": 32,
}
LINE = re.compile(r"^(\d\d) ([+-]) (\d\d) = (\d\d)$")


@pytest.fixture(scope="module")
def tokenizer():
    rows = read_split("validation")
    return build_tokenizer([f"{r['prompt'][0]['content']}\n{r['completion']}" for r in rows], 320, 256)


@pytest.mark.parametrize("text", ["1234567890", "Compute 63 + 18 - 35 - 25 step by step.", "x=07, y=-100.5\n\n9"])
def test_the_tokenizer_splits_digits_one_per_token_and_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == [c for c in text if c.isdigit()]  # every digit is a token of its own, in order
    assert tokenizer.decode(ids) == text


def test_the_chat_template_is_chatml_and_ends_a_turn_with_the_eos(tokenizer):
    messages = [{"role": "user", "content": "Compute 12 + 30 step by step."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nCompute 12 + 30 step by step.<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "Answer: 42"}], tokenize=False)
    assert full == prompt + "Answer: 42<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == full and tokenizer.eos_token_id in ids


def test_noisy_solutions_are_self_consistent_and_wrong_at_about_the_noise_rate():
    rows = read_split("train")[:1500]
    rng = random.Random(0)
    assert [noisy_solution(r["problem"], 0.0, rng) for r in rows[:50]] == [r["completion"] for r in rows[:50]]
    wrong = total = 0
    for row in rows:
        *lines, answer = noisy_solution(row["problem"], 0.15, rng).split("\n")
        numbers = row["problem"].split(" ")
        written = int(numbers[0])
        for step, line in enumerate(lines):
            a, op, b, c = LINE.match(line).groups()
            # Each line starts from what the previous line wrote and applies the problem's next operation.
            assert (int(a), op, b) == (written, numbers[2 * step + 1], numbers[2 * step + 2])
            right = int(a) + int(b) if op == "+" else int(a) - int(b)
            wrong += (int(c) // 10 != right // 10) + (int(c) % 10 != right % 10)
            total += 2
            written = int(c)
        assert answer == f"Answer: {written}"
    # A wrong digit is kept only when the rest of the chain stays carry-free, so the rate is at most the noise.
    assert 0.10 < wrong / total <= 0.16


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_the_build_is_cached_and_a_changed_recipe_rebuilds(tmp_path, monkeypatch, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert build_script.main(["--cache-dir", str(tmp_path), "--no-progress", *args]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    recipe = BaseModelRecipe(**TINY)
    assert path == os.path.join(str(tmp_path), f"base-{recipe.short_hash()}")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "build.json"):
        assert os.path.isfile(os.path.join(path, name)), name
    record = json.load(open(os.path.join(path, "build.json")))
    assert record["recipe"] == {**BaseModelRecipe().__dict__, **TINY}
    # build.json records what the weights depend on, and the sha256 of the files it wrote.
    assert {k: record[k] for k in base_model.build_key(recipe)} == base_model.build_key(recipe)
    assert set(record["versions"]) == set(base_model.BUILD_LIBRARIES) and record["cpu_capability"]
    for name in base_model.WEIGHT_FILES:
        assert record["sha256"][name] == _sha256(os.path.join(path, name))
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no staging directory left behind

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "qwen3" and model.generation_config.eos_token_id == tokenizer.eos_token_id

    built = []
    real_build = base_model._build_in_subprocess
    monkeypatch.setattr(base_model, "_build_in_subprocess", lambda *a: built.append(a[0]) or real_build(*a))
    assert build_base_model(recipe, str(tmp_path)) == path and built == []  # cached: nothing rebuilt
    other = BaseModelRecipe(**{**TINY, "seed": 1})
    assert build_base_model(other, str(tmp_path), progress=False) != path and built == [other]
    # On one machine and one software stack a build is deterministic: rebuilding gives the same bytes.
    weights = _sha256(os.path.join(path, "model.safetensors"))
    assert build_base_model(recipe, str(tmp_path), overwrite=True, progress=False) == path
    assert _sha256(os.path.join(path, "model.safetensors")) == weights


def test_the_build_process_sees_no_launcher_and_no_gpu(monkeypatch):
    launched = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in {**launched, "ACCELERATE_USE_DEEPSPEED": "true", "CUDA_VISIBLE_DEVICES": "0,1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MY_SETTING", "kept")
    environ = base_model._build_environ(BaseModelRecipe(num_threads=3))
    assert not set(launched) & set(environ) and "ACCELERATE_USE_DEEPSPEED" not in environ
    assert (environ["CUDA_VISIBLE_DEVICES"], environ["OMP_NUM_THREADS"], environ["MY_SETTING"]) == ("", "3", "kept")
    # The child imports this package, wherever the caller found it.
    import trl_forking

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(trl_forking.__file__)))
    assert environ["PYTHONPATH"].split(os.pathsep)[0] == package_root


def test_the_cache_key_covers_the_build_code_the_libraries_and_the_cpu(monkeypatch):
    recipe = BaseModelRecipe(**TINY)
    name = recipe.short_hash()
    # The code as a syntax tree: docstrings, comments and layout do not count, a changed statement does.
    code = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    assert base_model._syntax_tree(code) == base_model._syntax_tree("def f(x):\n\n    return (x +\n            1)\n")
    assert base_model._syntax_tree(code) != base_model._syntax_tree("def f(x):\n    return x + 2\n")
    monkeypatch.setattr(base_model, "build_code_fingerprint", lambda: "0" * 64)
    assert recipe.short_hash() != name
    monkeypatch.undo()
    real_version = base_model.metadata.version
    monkeypatch.setattr(base_model.metadata, "version", lambda d: "0.0.1" if d == "tokenizers" else real_version(d))
    assert recipe.short_hash() != name
    monkeypatch.undo()
    import torch

    other = "AVX512" if torch.backends.cpu.get_cpu_capability() != "AVX512" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert recipe.short_hash() != name
    monkeypatch.undo()
    # MKL pinned to another code path (docs/task.md: MKL_CBWR=COMPATIBLE built other weights under the same key).
    for variable in base_model.MKL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    plain = recipe.short_hash()
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert recipe.short_hash() != plain
    monkeypatch.undo()
    assert recipe.short_hash() == name


def test_a_failed_build_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(base_model.sys, "executable", "false")  # the build process exits 1 at once
    with pytest.raises(RuntimeError, match=r"building the base model base-\w+ failed \(exit status 1\)"):
        build_base_model(BaseModelRecipe(**TINY), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_an_interrupted_build_leaves_no_directory_that_looks_finished(tmp_path, monkeypatch):
    def interrupted(recipe, output_dir, progress):
        open(os.path.join(output_dir, "config.json"), "w").write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "_build_in_subprocess", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_base_model(BaseModelRecipe(**TINY), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_concurrent_build_that_finishes_first_wins(tmp_path, monkeypatch):
    recipe = BaseModelRecipe(**TINY)
    target = os.path.join(str(tmp_path), f"base-{recipe.short_hash()}")

    def racing(recipe, output_dir, progress):
        os.makedirs(target)  # another process renames its finished build into place meanwhile
        open(os.path.join(target, "config.json"), "w").write('{"winner": true}')
        open(os.path.join(target, "build.json"), "w").write('{"sha256": {"model.safetensors": "abc"}}')

    monkeypatch.setattr(base_model, "_build_in_subprocess", racing)
    assert build_base_model(recipe, str(tmp_path)) == target
    assert json.load(open(os.path.join(target, "config.json"))) == {"winner": True}
    assert os.listdir(tmp_path) == [os.path.basename(target)]


def test_the_cache_follows_xdg_cache_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert base_model.base_model_dir() == os.path.join(
        str(tmp_path), "trl-forking", f"base-{BaseModelRecipe().short_hash()}"
    )


def test_recipe_errors_name_the_field_and_what_is_allowed(capsys):
    with pytest.raises(ValueError, match=r"task: 'gsm8k' is not allowed; the bundled task is 'arithmetic-chains'"):
        BaseModelRecipe(task="gsm8k")
    with pytest.raises(ValueError, match=r"digit_noise: 1.5 is not allowed; use a value in \[0, 1\)"):
        BaseModelRecipe(digit_noise=1.5)
    with pytest.raises(ValueError, match=r"num_heads: 3 .* num_heads must divide hidden_size"):
        BaseModelRecipe(num_heads=3)
    assert build_script.main(["--sft-steps", "0"]) == 2
    assert "error: sft_steps: 0 is not allowed; use an integer >= 1." in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_base_model_has_the_documented_properties(default_base_model):
    """pass@1 at temperature 1 in [10%, 60%] with pass@8 well above it, and the paper's entropy shape: most tokens
    near-deterministic, a high-entropy minority (docs/task.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_forking.analysis import entropy_summary, score_completions
    from trl_forking.evaluation import evaluate
    from trl_forking.tasks.arithmetic_chains.task import load_task

    path = default_base_model
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate(model, tokenizer, load_task("test"), num_samples=8, ks=[1, 8], max_new_tokens=48, seed=0)
    assert 0.10 <= result["pass@k"]["1"] <= 0.60, result["pass@k"]
    assert result["pass@k"]["8"] >= result["pass@k"]["1"] + 0.3
    greedy_like = evaluate(model, tokenizer, load_task("test"), num_samples=1, temperature=0.05, seed=0)
    assert greedy_like["avg@1"] >= 0.9  # the model knows the method; temperature 1 makes it slip
    records = [
        {"prompt": p["prompt"], "completion": c}
        for p, row in zip(load_task("test"), result["problems"], strict=True)
        for c in row["completions"][:2]
    ]
    _, entropies, mask = score_completions(model, tokenizer, records, progress=False).padded()
    summary = entropy_summary(entropies, mask, 0.2)
    assert summary["percentiles"]["p50"] < 0.1
    assert summary["share_below"]["0.01"] > 0.3
    assert summary["percentiles"]["p95"] > 10 * summary["percentiles"]["p50"]  # a distinct high-entropy minority
