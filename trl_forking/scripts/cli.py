"""The ``trl-forking`` command line.

- ``train``, ``evaluate`` and ``ablate`` run the recipe scripts (``trl_forking.scripts.train``, ``.evaluate``,
  ``.ablate``; the files ``recipes/grpo_forking.py``, ``eval_aime.py`` and ``ablation.py`` run the same), with their
  own flags and ``--config <recipe YAML>``: ``trl-forking train --help`` lists them;
- ``analyze``, ``render`` and ``overlap``, each a thin parser over ``trl_forking.analysis``, and ``compare`` over
  ``trl_forking.analysis.study``.

The analysis package (torch, transformers, matplotlib) and the scripts are imported only when a subcommand runs:
building the parser, and so ``--help`` or a usage error, needs only ``trl_forking.defaults``, which imports nothing.

Bad input (a missing model or file, an empty dataset, a malformed JSONL line, rho out of range, an unwritable output
directory) ends with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..defaults import (
    DEFAULT_ENTROPY_BATCH_SIZE,
    DEFAULT_ENTROPY_BUCKETS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_RHO,
    DEFAULT_TOP_TOKENS,
    DEFAULT_WIDTH,
)
from .allowed import above, at_least, between, seed_value

__all__ = ["SCRIPTS", "build_parser", "main"]

# Subcommand (the module trl_forking.scripts.<name>) -> help. Each parses its own flags (TRL's parser, a recipe YAML).
SCRIPTS = {
    "train": "GRPO with forking-token selection from a recipe YAML (no --config: the CPU demo)",
    "evaluate": "avg@n and pass@k of a model on AIME or the bundled task, graded with math-verify",
    "ablate": "the ablation study: arms x seeds from one model, compared on held-out problems",
}

EXIT_INPUT_ERROR, EXIT_USAGE = 1, 2


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(name: str, low: int = 1):
    """Returns an argparse type for an integer option ``name`` that must be >= ``low``."""
    return at_least(name, low).argparse_type(int)


def _unit_interval(name: str):
    """Returns an argparse type for an option ``name`` that must be a number in (0, 1]."""
    return between(name, "(0, 1]").argparse_type(float)


def _metric(text: str) -> str:
    """argparse type of ``compare --metric``: ``accuracy`` or ``pass@K`` with K >= 1."""
    if text == "accuracy" or re.fullmatch(r"pass@[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not allowed; use accuracy (avg@n) or pass@K with K >= 1")


def _common() -> argparse.ArgumentParser:
    """Returns the options every subcommand shares: inputs, compute, sampling, rho and output."""
    parent = _Parser(add_help=False)
    inputs = parent.add_argument_group("input (one of)")
    source = inputs.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompts", help="prompts to sample completions from: a JSONL file, a saved dataset directory or a Hub name"
    )
    source.add_argument("--completions", help="JSONL file of existing completions, one {prompt, completion} per line")
    inputs.add_argument("--split", default="train", help="dataset split of --prompts (default: train)")
    inputs.add_argument("--dataset-config", help="dataset configuration of --prompts")
    inputs.add_argument("--prompt-column", help="column of --prompts holding the prompt (default: prompt/problem/...)")
    inputs.add_argument("--num-samples", type=_number("num-samples"), help="use the first N prompts or completions")
    inputs.add_argument(
        "--index",
        type=_number("index", low=0),
        nargs="+",
        help="0-based completions to use, after --num-samples and sampling",
    )
    compute = parent.add_argument_group("compute")
    compute.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    compute.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    compute.add_argument(
        "--batch-size",
        type=_number("batch-size"),
        default=DEFAULT_ENTROPY_BATCH_SIZE,
        help=f"rows per forward: the memory bound (default: {DEFAULT_ENTROPY_BATCH_SIZE})",
    )
    compute.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sampling = parent.add_argument_group("sampling (with --prompts)")
    sampling.add_argument(
        "--temperature",
        type=above("temperature", 0).argparse_type(float),
        default=1.0,
        help="sampling temperature and entropy T (default: 1)",
    )
    sampling.add_argument(
        "--num-generations", type=_number("num-generations"), default=1, help="completions per prompt"
    )
    sampling.add_argument(
        "--max-new-tokens", type=_number("max-new-tokens"), default=DEFAULT_MAX_NEW_TOKENS, help="completion length cap"
    )
    sampling.add_argument("--top-p", type=_unit_interval("top-p"), default=1.0, help="nucleus sampling (default: 1)")
    sampling.add_argument(
        "--seed", type=seed_value("seed").argparse_type(int), default=0, help="sampling seed (default: 0)"
    )
    sampling.add_argument("--chat-template", action="store_true", help="wrap string prompts in a chat user turn")
    parent.add_argument(
        "--rho",
        type=_unit_interval("rho"),
        default=DEFAULT_RHO,
        help=f"share of tokens that are forking tokens (default: {DEFAULT_RHO})",
    )
    parent.add_argument("--output-dir", "-o", required=True, help="where to write the results")
    return parent


def _shared(args) -> dict:
    """Returns the keyword arguments every subcommand passes on: rho, and the input, sampling and compute options of
    ``trl_forking.analysis.score_inputs``."""
    return {
        "completions": args.completions,
        "prompts": args.prompts,
        "rho": args.rho,
        "num_samples": args.num_samples,
        "split": args.split,
        "dataset_config": args.dataset_config,
        "prompt_column": args.prompt_column,
        "indices": args.index,
        "num_generations": args.num_generations,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "chat_template": args.chat_template,
        "progress": not args.no_progress,
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _analyze(args) -> None:
    from ..analysis import analyze

    analyze(args.model, args.output_dir, top_tokens=args.top_tokens, **_shared(args))


def _render(args) -> None:
    from ..analysis import render

    files = render(args.model, args.output_dir, per_sequence=args.per_sequence, width=args.width, **_shared(args))
    print("wrote: " + ", ".join(files.values()))


def _overlap(args) -> None:
    from ..analysis import overlap

    overlap(args.model_a, args.model_b, args.output_dir, buckets=args.buckets, **_shared(args))


def _compare(args) -> None:
    from ..analysis.study import compare_runs, format_table

    summary = compare_runs(args.run_dirs, args.output_dir, args.metric)
    print(format_table(summary))
    if "files" in summary:
        print("wrote: " + ", ".join(summary["files"].values()))


def build_parser() -> argparse.ArgumentParser:
    """Returns the ``trl-forking`` argument parser."""
    parser = _Parser(
        prog="trl-forking",
        description="Forking-token RL (Beyond the 80/20 Rule): train, evaluate, ablate, and analyze forking tokens.",
    )
    names = ",".join([*SCRIPTS, "analyze", "render", "overlap", "compare"])
    commands = parser.add_subparsers(dest="command", required=True, metavar=f"{{{names}}}")
    for name, text in SCRIPTS.items():
        # Listed here for --help; main() hands their command lines to the script before this parser sees them.
        commands.add_parser(name, help=f"{text} (trl-forking {name} --help)", add_help=False)

    analyze_parser = commands.add_parser(
        "analyze",
        parents=[_common()],
        help="entropy statistics, forking-token table and charts",
        description="Write report.json, entropy_histogram.png and forking_tokens.png and print a summary.",
    )
    analyze_parser.add_argument("--model", required=True, help="model directory or Hub name")
    analyze_parser.add_argument(
        "--top-tokens", type=_number("top-tokens"), default=DEFAULT_TOP_TOKENS, help="rows of the forking-token table"
    )
    analyze_parser.set_defaults(run=_analyze)

    render_parser = commands.add_parser(
        "render",
        parents=[_common()],
        help="HTML page and PNG of completions shaded by token entropy",
        description="Write forking_tokens.html (standalone) and forking_tokens_render.png.",
    )
    render_parser.add_argument("--model", required=True, help="model directory or Hub name")
    render_parser.add_argument(
        "--per-sequence", action="store_true", help="mark the top-rho of each completion on its own"
    )
    render_parser.add_argument(
        "--width", type=_number("width"), default=DEFAULT_WIDTH, help="characters per line in the PNG"
    )
    render_parser.set_defaults(run=_render)

    overlap_parser = commands.add_parser(
        "overlap",
        parents=[_common()],
        help="share of top-rho positions two models have in common, entropy rank correlation, entropy change",
        description="Score the same completions with two models; write overlap.json and "
        "entropy_change_by_bucket.png and print a summary. With --prompts, completions are sampled from model A.",
    )
    overlap_parser.add_argument("--model-a", required=True, help="first model (e.g. the base model)")
    overlap_parser.add_argument("--model-b", required=True, help="second model (e.g. a trained checkpoint)")
    overlap_parser.add_argument(
        "--buckets",
        type=_number("buckets"),
        default=DEFAULT_ENTROPY_BUCKETS,
        help=f"percentile buckets of model A's entropy for the entropy change (default: {DEFAULT_ENTROPY_BUCKETS})",
    )
    overlap_parser.set_defaults(run=_overlap)

    compare_parser = commands.add_parser(
        "compare",
        help="per-arm table and plots of finished training runs (an ablation study)",
        description="Mean and standard error over seeds of each arm's final held-out accuracy and of the area under "
        "its accuracy curve, the difference to the 'all' arm with a 95%% confidence interval, and plots of accuracy "
        "and entropy percentiles against the training step.",
    )
    compare_parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or directories to search for runs"
    )
    compare_parser.add_argument(
        "--metric", type=_metric, default="accuracy", help="accuracy (avg@n, default) or pass@K"
    )
    compare_parser.add_argument(
        "--output-dir", "-o", help="write compare.md, compare.json and the plots here (default: print the table)"
    )
    compare_parser.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status after running the subcommand in ``argv`` (``sys.argv[1:]`` when None)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SCRIPTS:
        from importlib import import_module

        script = import_module(f"trl_forking.scripts.{argv[0]}")
        sys.argv = [f"trl-forking {argv[0]}", *argv[1:]]  # the scripts' --help names the command
        return script.run(argv[1:], prog=f"trl-forking {argv[0]}")
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        # Input problems are reported, not traced: the message already names the file, line or value.
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"trl-forking: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("trl-forking: interrupted", file=sys.stderr)
        return 130
    return 0
