"""Defaults shared by the ``trl-forking`` command line and the analysis functions, in a module that imports nothing:
the parser shows them in ``--help`` without loading torch, transformers or matplotlib."""

__all__ = [
    "DEFAULT_ENTROPY_BATCH_SIZE",
    "DEFAULT_ENTROPY_BUCKETS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_RHO",
    "DEFAULT_TOP_TOKENS",
    "DEFAULT_WIDTH",
]

DEFAULT_RHO = 0.2  # the paper's best ratio
# Rows per forward when scoring entropies (trl_forking.entropy), and prompts per generate call when sampling.
DEFAULT_ENTROPY_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256  # completion length cap when sampling
DEFAULT_TOP_TOKENS = 20  # rows of analyze's forking-token table
DEFAULT_WIDTH = 100  # characters per line in render's PNG
DEFAULT_ENTROPY_BUCKETS = 10  # overlap's entropy-change table: deciles of model A's entropy
