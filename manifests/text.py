"""Words every command shares: how a name from the user's own files (a manifest path, a row id, an image URI)
is shown in one line of sdfleet's output (the terminal, a log, a ledger's `error` column), and what is said of
a file that is not an image."""

from __future__ import annotations

import unicodedata

# for PIL.UnidentifiedImageError, whose own text names only the in-memory buffer an image was read from
NOT_AN_IMAGE = "not an image Pillow reads (PNG, JPEG, WebP, ...)"

BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_line(text: str) -> str:
    """`text` as one terminal line: a control character in a name it quotes (a file, a manifest path), such as
    a newline or an escape code, a line or paragraph separator (which str.splitlines splits on), or a bidi
    override that reorders what follows, is written out (`\\n`, `\\x1b`, `\\u2028`, `\\u202e`), so it can
    neither forge a line nor hide one; other text (accents, emoji joiners, non-breaking spaces) is left as it
    is."""
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if _hides(c) else c for c in text)


def _hides(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS  # Zl, Zp: U+2028, U+2029
