"""token_entropies: equal to the entropy of softmax(logits / T) computed naively, and never changes the model given."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer, token_entropies


def naive_entropies(model, input_ids, attention_mask, temperature):
    """H_t = -sum_j p_tj log p_tj with p_t = softmax(z_{t-1} / T): the distribution that predicts token t."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature  # (B, L, V)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, L): entry t predicts token t + 1
    out = torch.zeros(input_ids.shape)
    out[:, 1:] = entropy[:, :-1]
    return out * attention_mask


@pytest.mark.parametrize(("rows", "length", "batch_size"), [(1, 5, 8), (3, 11, 2), (4, 7, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropies_match_a_naive_softmax(tiny_model_dir, rows, length, batch_size, temperature):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(rows * 100 + length)
    input_ids = torch.randint(5, 400, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[-1, length - 2 :] = 0  # right padding on the last row (odd sizes, a ragged batch)
    got = token_entropies(model, input_ids, attention_mask, temperature=temperature, batch_size=batch_size)
    expected = naive_entropies(model, input_ids, attention_mask, temperature)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got[:, 0].abs().max() == 0 and got[-1, length - 2 :].abs().max() == 0


def test_token_entropies_leave_a_trainers_model_as_it_was(tiny_model_dir, prompt_dataset, tmp_path):
    # The trainer patched its model's LM head at its sampling temperature (0.5). Scoring entropies at 1.0 on that
    # same model must not change the log-probs the trainer trains on.
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, temperature=0.5,
        report_to="none", use_cpu=True,
    )  # fmt: skip
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
        train_dataset=prompt_dataset,
    )  # fmt: skip
    model = trainer.model
    input_ids = torch.randint(5, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)

    def training_logps():
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, 4)
        return logps

    forward_before, logps_before = model.__dict__.get("forward"), training_logps()
    token_entropies(model, input_ids, attention_mask, temperature=1.0)
    assert model.__dict__.get("forward") is forward_before
    torch.testing.assert_close(training_logps(), logps_before, rtol=0, atol=0)
    # ... while the entropies themselves were computed at T = 1.0, not the trainer's 0.5.
    expected = naive_entropies(model, input_ids, attention_mask, 1.0)
    torch.testing.assert_close(token_entropies(model, input_ids, attention_mask), expected, rtol=1e-4, atol=1e-5)


def masked_vocabulary_model(tiny_model_dir):
    """The tiny GPT-2 with an LM-head bias of -inf on the upper half of its vocabulary (a masked vocabulary)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bias = torch.zeros(model.config.vocab_size)
    bias[model.config.vocab_size // 2 :] = float("-inf")
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropies_are_finite_and_right_when_part_of_the_vocabulary_is_masked(tiny_model_dir, temperature):
    # huggingface/trl#7221: TRL's fused head evaluates 0 * log 0 as NaN next to -inf logits. The distribution is
    # well defined; torch's Categorical, which takes the term as 0, is the reference.
    from trl.trainer.utils import add_fused_lm_head

    model = masked_vocabulary_model(tiny_model_dir)
    input_ids = torch.randint(5, 200, (3, 8), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    got = token_entropies(model, input_ids, attention_mask, temperature=temperature, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
    expected = torch.zeros(input_ids.shape)
    expected[:, 1:] = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(got, expected * attention_mask, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got).all()
    # The test is not vacuous: TRL's fused head alone returns NaN here (drop this line once TRL is fixed).
    fused = copy.copy(model)
    add_fused_lm_head(fused, temperature=temperature, outputs=("log_probs", "entropy"))
    assert torch.isnan(fused(input_ids=input_ids, labels=input_ids, fused_lm_head=True).entropy).any()


def test_nan_logits_stay_nan(tiny_model_dir):
    # NaN logits are no distribution: the fallback must not invent an entropy for them.
    from trl_forking.entropy import fill_nonfinite_entropies

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bias = torch.zeros(model.config.vocab_size)
    bias[7] = float("nan")
    model.lm_head.bias = torch.nn.Parameter(bias)
    input_ids = torch.randint(5, 200, (1, 5), generator=torch.Generator().manual_seed(2))
    filled, count = fill_nonfinite_entropies(
        model, input_ids, torch.ones_like(input_ids), torch.full((1, 4), float("nan")), 0
    )
    assert count == 4 and torch.isnan(filled).all()
