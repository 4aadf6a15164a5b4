"""``trl-forking evaluate`` as a file: ``python recipes/eval_aime.py``, ``accelerate launch recipes/eval_aime.py``.

The script is ``trl_forking.scripts.evaluate`` (its docstring has the usage); this launcher only runs it, so a wheel
install without this folder has the same command (``trl-forking evaluate``, ``python -m trl_forking.scripts.evaluate``).
"""

import sys

from trl_forking.scripts.evaluate import run

if __name__ == "__main__":
    sys.exit(run(prog="eval_aime.py"))
