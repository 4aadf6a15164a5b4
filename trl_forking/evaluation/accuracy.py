"""Accuracy of a model on math problems: n sampled completions per problem, graded with math-verify, as avg@n
and unbiased pass@k.

``evaluate(model, tokenizer, problems)`` takes a model and tokenizer already in memory (nothing is reloaded), poses
each conversational prompt exactly as TRL's ``GRPOTrainer`` does (the tokenizer's chat template with the generation
prompt, left padding, sampling with GRPO's generation settings, completions cut at the first EOS and decoded without
special tokens), grades every completion with ``trl_forking.rewards.math_accuracy_reward`` and returns:

- avg@n: the mean over problems of the share of correct completions (the paper's AIME avg@32), with its standard
  error over problems, ``sd(a_i) / sqrt(P)``;
- pass@k = mean over problems of ``1 - C(n - c_i, k) / C(n, k)`` (Chen et al. 2021, Eq. 1), unbiased for k <= n.

Sampling runs under a forked torch RNG seeded with ``seed``: a call gives the same completions for the same model
and seed, and leaves the caller's random state (a training run's) as it was. The demo's before/after print, the
recipes' evaluation script and training-time evaluations all go through this one function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "DEFAULT_EVAL_BATCH_SIZE",
    "evaluate",
    "format_evaluation",
    "generate_completions",
    "left_pad",
    "pass_at_k",
    "score_problem",
    "summarize",
]

# Rows (prompt x sample) per ``generate`` call. For a model of a few million parameters the batch costs less than the
# Python loop around it; the memory bound is the KV cache, rows x layers x 2 x (prompt + new tokens) x hidden floats.
DEFAULT_EVAL_BATCH_SIZE = 256


def pass_at_k(n: int, c: int, k: int) -> float:
    """Returns the unbiased pass@k estimate ``1 - C(n - c, k) / C(n, k)`` from ``c`` correct of ``n`` samples.

    The chance that at least one of ``k`` samples drawn without replacement from the ``n`` is correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", Eq. 1); exact in integers.
    """
    if not 0 <= c <= n:
        raise ValueError(f"c: {c} correct of n={n} samples is not allowed; use 0 <= c <= n.")
    if not 1 <= k <= n:
        raise ValueError(f"k: {k} is not allowed; use 1 <= k <= n={n}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_problem(completions: list[str], answer: str, ks: Sequence[int]) -> dict:
    """Returns the verdicts of ``completions`` against ``answer`` and the problem's accuracy and pass@k.

    ``{"correct": [bool], "num_correct": c, "accuracy": c / n, "pass@k": {"k": float}}``; ``accuracy`` and ``pass@k``
    are None when math-verify cannot parse the gold answer (the problem is unscored).
    """
    from ..rewards import math_accuracy_reward

    rewards = math_accuracy_reward(completions, [answer] * len(completions))
    if any(r is None for r in rewards):
        return {"correct": None, "num_correct": None, "accuracy": None, "pass@k": None}
    correct = [r == 1.0 for r in rewards]
    n, c = len(correct), sum(correct)
    return {
        "correct": correct,
        "num_correct": c,
        "accuracy": c / n,
        "pass@k": {str(k): pass_at_k(n, c, k) for k in ks},
    }


def summarize(rows: list[dict], ks: Sequence[int], num_samples: int) -> dict:
    """Returns avg@n (mean per-problem accuracy), its standard error and mean pass@k over the scored ``rows``.

    ``stderr`` = ``sd(a_i) / sqrt(P)`` over the P scored problems' accuracies ``a_i`` (sample sd, P - 1 in the
    denominator; None below two problems): the error of avg@n as an estimate over problems like these.
    """
    scored = [row["accuracy"] for row in rows if row["accuracy"] is not None]
    num = len(scored)
    mean = sum(scored) / num if num else None
    stderr = None
    if num > 1:
        stderr = math.sqrt(sum((a - mean) ** 2 for a in scored) / (num - 1) / num)
    return {
        "num_problems": len(rows),
        "num_unscored": len(rows) - num,
        f"avg@{num_samples}": mean,
        "stderr": stderr,
        "pass@k": {
            str(k): (sum(row["pass@k"][str(k)] for row in rows if row["accuracy"] is not None) / num if num else None)
            for k in ks
        },
    }


def _eos_token_ids(model, tokenizer) -> list[int]:
    """Returns the ids that end a completion: the tokenizer's EOS, then the model's generation config's (as TRL)."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in configured:
        configured = [tokenizer.eos_token_id, *configured]
    return configured


def left_pad(rows: list[list[int]], pad_id: int):
    """Returns ``(input_ids, attention_mask)``, both (len(rows), longest row) long tensors: the rows right-aligned
    after ``pad_id`` (left padding, as decoder-only generation needs) and 1 where a row's own tokens are."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(row, dtype=torch.long) for row in rows]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(row) for row in ids], batch_first=True, padding_side="left")
    return input_ids, attention_mask


def generate_completions(
    model,
    tokenizer,
    prompts: list,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """Returns ``num_samples`` completion texts per prompt (a ``len(prompts)`` list of ``num_samples`` lists).

    Each conversational prompt is rendered by ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` (a
    list of plain strings is tokenized as is, as GRPOTrainer does for standard prompts), left-padded with the pad
    token, and sampled with GRPOTrainer's settings (``do_sample``, ``temperature``, ``top_p``, no top-k); a
    completion ends at its first EOS and is decoded without special tokens. Rows (prompt repeated ``num_samples``
    times) go ``batch_size`` at a time through ``model.generate``.

    Args:
        model: a causal LM in memory (its training mode is restored afterwards).
        tokenizer: its tokenizer, with a chat template and a pad token (EOS when it has none).
        prompts: conversations, each a list of ``{"role", "content"}`` messages, or plain strings.
        num_samples: completions per prompt, n of avg@n.
        max_new_tokens: cap on completion length.
        temperature, top_p: sampling parameters (temperature > 0).
        batch_size: rows per ``generate`` call.
        seed: seeds a forked torch RNG: the same seed gives the same completions; the caller's RNG is untouched.
        progress: show a progress bar over the ``generate`` calls.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    for name, value, ok, allowed in (
        ("num_samples", num_samples, num_samples >= 1, "an integer >= 1"),
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", temperature, temperature > 0, "a value > 0"),
        ("top_p", top_p, 0 < top_p <= 1, "a value in (0, 1]"),
        ("batch_size", batch_size, batch_size >= 1, "an integer >= 1"),
    ):
        if not ok:
            raise ValueError(f"{name}: {value!r} is not allowed; use {allowed}.")
    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
    )
    if all(isinstance(p, str) for p in prompts):  # standard prompts: tokenized as they are, as GRPOTrainer does
        encoded = tokenizer(text=list(prompts))["input_ids"]
    else:
        encoded = tokenizer.apply_chat_template(
            conversation=list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    rows = [ids for ids in encoded for _ in range(num_samples)]  # prompt i's samples are rows i*n ... i*n + n - 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            starts = range(0, len(rows), batch_size)
            for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
                batch = rows[start : start + batch_size]
                input_ids, attention_mask = left_pad(batch, pad)  # (b, P) each
                width = input_ids.shape[1]
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
                )
                for sequence in output[:, width:].tolist():  # (b, C)
                    cut = min((sequence.index(e) for e in eos if e in sequence), default=len(sequence))
                    texts.append(tokenizer.decode(sequence[: cut + 1], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def evaluate(
    model,
    tokenizer,
    problems,
    num_samples: int = 4,
    ks: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Returns avg@n, its standard error, pass@k and per-problem verdicts of ``model`` on ``problems``.

    ``{"num_problems", "num_unscored", "avg@<n>", "stderr", "pass@k": {"k": ...}, "num_samples", "problems": [...]}``
    where each entry of ``problems`` holds that problem's ``completions``, ``correct``, ``num_correct``, ``accuracy``
    and ``pass@k`` (``score_problem``). avg@n and pass@k are defined in the module docstring.

    Args:
        model, tokenizer: in memory; see ``generate_completions``.
        problems: rows with a conversational ``prompt`` and a gold ``solution`` (a ``datasets.Dataset`` or a list of
            dicts), e.g. ``trl_forking.tasks.arithmetic_chains.task.load_task("test")``.
        num_samples: n, completions per problem.
        ks: the k of pass@k, each in [1, n]; default ``[1, n]``.
        max_new_tokens, temperature, top_p, batch_size, seed, progress: see ``generate_completions``.
    """
    ks = sorted({1, num_samples}) if ks is None else list(ks)
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"ks: {bad} not allowed; each k must be in [1, num_samples={num_samples}].")
    rows = [problems[i] for i in range(len(problems))]
    missing = [c for c in ("prompt", "solution") if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"problems: missing column(s) {missing}; each row needs 'prompt' and 'solution'.")
    samples = generate_completions(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    scored = [
        {"completions": completions, **score_problem(completions, str(row["solution"]), ks)}
        for row, completions in zip(rows, samples, strict=True)
    ]
    return {**summarize(scored, ks, num_samples), "num_samples": num_samples, "problems": scored}


def format_evaluation(result: dict) -> str:
    """Returns one line: avg@n with its standard error and the pass@k of an ``evaluate`` result, in percent."""
    n = result["num_samples"]
    avg, stderr = result[f"avg@{n}"], result["stderr"]
    if avg is None:
        return f"avg@{n}: no scored problem of {result['num_problems']}"
    text = f"avg@{n} = {100 * avg:.1f}%"
    if stderr is not None:
        text += f" +/- {100 * stderr:.1f}% (standard error)"
    passes = ", ".join(f"pass@{k} = {100 * v:.1f}%" for k, v in result["pass@k"].items())
    return f"{text}, {passes}, {result['num_problems'] - result['num_unscored']} problems x {n} samples"
