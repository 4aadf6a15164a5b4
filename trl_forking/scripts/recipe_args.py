"""The command line of the recipe scripts: ``--config recipe.yaml`` plus flags, every mistake one ``UsageError`` line.

``RecipeParser`` is TRL's ``TrlParser`` (YAML values become defaults, flags override them) with the errors a user
meets turned into one line that names the field, the value and what is allowed: a missing or malformed config file, an
unknown key in it (with the nearest known name), a value of the wrong type, an unknown flag, a value a dataclass
refuses. argparse's own errors lose the 200-line usage block that precedes them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import replace

from trl import TrlParser

from .allowed import Allowed, problem
from .usage import UsageError, input_errors, one_line

__all__ = ["RecipeParser"]

_ARGUMENT_PREFIX = re.compile(r"^argument (--[\w.-]+)(?:/--[\w.-]+)*: ")


def _number_kinds(dataclass_types) -> dict[str, type]:
    """Returns {field: int or float} for the fields of ``dataclass_types`` typed ``int`` or ``float`` (None allowed
    or not); list fields are left out."""
    kinds = {}
    for dataclass_type in dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        for spec in dataclasses.fields(dataclass_type):
            hint = hints.get(spec.name)
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            options = set(typing.get_args(hint)) - {type(None)} if union else {hint}
            if len(options) == 1 and next(iter(options)) in (int, float):
                kinds[spec.name] = next(iter(options))
    return kinds


class RecipeParser(TrlParser):
    """``TrlParser`` whose bad input raises ``UsageError`` (one line) instead of a traceback or a usage block.

    ``parse_recipe(argv, default_config)`` reads ``default_config`` when ``argv`` has no ``--config``, so that flags
    modify that recipe instead of replacing it; ``default_config_used`` then says so. ``allowed``
    (``trl_forking.scripts.allowed``) are checked on the parsed values before any dataclass is built from them, and a
    YAML value of the wrong type (argparse converts only strings) is refused there too.
    """

    default_config_used = False
    _argv: list[str] = []
    _config_path: str | None = None
    _config_keys: frozenset[str] = frozenset()

    def __init__(self, dataclass_types, allowed: Iterable[Allowed] = (), **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self._kinds = _number_kinds(self.dataclass_types)
        # An int option is checked as an integer: a YAML 1.5 for it reaches the dataclass unconverted.
        self._allowed = [replace(rule, integer=self._kinds.get(rule.name) is int) for rule in allowed]

    def parse_known_args(self, args=None, namespace=None):
        # HfArgumentParser builds the dataclasses from what this returns; their __post_init__ and TRL's trainer see
        # only values that passed the checks.
        parsed, remaining = super().parse_known_args(args, namespace)
        values = vars(parsed)
        self._check_types(values)
        found = problem(self._allowed, values)
        if found is not None:
            raise UsageError(self._locate(*found))
        return parsed, remaining

    def _check_types(self, values: dict) -> None:
        """Raises ``UsageError`` for a YAML value that is not of its option's type: argparse converts strings only,
        so ``num_iterations: 1.5`` would reach the dataclass as a float."""
        for name, kind in self._kinds.items():
            value = values.get(name)
            if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            use = "an integer" if kind is int else "a number"
            raise UsageError(self._locate(name, f"{name}: {value!r} is not allowed; use {use}"))

    def _from_config(self, name: str) -> bool:
        """Returns whether option ``name`` has its value from the config file rather than the command line."""
        option = f"--{name}"
        on_command_line = any(arg == option or arg.startswith(option + "=") for arg in self._argv)
        return not on_command_line and name in self._config_keys

    def _locate(self, name: str, message: str) -> str:
        """Returns ``message`` about option ``name``, followed by ``(in FILE)`` when its value came from the config."""
        return f"{message} (in {self._config_path})" if self._from_config(name) else message

    @property
    def config_path(self) -> str | None:
        """Returns the YAML file the last ``parse_recipe`` read (the default config included), or None."""
        return self._config_path

    def error(self, message):
        # argparse calls this for an invalid choice, a bad number, a missing required flag; it would print the whole
        # usage block and exit. The script's edge prints the one line instead.
        raise UsageError(f"{self._rewrite(message)} (see --help)")

    def _rewrite(self, message: str) -> str:
        """Returns argparse's message with ``argument --a/--b:`` shortened to ``--a:``, or to ``a: ... (in FILE)``
        when the value came from the config file rather than the command line."""
        match = _ARGUMENT_PREFIX.match(message)
        if match is None:
            return one_line(message)
        option, rest = match.group(1), message[match.end() :]
        name = option.lstrip("-").replace("-", "_")
        if self._from_config(name):
            return one_line(f"{name}: {rest} (in {self._config_path})")
        return one_line(f"{option}: {rest}")

    def _known_names(self) -> list[str]:
        return sorted({action.dest for action in self._actions if action.dest != "help"})

    def _suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._known_names(), n=1)
        return f"; did you mean {close[0]!r}?" if close else "; see --help for the fields"

    def _read_config(self, path: str) -> dict:
        """Returns the mapping in the YAML file ``path``; raises ``UsageError`` for a missing file, bad YAML, a
        non-mapping or an unknown key."""
        import yaml

        if not os.path.isfile(path):
            raise UsageError(f"--config: no file {path!r} (from {os.getcwd()})")
        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or one_line(error)
            raise UsageError(f"--config: {path!r} is not valid YAML{where}: {problem}") from None
        if not isinstance(config, dict):
            kind = type(config).__name__
            raise UsageError(f"--config: {path!r} must hold a YAML mapping of field: value, not a {kind}")
        known = set(self._known_names()) | {"env"}
        for key in config:
            if key not in known:
                raise UsageError(f"{key}: unknown key in {path}{self._suggest(str(key))}")
        return config

    def parse_recipe(self, argv: list[str], default_config: str | None = None) -> tuple:
        """Returns the dataclasses parsed from ``argv`` (``--config FILE`` first, then flags that override it).

        Without ``--config`` in ``argv``, ``default_config`` (when given) is read as if it had been passed. Raises
        ``UsageError`` for any bad input.
        """
        argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
        if "--config" in argv:
            index = argv.index("--config")
            if index + 1 >= len(argv):
                raise UsageError("--config: expected a YAML file after it")
            config_path = argv[index + 1]
            self._argv = argv[:index] + argv[index + 2 :]
        elif default_config is not None:
            config_path, self._argv = default_config, argv
            argv = ["--config", default_config, *argv]
            self.default_config_used = True
        else:
            config_path, self._argv = None, argv
        if config_path is not None:
            self._config_path = config_path
            self._config_keys = frozenset(self._read_config(config_path))
        # ValueError / TypeError here come from the dataclasses' own validation of the values given.
        with input_errors(None, ValueError, TypeError):
            *parsed, unknown = self.parse_args_and_config(argv, return_remaining_strings=True)
        if unknown:
            flag = next((arg for arg in unknown if arg.startswith("-")), unknown[0])
            name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
            if flag.startswith("-"):
                raise UsageError(f"{flag}: unknown option{self._suggest(name)}")
            raise UsageError(f"{flag!r}: unexpected value (every value follows its --field)")
        return tuple(parsed)
