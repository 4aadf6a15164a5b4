"""LoRA through TRL's ``peft_config``: the selection's entropies are the policy's (adapters on), never the
adapter-free reference's; the adapters train and the base weights stay, under every scope, with and without KL."""

import pytest
import torch
from fixed_batch import scripted_generate
from peft import LoraConfig
from trl import GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer


def reward(completions, **kwargs):
    return [float(len(set(c))) + 0.01 * len(c) for c in completions]


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("scope", ["step", "micro_batch", "local", "sequence"])
def test_lora_selects_on_the_adapted_policy_and_trains_only_the_adapters(
    tiny_model_dir, prompt_dataset, tmp_path, monkeypatch, scope, beta
):
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted_generate)
    args = ForkingGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=10,
        max_steps=2, learning_rate=5e-2, beta=beta, forking_scope=scope, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip
    # Random adapters (not the usual B = 0): the adapted policy differs from the base model from the first step, so
    # entropies taken with the adapters off would show.
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=prompt_dataset, peft_config=lora
    )
    model = trainer.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    checked = []
    original = trainer._policy_gradient_weights

    def check(entropies, mask, inputs):
        weights = original(entropies, mask, inputs)
        if not checked:  # the first micro-batch, still on the initial weights
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            width = inputs["completion_ids"].size(1)
            with torch.no_grad():
                _, policy, _ = trainer._get_per_token_logps_and_entropies(
                    model, ids, attention, width, compute_entropy=True
                )
                with model.disable_adapter():
                    _, reference, _ = trainer._get_per_token_logps_and_entropies(
                        model, ids, attention, width, compute_entropy=True
                    )
            used, valid = trainer.forking_last_batch["entropies"], mask.bool()
            checked.append(((used - policy)[valid].abs().max().item(), (used - reference)[valid].abs().max().item()))
        return weights

    trainer._policy_gradient_weights = check
    trainer.train()
    (to_policy, to_reference), *_ = checked
    # The adapted policy's entropies (up to float noise between batch shapes), not the reference's.
    assert to_policy < 1e-5 and to_reference > 1e-3, checked
    for name, before in adapters.items():
        assert not torch.equal(before, dict(model.named_parameters())[name]), f"{name} did not train"
    for name, before in base.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), f"{name} changed"
