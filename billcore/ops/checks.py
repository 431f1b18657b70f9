"""Operator checks that ``billcore verify`` runs beside the ledger's own.

* ``ip_overlap``     no two IP bindings overlap in address and time (the
                     exclusion constraint should make it impossible: this
                     also reports the constraint missing)
* ``counters``       per account, the usage counters' ``charged`` equals
                     the usage charges in the ledger (rows keyed ``usage:…``
                     net of their reversals): counters and money agree
* ``watermark``      every ingest watermark is a sane offset, and — with a
                     state file — none went backwards since the previous
                     run, and none disappeared (a worker would replay its
                     whole journal against a restored older database)

Each is one set-based query (sorts and an equi-join for ``ip_overlap``,
one hash aggregate over the ledger for ``counters``), so
they finish in minutes on a million subscribers and a hundred million
ledger rows.  Each returns ``billcore.billing.verify.Problem`` values; an empty list is a
clean bill.  Queries run in the caller's snapshot when it has a
transaction open, else in one REPEATABLE READ snapshot of their own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from billcore.billing.verify import CHECK_TIMEOUT, MAX_REPORTED, WORK_MEM, CheckTimer, Problem, Progress
from billcore.db.rows import DbConnection

__all__ = ["extra_checks", "WATERMARK_STATE"]

WATERMARK_STATE = "verify-watermarks.json"
_FUTURE_SLACK = dt.timedelta(minutes=5)
_MAX_REPORTED = MAX_REPORTED

# A pair-wise join of a million bindings never ends, and probing the
# exclusion constraint's GiST index once per binding is no better at scale
# (100,000 /32s took over a minute: inet GiST pages overlap heavily).  CIDR
# prefixes overlap only when one holds the other, so sorts and an equi-join
# find every pair, O(n log n), with or without the constraint:
# * the same prefix: sorted by start, a row overlaps an earlier one when it
#   starts before the latest end seen so far (a window);
# * nested prefixes: each binding's prefix cut to every shorter mask length
#   in use is hash-joined to the bindings of exactly that prefix.
_IP_OVERLAP = """
WITH same AS (
    SELECT lag(id) OVER w AS a_id, lag(account_id) OVER w AS a_account, prefix::text AS a_prefix,
           id AS b_id, account_id AS b_account, prefix::text AS b_prefix, valid_from,
           max(coalesce(valid_to, 'infinity')) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS covered_until
    FROM ip_bindings WINDOW w AS (PARTITION BY prefix ORDER BY valid_from, id)
), lens AS (
    SELECT DISTINCT family(prefix) AS family, masklen(prefix) AS len FROM ip_bindings
)
SELECT a_id, a_account, a_prefix, b_id, b_account, b_prefix FROM same WHERE covered_until > valid_from
UNION ALL
SELECT a.id, a.account_id, a.prefix::text, b.id, b.account_id, b.prefix::text
FROM ip_bindings b
JOIN lens l ON l.family = family(b.prefix) AND l.len < masklen(b.prefix)
JOIN ip_bindings a ON a.prefix = set_masklen(b.prefix, l.len)
WHERE tstzrange(a.valid_from, a.valid_to) && tstzrange(b.valid_from, b.valid_to)
ORDER BY 1, 4 LIMIT $1"""

_EXCLUSION = """
SELECT count(*) FROM pg_constraint
WHERE conrelid = 'ip_bindings'::regclass AND contype = 'x' AND convalidated"""

# usage charges per account in one scan of the ledger (a hash aggregate),
# plus the reversals of usage rows, found through the ``reverses`` index
_COUNTERS = """
WITH counted AS (
    SELECT account_id, sum(charged) AS charged FROM usage_counters GROUP BY account_id
), booked AS (
    SELECT account_id, sum(charged) AS charged FROM (
        SELECT account_id, -sum(amount) AS charged FROM ledger
        WHERE idem_key LIKE 'usage:%' GROUP BY account_id
        UNION ALL
        SELECT r.account_id, -r.amount FROM ledger r JOIN ledger o ON o.id = r.reverses
        WHERE r.reverses IS NOT NULL AND o.idem_key LIKE 'usage:%' AND r.idem_key NOT LIKE 'usage:%'
    ) u GROUP BY account_id
)
SELECT coalesce(c.account_id, b.account_id) AS account_id,
       coalesce(c.charged, 0) AS counted, coalesce(b.charged, 0) AS booked
FROM counted c FULL JOIN booked b ON b.account_id = c.account_id
WHERE coalesce(c.charged, 0) <> coalesce(b.charged, 0)
ORDER BY 1 LIMIT $1"""


async def _ip_overlap(conn: DbConnection) -> list[Problem]:
    problems = []
    if not await conn.fetchval(_EXCLUSION):
        problems.append(Problem("ip_overlap", None, "the no-overlap exclusion constraint on ip_bindings is missing"))
    for row in await conn.fetch(_IP_OVERLAP, _MAX_REPORTED, timeout=CHECK_TIMEOUT):
        problems.append(Problem("ip_overlap", row["a_account"],
                                f"binding {row['a_id']} ({row['a_prefix']}) overlaps binding {row['b_id']}"
                                f" ({row['b_prefix']}, account {row['b_account']}) in time"))
    return problems


async def _counters(conn: DbConnection) -> list[Problem]:
    return [Problem("counters", row["account_id"],
                    f"usage counters say {row['counted']} charged, the ledger has {row['booked']}")
            for row in await conn.fetch(_COUNTERS, _MAX_REPORTED, timeout=CHECK_TIMEOUT)]


def _read_state(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}


def _write_state(path: Path, state: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


async def _watermarks(conn: DbConnection, now: dt.datetime, state_file: Path | None) -> list[Problem]:
    from billcore.billing.usage import NO_WATERMARK

    rows = await conn.fetch("SELECT source, watermark, updated_at FROM ingest_watermarks ORDER BY source")
    problems = []
    current: dict[str, int] = {}
    for row in rows:
        current[row["source"]] = row["watermark"]
        if row["watermark"] < NO_WATERMARK:
            problems.append(Problem("watermark", None, f"{row['source']}: watermark {row['watermark']} is negative"))
        if row["updated_at"] > now + _FUTURE_SLACK:
            problems.append(Problem("watermark", None,
                                    f"{row['source']}: updated at {row['updated_at'].isoformat()}, in the future"))
    if state_file is None:
        return problems
    seen = _read_state(state_file)
    for source, previous in sorted(seen.items()):
        if source not in current:
            problems.append(Problem("watermark", None,
                                    f"{source}: watermark row disappeared (was {previous})"))
        elif current[source] < previous:
            problems.append(Problem("watermark", None,
                                    f"{source}: watermark went backwards, {previous} -> {current[source]}"
                                    " (a restored older database? the journal replays from here)"))
    # remember the highest value seen, so a regression keeps being reported until it is resolved
    merged = {**current, **{s: max(v, current.get(s, v)) for s, v in seen.items()}}
    _write_state(state_file, merged)
    return problems


async def _run(conn: DbConnection, now: dt.datetime, state_file: Path | None,
               progress: Progress | None) -> list[Problem]:
    timer = CheckTimer(progress)
    await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
    problems: list[Problem] = []
    async with timer("ip_overlap"):
        problems += await _ip_overlap(conn)
    async with timer("counters"):
        problems += await _counters(conn)
    async with timer("watermark"):
        problems += await _watermarks(conn, now, state_file)
    return problems


async def extra_checks(conn: DbConnection, *, state_file: Path | None = None,
                       now: dt.datetime | None = None, progress: Progress | None = None) -> list[Problem]:
    """The operator checks; ``state_file`` keeps the last watermarks seen
    (``<data_dir>/verify-watermarks.json`` from ``billcore verify``);
    ``progress(check, seconds)`` after each check."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if conn.is_in_transaction():
        return await _run(conn, now, state_file, progress)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _run(conn, now, state_file, progress)
