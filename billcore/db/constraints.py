"""Which field a PostgreSQL constraint violation is about, without echoing what the client sent.

Both the error boundary (``billcore/server/wire_errors.py``) and the domain
(``billcore/billing/tariffs.py``) name the field in their messages; the
answer is read off the violation's detail, column or constraint name, and
only lower-case identifiers pass.
"""

from __future__ import annotations

import re

import asyncpg

__all__ = ["constraint_field"]

_KEY_COLUMNS = re.compile(r"Key \(([a-z_, ]+)\)")


def constraint_field(exc: asyncpg.PostgresError) -> str:
    """The field a constraint is about, read off its name or detail ('' if unsure).

    Only lower-case identifiers pass: nothing the client sent is echoed."""
    detail = getattr(exc, "detail", None) or ""
    m = _KEY_COLUMNS.search(detail)
    if m:
        return m.group(1)
    column = getattr(exc, "column_name", None) or ""
    if re.fullmatch(r"[a-z_]+", column):
        return column
    constraint = getattr(exc, "constraint_name", None) or ""
    table = getattr(exc, "table_name", None) or ""
    if table and constraint.startswith(table + "_"):
        name = constraint[len(table) + 1:]
        for suffix in ("_check", "_key", "_fkey", "_excl"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if re.fullmatch(r"[a-z_]+", name):
            return name
    return ""
