"""The gradient of ForkingGRPOTrainer.compute_loss against the paper's loss written out by hand, for every loss type,
both normalizations and the entropy bonus on and off; and its independence of how a step is split into micro-batches.

The trainer runs for real (TRL's ``_prepare_inputs``, TRL's loss, our hook); only generation and the model forward are
fixed tensors (tests/fixed_batch.py), so the gradient with respect to the per-token log-probs and entropies is exact.
"""

import math

import pytest
import torch
from fixed_batch import make_batch, run_step, run_steps, selected_rows

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer, num_selected

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
RHO = 0.3
EPSILON, EPSILON_HIGH, CISPO_MAX = 0.2, 0.28, 1.28
SAPO_TAU = (1.0, 1.05)  # TRL's defaults for positive / negative advantages
VESPO = {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}  # TRL's defaults
MAX_COMPLETION_LENGTH = 9  # dr_grpo divides by B * this, not by the batch's width


def reward(completions, **kwargs):
    return [0.0] * len(completions)


def make_trainer(tiny_model_dir, prompt_dataset, tmp_path, rows, accumulation=1, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=rows // accumulation,
        gradient_accumulation_steps=accumulation,
        num_generations=2,
        max_completion_length=MAX_COMPLETION_LENGTH,
        top_entropy_quantile=RHO,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    settings.update(overrides)
    if settings.get("loss_type") == "cispo":
        settings["epsilon_high"] = CISPO_MAX
    if settings.get("loss_type") == "luspo":
        settings["importance_sampling_level"] = "sequence"  # LUSPO's setting (TRL warns otherwise)
    args = ForkingGRPOConfig(**settings)
    return ForkingGRPOTrainer(model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=prompt_dataset)


def naive_top(entropies, mask, rho):
    """The paper's selection by sorting: the ceil(rho * N) highest entropies of the N valid tokens (no ties here)."""
    values = sorted(entropies[mask.bool()].tolist(), reverse=True)
    k = math.ceil(round(rho * len(values), 9))
    return mask.bool() & (entropies >= values[k - 1])


def informative(batch):
    """The selection population by default: the valid tokens of the completions whose advantage is not 0."""
    return batch.mask.bool() & (batch.advantages != 0).unsqueeze(1)


def policy_term(loss_type, logps, batch):
    """Returns the per-token policy-gradient loss l_t (B, T), or (B, 1) for luspo's sequence-level ratio."""
    mask = batch.mask.float()
    advantages = batch.advantages.unsqueeze(1)
    log_ratio = logps - batch.old_logps
    if loss_type == "luspo":  # GSPO-style sequence ratio: exp of the mean token log-ratio
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):  # PPO clip, clip-higher
        return -torch.min(ratio * advantages, ratio.clamp(1 - EPSILON, 1 + EPSILON_HIGH) * advantages)
    if loss_type == "cispo":  # -sg(min(r, eps_max)) A log pi
        return -ratio.clamp(max=CISPO_MAX).detach() * advantages * logps
    if loss_type == "sapo":  # soft gate sigmoid(tau (r - 1)) * 4 / tau
        tau = torch.where(advantages > 0, SAPO_TAU[0], SAPO_TAU[1])
        return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    if loss_type == "vespo":  # phi(w) = e^lambda w^k e^(-lambda w), w the sequence ratio, a constant weight
        w = torch.exp(((logps - batch.old_logps) * mask).sum(-1, keepdim=True)).detach()
        positive = advantages >= 0
        k = torch.where(positive, VESPO["k_pos"], VESPO["k_neg"])
        lam = torch.where(positive, VESPO["lambda_pos"], VESPO["lambda_neg"])
        phi = torch.exp(lam) * w**k * torch.exp(-lam * w)
        return -phi * advantages * logps
    raise AssertionError(loss_type)


def aggregate(loss_type, per_token, weights, mask):
    """Returns the loss type's aggregate of ``per_token * weights`` with denominator counts from ``mask``."""
    rows = mask.size(0)
    total = (per_token * weights).expand_as(mask).float() if per_token.dim() else per_token
    if loss_type in ("dapo", "cispo", "vespo", "bnpo"):  # one token-mean over the step
        return total.sum() / mask.sum()
    if loss_type in ("grpo", "sapo"):  # mean over sequences of each sequence's token-mean
        counts = mask.sum(-1)
        return torch.where(counts > 0, total.sum(-1) / counts.clamp(min=1), 0.0).mean()
    if loss_type == "dr_grpo":
        return total.sum() / (rows * MAX_COMPLETION_LENGTH)
    if loss_type == "luspo":
        return total.sum(-1).mean()
    raise AssertionError(loss_type)


def reference_loss(loss_type, normalization, coef, beta, logps, entropies, batch, selected):
    """The paper's loss on the selected tokens: policy gradient on ``selected`` with its denominator counting the
    selected tokens ("selected") or all tokens ("all"), the KL term on every token with TRL's denominator, minus
    ``coef`` times the mean entropy of the selected tokens."""
    mask = batch.mask.float()
    chosen = selected.float()
    denominator = chosen if normalization == "selected" else mask
    loss = aggregate(loss_type, policy_term(loss_type, logps, batch), chosen, denominator)
    if beta:
        gap = batch.ref_logps - logps
        ratio = torch.exp(logps - batch.old_logps)
        kl = (torch.exp(gap) - gap - 1) * ratio  # k3 estimator, importance-weighted (TRL's use_bias_correction_kl)
        loss = loss + beta * aggregate(loss_type, kl, mask, mask)
    if coef:
        loss = loss - coef * (entropies * chosen).sum() / chosen.sum()
    return loss


@pytest.mark.parametrize("coef", [0.0, 0.1])
@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_equals_the_hand_written_loss(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization, coef
):
    batch = make_batch(rows=6, cols=5, seed=3)
    trainer = make_trainer(
        tiny_model_dir,
        prompt_dataset,
        tmp_path,
        rows=6,
        loss_type=loss_type,
        forking_loss_normalization=normalization,
        entropy_coef=coef,
    )
    logps, entropies, losses, micro_batches = run_step(trainer, batch, monkeypatch)

    selected = selected_rows(micro_batches, batch.shape)
    # The last completion has advantage 0 (make_batch): it is left out of the population the top-rho is taken from.
    assert batch.advantages[-1] == 0 and informative(batch)[-1].sum() == 0 < batch.mask[-1].sum()
    assert torch.equal(selected, naive_top(batch.entropies, informative(batch), RHO))
    ref_logps = batch.logps.clone().requires_grad_(True)
    ref_entropies = batch.entropies.clone().requires_grad_(True)
    expected = reference_loss(loss_type, normalization, coef, 0.0, ref_logps, ref_entropies, batch, selected)
    expected.backward()
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(logps.grad, ref_logps.grad, rtol=1e-5, atol=1e-7)
    if coef:
        torch.testing.assert_close(entropies.grad, ref_entropies.grad, rtol=1e-5, atol=1e-7)
        assert entropies.grad[~selected].abs().max() == 0  # the bonus acts on the selected tokens only
    else:
        assert entropies.grad is None or entropies.grad.abs().max() == 0
    # Unselected tokens get no policy gradient (the comparison above is not vacuous: selected ones do). luspo's
    # sequence-level ratio exp(mean_t log r_t) is built from every token of the sequence, so there (as in the
    # reference) the unselected tokens of a sequence with selected ones get a gradient through it.
    if loss_type != "luspo":
        assert logps.grad[~selected].abs().max() == 0
    assert (logps.grad[selected] != 0).sum() >= selected.sum() // 2


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_kl_term_keeps_every_token_with_trls_denominator(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization
):
    batch = make_batch(rows=6, cols=5, seed=4)
    trainer = make_trainer(
        tiny_model_dir,
        prompt_dataset,
        tmp_path,
        rows=6,
        loss_type=loss_type,
        forking_loss_normalization=normalization,
        beta=0.1,
    )
    logps, _, losses, micro_batches = run_step(trainer, batch, monkeypatch)
    selected = selected_rows(micro_batches, batch.shape)
    ref_logps = batch.logps.clone().requires_grad_(True)
    expected = reference_loss(loss_type, normalization, 0.0, 0.1, ref_logps, batch.entropies, batch, selected)
    expected.backward()
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logps.grad, ref_logps.grad, rtol=1e-5, atol=1e-7)
    assert (logps.grad[batch.mask.bool() & ~selected] != 0).all()  # KL reaches the unselected tokens


def test_entropy_bonus_is_the_mean_over_selected_tokens_for_per_sequence_losses(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # Row 0 has n = 4 valid tokens, row 1 has n = 2; rho = 1/3 of N = 6 selects k = 2: H = 3.0 (row 0) and 0.3
    # (row 1), one per row. grpo under "selected" weights row i by n_i / s_i = 4 and 2, so TRL's bonus alone would be
    # (4 * 3.0 + 2 * 0.3) / 6 = 2.1; the mean entropy of the selected tokens is (3.0 + 0.3) / 2 = 1.65.
    batch = make_batch(rows=2, cols=4, seed=0)
    batch.mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch.entropies = torch.tensor([[3.0, 0.25, 0.1, 0.05], [0.3, 0.02, 9.0, 9.0]])  # 9.0: padding, never selected
    batch.advantages = torch.zeros(2)  # no policy gradient: the loss is the bonus alone
    losses = {}
    for coef in (0.0, 1.0):
        trainer = make_trainer(
            tiny_model_dir, prompt_dataset, tmp_path / str(coef), rows=2, loss_type="grpo", entropy_coef=coef,
            top_entropy_quantile=1 / 3, forking_ignore_zero_advantage=False,
        )  # fmt: skip
        _, _, step_losses, micro_batches = run_step(trainer, batch, monkeypatch)
        losses[coef] = step_losses[0].item()
        assert selected_rows(micro_batches, batch.shape).nonzero().tolist() == [[0, 0], [1, 0]]
    assert losses[0.0] == 0.0
    assert losses[1.0] == pytest.approx(-1.65, rel=1e-6)


def split_gradients(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, accumulation, **overrides):
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path / f"ga{accumulation}", rows=batch.shape[0],
        accumulation=accumulation, **overrides,
    )  # fmt: skip
    logps, _, _, micro_batches = run_step(trainer, batch, monkeypatch, accumulation)
    return logps.grad.clone(), selected_rows(micro_batches, batch.shape)


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
def test_step_gradient_does_not_depend_on_gradient_accumulation(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization
):
    batch = make_batch(rows=8, cols=6, seed=5)  # ragged: the micro-batches hold different token counts
    options = dict(loss_type=loss_type, forking_loss_normalization=normalization)
    one, selected_one = split_gradients(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, 1, **options)
    four, selected_four = split_gradients(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, 4, **options)
    assert torch.equal(selected_one, selected_four)
    assert selected_one.sum() == num_selected(int(informative(batch).sum()), RHO)
    assert relative_difference(four, one) < 1e-6


@pytest.mark.parametrize("ragged", [False, True])
def test_bnpo_depends_on_the_split_exactly_as_much_as_trls_bnpo(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, ragged
):
    # TRL's bnpo averages each micro-batch over its own tokens: split-independent only when the micro-batches hold
    # equal token counts. Under "selected" the trainer rescales it by the step's N / S, one constant per step, so its
    # split dependence is TRL's, never more (dividing by each micro-batch's own selected count was 16% off).
    batch = make_batch(rows=8, cols=6, seed=6, ragged=ragged)
    difference = {}
    for normalization in ("selected", "all"):
        options = dict(loss_type="bnpo", forking_loss_normalization=normalization)
        one, _ = split_gradients(
            tiny_model_dir, prompt_dataset, tmp_path / normalization, monkeypatch, batch, 1, **options
        )
        four, _ = split_gradients(
            tiny_model_dir, prompt_dataset, tmp_path / normalization, monkeypatch, batch, 4, **options
        )
        difference[normalization] = relative_difference(four, one)
    if ragged:
        assert difference["all"] > 1e-3  # TRL's own bnpo does depend on the split here
        assert difference["selected"] == pytest.approx(difference["all"], rel=1e-4)
    else:
        assert difference["selected"] < 1e-6 and difference["all"] < 1e-6


def test_a_micro_batch_that_skipped_prepare_inputs_is_selected_on_its_own(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # compute_loss on a generation output straight from TRL (no forking keys): no KeyError; the documented fallback
    # selects over the micro-batch (as scope "micro_batch") with the micro-batch's own counts as denominators.
    from fixed_batch import generation_output, row_order

    batch = make_batch(rows=6, cols=5, seed=7)
    trainer = make_trainer(tiny_model_dir, prompt_dataset, tmp_path, rows=6, loss_type="dapo")
    logps = batch.logps.clone().requires_grad_(True)
    monkeypatch.setattr(
        trainer,
        "_get_per_token_logps_and_entropies",
        lambda model, input_ids, *a, **k: (logps[row_order(input_ids)], batch.entropies[row_order(input_ids)], None),
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, generation_output(batch))
    loss.backward()
    selected = naive_top(batch.entropies, informative(batch), RHO)
    ref_logps = batch.logps.clone().requires_grad_(True)
    reference_loss("dapo", "selected", 0.0, 0.0, ref_logps, batch.entropies, batch, selected).backward()
    torch.testing.assert_close(logps.grad, ref_logps.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_zero_advantage_completions_compete_for_the_top_rho_as_in_trl_when_asked(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization
):
    # forking_ignore_zero_advantage=False: TRL's population, every valid token, the zero-advantage ones included.
    batch = make_batch(rows=6, cols=5, seed=3)
    batch.entropies[-1] = batch.entropies.max() + 1.0  # the zero-advantage completion holds the highest entropies
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path, rows=6, loss_type=loss_type,
        forking_loss_normalization=normalization, forking_ignore_zero_advantage=False,
    )  # fmt: skip
    logps, _, losses, micro_batches = run_step(trainer, batch, monkeypatch)
    selected = selected_rows(micro_batches, batch.shape)
    assert torch.equal(selected, naive_top(batch.entropies, batch.mask, RHO))
    assert selected[-1].sum() == batch.mask[-1].sum()  # it took its slots, for nothing
    ref_logps = batch.logps.clone().requires_grad_(True)
    expected = reference_loss(loss_type, normalization, 0.0, 0.0, ref_logps, batch.entropies, batch, selected)
    expected.backward()
    torch.testing.assert_close(logps.grad, ref_logps.grad, rtol=1e-5, atol=1e-7)
    # By default the same batch trains the top rho of the informative tokens instead, and divides by their count.
    default = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path / "default", rows=6, loss_type=loss_type,
        forking_loss_normalization=normalization,
    )  # fmt: skip
    _, _, _, micro_batches = run_step(default, batch, monkeypatch)
    assert torch.equal(selected_rows(micro_batches, batch.shape), naive_top(batch.entropies, informative(batch), RHO))
    logged = default._metrics["train"]["forking/excluded_fraction"]
    assert logged == [pytest.approx(float(batch.mask[-1].sum() / batch.mask.sum()))]


# --- optimizer steps that span generation batches ---------------------------------------------------------------------

# (steps_per_generation, gradient_accumulation_steps): TRL accepts spg below GA (a smaller generation batch to fit
# rollout memory) and spg not a multiple of GA; the optimizer step then spans generation batches.
SPLITS = [(spg, ga) for spg in (1, 2, 3) for ga in (2, 4)]
ROWS_PER_MICRO_BATCH, SPLIT_ROWS = 2, 24  # 24 rows: whole generation batches and whole steps for every split


def summed_gradient(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, spg, ga, **options):
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path / f"spg{spg}-ga{ga}", rows=ROWS_PER_MICRO_BATCH * ga,
        accumulation=ga, steps_per_generation=spg, **options,
    )  # fmt: skip
    logps, _, losses, micro_batches = run_steps(trainer, batch, monkeypatch, SPLIT_ROWS // (ROWS_PER_MICRO_BATCH * ga))
    return logps.grad.clone(), losses, micro_batches


@pytest.mark.parametrize("normalization", ["selected", "all"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
@pytest.mark.parametrize(("spg", "ga"), [split for split in SPLITS if split[0] != split[1]])
def test_the_update_of_steps_spanning_generation_batches_is_that_of_whole_generation_batches(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type, normalization, spg, ga
):
    # The same 24 completions, trained as generation batches of spg micro-batches and as generation batches of one
    # optimizer step each (spg = GA). Per-sequence selection and equal lengths make the masks and every part's count
    # independent of the split, so TRL's own extrapolation (num_items * GA / spg) and ours are exact: the summed
    # update must agree. Before the fix, spg = 1 and GA = 4 gave 4 times the update under "selected".
    batch = make_batch(rows=SPLIT_ROWS, cols=5, seed=8, ragged=False)
    batch.advantages[-1] = 0.5  # no zero-advantage completion: it would leave its part with fewer selected tokens
    options = dict(loss_type=loss_type, forking_loss_normalization=normalization, forking_scope="sequence")
    split, _, _ = summed_gradient(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, spg, ga, **options)
    whole, _, _ = summed_gradient(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, ga, ga, **options)
    assert whole.norm() > 0
    assert relative_difference(split, whole) < 1e-6


@pytest.mark.parametrize("loss_type", ["dr_grpo", "cispo", "sapo", "vespo", "luspo"])
def test_every_other_loss_type_is_split_independent_across_generation_batches(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, loss_type
):
    batch = make_batch(rows=SPLIT_ROWS, cols=5, seed=9, ragged=False)
    batch.advantages[-1] = 0.5
    options = dict(loss_type=loss_type, forking_scope="sequence")
    split, _, _ = summed_gradient(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, 1, 4, **options)
    whole, _, _ = summed_gradient(tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, 4, 4, **options)
    assert whole.norm() > 0
    assert relative_difference(split, whole) < 1e-6


@pytest.mark.parametrize(("spg", "ga"), SPLITS)
def test_with_a_loss_of_one_per_token_every_optimizer_step_weighs_one(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, spg, ga
):
    # The check, on ragged completions and the default scope "step": ratio 1 and advantage -1 make DAPO's
    # per-token loss exactly 1, so a step's loss is the sum of its weights over its denominator. It must be 1 for
    # every step, whether the step lies inside one generation batch or spans two (it was 4.0 at spg = 1, GA = 4;
    # 1, 2, 1 at spg = 3, GA = 2).
    batch = make_batch(rows=SPLIT_ROWS, cols=6, seed=10)
    batch.old_logps = batch.logps.clone()
    batch.advantages = -torch.ones(SPLIT_ROWS)
    _, losses, micro_batches = summed_gradient(
        tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, batch, spg, ga, loss_type="dapo"
    )
    per_step = torch.stack(losses).view(-1, ga).sum(-1)
    torch.testing.assert_close(per_step, torch.ones_like(per_step), rtol=1e-6, atol=1e-6)
    selected = sum(int(inputs["forking_mask"].sum()) for inputs in micro_batches)
    assert selected >= num_selected(int(batch.mask.sum()), RHO)  # every part took its top rho (no empty part)


def test_the_parts_of_a_step_spanning_generation_batches_draw_distinct_random_streams(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch
):
    # spg = 1, GA = 2: each optimizer step is two generation batches of one micro-batch. Equal lengths make both parts
    # draw over the same layout, so one stream shared by the two parts would select the same positions in both.
    batch = make_batch(rows=16, cols=5, seed=11, ragged=False)
    batch.advantages = torch.ones(16)
    trainer = make_trainer(
        tiny_model_dir, prompt_dataset, tmp_path, rows=8, accumulation=2, steps_per_generation=1,
        forking_selection="random", seed=3,
    )  # fmt: skip
    _, _, _, micro_batches = run_steps(trainer, batch, monkeypatch, steps=2)
    masks = [inputs["forking_mask"] for inputs in micro_batches]
    assert all(int(m.sum()) == num_selected(m.numel(), RHO) for m in masks)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])
    assert not torch.equal(masks[0], masks[2])  # and the next step draws another stream again
