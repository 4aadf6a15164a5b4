"""trl_forking.evaluation: pass@k against a naive reference, and evaluate() on a model whose answers we script."""

import itertools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from trl_forking.evaluation import (
    evaluate,
    format_evaluation,
    generate_completions,
    pass_at_k,
    score_problem,
    summarize,
)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(4, 1, 2), (10, 3, 1), (5, 0, 3), (5, 3, 3), (6, 2, 3), (7, 7, 4), (8, 1, 8), (5, 0, 5), (6, 6, 6), (9, 4, 9)],
)
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    # Naive reference: enumerate every k-subset of n samples of which the first c are correct.
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_by_hand():
    assert pass_at_k(8, 0, 8) == 0.0  # no correct sample: no k-subset has one
    assert pass_at_k(8, 8, 1) == 1.0  # every sample correct
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: the subset is all samples, which include the correct one
    assert pass_at_k(4, 2, 1) == 0.5  # k = 1 is the share of correct samples
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match=r"c: 5 correct of n=4 samples is not allowed; use 0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match=r"k: 5 is not allowed; use 1 <= k <= n=4"):
        pass_at_k(4, 1, 5)


def test_score_problem_and_summary_by_hand():
    completions = ["\\boxed{204}", "so...\nAnswer: 204", "\\boxed{1}", ""]
    row = score_problem(completions, "204", [1, 2, 4])
    assert row["correct"] == [True, True, False, False] and row["accuracy"] == 0.5
    # pass@2 = 1 - C(2, 2) / C(4, 2) = 1 - 1/6
    assert row["pass@k"] == {"1": 0.5, "2": pytest.approx(5 / 6), "4": 1.0}
    unscored = score_problem(["\\boxed{1}"] * 4, "}{}{}{", [1])  # gold math-verify cannot parse
    assert unscored["accuracy"] is None
    summary = summarize(
        [row, {**row, "accuracy": 1.0, "pass@k": {"1": 1.0, "2": 1.0, "4": 1.0}}, unscored], [1, 2, 4], 4
    )
    # Accuracies 0.5 and 1.0: sample sd = sqrt(0.125), standard error = sd / sqrt(2) = 0.25.
    assert summary == {
        "num_problems": 3,
        "num_unscored": 1,
        "avg@4": 0.75,
        "stderr": pytest.approx(0.25),
        "pass@k": {"1": 0.75, "2": pytest.approx((5 / 6 + 1) / 2), "4": 1.0},
    }


class ScriptedModel(torch.nn.Module):
    """A causal-LM stand-in whose answer to ``Compute <expression>`` is right with a probability set per expression.

    ``generate`` draws one ``torch.rand`` per row, in row order, and writes ``Answer: <gold>`` (or ``<gold + 1>``), the
    EOS, then junk that a correct implementation must cut; it records the prompt ids it was given.
    """

    def __init__(self, tokenizer, gold: dict[str, int], p_correct: dict[str, float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.gold, self.p_correct = tokenizer, gold, p_correct
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.seen_prompts, self.eval_calls = [], 0

    def eval(self):
        self.eval_calls += 1
        return super().eval()

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = [i for i, m in zip(ids, mask, strict=True) if m]
            assert all(m == 0 for m in mask[: len(ids) - len(prompt)])  # left padding
            self.seen_prompts.append(prompt)
            expression = re.search(r"Compute (.+?) step", self.tokenizer.decode(prompt)).group(1)
            right = torch.rand(()) < self.p_correct[expression]
            answer = self.gold[expression] + (0 if right else 1)
            completion = self.tokenizer(f"Answer: {answer}")["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(ids + completion + self.tokenizer("Answer: 1")["input_ids"])  # junk after the EOS
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


@pytest.fixture
def scripted(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expressions = ["1 + 2", "30 - 4", "5 + 60", "7 + 8", "90 - 9"]
    problems = [
        {"prompt": [{"role": "user", "content": f"Compute {e} step by step."}], "solution": str(eval(e))}
        for e in expressions
    ]
    p_correct = dict(zip(expressions, [1.0, 0.0, 1.0, 0.5, 0.0], strict=True))
    model = ScriptedModel(tokenizer, {e: eval(e) for e in expressions}, p_correct)
    return model, tokenizer, problems


def test_evaluate_grades_a_scripted_models_answers(scripted):
    model, tokenizer, problems = scripted
    result = evaluate(model, tokenizer, problems, num_samples=4, ks=[1, 2, 4], batch_size=3, seed=0)
    counts = [p["num_correct"] for p in result["problems"]]
    assert counts[:3] == [4, 0, 4] and counts[4] == 0 and 0 <= counts[3] <= 4
    assert result["problems"][0]["completions"] == ["Answer: 3"] * 4  # cut at the EOS: the junk after it is dropped
    accuracies = [c / 4 for c in counts]
    mean = sum(accuracies) / 5
    assert result["avg@4"] == pytest.approx(mean)
    assert result["stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 4 / 5))
    assert result["pass@k"]["4"] == pytest.approx(sum(c > 0 for c in counts) / 5)
    assert result["pass@k"]["1"] == pytest.approx(mean)
    assert result["num_samples"] == 4 and result["num_problems"] == 5 and result["num_unscored"] == 0
    assert format_evaluation(result).startswith(f"avg@4 = {100 * mean:.1f}% +/- ")


def test_evaluate_is_deterministic_in_its_seed_and_leaves_the_callers_rng_alone(scripted):
    model, tokenizer, problems = scripted
    problems = problems * 8  # 8 copies of the coin-flip problem: some seed must differ
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate(model, tokenizer, problems, num_samples=4, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues as if nothing had been drawn
    assert evaluate(model, tokenizer, problems, num_samples=4, seed=7) == first
    # One torch.rand per row in row order: the batch size does not change what is sampled.
    assert evaluate(model, tokenizer, problems, num_samples=4, seed=7, batch_size=5) == first
    others = [evaluate(model, tokenizer, problems, num_samples=4, seed=s)["problems"] for s in range(3)]
    assert any(o != first["problems"] for o in others)


def test_prompts_are_tokenized_as_grpo_trainer_does_and_training_mode_is_restored(scripted):
    model, tokenizer, problems = scripted
    prompts = [p["prompt"] for p in problems]
    model.train()
    generate_completions(model, tokenizer, prompts, num_samples=2, batch_size=4)
    assert model.training and model.eval_calls == 1
    # TRL's own tokenization of conversational prompts (GRPOTrainer._tokenize_prompts), called on a bare namespace.
    grpo = SimpleNamespace(
        processing_class=tokenizer,
        chat_template=None,
        tools=None,
        chat_template_kwargs={},
        environment_factories=None,
        _is_vlm=False,
    )
    trl_ids, _, _ = GRPOTrainer._tokenize_prompts(grpo, prompts)
    assert model.seen_prompts == [list(ids) for ids in trl_ids for _ in range(2)]
    # Standard (string) prompts are tokenized as they are, without the chat template, as GRPOTrainer does.
    texts = [p[0]["content"] for p in prompts]
    model.seen_prompts.clear()
    generate_completions(model, tokenizer, texts, num_samples=1)
    trl_ids, _, _ = GRPOTrainer._tokenize_prompts(grpo, texts)
    assert model.seen_prompts == [list(ids) for ids in trl_ids]


def test_evaluate_runs_a_real_model_and_bad_arguments_name_the_field(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    problems = [
        {"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "solution": str(a + 1)} for a in range(3)
    ]
    result = evaluate(model, tokenizer, problems, num_samples=2, max_new_tokens=4, batch_size=4, seed=1)
    assert [len(p["completions"]) for p in result["problems"]] == [2, 2, 2]
    assert result == evaluate(model, tokenizer, problems, num_samples=2, max_new_tokens=4, batch_size=4, seed=1)
    with pytest.raises(ValueError, match=r"ks: \[3\] not allowed; each k must be in \[1, num_samples=2\]"):
        evaluate(model, tokenizer, problems, num_samples=2, ks=[3])
    with pytest.raises(ValueError, match=r"temperature: 0 is not allowed; use a value > 0"):
        generate_completions(model, tokenizer, [problems[0]["prompt"]], temperature=0)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['solution'\]"):
        evaluate(model, tokenizer, [{"prompt": problems[0]["prompt"]}])


# --- HeldOutEvaluationCallback: the evaluation a study records during training -----------------------------------


def _callback_run(callback, model, tokenizer, tmp_path, steps, process_index=0):
    """Drives ``callback`` through ``steps`` optimizer steps as the Trainer does; returns the records it wrote."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trl_forking.analysis.study import EVAL_FILE

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=process_index == 0)
    control = TrainerControl()
    kwargs = {"model": model, "processing_class": tokenizer}
    callback.on_train_begin(args, state, control, **kwargs)
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_step_end(args, state, control, **kwargs)
    callback.on_train_end(args, state, control, **kwargs)
    path = tmp_path / EVAL_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_held_out_evaluation_records_the_start_every_nth_step_and_the_end(scripted, tmp_path):
    from trl_forking.evaluation.callback import HeldOutEvaluationCallback

    model, tokenizer, problems = scripted
    problems = problems * 4  # the coin-flip problem four times: the records then depend on the random stream
    seen = []
    callback = HeldOutEvaluationCallback(problems, every_n_steps=2, num_samples=4, seed=7, on_result=seen.append)
    records = _callback_run(callback, model, tokenizer, tmp_path, steps=5)
    assert [r["step"] for r in records] == [0, 2, 4, 5] and seen == records  # the end (5) once, step 4 not twice
    expected = evaluate(model, tokenizer, problems, num_samples=4, seed=7)
    for record in records:  # a fixed seed: every evaluation draws the same samples of the (unchanged) model
        assert record["accuracy"] == pytest.approx(expected["avg@4"])
        assert record["stderr"] == pytest.approx(expected["stderr"])
        assert record["pass@k"] == pytest.approx(expected["pass@k"])
        assert (record["num_problems"], record["num_samples"]) == (20, 4)
    assert model.training  # put back in training mode after each evaluation


def test_held_out_evaluation_takes_a_given_start_and_only_the_main_process_writes(scripted, tmp_path):
    from trl_forking.evaluation.callback import HeldOutEvaluationCallback

    model, tokenizer, problems = scripted
    initial = {"accuracy": 0.123, "stderr": 0.01, "pass@k": {"1": 0.123}, "num_problems": 5, "num_samples": 4}
    callback = HeldOutEvaluationCallback(problems, every_n_steps=0, initial=initial)
    calls = model.eval_calls
    first, last = _callback_run(callback, model, tokenizer, tmp_path / "main", steps=3)
    assert first == {"step": 0, **initial} and last["step"] == 3
    assert model.eval_calls == calls + 1  # the given start was not evaluated again, the end was
    other = HeldOutEvaluationCallback(problems, every_n_steps=1)
    assert _callback_run(other, model, tokenizer, tmp_path / "rank1", steps=2, process_index=1) == []
    with pytest.raises(ValueError, match="every_n_steps must be >= 0, got -1"):
        HeldOutEvaluationCallback(problems, every_n_steps=-1)


# Five problems the scripted model always gets right (p = 1) or wrong (p = 0): the verdicts then do not depend on
# which rank draws which random numbers, and a gathered result must equal the single-process one exactly.
SURE = {"1 + 2": 1.0, "30 - 4": 0.0, "5 + 60": 1.0, "90 - 9": 0.0, "2 + 2": 1.0}


def _sure_problems_and_model(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = [
        {"prompt": [{"role": "user", "content": f"Compute {e} step by step."}], "solution": str(eval(e))} for e in SURE
    ]
    return ScriptedModel(tokenizer, {e: eval(e) for e in SURE}, SURE), tokenizer, problems


def _held_out_on_a_rank(rank, world, tiny_model_dir, output_dir):
    """One rank of a training run with HeldOutEvaluationCallback; returns how many rows this rank generated."""
    from pathlib import Path

    from trl_forking.evaluation.callback import HeldOutEvaluationCallback

    model, tokenizer, problems = _sure_problems_and_model(tiny_model_dir)
    callback = HeldOutEvaluationCallback(problems, every_n_steps=2, num_samples=3, seed=5)
    _callback_run(callback, model, tokenizer, Path(output_dir), steps=3, process_index=rank)
    return len(model.seen_prompts)


@pytest.mark.distributed
def test_held_out_evaluation_on_two_ranks_samples_a_share_on_each_and_records_what_one_process_does(
    tiny_model_dir, tmp_path
):
    from gloo import run_on_ranks

    from trl_forking.evaluation.callback import HeldOutEvaluationCallback

    model, tokenizer, problems = _sure_problems_and_model(tiny_model_dir)
    alone = _callback_run(
        HeldOutEvaluationCallback(problems, every_n_steps=2, num_samples=3, seed=5), model, tokenizer,
        tmp_path / "one", steps=3,
    )  # fmt: skip
    assert [r["step"] for r in alone] == [0, 2, 3] and alone[0]["accuracy"] == pytest.approx(3 / 5)
    rows = run_on_ranks(_held_out_on_a_rank, 2, tiny_model_dir, str(tmp_path / "two"))
    # Rank 0 sampled problems 0, 2, 4 and rank 1 problems 1, 3, each 3 times at each of the 3 evaluations: neither
    # waited in a collective while the other generated everything.
    assert rows == [3 * 3 * 3, 2 * 3 * 3]
    together = [json.loads(line) for line in (tmp_path / "two" / "forking_eval.jsonl").read_text().splitlines()]
    assert together == alone  # written once (by rank 0), and the same record as one process


def test_left_pad_right_aligns_rows_of_odd_lengths_and_masks_the_padding():
    from trl_forking.evaluation import left_pad

    input_ids, attention_mask = left_pad([[5, 6, 7], [8], [], [9, 10]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0], [0, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 1]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
