"""Forking-token analysis: entropy statistics of a model's completions, token renderings and model overlap.

The functions here are the Python API behind ``trl-forking analyze``, ``render`` and ``overlap``; notebooks call
them directly. All three read, sample and score their inputs with one function, ``score_inputs``. Entropies come from
``trl_forking.entropy.token_entropies`` (chunked, through TRL's fused LM head) and the top-rho selection from
``trl_forking.selection.forking_mask``, as in training.
"""

from ..defaults import DEFAULT_RHO
from .inputs import load_completions, load_prompts, read_inputs
from .overlap import compare_entropies, format_overlap, overlap
from .pipeline import ScoredInputs, score_inputs
from .render import render, render_html, render_png
from .report import analyze, format_summary, position_profile
from .sampling import load_model, sample_completions
from .scoring import ScoredCompletions, score_completions
from .stats import (
    average_ranks,
    entropy_change_by_bucket,
    entropy_summary,
    forking_token_table,
    log_histogram,
    spearman,
    top_rho_overlap,
    top_rho_threshold,
)

__all__ = [
    "DEFAULT_RHO",
    "ScoredCompletions",
    "ScoredInputs",
    "analyze",
    "average_ranks",
    "compare_entropies",
    "entropy_change_by_bucket",
    "entropy_summary",
    "format_overlap",
    "format_summary",
    "forking_token_table",
    "load_completions",
    "load_model",
    "load_prompts",
    "log_histogram",
    "overlap",
    "position_profile",
    "read_inputs",
    "render",
    "render_html",
    "render_png",
    "sample_completions",
    "score_completions",
    "score_inputs",
    "spearman",
    "top_rho_overlap",
    "top_rho_threshold",
]
