"""recipes/ablation.py end to end (``--quick`` on the real base model) and its answers to bad input."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "recipes", "ablation.py")


def _run(argv, cwd, cache=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env["XDG_CACHE_HOME"] = cache
    return subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_quick_study_writes_one_record_per_run_and_evaluation_and_compare_agrees(tmp_path, default_base_cache):
    out = tmp_path / "study"
    done = _run(["--quick", "--output_dir", str(out)], tmp_path, cache=default_base_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    # Progress: arm, seed, step and time left on each line.
    assert "Ablation: 4 arms x 1 seeds = 4 runs of 3 steps" in done.stdout
    assert "[run 4/4] random 20% seed 0 step 3: held-out accuracy" in done.stdout and "left" in done.stdout

    records = json.loads((out / "results.json").read_text())
    arms = ["top 20%", "all", "bottom 80%", "random 20%"]
    assert [(r["arm"], r["step"]) for r in records] == [(arm, step) for arm in arms for step in (0, 3)]
    for record in records:
        assert record["seed"] == 0 and record["num_problems"] == 32 and record["num_samples"] == 2
        assert 0 <= record["accuracy"] <= 1 and record["pass@k"]["1"] == pytest.approx(record["accuracy"])
        assert record["pass@k"]["2"] >= record["accuracy"]
    start = [r for r in records if r["step"] == 0]
    # Every arm starts from the same model, evaluated once: the same step-0 figures.
    assert all(r["accuracy"] == start[0]["accuracy"] and r["forking"] == {} for r in start)
    # The forking metrics at the last step are the arm's: its selected share of the step's tokens.
    fractions = {r["arm"]: r["forking"]["forking/selected_fraction"] for r in records if r["step"] == 3}
    assert fractions["all"] == 1.0 and fractions["bottom 80%"] == pytest.approx(0.8, abs=0.01)
    assert fractions["top 20%"] == pytest.approx(0.2, abs=0.01) == fractions["random 20%"]
    selection = {r["arm"]: (r["selection"], r["rho"]) for r in records}
    assert selection == {
        "top 20%": ("top", 0.2),
        "all": ("all", 1.0),
        "bottom 80%": ("bottom", 0.2),
        "random 20%": ("random", 0.2),
    }

    # trl-forking compare gives the same table from the run directories alone.
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 6 and "| top 20% | 1 |" in table
    again = subprocess.run(
        [sys.executable, "-m", "trl_forking", "compare", str(out / "runs"), "-o", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "again" / "compare.md").read_text() == table
    for name in ("accuracy_curves.png", "entropy_percentiles.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def _script():
    """Returns the ablation script, trl_forking.scripts.ablate (recipes/ablation.py runs it)."""
    return importlib.import_module("trl_forking.scripts.ablate")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--arms", "top:0.2", "best:0.2"], "arms: 'best:0.2' is not allowed"),
        (["--arms", "top:1.5"], "arms: 'top:1.5'"),
        (["--arms", "bottom:1.0"], "selects nothing"),
        (["--arms", "top:0.2", "top:0.2"], "listed twice"),
        (["--eval_num_samples", "0"], "eval_num_samples: 0 is not allowed"),
        (["--eval_every", "-5"], "eval_every: -5 is not allowed"),
        (["--model_name_or_path", "/no/such/model"], "model_name_or_path"),
    ],
)
def test_bad_input_names_the_field_before_anything_loads(tmp_path, argv, expected):
    from trl_forking.scripts.usage import UsageError

    with pytest.raises(UsageError, match=re.escape(expected)):
        _script().main([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_multi_process_launch_is_refused(tmp_path, monkeypatch):
    from trl_forking.scripts.usage import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="launch: ablation.py trains its runs one after another on one process, not 2"):
        _script().main(["--output_dir", str(tmp_path / "out")])


def test_a_launched_study_answers_bad_input_with_one_line(tmp_path):
    done = _run(["--arms", "top:0.2", "best:0.2", "--output_dir", str(tmp_path / "out")], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "ablation.py: error: arms: 'best:0.2' is not allowed; use selection:rho with selection in "
        "['top', 'bottom', 'random', 'all'] (e.g. top:0.2, bottom:0.2) or all"
    ]


def test_the_progress_line_prints_a_metric_logged_as_none(capsys):
    # A step whose groups all had equal rewards selects no token: its threshold is logged as None, and printing it
    # with :.3f raised a TypeError mid-study.
    from types import SimpleNamespace

    progress = _script().StudyProgress(total_steps=4)
    progress.start_run("[run 1/1] top 20% seed 0")
    state = SimpleNamespace(global_step=1, max_steps=4)
    progress.on_log(None, state, None, logs={"reward": 0.25, "forking/threshold": None})
    progress.on_log(None, state, None, logs={"reward": float("nan")})
    first, second = capsys.readouterr().out.splitlines()
    assert "step 1/4  reward 0.250  threshold n/a" in first
    assert "reward n/a  threshold n/a" in second


def test_quick_fills_only_the_options_the_command_line_leaves_unset():
    # --quick used to replace the arms, seeds and evaluation flags given with it, without a word.
    script = _script()
    study, argv = script.with_quick(script.AblationArguments(quick=True), ["--arms", "top:0.2", "all", "--max_steps=7"])
    assert argv == ["--arms", "top:0.2", "all", "--max_steps=7"]  # max_steps given: not appended
    assert study.seeds == script.QUICK["seeds"] and study.eval_num_problems == script.QUICK["eval_num_problems"]
    assert study.arms == script.AblationArguments().arms  # the parsed --arms would be here; QUICK's are not imposed
    study, argv = script.with_quick(script.AblationArguments(quick=True, seeds=[5]), ["--seeds", "5"])
    assert study.seeds == [5] and study.arms == script.QUICK["arms"]
    assert argv == ["--seeds", "5", "--max_steps", str(script.QUICK["max_steps"])]
