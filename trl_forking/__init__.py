"""trl-forking: forking-token reinforcement learning for Hugging Face TRL.

Train only on the high-entropy minority of completion tokens ("Beyond the 80/20 Rule", arXiv 2506.01939), with a
selection that is exact at any scale and independent of how the optimizer step is split across micro-batches,
accumulation steps and ranks.
"""

from .callbacks import ForkingStatsCallback
from .config import ForkingGRPOConfig
from .entropy import token_entropies
from .metrics import forking_metrics
from .rewards import dapo_accuracy_reward, get_reward_funcs, math_accuracy_reward
from .selection import SELECTIONS, entropy_quantiles, forking_mask, num_selected
from .tiny_model import build_tiny_model
from .trainer import ForkingGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "ForkingGRPOConfig",
    "ForkingStatsCallback",
    "ForkingGRPOTrainer",
    "SELECTIONS",
    "build_tiny_model",
    "dapo_accuracy_reward",
    "entropy_quantiles",
    "forking_mask",
    "forking_metrics",
    "get_reward_funcs",
    "math_accuracy_reward",
    "num_selected",
    "token_entropies",
]
