"""Shared fixtures: a tiny GPT-2 built locally (never downloaded) and a small prompt dataset."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny random GPT-2 with a locally trained BPE tokenizer (Hub layout)."""
    from trl_forking import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def prompt_dataset():
    """A 16-prompt standard (non-conversational) dataset, enough for a few GRPO steps."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"What is {a} + {a + 3}? Answer:" for a in range(16)]})
