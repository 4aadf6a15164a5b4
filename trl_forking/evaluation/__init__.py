"""Evaluation: accuracy of sampled completions and the records of training runs.

- ``accuracy``: avg@n and unbiased pass@k of n completions per problem, graded with math-verify (``evaluate``);
- ``callback``: ``HeldOutEvaluationCallback``, held-out accuracy during training;
- ``records``: the run files the study reads (``forking_run.json``, ``forking_eval.jsonl``).

Imports the library only.
"""

from .accuracy import (
    DEFAULT_EVAL_BATCH_SIZE,
    evaluate,
    format_evaluation,
    generate_completions,
    left_pad,
    pass_at_k,
    score_problem,
    summarize,
)
from .callback import HeldOutEvaluationCallback
from .records import EVAL_FILE, RUN_FILE, Arm, append_evaluation, write_run_info

__all__ = [
    "DEFAULT_EVAL_BATCH_SIZE",
    "EVAL_FILE",
    "RUN_FILE",
    "Arm",
    "HeldOutEvaluationCallback",
    "append_evaluation",
    "evaluate",
    "format_evaluation",
    "generate_completions",
    "left_pad",
    "pass_at_k",
    "score_problem",
    "summarize",
    "write_run_info",
]
