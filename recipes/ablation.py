"""``trl-forking ablate`` as a file: ``python recipes/ablation.py`` (one process: the study trains its runs in turn).

The script is ``trl_forking.scripts.ablate`` (its docstring has the usage); this launcher only runs it, so a wheel
install without this folder has the same command (``trl-forking ablate``, ``python -m trl_forking.scripts.ablate``).
"""

import sys

from trl_forking.scripts.ablate import run

if __name__ == "__main__":
    sys.exit(run(prog="ablation.py"))
