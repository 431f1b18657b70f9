"""CSV cells a spreadsheet will not run: text a payer or a subscriber wrote must not become a formula.

An accountant opens an export in a spreadsheet.  A cell that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula there
(OWASP's "CSV injection"): a bank transfer's purpose text, a payment
comment or a subscriber's name could then call out or run a command.  Such
a cell is written with a leading apostrophe, which spreadsheets show as
text.  A number (``-10.50``, ``+7``) is left as it is: it is what the cell
means, not a formula.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["FORMULA_START", "safe_text"]

FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
_NUMBER: Final = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def safe_text(text: str) -> str:
    """``text``, with a leading apostrophe when a spreadsheet would take it for a formula."""
    if text.startswith(FORMULA_START) and _NUMBER.fullmatch(text) is None:
        return "'" + text
    return text
