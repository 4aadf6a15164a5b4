"""Release 0.1's names keep working for one release: each warns (FutureWarning, with the new name) and is the object
at its new place, not a copy (trl_forking._moved)."""

import importlib
import json
import subprocess
import sys
import warnings

import pytest

from trl_forking import _moved


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_every_old_module_name_imports_its_new_module_with_a_warning():
    # One fresh interpreter for all of them (none imported before): an import each, not an interpreter each.
    done = fresh_python(
        "import importlib, json, warnings\n"
        "warnings.simplefilter('always')\n"
        "found = {}\n"
        f"for old, new in {sorted(_moved.MOVED_MODULES.items())!r}:\n"
        "    with warnings.catch_warnings(record=True) as seen:\n"
        "        module = importlib.import_module(old)\n"
        "    found[old] = [module is importlib.import_module(new), module.__spec__.name,\n"
        "                  [str(w.message) for w in seen if w.category is FutureWarning]]\n"
        "print(json.dumps(found))\n"
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for old, new in _moved.MOVED_MODULES.items():
        same, spec_name, messages = found[old]
        assert same, f"{old} is not {new}"
        assert spec_name == new  # -m and pickling keep the real name
        assert any(f"{old} moved to {new}" in message for message in messages), (old, messages)


def test_the_public_names_of_moved_objects_are_the_objects_at_their_new_place():
    import trl_forking
    import trl_forking.callbacks
    from trl_forking.evaluation.callback import HeldOutEvaluationCallback
    from trl_forking.testing import build_tiny_model

    with pytest.warns(FutureWarning, match=r"trl_forking.build_tiny_model moved to trl_forking.testing"):
        assert trl_forking.build_tiny_model is build_tiny_model
    with pytest.warns(FutureWarning, match=r"HeldOutEvaluationCallback moved to trl_forking.evaluation.callback"):
        assert trl_forking.callbacks.HeldOutEvaluationCallback is HeldOutEvaluationCallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current names do not warn
        assert trl_forking.ForkingGRPOTrainer is importlib.import_module("trl_forking.trainer").ForkingGRPOTrainer
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        trl_forking.no_such_name  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("trl_forking.no_such_module")


def test_the_old_build_command_still_builds_and_says_where_it_went(tmp_path):
    """``python -m trl_forking.base_model`` runs the build's command line: here its usage error (no build)."""
    done = subprocess.run(
        [sys.executable, "-m", "trl_forking.base_model", "--sft-steps", "0", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "python -m trl_forking.base_model moved to python -m trl_forking.scripts.base_model" in done.stderr
    assert "error: sft_steps: 0 is not allowed" in done.stderr
    assert list(tmp_path.iterdir()) == []
