"""The names of release 0.1's flat layout, kept for one release: each warns once and gives the object at its new place.

``trl_forking.task`` and the other moved modules import as their new module (``import trl_forking.study`` is
``trl_forking.analysis.study``; ``python -m trl_forking.base_model`` runs ``trl_forking.scripts.base_model``), and
``trl_forking.build_tiny_model`` and ``trl_forking.callbacks.HeldOutEvaluationCallback`` resolve to their new homes,
each with a ``FutureWarning`` (shown by default, unlike ``DeprecationWarning``) that names the new path. The library
imports its moved neighbours only here, by name and on use, so the import rules (``tests/test_imports.py``) hold.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED_ATTRIBUTES", "MOVED_MODULES", "install", "moved_attribute"]

REMOVED_IN = "0.3"

# Old module -> new module.
MOVED_MODULES = {
    "trl_forking.base_model": "trl_forking.tasks.arithmetic_chains.base_model",
    "trl_forking.task": "trl_forking.tasks.arithmetic_chains.task",
    "trl_forking.tiny_model": "trl_forking.testing",
    "trl_forking.study": "trl_forking.analysis.study",
    "trl_forking.cli": "trl_forking.scripts.cli",
    "trl_forking.console": "trl_forking.scripts.console",
    "trl_forking.launch": "trl_forking.scripts.launch",
    "trl_forking.plan": "trl_forking.scripts.plan",
    "trl_forking.recipe_args": "trl_forking.scripts.recipe_args",
    "trl_forking.run_dir": "trl_forking.scripts.run_dir",
    "trl_forking.usage": "trl_forking.scripts.usage",
}
# The command line of a moved module, where it is not the module itself (``python -m trl_forking.base_model``).
MOVED_MAINS = {"trl_forking.base_model": "trl_forking.scripts.base_model"}
# (old module, name) -> new module.
MOVED_ATTRIBUTES = {
    ("trl_forking", "build_tiny_model"): "trl_forking.testing",
    ("trl_forking.callbacks", "HeldOutEvaluationCallback"): "trl_forking.evaluation.callback",
}


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} moved to {new} in trl-forking 0.2; the old name goes in {REMOVED_IN}",
        FutureWarning,
        stacklevel=stacklevel,
    )


def moved_attribute(module: str, name: str):
    """Returns ``name`` of ``module`` from its new module, with a ``FutureWarning``; raises ``AttributeError`` for a
    name that never was there (the ``__getattr__`` of ``module`` calls this)."""
    new = MOVED_ATTRIBUTES.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{new}.{name}", stacklevel=4)  # the caller of the module's __getattr__
    return getattr(importlib.import_module(new), name)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name after every other finder has failed, and loads it as its new module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self):
        self._own_specs = {}  # new module name -> its own spec

    def create_module(self, spec):
        _warn(spec.name, MOVED_MODULES[spec.name])
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # The import system set ``__spec__`` to the old name's; the module keeps its own (``-m`` and pickling use it).
        module.__spec__ = self._own_specs[module.__name__]

    def get_code(self, fullname):
        """``python -m <old name>`` (runpy): the code of the new module, or of its command line."""
        new = MOVED_MAINS.get(fullname, MOVED_MODULES[fullname])
        _warn(f"python -m {fullname}", f"python -m {new}")
        return importlib.util.find_spec(new).loader.get_code(new)

    def is_package(self, fullname):
        return False


def install() -> None:
    """Adds the finder of moved modules to ``sys.meta_path`` (once), after the others: it never shadows a module."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
