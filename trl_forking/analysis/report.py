"""``analyze``: the entropy report of a model's completions (report.json, two charts and a printed summary)."""

from __future__ import annotations

import json
import os

import torch

from ..defaults import DEFAULT_RHO, DEFAULT_TOP_TOKENS
from ..selection import check_quantile, forking_mask
from .pipeline import score_inputs
from .plots import plot_entropy_histogram, plot_forking_tokens
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
    *,
    tokenizer=None,
    rho: float = DEFAULT_RHO,
    top_tokens: int = DEFAULT_TOP_TOKENS,
    bins: int = 50,
    verbose: bool = True,
    **options,
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
        tokenizer: the tokenizer of a loaded ``model``.
        rho: share of tokens that are forking tokens, in (0, 1].
        top_tokens: rows in the forking-token table.
        bins: histogram bins.
        verbose: print the summary.
        **options: the input, sampling and compute options of ``pipeline.score_inputs``, the same for ``render`` and
            ``overlap``: ``prompts`` or ``completions``, ``num_samples``, ``split``, ``dataset_config``,
            ``prompt_column``, ``indices``; ``num_generations``, ``max_new_tokens``, ``temperature`` (also T of the
            entropy), ``top_p``, ``seed``, ``chat_template``; ``batch_size``, ``device``, ``dtype``, ``progress``.
    """
    rho = check_quantile(rho, "rho")
    scored = score_inputs([model], output_dir, [tokenizer], **options)
    (scores,), (tokenizer,) = scored.scores, scored.tokenizers
    token_ids, entropies, mask = scores.padded()  # (B, T) each
    selected = forking_mask(entropies, mask, rho)  # (B, T)
    summary = entropy_summary(entropies, mask, rho, DEFAULT_PERCENTILES, DEFAULT_LOW_ENTROPY)
    table = forking_token_table(
        token_ids, entropies, selected, mask, top_tokens, decode=lambda i: token_strings(tokenizer, [i])[0]
    )
    histogram = log_histogram(entropies[mask], bins)
    files = dict(scored.files)
    files["report"] = os.path.join(scored.output_dir, REPORT_FILE)
    files["histogram"] = plot_entropy_histogram(
        histogram, os.path.join(scored.output_dir, HISTOGRAM_FILE), summary["threshold"], rho, DEFAULT_LOW_ENTROPY
    )
    files["forking_tokens"] = plot_forking_tokens(table, os.path.join(scored.output_dir, TOKENS_FILE), rho)
    report = {
        "model": scored.names[0],
        "temperature": scored.temperature,
        "num_completions": len(scored.records),
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
