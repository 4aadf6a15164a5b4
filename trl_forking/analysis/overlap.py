"""``overlap``: do two models (e.g. a base model and its RL-trained checkpoint) fork at the same positions, and how
did the entropy of each kind of token change?

Both models score the same completion tokens. Reported, pooled over all completions and per completion: the share
of top-rho positions they have in common (the paper finds over 86% between Qwen3-14B and its DAPO-trained version)
and Spearman's rank correlation of their entropies; and, per percentile bucket of model A's entropy, how much the
entropy changed from A to B (the paper: RLVR mostly changes the entropy of high-entropy tokens).
"""

from __future__ import annotations

import json
import os

import torch

from ..defaults import DEFAULT_ENTROPY_BUCKETS, DEFAULT_RHO
from ..selection import check_quantile, forking_mask
from .pipeline import score_inputs
from .plots import plot_entropy_change
from .stats import check_buckets, entropy_change_by_bucket, spearman, top_rho_overlap

__all__ = ["CHANGE_FILE", "OVERLAP_FILE", "compare_entropies", "format_overlap", "overlap"]

OVERLAP_FILE = "overlap.json"
CHANGE_FILE = "entropy_change_by_bucket.png"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def compare_entropies(
    entropies_a: list[torch.Tensor],
    entropies_b: list[torch.Tensor],
    rho: float,
    buckets: int = DEFAULT_ENTROPY_BUCKETS,
) -> dict:
    """Returns the overlap of the top-rho positions, the Spearman correlation and the entropy change by bucket of two
    models' entropies.

    Pooled: the top ``ceil(rho * N)`` of all N tokens under each model (``forking_mask``), the share of those
    positions that both select (``top_rho_overlap``), Spearman's rho of the N entropy pairs, and
    ``entropy_change_by_bucket`` (B - A per percentile bucket of A's entropy). Per completion i: the overlap and
    Spearman's rho with ``ceil(rho * n_i)`` tokens of that completion. ``per_completion_mean`` averages the defined
    values.

    Args:
        entropies_a, entropies_b: one (T_i,) tensor per completion for each model, same lengths pairwise.
        rho: share of tokens selected, in (0, 1].
        buckets: percentile buckets of A's entropy (10: deciles).
    """
    rho = check_quantile(rho, "rho")
    for i, (a, b) in enumerate(zip(entropies_a, entropies_b, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"completion {i}: {a.numel()} tokens under model A but {b.numel()} under model B")
    flat_a, flat_b = torch.cat(entropies_a), torch.cat(entropies_b)  # (N,)
    everything = torch.ones_like(flat_a, dtype=torch.bool)
    pooled_a, pooled_b = forking_mask(flat_a, everything, rho), forking_mask(flat_b, everything, rho)
    rows = []
    for i, (a, b) in enumerate(zip(entropies_a, entropies_b, strict=True)):
        valid = torch.ones_like(a, dtype=torch.bool)
        sel_a, sel_b = forking_mask(a, valid, rho), forking_mask(b, valid, rho)
        rows.append(
            {
                "index": i,
                "num_tokens": a.numel(),
                "num_selected": int(sel_a.sum()),
                "overlap": top_rho_overlap(sel_a, sel_b),
                "spearman": spearman(a, b),
            }
        )
    return {
        "rho": rho,
        "num_completions": len(rows),
        "num_tokens": flat_a.numel(),
        "num_selected": int(pooled_a.sum()),
        "overlap": top_rho_overlap(pooled_a, pooled_b),
        "spearman": spearman(flat_a, flat_b),
        "per_completion_mean": {
            "overlap": _mean(r["overlap"] for r in rows),
            "spearman": _mean(r["spearman"] for r in rows),
        },
        "entropy_change_by_bucket": entropy_change_by_bucket(flat_a, flat_b, buckets),
        "per_completion": rows,
    }


def _fmt(value: float | None, percent: bool = False, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _bucket_lines(rows: list[dict]) -> list[str]:
    """Returns the lines of the entropy-change table of ``entropy_change_by_bucket`` rows."""
    lines = [
        "entropy change by bucket of model A's entropy (nats):",
        f"{'bucket':>10} {'tokens':>7} {'A min':>8} {'A max':>8} {'mean A':>8} {'mean B':>8} {'mean B-A':>9} "
        f"{'mean |B-A|':>10}",
    ]
    for row in rows:
        lines.append(
            f"{row['bucket']:>10} {row['num_tokens']:>7} {_fmt(row['entropy_a_min']):>8} "
            f"{_fmt(row['entropy_a_max']):>8} {_fmt(row['mean_entropy_a']):>8} {_fmt(row['mean_entropy_b']):>8} "
            f"{_fmt(row['mean_change'], sign=True):>9} {_fmt(row['mean_abs_change']):>10}"
        )
    return lines


def format_overlap(result: dict, max_rows: int = 10) -> str:
    """Returns a plain-text summary of an ``overlap`` result (the first ``max_rows`` completions listed)."""
    mean = result["per_completion_mean"]
    lines = [
        f"model A: {result['model_a']}",
        f"model B: {result['model_b']}",
        f"completions: {result['num_completions']}, tokens: {result['num_tokens']:,}, "
        f"top-{result['rho']:g} positions per model: {result['num_selected']:,}",
        f"top-{result['rho']:g} overlap: {_fmt(result['overlap'], True)} pooled, "
        f"{_fmt(mean['overlap'], True)} mean per completion",
        f"Spearman rank correlation of entropies: {_fmt(result['spearman'])} pooled, "
        f"{_fmt(mean['spearman'])} mean per completion",
        *_bucket_lines(result["entropy_change_by_bucket"]),
        f"{'completion':>10} {'tokens':>7} {'overlap':>8} {'spearman':>9}",
    ]
    for row in result["per_completion"][:max_rows]:
        lines.append(
            f"{row['index']:>10} {row['num_tokens']:>7} {_fmt(row['overlap'], True):>8} {_fmt(row['spearman']):>9}"
        )
    if result["num_completions"] > max_rows:
        lines.append(f"... {result['num_completions'] - max_rows} more in {OVERLAP_FILE}")
    if "files" in result:
        lines.append("wrote: " + ", ".join(result["files"].values()))
    return "\n".join(lines)


def overlap(
    model_a,
    model_b,
    output_dir: str,
    *,
    tokenizer_a=None,
    tokenizer_b=None,
    rho: float = DEFAULT_RHO,
    buckets: int = DEFAULT_ENTROPY_BUCKETS,
    verbose: bool = True,
    **options,
) -> dict:
    """Returns the ``compare_entropies`` result of two models on the same completions (plus model names and the
    output files) after writing it to ``output_dir/overlap.json``, drawing the entropy change by bucket to
    ``output_dir/entropy_change_by_bucket.png`` and, with ``verbose``, printing a summary.

    Models given by name are loaded one after the other and released in between, so peak memory is one model. With
    ``prompts``, completions are sampled from model A, saved to ``output_dir/completions.jsonl``, and model B scores
    exactly those tokens.

    Args:
        model_a, model_b: names or paths, or loaded causal LMs (then pass their tokenizers). Both must share one
            vocabulary, since the same token ids are scored.
        output_dir: created if needed.
        tokenizer_a, tokenizer_b: the tokenizers of loaded models.
        rho: share of tokens compared, in (0, 1].
        buckets: percentile buckets of model A's entropy for the entropy-change table (10: deciles).
        verbose: print the summary.
        **options: the input, sampling and compute options of ``pipeline.score_inputs``, as in ``analyze``.
    """
    rho = check_quantile(rho, "rho")
    buckets = check_buckets(buckets)  # before any model is loaded
    scored = score_inputs([model_a, model_b], output_dir, [tokenizer_a, tokenizer_b], **options)
    result = {"model_a": scored.names[0], "model_b": scored.names[1], "temperature": scored.temperature}
    result.update(compare_entropies(scored.scores[0].entropies, scored.scores[1].entropies, rho, buckets))
    files = dict(scored.files)
    files["overlap"] = os.path.join(scored.output_dir, OVERLAP_FILE)
    files["entropy_change"] = plot_entropy_change(
        result["entropy_change_by_bucket"], os.path.join(scored.output_dir, CHANGE_FILE)
    )
    result["files"] = files
    with open(files["overlap"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if verbose:
        print(format_overlap(result))
    return result
