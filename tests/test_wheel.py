"""``pip install trl-forking`` from a wheel ships the whole tool: the commands, the demo's recipe and the bundled task.

The wheel is built from this tree and installed, without its dependencies, into a fresh virtualenv that sees the
dependencies of this one through a path file (so nothing is downloaded) but not this source tree: the package it
imports is the wheel's. Then ``trl-forking --help`` and ``trl-forking train --config <the wheel's demo.yaml>
--max_steps 2`` run from an empty directory.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest
from test_recipes import TINY_BASE  # a base model that builds in seconds: the install is under test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Returns (the fresh virtualenv's bin directory, an empty working directory, the environment to run in)."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tree: setuptools' build/ folder would otherwise stay in the checkout, and the stale
    # modules a build/ folder can hold would go into the wheel.
    source = work / "source"
    skip = shutil.ignore_patterns(".git", "build", "dist", "outputs", "runs", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
        ]
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (work / "dist").glob("trl_forking-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # This environment's dependencies, as a plain path: its .pth files (the editable install of ROOT) do not run.
    (env_dir / purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cwd = work / "run"
    cwd.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(work / "cache"), OMP_NUM_THREADS="1")
    return env_dir / "bin", cwd, environ


@pytest.mark.slow
def test_the_installed_package_is_the_wheels_with_its_data(installed):
    bin_dir, cwd, env = installed
    code = (
        "import json, os, trl_forking, trl_forking.scripts.train as train\n"
        "from trl_forking.tasks.arithmetic_chains.task import split_path\n"
        "print(json.dumps([trl_forking.__file__, train.DEMO_CONFIG, os.path.isfile(train.DEMO_CONFIG),"
        " os.path.isfile(split_path('train'))]))"
    )
    done = _run([str(bin_dir / "python"), "-c", code], cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    package, demo, has_demo, has_task = json.loads(done.stdout)
    assert package.startswith(str(bin_dir.parent)) and not package.startswith(ROOT)
    assert has_demo and has_task


@pytest.mark.slow
def test_the_wheels_command_trains_the_demo_from_its_own_recipe(installed):
    bin_dir, cwd, env = installed
    done = _run([str(bin_dir / "trl-forking"), "--help"], cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for command in ("train", "evaluate", "ablate", "analyze", "render", "overlap", "compare"):
        assert command in done.stdout
    locate = "import trl_forking.scripts.train as t; print(t.DEMO_CONFIG)"
    demo = _run([str(bin_dir / "python"), "-c", locate], cwd=cwd, env=env).stdout.strip()
    argv = [str(bin_dir / "trl-forking"), "train", "--config", demo, "--max_steps", "2", "--output_dir", "out"]
    argv += ["--base_model_recipe", json.dumps(TINY_BASE), "--eval_num_samples", "1"]
    done = _run(argv, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "change:" in done.stdout and (cwd / "out" / "trainer_state.json").is_file()
    state = json.loads((cwd / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # Bad input from the installed command: one line naming the command, no traceback.
    done = _run([str(bin_dir / "trl-forking"), "train", "--max_steps", "two"], cwd=cwd, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("trl-forking train: error:"), done.stderr
