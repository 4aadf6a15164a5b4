"""trl-forking: forking-token reinforcement learning for Hugging Face TRL.

Train only on the high-entropy minority of completion tokens ("Beyond the 80/20 Rule", arXiv 2506.01939), with a
selection that is exact at any scale and independent of how the optimizer step is split across micro-batches,
accumulation steps and ranks.

The public names below load on first use (PEP 562), so that ``trl-forking --help`` and other light entry points do
not import torch, transformers or TRL.
"""

from importlib import import_module

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ForkingGRPOConfig": "config",
    "ForkingStatsCallback": "callbacks",
    "ForkingGRPOTrainer": "trainer",
    "SELECTIONS": "selection",
    "build_tiny_model": "tiny_model",
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
        raise AttributeError(f"module 'trl_forking' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
