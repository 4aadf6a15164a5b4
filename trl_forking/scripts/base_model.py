"""Build (or find in the cache) the demo's base model and print its directory:
``python -m trl_forking.scripts.base_model [--seed 1 ...]`` (``trl_forking.tasks.arithmetic_chains.base_model``).

Every field of ``BaseModelRecipe`` is a flag. ``build_base_model`` also runs this module, with the hidden
``--build-into DIR --recipe-json JSON``, as the child process that builds a model: there it prints the SFT progress
in the compact log lines of the recipe scripts (``trl_forking.scripts.console``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from trl_forking.scripts.console import quiet_deepspeed_accelerator_notice, quiet_known_noise, use_compact_log
from trl_forking.tasks.arithmetic_chains.base_model import BUILD_FILE, BaseModelRecipe, build_base_model, build_here

__all__ = ["main"]

PROG = "python -m trl_forking.scripts.base_model"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build (or find in the cache) the tiny Qwen3 base model of the CPU demo and print its path.",
    )
    parser.add_argument("--cache-dir", default=None, help="Parent directory (default: $XDG_CACHE_HOME/trl-forking).")
    parser.add_argument("--overwrite", action="store_true", help="Rebuild even if the model is cached.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the SFT progress bar.")
    # The child process of build_base_model: build the recipe given as JSON into a directory, here.
    parser.add_argument("--build-into", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recipe-json", default=None, help=argparse.SUPPRESS)
    for field in dataclasses.fields(BaseModelRecipe):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=int if field.default is None else type(field.default),  # num_train_problems: int or None
            default=field.default,
            help=f"Recipe field (default: {field.default}).",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Builds the base model named by the command line ``argv`` and prints its directory; returns the exit status."""
    args = _parser().parse_args(argv)
    names = [field.name for field in dataclasses.fields(BaseModelRecipe)]
    try:
        fields = json.loads(args.recipe_json) if args.recipe_json else {name: getattr(args, name) for name in names}
        recipe = BaseModelRecipe(**fields)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if args.build_into:
        # A build process of its caller: the caller's run has already said what these warnings would repeat.
        quiet_known_noise()
        quiet_deepspeed_accelerator_notice()
        record = build_here(recipe, args.build_into, progress=not args.no_progress, on_trainer=use_compact_log)
        with open(os.path.join(args.build_into, BUILD_FILE), "w") as f:
            json.dump(record, f, indent=2)
        return 0
    print(build_base_model(recipe, args.cache_dir, overwrite=args.overwrite, progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
