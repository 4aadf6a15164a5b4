"""Run a script many times, each in its own process, without paying its imports each time.

A fresh ``python recipes/grpo_forking.py ...`` spends ~6 s of CPU importing torch, transformers and TRL before it can
answer bad input in a line. ``WarmPython`` starts one interpreter that executes the scripts' top level (their imports
and definitions, not their ``__main__`` block), then forks it once per run: each run is a separate process with its own
argv, working directory, environment additions, stdout, stderr and exit status, that executes the script as
``__main__`` exactly as ``python script.py`` would after the imports. Environment read at import time (HF_HUB_OFFLINE)
must be given to ``WarmPython`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from subprocess import CompletedProcess

_SERVER = r"""
import json, os, runpy, signal, sys, time, traceback

for script in sys.argv[1:]:
    runpy.run_path(script, run_name="__warm__")  # the imports and definitions, not the main block
print("ready", flush=True)
for line in sys.stdin:
    run = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.chdir(run["cwd"])
        os.environ.update(run["env"])
        sys.argv = [run["script"], *run["argv"]]
        code = 0
        try:
            runpy.run_path(run["script"], run_name="__main__")
        except SystemExit as done:  # what the interpreter does with it at exit
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + run["timeout"]
    while not (waited := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:  # a run that hangs is killed, as subprocess.run(timeout=...) would
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    print(os.waitstatus_to_exitcode(waited[1]), flush=True)
"""


# What the scripts run with in the bad-input tests: offline, one thread, and stderr kept to what the script says
# (progress bars of weight loading and dataset maps are not messages).
SCRIPT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
# Set by a launcher; a test's script runs as a plain single process.
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")


def script_env(workdir) -> dict[str, str]:
    """Returns this process's environment with ``SCRIPT_ENV``, the base-model cache in ``workdir/cache`` and no
    launcher variables."""
    env = {**os.environ, **SCRIPT_ENV, "XDG_CACHE_HOME": os.path.join(str(workdir), "cache")}
    return {name: value for name, value in env.items() if name not in LAUNCH_VARIABLES}


class WarmPython:
    """One interpreter with ``scripts``' imports done, forked for each ``run``; use as a context manager."""

    def __init__(self, scripts: list[str], env: dict[str, str], workdir) -> None:
        self.workdir, self.count = workdir, 0
        self.server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, *scripts],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        ready = self.server.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the warm interpreter did not start: {ready!r}")

    def run(self, script: str, argv: list[str], cwd, env: dict | None = None, timeout: float = 300) -> CompletedProcess:
        """Returns what ``python script *argv`` run in ``cwd`` with ``env`` added gave: exit status, stdout, stderr.

        A run still going after ``timeout`` seconds is killed (exit status -9).
        """
        self.count += 1
        out, err = (os.path.join(self.workdir, f"run{self.count}.{name}") for name in ("out", "err"))
        request = {"script": script, "argv": argv, "cwd": str(cwd), "env": env or {}, "stdout": out, "stderr": err}
        request["timeout"] = timeout
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        code = int(self.server.stdout.readline())
        with open(out) as stdout, open(err) as stderr:
            return CompletedProcess([script, *argv], code, stdout.read(), stderr.read())

    def __enter__(self) -> WarmPython:
        return self

    def __exit__(self, *exc) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
