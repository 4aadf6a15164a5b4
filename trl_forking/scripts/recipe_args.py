"""The command line of the recipe scripts: ``--config recipe.yaml`` plus flags, every mistake one ``UsageError`` line.

``RecipeParser`` is TRL's ``TrlParser`` (YAML values become defaults, flags override them) with the errors a user
meets turned into one line that names the field, the value and what is allowed: a missing or malformed config file, an
unknown key in it (with the nearest known name), a value of the wrong type, an unknown flag, a value a dataclass
refuses. argparse's own errors lose the 200-line usage block that precedes them.
"""

from __future__ import annotations

import difflib
import os
import re

from trl import TrlParser

from .usage import UsageError, input_errors, one_line

__all__ = ["RecipeParser"]

_ARGUMENT_PREFIX = re.compile(r"^argument (--[\w.-]+)(?:/--[\w.-]+)*: ")


class RecipeParser(TrlParser):
    """``TrlParser`` whose bad input raises ``UsageError`` (one line) instead of a traceback or a usage block.

    ``parse_recipe(argv, default_config)`` reads ``default_config`` when ``argv`` has no ``--config``, so that flags
    modify that recipe instead of replacing it; ``default_config_used`` then says so.
    """

    default_config_used = False
    _argv: list[str] = []
    _config_path: str | None = None
    _config_keys: frozenset[str] = frozenset()

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
        on_command_line = any(arg == option or arg.startswith(option + "=") for arg in self._argv)
        if not on_command_line and name in self._config_keys:
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
