"""Verifiable math rewards for GRPO: math-verify accuracy on ``\\boxed{...}`` or DAPO's last line ``Answer: ...``.

``math_accuracy_reward`` (1 / 0) and ``dapo_accuracy_reward`` (1 / -1, DAPO's rule-based reward) take the final
answer of each completion, parse it and the gold answer with math-verify, and compare them symbolically. A gold answer
that math-verify cannot parse gives ``None``, which TRL's ``GRPOTrainer`` excludes from the group baseline, with one
warning per distinct gold answer. Nothing here can hang: in the main thread math-verify's own ``signal.alarm``
timeouts bound every parse and comparison; anywhere else (reward threads, async loops) the scoring runs in a
fresh Python process whose main thread has those alarms, and the caller waits at most a fixed wall-clock budget,
killing the process if it is exceeded.

DAPO's overlong shaping is TRL's own ``trl.rewards.get_soft_overlong_punishment``; ``get_reward_funcs`` builds the
list a recipe asks for by name.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

__all__ = [
    "REWARD_FUNCS",
    "MathAccuracyReward",
    "dapo_accuracy_reward",
    "extract_final_answer",
    "get_reward_funcs",
    "math_accuracy_reward",
    "numeric_closeness_reward",
]

logger = logging.getLogger(__name__)

# Bound on each math-verify parse and each comparison; its alarm-based timeouts take whole seconds.
TIMEOUT_S = 5
# Wall-clock slack for the scoring subprocess outside the main thread: start-up (importing sympy) plus scheduling noise.
WORKER_SLACK_S = 60.0
# Only the tail of a completion can hold its final answer; bounding the text bounds regex and parser work.
MAX_ANSWER_CHARS = 2000

_RUN_AS_SCRIPT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
_ANSWER_LINE = re.compile(r"^[ \t>*#]*answer[ \t*]*:[ \t]*(?P<answer>.+?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _last_boxed(text: str) -> str | None:
    """Returns the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (braces balanced), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed: the completion was cut off inside its answer


def extract_final_answer(text: str) -> str | None:
    """Returns the final answer written in ``text``: the last ``\\boxed{...}``, else the last ``Answer: ...`` line.

    The last boxed answer wins over earlier ones (a model that boxes two candidates is graded on the one it ended
    with, as verl's DAPO scorer does). ``Answer:`` follows DAPO-Math-17k's instruction ("The last line of your
    response should be of the form Answer: $Answer"); surrounding ``$`` signs are dropped. None when neither is there.
    """
    text = text[-MAX_ANSWER_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    lines = _ANSWER_LINE.findall(text)
    if not lines:
        return None
    answer = lines[-1].rstrip(". ").strip().strip("$").strip()
    return answer or None


def _parse(answer: str, timeout: int | None) -> list:
    """Returns math-verify's parse of one bare answer string (LaTeX first, then a plain expression); [] if neither."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    latex = LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(units=True))
    # Boxing the bare string lets the LaTeX extractor take it whole: "2\sqrt{3}" or "(0, 1]" stay one expression.
    parsed = parse(f"\\boxed{{{answer}}}", extraction_config=[latex], parsing_timeout=timeout)
    return parsed or parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=timeout)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    """Returns the parsed gold answer (cached: the 16 completions of a group share it); () with one warning if none."""
    answer = extract_final_answer(gold) or gold.strip()
    parsed = _parse(answer, timeout) if answer else []
    if not parsed:
        logger.warning("Gold answer %r cannot be parsed by math-verify: its completions get reward None.", gold)
    return tuple(parsed)


def _score(completion: str, gold: str, timeout: int | None) -> bool | None:
    """Returns whether ``completion``'s final answer equals ``gold`` (None: gold unparsable)."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold, timeout)
    if not gold_parsed:
        return None
    answer = extract_final_answer(completion)
    if answer is None:
        return False
    predicted = _parse(answer, timeout)
    return bool(predicted) and verify(list(gold_parsed), predicted, timeout_seconds=timeout)


def _score_all(completions: Sequence[str], golds: Sequence[str], timeout: int | None) -> list[bool | None]:
    """Returns ``_score`` for each pair; runs in the caller's main thread or in the worker process."""
    return [_score(c, g, timeout) for c, g in zip(completions, golds, strict=True)]


def _score_in_subprocess(completions: list[str], golds: list[str], timeout: int) -> list[bool | None]:
    """Returns ``_score_all`` computed by this file run as a script in a fresh Python; all False if it overruns.

    A separate interpreter, not ``multiprocessing``: its main thread can use math-verify's alarms, it never re-imports
    the caller's ``__main__`` (spawn would re-run a training script without a main guard), and ``subprocess.run``
    kills it when the wall-clock budget is spent. The file runs on its own, not as ``-m trl_forking.rewards``, so
    that the child does not import torch through the package ``__init__``.
    """
    budget = WORKER_SLACK_S + len(completions) * 3 * timeout  # two parses and one comparison each
    request = json.dumps({"completions": completions, "golds": golds, "timeout": timeout})
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN_AS_SCRIPT, os.path.abspath(__file__)],
            input=request,
            capture_output=True,
            text=True,
            timeout=budget,
            check=True,
        )
    except subprocess.TimeoutExpired:
        logger.warning("math-verify subprocess exceeded %.0f s; scoring this batch as wrong.", budget)
        return [False] * len(completions)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"math-verify scoring subprocess failed:\n{error.stderr[-2000:]}") from error
    if done.stderr:
        sys.stderr.write(done.stderr)  # the worker's "gold answer cannot be parsed" warnings
    return json.loads(done.stdout.strip().splitlines()[-1])


class MathAccuracyReward:
    """A GRPO reward: ``correct`` when the completion's final answer equals ``solution`` under math-verify.

    Returns one float per completion, ``incorrect`` when the answer is wrong or missing, and None when the gold answer
    is unparsable (TRL then leaves that completion out of the group statistics). Completions may be plain strings or
    conversations (the last message's content is graded). A callable class, not a closure, so it pickles into TRL's
    rollout workers.
    """

    def __init__(self, correct: float = 1.0, incorrect: float = 0.0, name: str = "math_accuracy_reward"):
        self.correct, self.incorrect = correct, incorrect
        self.__name__ = name

    def __call__(self, completions: list, solution: list[str], **kwargs) -> list[float | None]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        golds = [str(s) for s in solution]
        if threading.current_thread() is threading.main_thread():
            verdicts = _score_all(texts, golds, TIMEOUT_S)
        else:
            verdicts = _score_in_subprocess(texts, golds, TIMEOUT_S)
        return [None if v is None else (self.correct if v else self.incorrect) for v in verdicts]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_closeness_reward(completions: list, solution: list[str], **kwargs) -> list[float | None]:
    """Returns ``1 / (1 + |predicted - gold|)`` per completion: partial credit for numeric answers (a shaping reward).

    The prediction is the final answer (``\\boxed{}`` / ``Answer:``) or else the last number in the completion; 0.0
    when there is none, None when the gold answer is not a plain number. Meant for models that almost never state an
    exact answer (the random tiny GPT-2 of the tests), where an exact-match reward alone would leave every group's
    advantages at zero; the demo and the real recipes train on the exact answer only.
    """
    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        text = (completion if isinstance(completion, str) else completion[-1]["content"])[-MAX_ANSWER_CHARS:]
        gold_match = _NUMBER.fullmatch(str(gold).strip())
        if gold_match is None:
            rewards.append(None)
            continue
        final = extract_final_answer(text)
        numbers = _NUMBER.findall(final if final is not None else text)
        rewards.append(1.0 / (1.0 + abs(float(numbers[-1]) - float(gold))) if numbers else 0.0)
    return rewards


math_accuracy_reward = MathAccuracyReward()
# DAPO scores a wrong answer -1, so that its overlong penalty (in [-1, 0]) weighs the same as in the paper.
dapo_accuracy_reward = MathAccuracyReward(correct=1.0, incorrect=-1.0, name="dapo_accuracy_reward")

REWARD_FUNCS: dict[str, Callable] = {
    "math_accuracy": math_accuracy_reward,
    "dapo_accuracy": dapo_accuracy_reward,
    "numeric_closeness": numeric_closeness_reward,
}


def get_reward_funcs(names: Sequence[str], max_completion_length: int, overlong_buffer: int = 0) -> list[Callable]:
    """Returns the reward functions named in ``names`` (keys of ``REWARD_FUNCS``), plus DAPO's overlong punishment.

    With ``overlong_buffer > 0``, appends ``trl.rewards.get_soft_overlong_punishment(max_completion_length,
    overlong_buffer)``: 0 up to ``max_completion_length - overlong_buffer`` tokens, then a linear penalty reaching -1
    at ``max_completion_length`` (DAPO, Eq. 13; the paper uses a 4,096-token buffer on 20,480).
    """
    from trl.rewards import get_soft_overlong_punishment

    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"reward_funcs: unknown reward {unknown}; allowed: {sorted(REWARD_FUNCS)}.")
    if not 0 <= overlong_buffer <= max_completion_length:
        raise ValueError(
            f"overlong_buffer: {overlong_buffer} must be in [0, max_completion_length={max_completion_length}]."
        )
    funcs = [REWARD_FUNCS[n] for n in names]
    if overlong_buffer:
        funcs.append(get_soft_overlong_punishment(max_completion_length, overlong_buffer))
    return funcs


if __name__ == "__main__":
    # The worker side of _score_in_subprocess: one JSON request on stdin, one JSON list on the last stdout line.
    logging.basicConfig(format="%(message)s")
    req = json.loads(sys.stdin.read())
    print(json.dumps(_score_all(req["completions"], req["golds"], req["timeout"])))
