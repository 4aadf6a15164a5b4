"""``python -m trl_forking``: the ``trl-forking`` command line."""

from .scripts.cli import main

raise SystemExit(main())
