"""The bundled task: a deterministic generator, disjoint splits, and answers that verify against their solutions."""

import json
import re

import pytest

from trl_forking.rewards import math_accuracy_reward
from trl_forking.tasks.arithmetic_chains import task

LINE = re.compile(r"^(\d\d) ([+-]) (\d\d) = (\d\d)$")


def test_the_generator_is_deterministic_in_its_seed():
    assert task.generate_problems(50, seed=3) == task.generate_problems(50, seed=3)
    assert task.generate_problems(50, seed=3) != task.generate_problems(50, seed=4)
    assert task.make_splits(seed=1, sizes={"train": 30, "test": 10}) == task.make_splits(
        seed=1, sizes={"train": 30, "test": 10}
    )


def test_the_bundled_files_are_the_generator_output():
    generated = task.make_splits()
    for split in task.SPLITS:
        assert task.read_split(split) == generated[split], split
        assert len(generated[split]) == task.SPLIT_SIZES[split]


def test_no_problem_is_in_two_splits():
    expressions = {split: [row["problem"] for row in task.read_split(split)] for split in task.SPLITS}
    for split, rows in expressions.items():
        assert len(set(rows)) == len(rows), f"{split} repeats a problem"
    assert not set(expressions["train"]) & set(expressions["test"])
    assert not set(expressions["train"]) & set(expressions["validation"])
    assert not set(expressions["validation"]) & set(expressions["test"])


def test_a_larger_train_split_keeps_the_test_split():
    small = task.make_splits(sizes={"train": 10, "validation": 5, "test": 20})
    large = task.make_splits(sizes={"train": 100, "validation": 5, "test": 20})
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


@pytest.mark.parametrize("split", task.SPLITS)
def test_every_bundled_answer_verifies_against_its_own_worked_solution(split):
    rows = task.read_split(split)
    # The reward grades the worked solution's last line "Answer: N" against the gold answer with math-verify.
    assert math_accuracy_reward([row["completion"] for row in rows], [row["solution"] for row in rows]) == [1.0] * len(
        rows
    )


@pytest.mark.parametrize("split", task.SPLITS)
def test_every_worked_solution_is_right_step_by_step_and_in_range(split):
    for row in task.read_split(split):
        *lines, answer_line = row["completion"].split("\n")
        numbers = row["problem"].split(" ")
        assert len(lines) == task.NUM_OPERATIONS and len(numbers) == 2 * task.NUM_OPERATIONS + 1
        total = int(numbers[0])
        for step, line in enumerate(lines):
            a, op, b, c = LINE.match(line).groups()
            # Each line starts from the previous result and applies the prompt's next operation.
            assert (int(a), op, b) == (total, numbers[2 * step + 1], numbers[2 * step + 2])
            total = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert int(c) == total and 10 <= total <= 99
            # No carry or borrow: each result digit is the sum or difference of the digits above it.
            digit_op = (lambda x, y: x + y) if op == "+" else (lambda x, y: x - y)
            assert c == f"{digit_op(int(a[0]), int(b[0]))}{digit_op(int(a[1]), int(b[1]))}"
        assert answer_line == f"Answer: {total}" and row["solution"] == str(total)
        assert row["prompt"] == [{"role": "user", "content": f"Compute {row['problem']} step by step."}]


def test_load_task_has_the_trainer_columns():
    test = task.load_task("test")
    assert test.column_names == ["id", "problem", "prompt", "completion", "solution"]
    assert test[0]["prompt"] == task.format_prompt(test[0]["problem"])
    assert json.loads(json.dumps(test[0])) == task.read_split("test")[0]


def test_bad_arguments_name_the_field_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"split: 'dev' is not allowed; use one of \['train', 'validation', 'test'\]"):
        task.load_task("dev")
    with pytest.raises(ValueError, match=r"sizes: unknown split \['dev'\]; allowed: \['train', 'validation', 'test'\]"):
        task.make_splits(sizes={"dev": 3})
    with pytest.raises(ValueError, match=r"num_problems: -1 is not allowed; use an integer >= 0"):
        task.generate_problems(-1)
    with pytest.raises(ValueError, match=r"operator '\*' is not allowed; use '\+' or '-'"):
        task.worked_solution(10, [("*", 2)])
