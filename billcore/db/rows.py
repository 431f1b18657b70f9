"""The connection type every query function takes, and the check for a row
that must exist.

asyncpg hands out two kinds of connection: one opened alone and one lent by a
pool (a proxy with the same methods, not a subclass), so query code takes
either.  ``fetchrow`` answers ``None`` for no row; where the query cannot
miss (an ``INSERT … RETURNING``, a row locked a moment ago) a missing row is
a broken invariant and stops the operation loudly instead of failing later
on ``None``.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from billcore.common.errors import InvariantViolation

__all__ = ["DbConnection", "expect_row"]

DbConnection: TypeAlias = asyncpg.Connection | PoolConnectionProxy


def expect_row(row: asyncpg.Record | None, what: str) -> asyncpg.Record:
    """``row``, which the query guarantees; ``what`` names it in the error."""
    if row is None:
        raise InvariantViolation(f"{what}: the query returned no row")
    return row
