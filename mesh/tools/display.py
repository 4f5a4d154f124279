"""Text as a terminal shows it: ids made visible, and padding by display width.

A model or vmodel id is any UTF-8 without NUL (mesh/protocol/ids.py), so the CLI prints the id
itself, not its encoded form in keys and queue names. Two things then matter on a terminal:

- its width: `模型` takes four columns, `é` written as `e` + U+0301 one; `str.ljust` counts code
  points, which misaligns every column after such an id. `ljust_cells` counts display cells
  (rich's `cell_len`, as rich's tables do).
- characters that are not text: a control character (ESC starts a terminal escape sequence,
  a newline or tab breaks a table row) or a bidirectional override (U+202E shows the rest of
  the line reversed) would make the id look like something else, and a lone surrogate (a
  byte that was not UTF-8 in a message, kept by `surrogateescape`) has no UTF-8 form (rich
  writes `?` or U+FFFD, whatever the byte was). `visible` shows them as escapes (`\\x1b`,
  `\\u202e`, `\\udcff`); `--json` output keeps the exact id.
"""

from __future__ import annotations

import unicodedata

from rich.cells import cell_len

# Unicode's bidirectional formatting characters (UAX #9): embeddings, overrides, isolates, marks
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def visible(text: str) -> str:
    """`text` with its control characters (Unicode category Cc), lone surrogates (Cs) and
    bidirectional formatting characters written as escapes; any other text (CJK, combining
    marks, emoji, zero-width joiners) as it is."""
    if text.isprintable():  # the common case; False for any Cc, Cs or Cf (bidi marks are Cf)
        return text
    return "".join(_escape(ch) if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)


def ljust_cells(text: str, width: int) -> str:
    """`text` padded with spaces to `width` display cells (as `str.ljust` pads to code points)."""
    return text + " " * max(0, width - cell_len(text))


__all__ = ["cell_len", "ljust_cells", "visible"]
