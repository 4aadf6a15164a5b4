"""Shared fixtures: a tiny GPT-2 built locally (never downloaded), a small prompt dataset, and (slow tests only) the
demo's default base model, built once per session."""

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


@pytest.fixture(scope="session")
def default_base_cache(tmp_path_factory):
    """An ``XDG_CACHE_HOME`` whose ``trl-forking/`` holds the default base model, built once per session.

    The one fixture that builds the real recipe (about a minute on 2 cores, up to 3 on a busy machine): only tests
    marked ``slow`` may use it. A subprocess given this ``XDG_CACHE_HOME`` finds the model cached.
    """
    from trl_forking.base_model import build_base_model

    root = tmp_path_factory.mktemp("xdg-cache")
    build_base_model(cache_dir=os.path.join(str(root), "trl-forking"), progress=False)
    return str(root)


@pytest.fixture(scope="session")
def default_base_model(default_base_cache):
    """Path of the default base model inside ``default_base_cache``."""
    from trl_forking.base_model import base_model_dir

    return base_model_dir(cache_dir=os.path.join(default_base_cache, "trl-forking"))
