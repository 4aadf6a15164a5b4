"""trl_forking.analysis.study and `trl-forking compare`: per-arm means, standard errors, AUCs and intervals checked by
hand."""

import json
import math
import subprocess
import sys

import pytest

from trl_forking.analysis.study import (
    Arm,
    append_evaluation,
    area_under_curve,
    compare_runs,
    difference,
    find_runs,
    format_table,
    load_run,
    mean_and_se,
    write_run_info,
)

T_975_DOF_2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)

# Accuracy at steps 0, 10, 20 per arm and seed.
CURVES = {
    ("all", 0.2): {0: [0.30, 0.40, 0.50], 1: [0.30, 0.45, 0.60], 2: [0.30, 0.35, 0.40]},
    ("top", 0.2): {0: [0.30, 0.50, 0.60], 1: [0.30, 0.50, 0.70], 2: [0.30, 0.40, 0.45]},
    ("bottom", 0.2): {0: [0.30, 0.25, 0.20], 1: [0.30, 0.30, 0.30]},
}
STEPS = [0, 10, 20]


def make_runs(root):
    for (selection, rho), seeds in CURVES.items():
        for seed, values in seeds.items():
            run = root / f"{selection}-{rho}" / f"seed-{seed}"
            write_run_info(str(run), selection, rho, seed, loss_type="dapo")
            for step, value in zip(STEPS, values, strict=True):
                append_evaluation(str(run), {"step": step, "accuracy": value, "pass@k": {"4": min(1.0, 2 * value)}})
            history = [{"step": s, "forking/entropy_p50": 0.01 * (1 + s), "forking/entropy_p80": 0.5,
                        "forking/entropy_p95": 1.5} for s in (1, 10, 20)]  # fmt: skip
            (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return root


def test_area_under_curve_is_the_mean_of_the_piecewise_linear_curve():
    # (10 * (0.3 + 0.4) / 2 + 10 * (0.4 + 0.5) / 2) / 20 = (3.5 + 4.5) / 20 = 0.4
    assert area_under_curve([0, 10, 20], [0.3, 0.4, 0.5]) == pytest.approx(0.4)
    # Unequal spacing: (1 * (0 + 1) / 2 + 3 * (1 + 1) / 2) / 4 = 3.5 / 4
    assert area_under_curve([0, 1, 4], [0.0, 1.0, 1.0]) == pytest.approx(0.875)
    assert area_under_curve([5], [0.3]) is None


def test_mean_and_standard_error_by_hand():
    # 0.5, 0.6, 0.4: deviations 0, 0.1, -0.1; sd = sqrt(0.02 / 2) = 0.1; SE = 0.1 / sqrt(3)
    mean, se = mean_and_se([0.5, 0.6, 0.4])
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.1 / math.sqrt(3))
    assert mean_and_se([0.7]) == (0.7, None)


def test_paired_difference_by_hand():
    # top - all per seed: 0.6 - 0.5, 0.7 - 0.6, 0.45 - 0.4 = 0.10, 0.10, 0.05: mean 0.25 / 3; deviations 1/60, 1/60,
    # -1/30: sd = sqrt((2 / 3600 + 4 / 3600) / 2) = sqrt(1 / 1200); SE = sd / sqrt(3) = 1 / 60.
    result = difference({0: 0.6, 1: 0.7, 2: 0.45}, {0: 0.5, 1: 0.6, 2: 0.4})
    assert result["paired"] and result["n"] == 3
    assert result["mean"] == pytest.approx(0.25 / 3)
    assert result["se"] == pytest.approx(1 / 60)
    assert result["ci"] == pytest.approx([0.25 / 3 - T_975_DOF_2 / 60, 0.25 / 3 + T_975_DOF_2 / 60])


def test_unpaired_difference_uses_welch():
    # bottom finals 0.2, 0.3 (seeds 0, 1): mean 0.25, SE = sd / sqrt(2) = sqrt(0.005) / sqrt(2) = 0.05.
    # all finals 0.5, 0.6, 0.4: SE^2 = 0.01 / 3. Difference -0.25, SE^2 = 0.0025 + 0.01 / 3;
    # Welch dof = SE^4 / (0.05^4 / 1 + (0.01 / 3)^2 / 2).
    result = difference({0: 0.2, 1: 0.3}, {0: 0.5, 1: 0.6, 2: 0.4})
    se2 = 0.0025 + 0.01 / 3
    dof = se2**2 / (0.05**4 / 1 + (0.01 / 3) ** 2 / 2)
    assert not result["paired"]
    assert result["mean"] == pytest.approx(-0.25) and result["se"] == pytest.approx(math.sqrt(se2))
    from scipy.stats import t

    half = t.ppf(0.975, dof) * math.sqrt(se2)
    assert 2 < dof < 3 and result["ci"] == pytest.approx([-0.25 - half, -0.25 + half])


def test_summary_table_of_known_runs(tmp_path):
    root = make_runs(tmp_path / "study")
    assert len(find_runs([str(root)])) == 8  # a study directory is searched for its runs
    summary = compare_runs([str(root)])
    rows = {row["arm"]: row for row in summary["arms"]}
    assert [row["arm"] for row in summary["arms"]] == ["all", "bottom 80%", "top 20%"]
    assert summary["base_arm"] == "all"
    assert rows["all"]["final"]["mean"] == pytest.approx(0.5)
    assert rows["all"]["final"]["se"] == pytest.approx(0.1 / math.sqrt(3))
    # AUCs of "all": 0.40, 0.45, 0.35 (see test_area_under_curve...): mean 0.4, sd 0.05, SE 0.05 / sqrt(3).
    assert rows["all"]["auc"]["mean"] == pytest.approx(0.4)
    assert rows["all"]["auc"]["se"] == pytest.approx(0.05 / math.sqrt(3))
    assert "final_vs_all" not in rows["all"]
    top = rows["top 20%"]["final_vs_all"]
    assert top["paired"] and top["mean"] == pytest.approx(0.25 / 3) and top["se"] == pytest.approx(1 / 60)
    assert not rows["bottom 80%"]["final_vs_all"]["paired"]
    table = format_table(summary)
    assert "| top 20% | 3 | 58.3 +- 7.3 |" in table  # finals 0.6, 0.7, 0.45: SE = sqrt(0.01625 / 2 / 3)
    assert "| +8.3 [+1.2, +15.5] |" in table  # 8.33 +- 4.3027 * 1.667 percentage points
    pass_at = compare_runs([str(root)], metric="pass@4")
    # pass@4 = min(1, 2 * accuracy): the finals of "all" are 1.0, 1.0 and 0.8.
    assert {row["arm"]: row["final"]["mean"] for row in pass_at["arms"]}["all"] == pytest.approx(2.8 / 3)


def test_compare_command_writes_the_table_json_and_plots(tmp_path):
    root = make_runs(tmp_path / "study")
    out = tmp_path / "out"
    runs = [str(root / "all-0.2"), str(root / "top-0.2"), str(root / "bottom-0.2")]
    done = subprocess.run(
        [sys.executable, "-m", "trl_forking", "compare", *runs, "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "| all | 3 | 50.0 +- 5.8 | 40.0 +- 2.9 | n/a | n/a |" in done.stdout
    saved = json.loads((out / "compare.json").read_text())
    assert saved["arms"][0]["final"]["mean"] == pytest.approx(0.5)
    assert (out / "compare.md").read_text().strip() == format_table(saved).strip()
    for name in ("accuracy_curves.png", "entropy_percentiles.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_run_keeps_the_last_record_of_a_step_evaluated_twice(tmp_path):
    write_run_info(str(tmp_path), "top", 0.2, 0)
    for value in (0.1, 0.2, 0.9):
        append_evaluation(str(tmp_path), {"step": 0 if value < 0.5 else 5, "accuracy": value})
    run = load_run(str(tmp_path))
    assert run.curve() == ([0, 5], [0.2, 0.9])
    assert run.arm == Arm("top", 0.2) and Arm.of("all", 0.3) == Arm("all", 1.0)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "run directory not found"),
        ("empty", "no run in"),
        ("no_evaluations", "forking_eval.jsonl not found"),
        ("duplicate_seed", "two runs of arm 'top 20%' with seed 0"),
        ("bad_json", "malformed JSON line"),
    ],
)
def test_compare_bad_input_is_one_line(tmp_path, setup, message):
    runs = [str(tmp_path / "missing")]
    if setup == "empty":
        (tmp_path / "empty").mkdir()
        runs = [str(tmp_path / "empty")]
    elif setup == "no_evaluations":
        write_run_info(str(tmp_path / "r"), "top", 0.2, 0)
        runs = [str(tmp_path / "r")]
    elif setup == "duplicate_seed":
        for name in ("a", "b"):
            write_run_info(str(tmp_path / name), "top", 0.2, 0)
            append_evaluation(str(tmp_path / name), {"step": 0, "accuracy": 0.5})
        runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    elif setup == "bad_json":
        write_run_info(str(tmp_path / "r"), "top", 0.2, 0)
        (tmp_path / "r" / "forking_eval.jsonl").write_text('{"step": 0,\n')
        runs = [str(tmp_path / "r")]
    done = subprocess.run([sys.executable, "-m", "trl_forking", "compare", *runs], capture_output=True, text=True)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
