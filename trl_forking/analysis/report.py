"""``analyze``: the entropy report of a model's completions (report.json, two charts and a printed summary)."""

from __future__ import annotations

import json
import os

import torch

from ..defaults import DEFAULT_ENTROPY_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_RHO, DEFAULT_TOP_TOKENS
from ..selection import check_quantile, forking_mask
from .inputs import COMPLETIONS_FILE, ensure_output_dir, read_inputs
from .plots import plot_entropy_histogram, plot_forking_tokens
from .sampling import ensure_model, obtain_records
from .scoring import score_completions
from .stats import DEFAULT_LOW_ENTROPY, DEFAULT_PERCENTILES, entropy_summary, forking_token_table, log_histogram
from .tokens import token_strings

__all__ = ["analyze", "format_summary", "position_profile"]

REPORT_FILE = "report.json"
HISTOGRAM_FILE = "entropy_histogram.png"
TOKENS_FILE = "forking_tokens.png"


def position_profile(selected: torch.Tensor, mask: torch.Tensor, bins: int = 10) -> list[float | None]:
    """Returns, for each of ``bins`` equal slices of relative position in a completion, the share of its tokens that
    are forking tokens (None for an empty slice): where in a completion the forks sit.

    Token t of a completion of n tokens falls in slice ``floor(bins * t / n)``.

    Args:
        selected: (B, T) bool forking tokens.
        mask: (B, T) valid tokens, left-aligned (completion token t at column t).
        bins: number of slices.
    """
    lengths = mask.long().sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    positions = torch.arange(mask.size(-1)).expand_as(mask)  # (B, T)
    slices = (bins * positions // lengths)[mask.bool()]
    totals = torch.bincount(slices, minlength=bins)
    forks = torch.bincount(slices, weights=selected[mask.bool()].double(), minlength=bins)
    return [float(f / t) if t else None for f, t in zip(forks, totals, strict=True)]


def format_summary(report: dict) -> str:
    """Returns a short plain-text summary of an ``analyze`` report."""
    s = report["summary"]
    lines = [
        f"model: {report['model']}",
        f"completions: {report['num_completions']}, tokens: {s['num_tokens']:,}, "
        f"forking (top {s['rho']:g}): {s['num_selected']:,}",
    ]
    if s["num_tokens"]:
        lines.append("percentiles: " + "  ".join(f"{k}={v:.4g}" for k, v in s["percentiles"].items()))
        lines.extend(f"share of tokens with H < {k}: {100 * v:.1f}%" for k, v in s["share_below"].items())
        lines.append(f"top-{s['rho']:g} threshold: H >= {s['threshold']:.4g}  (mean H = {s['mean']:.4g})")
    if report["forking_tokens"]:
        lines.append(f"{'token':>16} {'count':>7} {'share':>7} {'fork rate':>9} {'mean H':>7}")
        for row in report["forking_tokens"]:
            lines.append(
                f"{repr(row['token'])[:16]:>16} {row['count']:>7} {100 * row['share']:>6.1f}% "
                f"{100 * row['fork_rate']:>8.1f}% {row['mean_entropy']:>7.3f}"
            )
    lines.append("wrote: " + ", ".join(report["files"].values()))
    return "\n".join(lines)


def analyze(
    model,
    output_dir: str,
    prompts=None,
    completions=None,
    tokenizer=None,
    rho: float = DEFAULT_RHO,
    num_samples: int | None = None,
    num_generations: int = 1,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = DEFAULT_ENTROPY_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    split: str = "train",
    dataset_config: str | None = None,
    prompt_column: str | None = None,
    chat_template: bool = False,
    top_tokens: int = DEFAULT_TOP_TOKENS,
    bins: int = 50,
    seed: int | None = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Returns the report dict after writing report.json, the two charts (and the sampled completions) to
    ``output_dir``.

    The report holds the entropy distribution of all completion tokens (``stats.entropy_summary``: percentiles,
    share below 0.01, the top-rho threshold), the most frequent forking tokens (``stats.forking_token_table``), the
    log-binned histogram, and the share of forking tokens by relative position (``position_profile``). Forking
    tokens are the top ``ceil(rho * N)`` of all N completion tokens pooled, as ``forking_mask`` selects them in
    training over one batch.

    Args:
        model: a model name or path (loaded with ``load_model``), or a loaded causal LM (then pass ``tokenizer``).
        output_dir: created if needed; checked to be writable before any work.
        prompts: a dataset (JSONL file, saved dataset directory or Hub name) or a list of prompts to sample from.
        completions: a completions JSONL path, or a list of ``{"prompt", "completion"}``; exclusive with prompts.
        rho: share of tokens that are forking tokens, in (0, 1].
        num_samples: use the first ``num_samples`` prompts or completions (all when None).
        num_generations: completions sampled per prompt.
        max_new_tokens, top_p, seed: sampling parameters.
        temperature: sampling temperature, also T in the entropy ``softmax(z / T)``.
        batch_size: rows per forward, for sampling and for entropies (the memory bound).
        device, dtype: where and in what precision to load ``model`` when it is a name.
        split, dataset_config, prompt_column: which split, config and column of the prompt dataset.
        chat_template: wrap string prompts in a user turn of the tokenizer's chat template.
        top_tokens: rows in the forking-token table.
        bins: histogram bins.
        progress: show progress bars.
        verbose: print the summary.
    """
    rho = check_quantile(rho, "rho")
    output_dir = ensure_output_dir(output_dir)
    inputs = read_inputs(prompts, completions, num_samples, split, dataset_config, prompt_column)
    model_name = model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)
    model, tokenizer = ensure_model(model, tokenizer, device, dtype)
    files = {}
    if inputs.records is None:
        files["completions"] = os.path.join(output_dir, COMPLETIONS_FILE)
    records = obtain_records(
        model,
        tokenizer,
        inputs,
        files.get("completions"),
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        chat_template=chat_template,
        seed=seed,
        progress=progress,
    )
    scored = score_completions(model, tokenizer, records, temperature, batch_size, chat_template, progress)
    token_ids, entropies, mask = scored.padded()  # (B, T) each
    selected = forking_mask(entropies, mask, rho)  # (B, T)
    summary = entropy_summary(entropies, mask, rho, DEFAULT_PERCENTILES, DEFAULT_LOW_ENTROPY)
    table = forking_token_table(
        token_ids, entropies, selected, mask, top_tokens, decode=lambda i: token_strings(tokenizer, [i])[0]
    )
    histogram = log_histogram(entropies[mask], bins)
    files["report"] = os.path.join(output_dir, REPORT_FILE)
    files["histogram"] = plot_entropy_histogram(
        histogram, os.path.join(output_dir, HISTOGRAM_FILE), summary["threshold"], rho, DEFAULT_LOW_ENTROPY
    )
    files["forking_tokens"] = plot_forking_tokens(table, os.path.join(output_dir, TOKENS_FILE), rho)
    report = {
        "model": model_name,
        "temperature": temperature,
        "num_completions": len(records),
        "summary": summary,
        "forking_tokens": table,
        "position_profile": position_profile(selected, mask),
        "histogram": histogram,
        "files": files,
    }
    with open(files["report"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    if verbose:
        print(format_summary(report))
    return report
