"""Token text for display: one string per token id, with invisible characters made visible."""

from __future__ import annotations

import unicodedata

__all__ = ["display_token", "token_strings"]

_KEEP = {"\n", "\t"}


def token_strings(tokenizer, ids) -> list[str]:
    """Returns the text of each token id in ``ids`` decoded on its own (special tokens kept, e.g. EOS).

    Concatenated, the pieces give the completion text, except where a character spans several byte-level tokens:
    such a piece decodes to U+FFFD alone, so its vocabulary symbol is shown instead (distinct tokens stay distinct).
    """
    pieces = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        pieces.append(tokenizer.convert_ids_to_tokens(int(i)) if "\ufffd" in text else text)
    return pieces


def display_token(text: str) -> str:
    """Returns ``text`` with control characters (other than newline and tab) written as ``\\xNN`` escapes."""
    return "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cf") and c not in _KEEP else c for c in text
    )
