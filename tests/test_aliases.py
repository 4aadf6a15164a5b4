"""Release 0.1's names keep working for one release: each warns (FutureWarning, with the new name) and is the object
at its new place, not a copy (trl_forking._moved)."""

import importlib
import subprocess
import sys
import warnings

import pytest

from trl_forking import _moved


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("old", "new"), sorted(_moved.MOVED_MODULES.items()))
def test_an_old_module_name_imports_its_new_module_with_a_warning(old, new):
    done = fresh_python(
        "import importlib, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        f"assert new.__spec__.name == {new!r}, new.__spec__.name  # -m and pickling keep the real name\n"
        "print(' | '.join(str(w.message) for w in seen if w.category is FutureWarning))\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"{old} moved to {new}" in done.stdout


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
