"""The trl-forking command line: each subcommand end to end on the tiny model, and one-line errors on bad input."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trl_forking.scripts.cli import _shared, build_parser, main


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """Same architecture and tokenizer as the tiny model, weights from another seed."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("cli-seed1"))
    torch.manual_seed(1)
    GPT2LMHeadModel(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-prompts") / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 3}?"}]} for a in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def analyzed(tiny_model_dir, prompts_file, tmp_path_factory):
    """Output of `trl-forking analyze` sampling 2 completions for each of 3 prompts."""
    out = tmp_path_factory.mktemp("cli-analyze")
    argv = [
        "analyze",
        "--model",
        tiny_model_dir,
        "--prompts",
        prompts_file,
        "-o",
        str(out),
        "--num-generations",
        "2",
        "--max-new-tokens",
        "16",
        "--rho",
        "0.25",
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_analyze_samples_then_writes_report_charts_and_completions(analyzed):
    report = json.loads((analyzed / "report.json").read_text())
    assert report["num_completions"] == 6 and report["summary"]["rho"] == 0.25
    lines = (analyzed / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 6
    for name in ("entropy_histogram.png", "forking_tokens.png"):
        assert (analyzed / name).stat().st_size > 5_000


def test_render_and_overlap_run_on_the_completions_analyze_wrote(
    tiny_model_dir, other_model_dir, analyzed, tmp_path, capsys
):
    completions = str(analyzed / "completions.jsonl")
    assert (
        main(
            [
                "render",
                "--model",
                tiny_model_dir,
                "--completions",
                completions,
                "--index",
                "0",
                "2",
                "-o",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 0
    )
    page = (tmp_path / "r" / "forking_tokens.html").read_text()
    assert page.count('<section class="completion">') == 2
    assert (tmp_path / "r" / "forking_tokens_render.png").stat().st_size > 5_000
    assert (
        main(
            [
                "overlap",
                "--model-a",
                tiny_model_dir,
                "--model-b",
                other_model_dir,
                "--completions",
                completions,
                "-o",
                str(tmp_path / "o"),
                "--buckets",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert result["num_completions"] == 6 and 0.0 <= result["overlap"] < 1.0
    buckets = result["entropy_change_by_bucket"]
    assert [row["bucket"] for row in buckets] == ["0-25%", "25-50%", "50-75%", "75-100%"]
    assert sum(row["num_tokens"] for row in buckets) == result["num_tokens"]
    assert (tmp_path / "o" / "entropy_change_by_bucket.png").stat().st_size > 5_000
    out = capsys.readouterr().out
    assert "Spearman" in out and "75-100%" in out


# --- every input option reaches every subcommand --------------------------------------------------------------------


def model_args(command, tiny_model_dir, other_model_dir):
    """The model options of ``command``: one model for analyze and render, two for overlap."""
    if command == "overlap":
        return ["--model-a", tiny_model_dir, "--model-b", other_model_dir]
    return ["--model", tiny_model_dir]


@pytest.fixture(scope="module")
def dataset_dict_dir(tmp_path_factory):
    """A saved DatasetDict whose train split and default column hold other prompts than validation's "question"."""
    from datasets import Dataset, DatasetDict

    path = str(tmp_path_factory.mktemp("cli-datasetdict") / "ds")
    DatasetDict(
        {
            "train": Dataset.from_dict({"prompt": ["train 0", "train 1", "train 2"], "question": ["q0", "q1", "q2"]}),
            "validation": Dataset.from_dict(
                {"prompt": ["not this column", "nor this"], "question": ["What is 2 + 2?", "What is 3 + 5?"]}
            ),
        }
    ).save_to_disk(path)
    return path


@pytest.mark.parametrize("command", ["analyze", "render", "overlap"])
def test_split_and_prompt_column_choose_the_prompts_of_every_subcommand(
    command, tiny_model_dir, other_model_dir, dataset_dict_dir, tmp_path
):
    argv = [command, *model_args(command, tiny_model_dir, other_model_dir), "--prompts", dataset_dict_dir]
    argv += ["--split", "validation", "--prompt-column", "question", "--max-new-tokens", "4"]
    assert main([*argv, "-o", str(tmp_path), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["What is 2 + 2?", "What is 3 + 5?"]


@pytest.mark.parametrize("command", ["analyze", "render", "overlap"])
def test_dataset_config_and_split_reach_the_hub_loader_in_every_subcommand(
    command, tiny_model_dir, other_model_dir, tmp_path, monkeypatch
):
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None):  # stands in for the Hub
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"problem": ["What is 1 + 1?"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    argv = [command, *model_args(command, tiny_model_dir, other_model_dir), "--prompts", "some-org/some-set"]
    argv += ["--dataset-config", "en", "--split", "test", "--max-new-tokens", "4", "-o", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert calls == [("some-org/some-set", "en", "test")]


def test_every_subcommand_passes_every_option_of_the_input_pipeline():
    from trl_forking.analysis.pipeline import score_inputs

    options = {name for name, p in inspect.signature(score_inputs).parameters.items() if p.kind is p.KEYWORD_ONLY}
    for command, models in (
        ("analyze", ["--model", "m"]),
        ("render", ["--model", "m"]),
        ("overlap", ["--model-a", "a", "--model-b", "b"]),
    ):
        args = build_parser().parse_args([command, *models, "--completions", "c.jsonl", "-o", "out"])
        assert set(_shared(args)) == options | {"rho"}, command


# --- a light parser -------------------------------------------------------------------------------------------------


def test_help_imports_no_torch_transformers_matplotlib_or_analysis():
    # The package root is lazy: `trl-forking --help` (python -m trl_forking) loads only the parser and its defaults.
    code = textwrap.dedent(
        """
        import contextlib, io, json, runpy, sys

        for argv in (["--help"], ["overlap", "--help"]):
            sys.argv = ["trl-forking", *argv]
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                runpy.run_module("trl_forking", run_name="__main__")
            assert "usage: trl-forking" in out.getvalue()
        print(json.dumps(sorted(sys.modules)))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    heavy = {"torch", "transformers", "trl", "matplotlib", "datasets", "numpy", "tqdm"}
    assert not {name.split(".")[0] for name in loaded} & heavy
    assert {name for name in loaded if name.startswith("trl_forking")} == {
        "trl_forking",
        "trl_forking._moved",
        "trl_forking.scripts",
        "trl_forking.scripts.cli",
        "trl_forking.scripts.allowed",
        "trl_forking.defaults",
    }


def test_defaults_without_torch_equal_the_library_defaults():
    from trl_forking import defaults, entropy
    from trl_forking.analysis.pipeline import score_inputs
    from trl_forking.analysis.sampling import sample_completions

    assert defaults.DEFAULT_ENTROPY_BATCH_SIZE == entropy.DEFAULT_ENTROPY_BATCH_SIZE
    assert inspect.signature(score_inputs).parameters["batch_size"].default == entropy.DEFAULT_ENTROPY_BATCH_SIZE
    assert inspect.signature(sample_completions).parameters["max_new_tokens"].default == defaults.DEFAULT_MAX_NEW_TOKENS


# --- bad input ------------------------------------------------------------------------------------------------------


def bad_inputs(tmp_path, tiny_model_dir):
    """(name, argv, text the error must contain) for each kind of bad input."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "a",\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = str(tmp_path / "out")
    return [
        (
            "missing model",
            ["analyze", "--model", str(tmp_path / "nope"), "--completions", str(good), "-o", out],
            "model path does not exist",
        ),
        (
            "missing overlap model",
            ["overlap", "--model-a", tiny_model_dir, "--model-b", "./nope", "--completions", str(good), "-o", out],
            "model path does not exist: ./nope",
        ),
        ("empty dataset", ["analyze", "--model", tiny_model_dir, "--prompts", str(empty), "-o", out], "is empty"),
        (
            "malformed line",
            ["render", "--model", tiny_model_dir, "--completions", str(malformed), "-o", out],
            "malformed.jsonl:2: malformed JSON",
        ),
        (
            "missing completions",
            ["analyze", "--model", tiny_model_dir, "--completions", str(tmp_path / "x.jsonl"), "-o", out],
            "not found",
        ),
        (
            "rho zero",
            ["analyze", "--model", tiny_model_dir, "--completions", str(good), "-o", out, "--rho", "0"],
            "argument --rho: 0.0 is not allowed; use a number in (0, 1]",
        ),
        (
            "rho above one",
            ["overlap", "--model-a", "a", "--model-b", "b", "--completions", str(good), "-o", out, "--rho", "1.5"],
            "argument --rho: 1.5 is not allowed; use a number in (0, 1]",
        ),
        (
            "rho not a number",
            ["render", "--model", "m", "--completions", str(good), "-o", out, "--rho", "x"],
            "argument --rho: 'x' is not allowed; use a number in (0, 1]",
        ),
        (
            "unwritable output",
            ["analyze", "--model", tiny_model_dir, "--completions", str(good), "-o", str(blocker / "out")],
            "cannot write to output directory",
        ),
        (
            "top-p above one",
            ["analyze", "--model", "m", "--prompts", str(good), "-o", out, "--top-p", "2"],
            "argument --top-p: 2.0 is not allowed; use a number in (0, 1]",
        ),
        (
            "unknown device",
            ["analyze", "--model", tiny_model_dir, "--completions", str(good), "-o", out, "--device", "gpu"],
            "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'",
        ),
        (
            "both inputs",
            ["analyze", "--model", "m", "--completions", str(good), "--prompts", str(good), "-o", out],
            "not allowed with argument",
        ),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_exits_non_zero_with_one_line_on_stderr(case, tmp_path, tiny_model_dir, capsys):
    name, argv, expected = bad_inputs(tmp_path, tiny_model_dir)[case]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status != 0, name
    assert len(lines) == 1, f"{name}: {captured.err!r}"
    assert lines[0].startswith("trl-forking") and expected in lines[0], name
    assert not os.path.exists(tmp_path / "out" / "report.json")


def test_module_entry_point_reports_a_missing_model_without_a_traceback(tmp_path):
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trl_forking",
            "analyze",
            "--model",
            str(tmp_path / "missing"),
            "--completions",
            str(completions),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1] == f"trl-forking: error: model path does not exist: {tmp_path}/missing"
    )
