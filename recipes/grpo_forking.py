"""``trl-forking train`` as a file: ``python recipes/grpo_forking.py``, ``accelerate launch recipes/grpo_forking.py``.

The script is ``trl_forking.scripts.train`` (its docstring has the usage); this launcher only runs it, so a wheel
install without this folder has the same command (``trl-forking train``, ``python -m trl_forking.scripts.train``).
"""

import sys

from trl_forking.scripts.train import run

if __name__ == "__main__":
    sys.exit(run(prog="grpo_forking.py"))
