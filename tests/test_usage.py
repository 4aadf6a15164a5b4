"""Usage errors: what is translated into one line and what keeps its traceback, the exit at the script's edge, and the
model and data checks that run before anything loads."""

import dataclasses
import os

import pytest

from trl_forking.scripts.recipe_args import RecipeParser
from trl_forking.scripts.usage import (
    EXIT_USAGE,
    TRACEBACK_ENV,
    UsageError,
    check_data_source,
    check_model,
    check_quantization,
    exit_on_usage_error,
    input_errors,
)


def test_input_errors_turns_the_listed_types_into_one_line_naming_what_was_read():
    with pytest.raises(UsageError) as raised, input_errors("dataset_name"):
        raise FileNotFoundError("no such file:\n 'x.jsonl'")
    assert str(raised.value) == "dataset_name: no such file: 'x.jsonl'"  # newlines folded into one line
    assert isinstance(raised.value.__cause__, FileNotFoundError)  # kept for TRL_FORKING_TRACEBACK and debuggers


def test_input_errors_lets_every_other_error_keep_its_traceback():
    # A KeyError or a RuntimeError inside is a bug, not bad input: it must not be turned into a polite line.
    with pytest.raises(KeyError), input_errors("dataset_name"):
        raise KeyError("prompt")
    with pytest.raises(RuntimeError), input_errors(None, ValueError):
        raise RuntimeError("shape mismatch")


def test_a_deep_call_says_how_to_see_the_traceback():
    with pytest.raises(UsageError, match=r"^bad combination \(TRL_FORKING_TRACEBACK=1 shows where it was raised\)$"):
        with input_errors(None, ValueError, traceback_hint=True):
            raise ValueError("bad combination")


def test_traceback_env_shows_the_original_error(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="bad"), input_errors("field"):
        raise ValueError("bad")


def test_exit_on_usage_error_prints_one_line_and_exits_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as exited, exit_on_usage_error("script.py"):
        raise UsageError("top_entropy_quantile: 1.5 is not in (0, 1]")
    assert exited.value.code == EXIT_USAGE
    assert capsys.readouterr().err == "script.py: error: top_entropy_quantile: 1.5 is not in (0, 1]\n"


def test_a_later_rank_reports_after_a_delay_and_names_itself(capsys, monkeypatch):
    # Under a launcher, the node's first rank speaks at once; the others wait (the launcher usually stops them first).
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setattr("trl_forking.scripts.usage.OTHER_RANKS_DELAY_S", 0.0)
    with pytest.raises(SystemExit), exit_on_usage_error("script.py"):
        raise UsageError("bad")
    assert capsys.readouterr().err == "script.py: error (rank 9): bad\n"


def test_check_model_accepts_a_model_folder_and_refuses_what_is_not_one(tmp_path, tiny_model_dir):
    assert check_model(tiny_model_dir) == tiny_model_dir
    with pytest.raises(UsageError, match=r"model_name_or_path: the folder '.*' has no config.json"):
        check_model(str(tmp_path))
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        check_model(str(tmp_path / "weights.bin"))
    # "outputs/forking-demo" before the demo ran: outputs/ exists, so it is a path that is missing, not a Hub id.
    with pytest.raises(UsageError, match=r"no folder '.*forking-demo'.* has no such model folder"):
        check_model(str(tmp_path / "forking-demo"))
    with pytest.raises(UsageError, match=r"no folder '/no/such/model' .* not a Hub id"):
        check_model("/no/such/model")


def test_check_model_asks_the_hub_for_an_id_and_explains_when_it_cannot(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too: nothing may be downloaded in the tests
    with pytest.raises(UsageError, match=r"model_name_or_path: no folder 'nobody/no-such-model' .* the Hub did not"):
        check_model("nobody/no-such-model")


def test_check_data_source_refuses_a_missing_or_empty_local_file(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(UsageError, match=r"dataset_name: the file '.*blank.jsonl' is empty"):
        check_data_source(str(blank), "dataset_name")
    with pytest.raises(UsageError, match=r"datasets: no file 'missing.jsonl' \(from .*\); give a .jsonl"):
        check_data_source("missing.jsonl", "datasets")
    (tmp_path / "rows.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    assert check_data_source(str(tmp_path / "rows.jsonl"), "datasets") == str(tmp_path / "rows.jsonl")
    # A Hub name passes: its loader reports, through input_errors.
    assert check_data_source("open-r1/DAPO-Math-17k-Processed", "dataset_name") == "open-r1/DAPO-Math-17k-Processed"


@dataclasses.dataclass
class _Args:
    learning_rate: float = 1e-6
    mode: str = dataclasses.field(default="a", metadata={"choices": ["a", "b"]})
    steps: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} must be >= 1.")


def _parse(argv, default_config=None):
    return RecipeParser(_Args).parse_recipe(argv, default_config)


def test_recipe_parser_reads_the_default_config_when_none_is_given_and_flags_modify_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.5\nsteps: 7\n")
    parser = RecipeParser(_Args)
    (args,) = parser.parse_recipe(["--steps", "3"], str(recipe))
    assert (args.learning_rate, args.steps, parser.default_config_used) == (0.5, 3, True)
    (args,) = _parse([f"--config={recipe}"], default_config="unused.yaml")  # the --config=FILE spelling too
    assert args.steps == 7


@pytest.mark.parametrize(
    ("yaml_text", "argv", "message"),
    [
        ("steps: [1\n", [], r"--config: '.*' is not valid YAML at line 2, column 1: expected ',' or ']'"),
        ("- steps\n", [], r"--config: '.*' must hold a YAML mapping of field: value, not a list"),
        ("step: 3\n", [], r"step: unknown key in .*recipe.yaml; did you mean 'steps'\?"),
        ("learning_rate: fast\n", [], r"^learning_rate: invalid float value: 'fast' \(in .*recipe.yaml\)"),
        ("", ["--learning_rate", "fast"], r"^--learning_rate: invalid float value: 'fast' \(see --help\)$"),
        ("", ["--mode", "c"], r"^--mode: invalid choice: 'c' \(choose from 'a', 'b'\) \(see --help\)$"),
        ("", ["--stepz", "3"], r"^--stepz: unknown option; did you mean 'steps'\?$"),
        ("", ["--steps", "0"], r"^steps: 0 must be >= 1\.$"),
        ("", ["3"], r"^'3': unexpected value"),
    ],
)
def test_recipe_parser_names_the_field_and_value_in_one_line(tmp_path, yaml_text, argv, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text or "steps: 1\n")
    with pytest.raises(UsageError, match=message):
        _parse(["--config", str(recipe), *argv])


def test_recipe_parser_names_a_missing_config_file():
    with pytest.raises(UsageError, match=rf"--config: no file 'nope.yaml' \(from {os.getcwd()}\)"):
        _parse(["--config", "nope.yaml"])


def test_check_quantization_refuses_what_bitsandbytes_or_transformers_would_refuse_later(monkeypatch):
    from trl import ModelConfig

    check_quantization(ModelConfig(model_name_or_path="m"))  # nothing asked: nothing checked
    four_bit = ModelConfig(model_name_or_path="m", load_in_4bit=True)
    with pytest.raises(UsageError, match=r"^load_in_4bit: a quantized model trains only through adapters .*--use_peft"):
        check_quantization(four_bit)
    eight_bit = ModelConfig(model_name_or_path="m", load_in_8bit=True, use_peft=True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "bitsandbytes" else object())
    with pytest.raises(UsageError, match=r"^load_in_8bit: needs the bitsandbytes package, which is not installed"):
        check_quantization(eight_bit)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # installed, but no GPU
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^load_in_8bit: bitsandbytes quantization needs a CUDA GPU"):
        check_quantization(eight_bit)
    check_quantization(eight_bit, hardware=False)  # a dry run plans for the cluster's GPUs from a machine without
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    check_quantization(eight_bit)
