"""Worker for test_split_independence.py: train ForkingGRPOTrainer for real and save each run's parameter update.

    python tests/split_update.py MODEL_DIR OUT.pt SPLIT_JSON CONFIGS_JSON            (one process)
    torchrun --nproc_per_node 2 tests/split_update.py MODEL_DIR OUT.pt ...           (two gloo ranks)

SPLIT_JSON sets ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``steps_per_generation`` and
``max_steps``; CONFIGS_JSON is a list of ``{"loss_type", "forking_loss_normalization"}``. Generation is scripted
(fixed_batch.scripted_generate), so every split trains on the same completions; the optimizer is plain SGD, so the
update is ``-lr * gradient``. Rank 0 saves ``{name: {"update": flat float64 tensor, "steps": [...]}}``, where "steps"
lists, per optimizer step, the sorted completions it trained on (all ranks).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from fixed_batch import scripted_generate
from transformers import AutoTokenizer
from trl import GRPOTrainer

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer


def length_reward(completions, **kwargs):
    return [float(len(set(c))) + 0.01 * len(c) for c in completions]


def equal_length_prompts(model_dir: str, count: int = 8) -> Dataset:
    """Returns ``count`` prompts of one token length: left padding would otherwise shift GPT-2's positions."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10)]
    length = len(tokenizer(prompts[0])["input_ids"])
    same = [p for p in prompts if len(tokenizer(p)["input_ids"]) == length][:count]
    assert len(same) == count, "not enough prompts of one token length"
    return Dataset.from_dict({"prompt": same})


def run(model_dir: str, split: dict, config: dict, output_dir: str) -> tuple[torch.Tensor, list]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = ForkingGRPOConfig(
        output_dir=output_dir,
        num_generations=4,
        max_completion_length=10,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        ddp_backend="gloo" if world > 1 else None,
        seed=0,
        **split,
        **config,
    )
    trainer = ForkingGRPOTrainer(
        model=model_dir, reward_funcs=length_reward, args=args, train_dataset=equal_length_prompts(model_dir)
    )
    # bnpo is split-independent only when the micro-batches hold equal token counts (TRL's own bnpo too).
    trainer.scripted_equal_lengths = config["loss_type"] == "bnpo"
    steps: dict[int, list] = {}
    original = trainer.get_high_entropy_mask

    def record(entropies, mask, threshold):
        weights = original(entropies, mask, threshold)
        batch = trainer.forking_last_batch
        rows = [tuple(ids[m].tolist()) for ids, m in zip(batch["completion_ids"], batch["mask"], strict=True)]
        steps.setdefault(trainer.state.global_step, []).extend(rows)
        return weights

    trainer.get_high_entropy_mask = record
    before = torch.cat([p.detach().double().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().double().flatten() for p in trainer.model.parameters()])
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, steps)
    else:
        gathered = [steps]
    merged = [sorted(row for part in gathered for row in part.get(step, [])) for step in sorted(steps)]
    return after - before, merged


def main(argv: list[str]) -> None:
    model_dir, out, split, configs = argv[0], argv[1], json.loads(argv[2]), json.loads(argv[3])
    GRPOTrainer._generate_single_turn = scripted_generate
    results = {}
    for config in configs:
        name = f"{config['loss_type']}/{config['forking_loss_normalization']}"
        update, steps = run(model_dir, split, config, os.path.join(os.path.dirname(out), name.replace("/", "-")))
        results[name] = {"update": update, "steps": steps}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)
    if dist.is_initialized():
        # Free the gloo group, joining its threads, while the interpreter is whole: a group left alive into
        # interpreter shutdown aborts a rank now and then (exit -6; benchmarks/bench_distributed.py explains).
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
