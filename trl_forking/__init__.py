"""trl-forking: forking-token reinforcement learning for Hugging Face TRL.

Train only on the high-entropy minority of completion tokens ("Beyond the 80/20 Rule", arXiv 2506.01939), with a
selection that is exact at any scale and independent of how the optimizer step is split across micro-batches,
accumulation steps and ranks.

The public names below load on first use (PEP 562), so that ``trl-forking --help`` and other light entry points do
not import torch, transformers or TRL.

The package, by layer (a module imports only from its own layer and the ones above it; ``tests/test_imports.py``):

- the library, this folder's modules: ``config``, ``selection``, ``entropy``, ``entropy_stats``, ``metrics``,
  ``trainer``, ``callbacks``, ``defaults``, ``rewards`` (math-verify rewards), ``data`` (dataset loaders; the bundled
  task is one of its datasets, so it alone may import ``tasks``) and ``testing`` (a tiny random model for tests).
  Imports torch, transformers, TRL and accelerate, never a subpackage below;
- ``evaluation``: avg@k and pass@k of sampled completions, the held-out evaluation callback and the run records;
- ``analysis``: entropy statistics, plots and reports of completions, and the study that compares training runs;
- ``tasks``: the bundled task ``arithmetic_chains``, its data and the build of the demo's base model;
- ``scripts``: the command lines (``trl-forking train | evaluate | ablate | analyze | render | overlap | compare``)
  and their plumbing (argument parsing, console, launch checks, run directories, the dry-run plan).

Release 0.1's flat module names still import, with a ``FutureWarning``, until 0.3 (``trl_forking._moved``).
"""

from importlib import import_module

from . import _moved

_moved.install()

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ForkingGRPOConfig": "config",
    "ForkingStatsCallback": "callbacks",
    "ForkingGRPOTrainer": "trainer",
    "SELECTIONS": "selection",
    "dapo_accuracy_reward": "rewards",
    "entropy_quantiles": "selection",
    "forking_mask": "selection",
    "forking_metrics": "metrics",
    "get_reward_funcs": "rewards",
    "math_accuracy_reward": "rewards",
    "num_selected": "selection",
    "token_entropies": "entropy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        return _moved.moved_attribute(__name__, name)
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
