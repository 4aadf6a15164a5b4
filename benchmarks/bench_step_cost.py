"""Benchmark e: what a ForkingGRPOTrainer step costs against GRPOTrainer(top_entropy_quantile=0.2), same model, data
and seed, once it trains only what the update uses (the compact LM head and trimmed micro-batches).

Model: a random Qwen3 body (hidden 128, 2 layers, 4 heads) with Qwen3's vocabulary, 151,936, so that the LM head
weighs as in real runs (more: see ``flops``). Generation is scripted: both trainers train on the same completions,
whose lengths are set by design, each ending with EOS, so the shapes do not depend on what a random model samples.
Both compute old log-probs (``steps_per_generation = 2 * gradient_accumulation_steps``): two optimizer steps per
rollout, the setting of every recipe (TRL's old-log-prob pass then also gives scope "step" its entropies).

Shapes:
- ``vocabulary``: 8 completions of 64 tokens per optimizer step, one micro-batch: the LM head dominates;
- ``varied``: 8 completions per optimizer step in 4 micro-batches of 2, lengths from a long-tailed distribution
  (``_lengths``: mean about a quarter of the 256-token maximum): TRL pads every micro-batch to the rollout's longest.

Time: CPU seconds per optimizer step (one torch thread), the median over rollouts of their mean step, runs
interleaved in rounds (TRL, ours, TRL, ours, ...) so a slow spell of a shared machine hits both. Memory: the peak RSS
a training run adds over the trainer it starts from, in a process of its own per run (``common.peak_rss_delta``):
on CPU what a micro-step's activations, logits tiles and gradients take at most. ``flops``: the training step of
Qwen3-0.6B, 8B and 32B at the recipes' shapes, counted with TRL's ``compute_flops_per_token``, as TRL computes it
today and as this package does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["FULL", "QUICK", "QWEN3", "SHAPES", "flops", "run"]

VOCAB_SIZE = 151_936
# Per shape: completions per micro-batch, accumulation steps, maximum completion length, and the lengths' mean
# share of the maximum (1.0: every completion at the maximum).
SHAPES = {
    "vocabulary": {"batch": 8, "accumulation": 1, "max_tokens": 64, "mean_share": 1.0},
    "varied": {"batch": 2, "accumulation": 4, "max_tokens": 256, "mean_share": 0.25},
}
RUNS = ("trl_q0.2", "forking")
FULL = {"shapes": list(SHAPES), "warmup_steps": 2, "steps": 4, "rounds": 2, "memory": True}  # steps: 2 rollouts
QUICK = {"shapes": ["varied"], "warmup_steps": 0, "steps": 2, "rounds": 1, "memory": False, "scale": 8}
# Qwen3 dense models (their Hub config.json): hidden, layers, heads, KV heads, head dim, MLP, vocabulary.
QWEN3 = {
    "Qwen3-0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072),
    "Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288),
    "Qwen3-32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                      head_dim=128, intermediate_size=25600),
}  # fmt: skip
# The recipes' shapes (recipes/qwen3-*/forking_dapo.yaml): prompt and completion maximum, completions per rollout
# (16 optimizer steps of 512), one per micro-batch, and each rank's share of a rollout on 16 nodes x 8 GPUs.
RECIPE = {"prompt": 2048, "max_completion": 20480, "per_rollout": 8192, "steps_per_rollout": 16, "per_rank": 64}
RHO = 0.2


def _lengths(count: int, max_tokens: int, mean_share: float, seed: int) -> list[int]:
    """Returns ``count`` completion lengths in [4, max_tokens]: all ``max_tokens`` for a mean share of 1, else from a
    geometric (long-tailed) distribution of mean ``mean_share * max_tokens``, cut at the maximum."""
    if mean_share >= 1.0:
        return [max_tokens] * count
    generator = torch.Generator().manual_seed(seed)
    mean = mean_share * max_tokens
    draws = torch.empty(count).exponential_(1.0 / mean, generator=generator)
    return [int(min(max_tokens, max(4, round(float(x))))) for x in draws]


def build_model_dir(path: str) -> str:
    """Returns ``path`` after saving a random Qwen3 (hidden 128, 2 layers) with vocabulary 151,936 there, with the
    package's tiny tokenizer (its EOS ends the scripted completions)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from trl_forking.testing import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model())
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _scripted_generation(shape: dict, eos: int):
    """Returns a stand-in for ``GRPOTrainer._generate_single_turn``: completion k of a call has the k-th designed
    length of that call (the same for every trainer), random ids, and ends with EOS."""
    calls = {"count": 0}

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls["count"] += 1
        lengths = _lengths(len(prompt_ids), shape["max_tokens"], shape["mean_share"], seed=calls["count"])
        generator = torch.Generator().manual_seed(1000 + calls["count"])
        completions = []
        for length in lengths:
            ids = torch.randint(10, 400, (length,), generator=generator).tolist()
            ids[-1] = eos
            completions.append(ids)
        return completions, None

    return generate


def ids_reward(completions, completion_ids=None, **kwargs):
    """Returns a reward that varies within a group: the sum of the completion's ids modulo 7."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def _trainer(model_dir: str, shape: dict, name: str, steps: int, out_dir: str):
    """Returns ``(trainer, seconds)``: a trainer of ``name`` on ``shape`` ready to train, and the list its callback
    fills with the CPU seconds of every optimizer step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    GRPOTrainer._generate_single_turn = _scripted_generation(shape, eos)
    ours = name != "trl_q0.2"
    config_class, trainer_class = (ForkingGRPOConfig, ForkingGRPOTrainer) if ours else (GRPOConfig, GRPOTrainer)
    accumulation = shape["accumulation"]
    args = config_class(
        output_dir=out_dir, per_device_train_batch_size=shape["batch"], gradient_accumulation_steps=accumulation,
        steps_per_generation=2 * accumulation, num_generations=4, max_completion_length=shape["max_tokens"],
        max_steps=steps, learning_rate=1e-6, top_entropy_quantile=0.2, logging_steps=1, report_to="none",
        disable_tqdm=True, save_strategy="no", use_cpu=True, bf16=False, seed=0, data_seed=0,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [f"What is {a} + {a + 3}? Answer:" for a in range(256)]})
    seconds: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.process_time() - self.start)

    trainer = trainer_class(model=model_dir, reward_funcs=ids_reward, args=args, train_dataset=dataset)
    trainer.add_callback(StepClock())
    trainer.remove_callback(PrinterCallback)
    return trainer, seconds


def _train(model_dir: str, shape: dict, name: str, steps: int, out_dir: str) -> list[float]:
    """Returns the CPU seconds of every optimizer step of one training run of ``name`` on ``shape``."""
    trainer, seconds = _trainer(model_dir, shape, name, steps, out_dir)
    trainer.train()
    return seconds


def _per_rollout(seconds: list[float]) -> list[float]:
    """Returns the mean seconds per optimizer step of each rollout (2 steps: one with generation and the old-log-prob
    pass, one without), so that a median does not pick heavy or light steps alone."""
    return [statistics.fmean(seconds[i : i + 2]) for i in range(0, len(seconds) - 1, 2)]


def _peak_memory(model_dir: str, shape_name: str, name: str, steps: int) -> int:
    """Returns the peak RSS in bytes that training ``name`` on ``shape_name`` adds above the memory resident with the
    trainer built (``common.peak_rss_delta``), in a process of its own whose freed buffers go back to the kernel."""
    code = (
        "import json, sys, tempfile; sys.path.insert(0, sys.argv[1]); import bench_step_cost as b; "
        "from common import peak_rss_delta; b.quiet(); "
        "trainer, _ = b._trainer(sys.argv[2], b.SHAPES[sys.argv[3]], sys.argv[4], int(sys.argv[5]), "
        "tempfile.mkdtemp()); "
        "print(json.dumps(peak_rss_delta(trainer.train)[0]))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", code, here, model_dir, shape_name, name, str(steps)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def quiet() -> None:
    for logger in ("transformers", "trl", "trl_forking"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "disabled")


def flops(model: str, lengths: list[int] | None = None) -> dict:
    """Returns the training FLOPs of one optimizer step of ``model`` (a ``QWEN3`` name) at the recipes' shapes.

    One rollout of 8,192 completions of ``lengths`` (default: draws of ``_lengths`` with mean a quarter of the 20,480
    maximum, an assumption), prompts at the 2,048 maximum, one completion per micro-batch, 64 per rank, 16 optimizer
    steps; the figures are per optimizer step (the rollout's sixteenth):

    - ``today``: TRL 1.16 on a GPU. A rank pads its 64 completions to the longest of them, so each micro-batch's body
      runs forward and backward over ``P + W`` positions; the fused head projects only the positions with a label,
      the valid completion tokens ``n_i``.
    - ``ours``: each micro-batch trimmed to its own completion (``P + n_i`` positions for the body) and the head
      projected at the selected tokens only, ``ceil(0.2 * n_i)``.

    Training FLOPs per position are ``3 * forward`` (TRL's ``compute_flops_per_token``, which counts the body and a
    ``2 * V * h`` head); the head's ``6 * V * h`` is split out. The no-grad old-log-prob pass over the rollout (the
    same for both) is not counted.
    """
    from transformers import Qwen3Config
    from trl.trainer.utils import compute_flops_per_token

    config = Qwen3Config(vocab_size=VOCAB_SIZE, **QWEN3[model])
    prompt, rank = RECIPE["prompt"], RECIPE["per_rank"]
    lengths = lengths or _lengths(RECIPE["per_rollout"], RECIPE["max_completion"], 0.25, seed=0)
    head = 6 * VOCAB_SIZE * config.hidden_size  # forward 2 V h, backward 4 V h, per projected position

    def body(positions: int) -> float:
        return (compute_flops_per_token(config, positions) - head) * positions

    widths = [max(lengths[i : i + rank]) for i in range(0, len(lengths), rank) for _ in range(rank)][: len(lengths)]
    steps = RECIPE["steps_per_rollout"]
    today_body = sum(body(prompt + w) for w in widths) / steps
    today_head = head * sum(lengths) / steps
    ours_body = sum(body(prompt + n) for n in lengths) / steps
    ours_head = head * sum(math.ceil(RHO * n) for n in lengths) / steps
    return {
        "today": {"body": today_body, "head": today_head, "total": today_body + today_head},
        "ours": {"body": ours_body, "head": ours_head, "total": ours_body + ours_head},
        "ratio": (ours_body + ours_head) / (today_body + today_head),
        "head_share_today": today_head / (today_body + today_head),
        "mean_completion": statistics.fmean(lengths),
        "mean_width_today": statistics.fmean(widths),
    }


def run(plan=FULL, log=print) -> dict:
    """Returns {shape: {run: median CPU seconds per optimizer step}}, the ratios to TRL, peak memory and FLOPs."""
    quiet()
    scale = plan.get("scale", 1)  # quick mode: shorter completions, same code path
    shapes = {name: dict(SHAPES[name]) for name in plan["shapes"]}
    for shape in shapes.values():
        shape["max_tokens"] //= scale
    steps = plan["warmup_steps"] + plan["steps"]
    seconds = {name: {run_name: [] for run_name in RUNS} for name in shapes}
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "model"))
        for round_index in range(plan["rounds"]):
            for shape_name, shape in shapes.items():
                for run_name in RUNS:
                    measured = _train(model_dir, shape, run_name, steps, os.path.join(tmp, f"{shape_name}-{run_name}"))
                    cycles = _per_rollout(measured[plan["warmup_steps"] :])
                    seconds[shape_name][run_name] += cycles
                    median = statistics.median(cycles)
                    log(f"  e. round {round_index} {shape_name:10s} {run_name:9s} {median:.3f} s/step CPU")
        if plan["memory"]:
            for shape_name in shapes:
                memory[shape_name] = {run_name: _peak_memory(model_dir, shape_name, run_name, 2) for run_name in RUNS}
    medians = {
        shape: {name: statistics.median(times) for name, times in runs.items()} for shape, runs in seconds.items()
    }
    return {
        "seconds_per_step": medians,
        "spread": {shape: {name: (min(t), max(t)) for name, t in runs.items()} for shape, runs in seconds.items()},
        "ratio": {shape: runs["forking"] / runs["trl_q0.2"] for shape, runs in medians.items()},
        "peak_rss_bytes": memory,
        "flops": {model: flops(model) for model in QWEN3},
        "plan": {**plan, "shapes": shapes, "threads": torch.get_num_threads()},
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
