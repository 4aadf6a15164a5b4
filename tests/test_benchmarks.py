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
    assert {"a", "b", "c", "d", "machine", "verdicts"} <= set(results)
    # Exactness and constant communication hold at any size, so they must pass even in the quick mode.
    assert all(row["exact"] and row["topk_agrees"] for row in results["a"])
    assert all(row["forking_mask"]["exact_count"] for row in results["b"])
    assert len({row["forking_mask"]["bytes"] for row in results["b"]}) == 1
    for png in ("perf_selection.png", "perf_distributed.png", "perf_trainer.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "targets:" in out.stdout and "PASS" in out.stdout
