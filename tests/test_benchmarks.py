"""The benchmark command runs end to end in its quick mode (so it cannot rot) and reports every target.

Only that the code runs and the report is complete is asserted here; performance figures are for benchmarks/run.py,
never for timed unit tests.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed
def test_quick_benchmark_runs_every_section_and_writes_json_and_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"a", "b", "c", "d", "e", "machine", "verdicts"} <= set(results)
    assert set(results["e"]["ratio"]) == {"varied"} and results["e"]["ratio"]["varied"] > 0
    # Exactness and constant communication hold at any size, so they must pass even in the quick mode.
    assert all(row["exact"] and row["topk_agrees"] for row in results["a"])
    assert all(row["forking_mask"]["exact_count"] for row in results["b"])
    assert len({row["forking_mask"]["bytes"] for row in results["b"]}) == 1
    for png in ("perf_selection.png", "perf_distributed.png", "perf_trainer.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "targets:" in out.stdout and "PASS" in out.stdout


def test_the_flop_count_splits_body_and_head_as_the_recipes_shapes_say():
    # A hand check of benchmarks/bench_step_cost.flops: with every completion at the maximum, trimming changes
    # nothing and the head shrinks to the selected share; with short completions the body shrinks to P + n.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_step_cost as bench
    from transformers import Qwen3Config
    from trl.trainer.utils import compute_flops_per_token

    full = [20480] * 8192
    counts = bench.flops("Qwen3-8B", full)
    assert counts["ours"]["body"] == pytest.approx(counts["today"]["body"])
    assert counts["ours"]["head"] / counts["today"]["head"] == pytest.approx(4096 / 20480)
    config = Qwen3Config(vocab_size=bench.VOCAB_SIZE, **bench.QWEN3["Qwen3-8B"])
    head = 6 * bench.VOCAB_SIZE * 4096
    per_step = 8192 // 16
    expected_body = per_step * (compute_flops_per_token(config, 2048 + 20480) - head) * (2048 + 20480)
    assert counts["today"]["body"] == pytest.approx(expected_body)
    short = [100] * 8191 + [20480]  # one long completion: the first rank pads its 64 to it, the others do not
    trimmed = bench.flops("Qwen3-8B", short)
    assert trimmed["mean_width_today"] == pytest.approx((64 * 20480 + 8128 * 100) / 8192)
    assert trimmed["ours"]["body"] < trimmed["today"]["body"] and trimmed["ratio"] < counts["ratio"]
