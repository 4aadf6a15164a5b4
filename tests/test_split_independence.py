"""Scope "step" on the real trainer across ranks: the parameter update of an optimizer step does not depend on how the
step is split into ranks and accumulation micro-batches (tests/split_update.py runs the training; SGD, so the update is
-lr times the gradient).

One loss type per kind of denominator (the step's selected tokens, per-sequence counts, TRL's micro-batch mean, none);
test_loss_reference.py checks every loss type and normalization against 1 vs 4 accumulation steps in one process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [
    {"loss_type": "dapo", "forking_loss_normalization": "selected"},
    {"loss_type": "dapo", "forking_loss_normalization": "all"},
    {"loss_type": "grpo", "forking_loss_normalization": "selected"},
    {"loss_type": "bnpo", "forking_loss_normalization": "selected"},  # equal-length completions (see split_update.py)
    {"loss_type": "dr_grpo", "forking_loss_normalization": "selected"},
]
TOLERANCE = 1e-5  # float32 forwards of different batch shapes differ by ~1e-7 relative


def train(model_dir, out, split, configs, ranks):
    command = [os.path.join(HERE, "split_update.py"), model_dir, str(out), json.dumps(split), json.dumps(configs)]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port"]
        command = [*launcher, str(29500 + os.getpid() % 1000), *command]
    else:
        command = [sys.executable, *command]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def assert_same_updates(a, b, names):
    for name in names:
        assert a[name]["steps"] == b[name]["steps"], f"{name}: the splits trained on different completions"
        update, reference = b[name]["update"], a[name]["update"]
        assert reference.norm() > 0
        difference = ((update - reference).norm() / reference.norm()).item()
        assert difference < TOLERANCE, f"{name}: relative difference {difference:.2e}"


@pytest.mark.slow
@pytest.mark.distributed
def test_update_is_the_same_on_one_rank_and_on_two_ranks_with_four_accumulation_steps(tiny_model_dir, tmp_path):
    single = dict(per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=1, max_steps=1)
    split = dict(per_device_train_batch_size=1, gradient_accumulation_steps=4, steps_per_generation=4, max_steps=1)
    one = train(tiny_model_dir, tmp_path / "one.pt", single, CONFIGS, ranks=1)
    two = train(tiny_model_dir, tmp_path / "two.pt", split, CONFIGS, ranks=2)
    assert_same_updates(one, two, [f"{c['loss_type']}/{c['forking_loss_normalization']}" for c in CONFIGS])


@pytest.mark.slow
@pytest.mark.distributed
def test_update_is_the_same_with_several_optimizer_steps_per_generation(tiny_model_dir, tmp_path):
    # The recipes' setting, steps_per_generation > gradient_accumulation_steps: one generation batch feeds two
    # optimizer steps, entropies come from TRL's old-log-prob pass, and each step gets its own threshold.
    configs = CONFIGS[:1] + CONFIGS[2:4]
    whole = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, steps_per_generation=2, max_steps=2)
    split = dict(per_device_train_batch_size=1, gradient_accumulation_steps=4, steps_per_generation=8, max_steps=2)
    a = train(tiny_model_dir, tmp_path / "a.pt", whole, configs, ranks=2)
    b = train(tiny_model_dir, tmp_path / "b.pt", split, configs, ranks=2)
    names = [f"{c['loss_type']}/{c['forking_loss_normalization']}" for c in configs]
    assert all(len(a[name]["steps"]) == 2 for name in names)
    assert_same_updates(a, b, names)
