"""The math rewards: a table of real-looking answers, unparsable gold, threads and timeouts, overlong shaping."""

import logging
import threading
import time

import pytest
import torch

from trl_forking import rewards
from trl_forking.rewards import (
    dapo_accuracy_reward,
    extract_final_answer,
    get_reward_funcs,
    math_accuracy_reward,
    numeric_closeness_reward,
)

# (completion, gold, expected math_accuracy_reward)
CASES = [
    ("So the sum is $\\boxed{42}$.", "42", 1.0),
    ("Reasoning...\nAnswer: 42", "42", 1.0),  # DAPO's last line, plain
    ("Reasoning...\nAnswer: $42$", "42", 1.0),  # DAPO's last line, in math mode
    ("answer:   7\n", "7", 1.0),  # case and spacing do not matter
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # same number, other notation
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac{2}{3}}", "3/4", 0.0),
    ("Answer: 2\\sqrt{3}", "2\\sqrt{3}", 1.0),  # LaTeX on the Answer line without $ signs
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),  # symbolic equality
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{(0, 1]}", "(0,1]", 1.0),  # intervals
    ("\\boxed{[0, 1]}", "(0,1]", 0.0),  # closed vs half-open
    ("\\boxed{5} no wait, \\boxed{6}", "6", 1.0),  # the last boxed answer is the final one
    ("\\boxed{5} no wait, \\boxed{6}", "5", 0.0),
    ("\\boxed{3}\nAnswer: 4", "3", 1.0),  # a boxed answer wins over an Answer line
    ("", "42", 0.0),  # empty
    ("}{ \\frac{ ### \\boxed{", "42", 0.0),  # garbage, unclosed box
    ("The answer is 42", "42", 0.0),  # neither \boxed nor an Answer line: not graded as an answer
]


@pytest.mark.parametrize(("completion", "gold", "expected"), CASES)
def test_math_accuracy_reward_on_real_looking_answers(completion, gold, expected):
    assert math_accuracy_reward([completion], [gold]) == [expected]


def test_rewards_accept_conversational_completions_and_dapo_scores_wrong_as_minus_one():
    completions = [[{"role": "assistant", "content": "Answer: 12"}], [{"role": "assistant", "content": "Answer: 13"}]]
    assert math_accuracy_reward(completions, ["12", "12"]) == [1.0, 0.0]
    assert dapo_accuracy_reward(completions, ["12", "12"]) == [1.0, -1.0]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("a \\boxed{\\frac{1}{2}} b", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # nested braces stay balanced
        ("\\fbox{7}", "7"),
        ("x\nAnswer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 1\nmore text\nAnswer: 2", "2"),  # the last Answer line
        ("\\boxed{12", None),  # cut off inside the box
        ("no answer here", None),
    ],
)
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


def test_unparsable_gold_gives_none_with_one_warning(caplog):
    gold = "}{}{"  # unique to this test: the gold cache is per process
    with caplog.at_level(logging.WARNING, logger="trl_forking.rewards"):
        first = math_accuracy_reward(["\\boxed{1}", "\\boxed{2}"], [gold, gold])
        second = math_accuracy_reward(["\\boxed{1}"], [gold])
    assert first == [None, None] and second == [None]
    assert sum(gold in record.getMessage() for record in caplog.records) == 1


def test_off_the_main_thread_scores_match_the_main_thread():
    completions = [c for c, _, _ in CASES]
    golds = [g for _, g, _ in CASES]
    result = {}
    worker = threading.Thread(target=lambda: result.update(scores=math_accuracy_reward(completions, golds)))
    worker.start()
    worker.join(timeout=120)
    assert result["scores"] == [e for _, _, e in CASES]


def test_a_pathological_answer_times_out_in_the_main_thread(monkeypatch):
    # 9^(9^(9^9)) has ~10^(3.7e8) digits: sympy would compare it against 5 forever without the alarm.
    monkeypatch.setattr(rewards, "TIMEOUT_S", 1)
    start = time.monotonic()
    assert math_accuracy_reward(["\\boxed{9^{9^{9^{9}}}}"], ["5"]) == [0.0]
    assert time.monotonic() - start < 10


def test_a_pathological_answer_times_out_in_a_thread(monkeypatch):
    monkeypatch.setattr(rewards, "TIMEOUT_S", 1)  # sent to the scoring subprocess with the request
    result = {}
    worker = threading.Thread(target=lambda: result.update(s=math_accuracy_reward(["\\boxed{9^{9^{9^{9}}}}"], ["5"])))
    start = time.monotonic()
    worker.start()
    worker.join(timeout=60)
    assert result["s"] == [0.0]
    assert time.monotonic() - start < 15


def test_a_hung_scoring_subprocess_is_killed_at_its_budget(monkeypatch, caplog):
    monkeypatch.setattr(rewards, "_RUN_AS_SCRIPT", "import time; time.sleep(600)")
    monkeypatch.setattr(rewards, "WORKER_SLACK_S", 1.0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trl_forking.rewards"):
        scores = rewards._score_in_subprocess(["\\boxed{1}", "\\boxed{2}"], ["1", "2"], timeout=0)
    assert scores == [False, False]  # budget = 1 s slack + 2 x 0 s
    assert time.monotonic() - start < 10
    assert "exceeded" in caplog.text


def test_numeric_closeness_gives_partial_credit_by_distance():
    completions = ["\\boxed{7}", "so 3 then 5", "Answer: 9", "no numbers", "\\boxed{7}"]
    # 1/(1+0); last number 5 is 2 away; 9 is 2 away; nothing to grade; gold not a number -> excluded
    assert numeric_closeness_reward(completions, ["7", "7", "7", "7", "x+1"]) == [1.0, 1 / 3, 1 / 3, 0.0, None]


def test_get_reward_funcs_appends_trl_soft_overlong_punishment():
    funcs = get_reward_funcs(["dapo_accuracy"], max_completion_length=20, overlong_buffer=4)
    assert funcs[0] is dapo_accuracy_reward
    # DAPO Eq. 13: free up to 20 - 4 = 16 tokens, then linear down to -1 at 20.
    assert funcs[1](completion_ids=[[0] * 16, [0] * 18, [0] * 20]) == [0.0, -0.5, -1.0]
    assert len(get_reward_funcs(["math_accuracy", "numeric_closeness"], max_completion_length=20)) == 2


def test_get_reward_funcs_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"reward_funcs: unknown reward \['acuracy'\]; allowed: \['dapo_accuracy'"):
        get_reward_funcs(["acuracy"], max_completion_length=20)
    with pytest.raises(ValueError, match=r"overlong_buffer: 30 must be in \[0, max_completion_length=20\]"):
        get_reward_funcs(["dapo_accuracy"], max_completion_length=20, overlong_buffer=30)


class _RewardInWorker(torch.utils.data.Dataset):
    """Scores one (completion, gold) pair per item, inside a DataLoader worker process."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        completion, gold = self.pairs[index]
        return math_accuracy_reward([completion], [gold])[0]


def test_rewards_and_their_timeouts_work_in_dataloader_workers(monkeypatch):
    monkeypatch.setattr(rewards, "TIMEOUT_S", 1)  # forked workers inherit the patched module
    pairs = [("\\boxed{42}", "42"), ("Answer: 41", "42"), ("\\boxed{9^{9^{9^{9}}}}", "5")]
    loader = torch.utils.data.DataLoader(_RewardInWorker(pairs), batch_size=None, num_workers=1, timeout=60)
    start = time.monotonic()
    assert list(loader) == [1.0, 0.0, 0.0]
    assert time.monotonic() - start < 30


def test_a_crashing_scoring_subprocess_raises_with_its_error(monkeypatch):
    monkeypatch.setattr(rewards, "_RUN_AS_SCRIPT", "raise SystemExit('math_verify is not installed')")
    with pytest.raises(RuntimeError, match="math-verify scoring subprocess failed:\nmath_verify is not installed"):
        rewards._score_in_subprocess(["\\boxed{1}"], ["1"], timeout=1)
