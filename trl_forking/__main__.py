"""``python -m trl_forking``: the ``trl-forking`` command line."""

from .cli import main

raise SystemExit(main())
