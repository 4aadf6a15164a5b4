"""Shared fixtures: a tiny GPT-2 built locally (never downloaded), a small prompt dataset, and (slow tests only) the
demo's default base model, built once per session.

No test reads or writes the user's caches: the session runs with ``XDG_CACHE_HOME`` (trl-forking's base models) and
``HF_HOME`` (datasets, hub) in a temporary directory of its own, set before any Hugging Face library is imported and
inherited by every subprocess a test starts, and removed at the end.
"""

import os
import shutil
import tempfile

SESSION_CACHE = tempfile.mkdtemp(prefix="trl-forking-tests-cache-")
os.environ["XDG_CACHE_HOME"] = SESSION_CACHE
os.environ["HF_HOME"] = os.path.join(SESSION_CACHE, "huggingface")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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
    from trl_forking.testing import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def qwen3_hub_cache():
    """Returns the Hub ids ``Qwen/Qwen3-{8B,14B,32B}-Base`` after putting their ``config.json`` (nothing else) in the
    session's Hugging Face cache, from ``tests/data`` (the dimensions published on the Hub): the recipes then name
    their models as they do and resolve them offline, as on a machine that fetched the configs."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    repos = []
    for name in sorted(os.listdir(data)):
        repo = f"Qwen/{name}"
        cache = os.path.join(os.environ["HF_HOME"], "hub", f"models--{repo.replace('/', '--')}")
        os.makedirs(os.path.join(cache, "snapshots", "local"), exist_ok=True)
        shutil.copy(os.path.join(data, name, "config.json"), os.path.join(cache, "snapshots", "local"))
        os.makedirs(os.path.join(cache, "refs"), exist_ok=True)
        with open(os.path.join(cache, "refs", "main"), "w") as f:
            f.write("local")
        repos.append(repo)
    return repos


@pytest.fixture(scope="session")
def prompt_dataset():
    """A 16-prompt standard (non-conversational) dataset, enough for a few GRPO steps."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"What is {a} + {a + 3}? Answer:" for a in range(16)]})


@pytest.fixture(scope="session")
def default_base_cache():
    """The session's ``XDG_CACHE_HOME``, its ``trl-forking/`` holding the default base model, built once per session.

    The one fixture that builds the real recipe (about 1.5 minutes on 2 cores): only tests marked ``slow`` may use
    it. Every subprocess of the session inherits this ``XDG_CACHE_HOME`` and finds the model cached.
    """
    from trl_forking.tasks.arithmetic_chains.base_model import build_base_model

    build_base_model(cache_dir=os.path.join(SESSION_CACHE, "trl-forking"), progress=False)
    return SESSION_CACHE


@pytest.fixture(scope="session")
def default_base_model(default_base_cache):
    """Path of the default base model inside ``default_base_cache``."""
    from trl_forking.tasks.arithmetic_chains.base_model import base_model_dir

    return base_model_dir(cache_dir=os.path.join(default_base_cache, "trl-forking"))
