"""The output directory policy: which checkpoint a resume takes, and what a fresh run refuses, deletes or announces."""

import json

import pytest

from trl_forking.scripts.run_dir import check_output_dir, checkpoints, newest_checkpoint, resolve_resume
from trl_forking.scripts.usage import UsageError


def _checkpoint(output_dir, step: int, complete: bool = True):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:  # transformers writes trainer_state.json last
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return str(path)


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    paths = [_checkpoint(tmp_path, step) for step in (100, 9, 50)]
    (tmp_path / "checkpoint-final").mkdir()  # not a step: ignored
    assert checkpoints(str(tmp_path)) == [paths[1], paths[2], paths[0]]
    assert checkpoints(str(tmp_path / "missing")) == []


def test_newest_checkpoint_skips_one_whose_save_was_cut_short(tmp_path):
    complete = _checkpoint(tmp_path, 50)
    _checkpoint(tmp_path, 100, complete=False)  # killed while saving
    assert newest_checkpoint(str(tmp_path)) == complete


@pytest.mark.parametrize("value", ["true", "True", "last", "LAST", True])
def test_true_and_last_resume_the_newest_checkpoint(tmp_path, value):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    assert resolve_resume(value, str(tmp_path)) == newest


@pytest.mark.parametrize("value", [None, False, "", "false", "none"])
def test_no_resume(tmp_path, value):
    _checkpoint(tmp_path, 2)
    assert resolve_resume(value, str(tmp_path)) is None


def test_a_checkpoint_folder_resumes_that_checkpoint(tmp_path):
    older = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    assert resolve_resume(older, str(tmp_path / "elsewhere")) == older


def test_resume_errors_say_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match=r"resume_from_checkpoint: 'true' .* output_dir '.*', and it has none"):
        resolve_resume("true", str(tmp_path))
    _checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(UsageError, match=r"has only incomplete ones \(checkpoint-3 has no trainer_state.json\)"):
        resolve_resume("last", str(tmp_path))
    with pytest.raises(UsageError, match=r"resume_from_checkpoint: '.*checkpoint-3' is a folder without trainer_state"):
        resolve_resume(str(tmp_path / "checkpoint-3"), str(tmp_path))
    with pytest.raises(UsageError, match=r"resume_from_checkpoint: 'nowhere' is no such folder"):
        resolve_resume("nowhere", str(tmp_path))


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    _checkpoint(tmp_path, 50)
    with pytest.raises(UsageError, match=r"holds 1 checkpoint\(s\) .* \(newest checkpoint-50\); continue it with "):
        check_output_dir(str(tmp_path), resuming=False, overwrite=False)
    assert check_output_dir(str(tmp_path), resuming=True, overwrite=False) is None


def test_overwrite_deletes_the_checkpoints_on_the_main_process_only(tmp_path):
    _checkpoint(tmp_path, 50)
    notice = check_output_dir(str(tmp_path), resuming=False, overwrite=True, is_main_process=False)
    assert "deleted 1 checkpoint(s)" in notice and checkpoints(str(tmp_path))  # another rank: left to rank 0
    check_output_dir(str(tmp_path), resuming=False, overwrite=True, is_main_process=True)
    assert checkpoints(str(tmp_path)) == []


def test_a_fresh_run_over_a_finished_run_goes_ahead_and_says_so(tmp_path):
    assert check_output_dir(str(tmp_path / "new"), resuming=False, overwrite=False) is None
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    notice = check_output_dir(str(tmp_path), resuming=False, overwrite=False)
    assert notice.startswith(f"output_dir '{tmp_path}' holds a finished run (100 steps, saved ")
    assert notice.endswith("this run overwrites it")
