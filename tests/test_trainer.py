"""ForkingGRPOTrainer: config validation, the loss against hand computations, scope invariance, random-stream resume.

The gradient of every loss type against a hand-written reference is in test_loss_reference.py.
"""

import logging
import math

import pytest
import torch
from fixed_batch import scripted_generate
from trl import GRPOConfig, GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer, num_selected

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]


def length_reward(completions, **kwargs):
    """Varies within every group, so advantages are non-zero."""
    return [float(len(set(c))) + 0.01 * len(c) for c in completions]


def make_args(tmp_path, config_class=ForkingGRPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return config_class(**settings)


def make_trainer(tiny_model_dir, prompt_dataset, args, trainer_class=ForkingGRPOTrainer):
    return trainer_class(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=prompt_dataset)


# --- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("forking_scope", "global", r"\['step', 'micro_batch', 'local', 'sequence'\]"),
        ("forking_selection", "middle", r"\['top', 'bottom', 'random', 'all'\]"),
        ("forking_loss_normalization", "tokens", r"\['selected', 'all'\]"),
        ("top_entropy_quantile", 0.0, r"in \(0, 1\]"),
        ("top_entropy_quantile", 1.2, r"in \(0, 1\]"),
    ],
)
def test_config_error_names_field_value_and_allowed_values(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field} must .*{allowed}.*{value!r}|{field} must .*{allowed}"):
        make_args(tmp_path, **{field: value})


def test_bottom_selection_with_rho_one_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="forking_selection='bottom'"):
        make_args(tmp_path, forking_selection="bottom", top_entropy_quantile=1.0)


def test_config_defaults_are_the_papers(tmp_path):
    args = make_args(tmp_path)
    assert (args.top_entropy_quantile, args.forking_selection, args.forking_scope) == (0.2, "top", "step")
    assert args.forking_loss_normalization == "selected"


def test_plain_grpo_config_reads_rho_uses_defaults_and_says_so(tiny_model_dir, prompt_dataset, tmp_path, caplog):
    args = make_args(tmp_path, config_class=GRPOConfig, top_entropy_quantile=0.3)
    with caplog.at_level(logging.WARNING, logger="trl_forking"):
        trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
    assert trainer.forking.top_entropy_quantile == 0.3
    assert (trainer.forking.forking_scope, trainer.forking.forking_selection) == ("step", "top")
    assert "plain GRPOConfig" in caplog.text and "top_entropy_quantile=0.3" in caplog.text


# --- the loss on a hand-made batch ----------------------------------------------------------------------------------

# Two completions of 4 tokens; the last token of the first is padding. N = 7 valid tokens, rho = 0.3:
# k = ceil(2.1) = 3 -> the entropies 2.0, 1.5 and 1.0 (the padded 9.0 must not count).
ENTROPIES = [[0.1, 2.0, 0.3, 9.0], [1.5, 0.2, 1.0, 0.05]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]
TOP = [[0, 1, 0, 0], [1, 0, 1, 0]]
LOG_RATIO = [[0.0, 0.1, -0.3, 0.0], [0.5, 0.0, -0.1, 0.2]]  # log pi_theta - log pi_old
ADVANTAGES = [1.0, -2.0]
REF_GAP = [[0.2, -0.1, 0.3, 0.0], [0.0, 0.4, -0.2, 0.1]]  # log pi_ref - log pi_theta


def clipped_token_loss(log_ratio, advantage, low=0.2, high=0.28):
    ratio = math.exp(log_ratio)
    return -min(ratio * advantage, min(max(ratio, 1 - low), 1 + high) * advantage)


def kl(gap, log_ratio):
    """k3 estimator of KL(pi_theta || pi_ref), times the importance ratio (TRL's use_bias_correction_kl)."""
    return (math.exp(gap) - gap - 1) * math.exp(log_ratio)


def expected_loss(loss_type, normalization, beta):
    """The loss written out by hand from the DAPO / GRPO definitions (clip 0.2 / 0.28)."""
    pg = [[clipped_token_loss(LOG_RATIO[i][t], ADVANTAGES[i]) for t in range(4)] for i in range(2)]
    k = [[kl(REF_GAP[i][t], LOG_RATIO[i][t]) for t in range(4)] for i in range(2)]
    use = TOP if normalization == "selected" else MASK
    if loss_type == "dapo":  # one token-mean over the batch
        pg_term = sum(pg[i][t] * TOP[i][t] for i in range(2) for t in range(4)) / sum(map(sum, use))
        kl_term = sum(k[i][t] * MASK[i][t] for i in range(2) for t in range(4)) / sum(map(sum, MASK))
        return pg_term + beta * kl_term
    # grpo: mean over sequences of each sequence's token-mean
    per_sequence = []
    for i in range(2):
        pg_i = sum(pg[i][t] * TOP[i][t] for t in range(4)) / sum(use[i])
        kl_i = sum(k[i][t] * MASK[i][t] for t in range(4)) / sum(MASK[i])
        per_sequence.append(pg_i + beta * kl_i)
    return sum(per_sequence) / 2


def hand_batch():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, -2.2, -0.9]])
    return {
        "prompt_ids": torch.tensor([[5, 6], [7, 8]]),
        "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.tensor([[10, 11, 12, 0], [13, 14, 15, 16]]),
        "completion_mask": torch.tensor(MASK),
        "advantages": torch.tensor(ADVANTAGES),
        "num_items_in_batch": torch.tensor(7),
        "old_per_token_logps": logps - torch.tensor(LOG_RATIO),
        "ref_per_token_logps": logps + torch.tensor(REF_GAP),
    }, logps


def loss_on_hand_batch(trainer, monkeypatch, logps):
    """Runs the trainer's real _prepare_inputs + compute_loss with generation and the model forward stubbed out."""
    batch, _ = hand_batch()
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", lambda self, inputs: dict(batch))
    monkeypatch.setattr(trainer, "_entropy_forward", lambda b: torch.tensor(ENTROPIES))
    leaf = logps.clone().requires_grad_(True)

    def forward(model, input_ids, *args, **kwargs):
        order = [0 if row[-4:].tolist() == [10, 11, 12, 0] else 1 for row in input_ids]
        return leaf[order], torch.tensor(ENTROPIES)[order], None

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", forward)
    trainer._buffered_inputs = None
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    trainer.model.train()
    inputs = trainer._prepare_inputs([{}])
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss, leaf, inputs


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_loss_equals_hand_computed_reference(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization, beta
):
    args = make_args(
        tmp_path,
        per_device_train_batch_size=2,
        num_generations=2,
        loss_type=loss_type,
        top_entropy_quantile=0.3,
        forking_loss_normalization=normalization,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
    )
    trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
    _, logps = hand_batch()
    loss, _, inputs = loss_on_hand_batch(trainer, monkeypatch, logps)
    assert loss.item() == pytest.approx(expected_loss(loss_type, normalization, beta), rel=1e-5)
    rows = {
        tuple(r.tolist()): m.int().tolist()
        for r, m in zip(inputs["completion_ids"], inputs["forking_mask"], strict=True)
    }
    assert rows[(10, 11, 12, 0)] == TOP[0] and rows[(13, 14, 15, 16)] == TOP[1]


@pytest.mark.parametrize("selection", ["top", "bottom", "random"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_unselected_tokens_get_exactly_zero_policy_gradient(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, selection
):
    args = make_args(
        tmp_path,
        per_device_train_batch_size=2,
        num_generations=2,
        loss_type=loss_type,
        top_entropy_quantile=0.3,
        forking_selection=selection,
    )
    trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
    _, logps = hand_batch()
    loss, leaf, inputs = loss_on_hand_batch(trainer, monkeypatch, logps)
    loss.backward()
    order = [0 if row[-4:].tolist() == [10, 11, 12, 0] else 1 for row in inputs["completion_ids"]]
    selected = torch.zeros(2, 4, dtype=torch.bool)
    selected[order] = inputs["forking_mask"]
    assert selected.sum() == (3 if selection != "bottom" else 4)
    assert torch.all(leaf.grad[~selected] == 0)
    assert torch.all(leaf.grad[selected] != 0)


# --- training runs --------------------------------------------------------------------------------------------------


def record_first_generation_masks(trainer):
    """Keeps the first generation batch's (mask, entropies, valid) rows, keyed by (prompt ids, completion ids)."""
    recorded = {}
    original = trainer._select_generation_batch

    def wrapper(slices):
        original(slices)
        if recorded:
            return
        for part in slices:
            for i in range(part["completion_ids"].size(0)):
                key = (tuple(part["prompt_ids"][i].tolist()), tuple(part["completion_ids"][i].tolist()))
                mask = part["forking_mask"][i] if "forking_mask" in part else None
                entropies = part["forking_entropies"][i] if "forking_entropies" in part else None
                recorded[key] = (mask, entropies, part["completion_mask"][i].bool())

    trainer._select_generation_batch = wrapper
    return recorded


def test_step_scope_mask_is_independent_of_gradient_accumulation(tiny_model_dir, prompt_dataset, tmp_path):
    runs = {}
    for batch_size, accumulation in [(8, 1), (2, 4)]:
        args = make_args(
            tmp_path / f"{batch_size}x{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
        runs[accumulation] = record_first_generation_masks(trainer)
        trainer.train()
    one, four = runs[1], runs[4]
    assert one.keys() == four.keys() and len(one) == 8  # the same completions were generated
    for key in one:
        assert torch.allclose(one[key][1], four[key][1], atol=1e-5)
        assert torch.equal(one[key][0], four[key][0])
    selected = sum(int(mask.sum()) for mask, _, _ in one.values())
    valid = sum(int(valid.sum()) for _, _, valid in one.values())
    assert selected == math.ceil(0.2 * valid - 1e-9)  # one threshold over the whole step


def test_micro_batch_scope_depends_on_gradient_accumulation_unlike_step(tiny_model_dir, prompt_dataset, tmp_path):
    selected = {}
    for batch_size, accumulation in [(8, 1), (2, 4)]:
        args = make_args(
            tmp_path / f"mb{accumulation}",
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            forking_scope="micro_batch",
        )
        trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
        seen = {}
        original = trainer.get_high_entropy_mask

        def hook(entropies, mask, threshold, original=original, seen=seen, trainer=trainer):
            weights = original(entropies, mask, threshold)
            batch = trainer.forking_last_batch
            for ids, row in zip(batch["completion_ids"], batch["selected"], strict=True):
                seen.setdefault(tuple(ids.tolist()), row.clone())
            return weights

        trainer.get_high_entropy_mask = hook
        trainer.train()
        selected[accumulation] = seen
    assert selected[1].keys() == selected[4].keys()
    assert any(not torch.equal(selected[1][k], selected[4][k]) for k in selected[1])


def test_drop_in_plain_grpo_script_trains_and_changes_every_parameter(tiny_model_dir, prompt_dataset, tmp_path):
    # A TRL GRPO script with only the trainer class swapped; GRPOConfig comes from trl.
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        learning_rate=0.1,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        top_entropy_quantile=0.2,
    )
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=prompt_dataset
    )
    before = {name: param.clone() for name, param in trainer.model.named_parameters()}
    step_tokens = []
    original = trainer._select_step

    def record(slices, completion, population, members, scope, generator):
        step_tokens.append(int(sum(population[j].sum() for j in members)))
        original(slices, completion, population, members, scope, generator)

    trainer._select_step = record
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param), f"{name} did not change"
    logged = [entry for entry in trainer.state.log_history if "forking/threshold" in entry]
    # logging_steps=1: each entry is one step's exact share, ceil(0.2 * N) / N of that step's N tokens.
    assert [entry["forking/selected_fraction"] for entry in logged] == pytest.approx(
        [num_selected(n, 0.2) / n for n in step_tokens], rel=1e-6
    )
    metric_names = {
        "forking/threshold", "forking/selected_fraction", "forking/entropy_selected_mean",
        "forking/entropy_unselected_mean", "forking/entropy_p50", "forking/entropy_p80", "forking/entropy_p95",
        "forking/frac_entropy_below_0.01",
    }  # fmt: skip
    assert metric_names <= logged[0].keys()


def test_entropies_come_from_trls_old_logprob_pass_without_an_extra_forward(tiny_model_dir, prompt_dataset, tmp_path):
    calls = {}
    for iterations, logging_steps in ((1, 10), (2, 10), (2, 1)):
        args = make_args(
            tmp_path / f"{iterations}-{logging_steps}", num_iterations=iterations, max_steps=2,
            logging_steps=logging_steps,
        )  # fmt: skip
        trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
        count = {"extra": 0}
        original = trainer._entropy_forward

        def counting(batch, original=original, count=count):
            count["extra"] += 1
            return original(batch)

        trainer._entropy_forward = counting
        recorded = record_first_generation_masks(trainer)
        trainer.train()
        assert all(entropies is not None for _, entropies, _ in recorded.values())
        calls[iterations, logging_steps] = count["extra"]
    # num_iterations=1: TRL skips old log-probs, so one extra forward per generation batch (2 steps, 2 batches);
    # num_iterations=2: TRL computes them once per generation batch and we reuse that pass. Step 2 then trains on
    # step 1's mask; when it is logged, forking/mask_overlap_current costs one no-grad forward (the compact head
    # does not compute the current entropies of every token), and only then.
    assert calls == {(1, 10): 2, (2, 10): 0, (2, 1): 1}


def record_selections(trainer):
    """Returns the list that will hold (global step, completion ids, selected) of every training micro-batch."""
    seen = []
    original = trainer.get_high_entropy_mask

    def hook(entropies, mask, threshold):
        weights = original(entropies, mask, threshold)
        if trainer.model.training:
            batch = trainer.forking_last_batch
            seen.append((trainer.state.global_step, batch["completion_ids"].clone(), batch["selected"].clone()))
        return weights

    trainer.get_high_entropy_mask = hook
    return seen


@pytest.mark.parametrize("scope", ["step", "micro_batch"])
def test_resume_draws_the_same_random_tokens_as_an_uninterrupted_run(tiny_model_dir, prompt_dataset, tmp_path, scope):
    common = dict(forking_selection="random", forking_scope=scope, max_steps=3, save_strategy="steps", save_steps=1)
    full = make_trainer(tiny_model_dir, prompt_dataset, make_args(tmp_path / "full", **common))
    full_seen = record_selections(full)
    full.train()

    resumed = make_trainer(tiny_model_dir, prompt_dataset, make_args(tmp_path / "resumed", **common))
    resumed_seen = record_selections(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    # The resumed run trains steps 1 and 2; the random stream is derived from (seed, rank, step): no saved state.
    assert [s for s, _, _ in resumed_seen] == [1, 2]
    for (step, ids, selected), (step_full, ids_full, selected_full) in zip(resumed_seen, full_seen[1:], strict=True):
        assert step == step_full and torch.equal(ids, ids_full)
        assert torch.equal(selected, selected_full)
    assert not list((tmp_path / "full").glob("checkpoint-*/forking_state*"))


def test_evaluation_does_not_shift_the_random_selection_of_training(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # Sampling during evaluation advances torch's global RNG, which TRL's generation and its shuffle of the generation
    # batch read; both are fixed here, so the training micro-batches are the same with and without evaluation, and so
    # must be the randomly selected tokens (the old shared generator gave training what evaluation left of it).
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    monkeypatch.setattr("trl.trainer.grpo_trainer.shuffle_sequence_dict", lambda batch: batch)
    runs = {}
    for evaluating in (False, True):
        extra = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4) if evaluating else {}
        args = make_args(tmp_path / str(evaluating), forking_selection="random", max_steps=3, **extra)
        trainer = ForkingGRPOTrainer(
            model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=prompt_dataset,
            eval_dataset=prompt_dataset.select(range(4)) if evaluating else None,
        )  # fmt: skip
        runs[evaluating] = record_selections(trainer)
        trainer.train()
        if evaluating:
            assert any("eval_forking/selected_fraction" in entry for entry in trainer.state.log_history)
    assert len(runs[False]) == len(runs[True]) == 3
    for (_, ids, selected), (_, ids_eval, selected_eval) in zip(runs[False], runs[True], strict=True):
        assert torch.equal(ids, ids_eval) and torch.equal(selected, selected_eval)


@pytest.mark.parametrize(
    ("scope", "selection"),
    [("step", "bottom"), ("micro_batch", "random"), ("local", "top"), ("sequence", "top"), ("step", "all")],
)
def test_every_scope_and_selection_trains_the_expected_share_of_tokens(
    tiny_model_dir, prompt_dataset, tmp_path, scope, selection
):
    args = make_args(
        tmp_path,
        forking_scope=scope,
        forking_selection=selection,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    trainer = make_trainer(tiny_model_dir, prompt_dataset, args)
    shares = []
    original = trainer.get_high_entropy_mask

    def hook(entropies, mask, threshold):
        weights = original(entropies, mask, threshold)
        batch = trainer.forking_last_batch
        shares.append((batch["selected"].sum().item(), batch["mask"].sum(-1).tolist()))
        return weights

    trainer.get_high_entropy_mask = hook
    trainer.train()
    selected = sum(count for count, _ in shares)
    lengths = [n for _, rows in shares for n in rows]
    total = sum(lengths)
    expected = {
        "top": math.ceil(0.2 * total - 1e-9),
        "random": math.ceil(0.2 * total - 1e-9),
        "bottom": total - math.ceil(0.2 * total - 1e-9),
        "all": total,
    }[selection]
    if scope == "sequence":
        expected = sum(math.ceil(0.2 * n - 1e-9) for n in lengths)
    if scope in ("micro_batch", "local"):  # one threshold per micro-batch of 2 completions
        expected = sum(math.ceil(0.2 * sum(rows) - 1e-9) for _, rows in shares)
    assert selected == expected
    if scope in ("step", "sequence"):  # one metric entry per optimizer step: the logged share is exact
        logged = next(entry for entry in trainer.state.log_history if "forking/selected_fraction" in entry)
        assert logged["forking/selected_fraction"] == pytest.approx(expected / total, rel=1e-6)


def test_evaluation_selects_and_logs_forking_metrics(tiny_model_dir, prompt_dataset, tmp_path):
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=length_reward,
        args=args,
        train_dataset=prompt_dataset,
        eval_dataset=prompt_dataset.select(range(4)),
    )
    counts = []
    original = trainer.get_high_entropy_mask

    def hook(entropies, mask, threshold):
        counts.append(int(mask.sum()))
        return original(entropies, mask, threshold)

    trainer.get_high_entropy_mask = hook
    metrics = trainer.evaluate()
    # 4 prompts x 4 completions in micro-batches of 4, each selected on its own (as scope "micro_batch"); TRL
    # averages the per-batch metrics.
    assert len(counts) == 4
    expected = sum(num_selected(n, 0.2) / n for n in counts) / len(counts)
    assert metrics["eval_forking/selected_fraction"] == pytest.approx(expected, rel=1e-6)
    assert metrics["eval_forking/threshold"] >= metrics["eval_forking/entropy_p50"]
