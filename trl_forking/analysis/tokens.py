"""Token text for display: one string per token id (``token_strings``, from ``trl_forking.entropy_stats``), with
invisible characters made visible."""

from __future__ import annotations

import unicodedata

from ..entropy_stats import token_strings

__all__ = ["display_token", "token_strings"]

_KEEP = {"\n", "\t"}


def display_token(text: str) -> str:
    """Returns ``text`` with control characters (other than newline and tab) written as ``\\xNN`` escapes."""
    return "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cf") and c not in _KEEP else c for c in text
    )
