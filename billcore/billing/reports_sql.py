"""The operator reports' statements and the small pure rules around them.

Theory of operation
-------------------
Every report is one set-based statement that PostgreSQL runs over the whole
range: nothing is fetched into a list to be summed in Python. The call
layer (``billcore.api.report_calls``) reads each statement through a
server-side cursor and streams its rows in chunks, so memory stays flat
whether the range holds a hundred rows or ten million.

Revenue (``CHARGES`` and what is built on it) counts each charge once:
a row of ``periodic_charges`` (a service period), ``usage_counters`` (an
account's accounting period, cumulative) or ``once_charges``, under the
tariff of the account's link that includes its service and was in force
during its period (the latest such link). A charge is *final* once it can no
longer change: a periodic charge whose period ended before the scheduler's
last run, usage of a closed accounting period (its ``period_summaries`` row
exists), a once-off fee at once. The rest is *provisional*: the open
periods' charges so far. ``reports.revenue`` and ``reports.revenue_daily``
share this text, so their totals agree to the micro-unit.

Group keys are chosen from fixed tables (`REVENUE_GROUPS`,
`PAYMENT_GROUPS`): a caller's word selects a fragment, never becomes SQL.

The pure parts (`parse_day`, `parse_month`, `month_starts`, `bucket_of`,
`average`) take no I/O and raise `InvalidValue` (code ``billing.invalid``)
for anything a caller got wrong.
"""

from __future__ import annotations

from datetime import date, datetime, time, tzinfo
from typing import Final

from billcore.billing.ledger_errors import InvalidValue

__all__ = [
    "AGING", "ARPU_SQL", "CHARGES", "CHURN_SQL", "DEBTORS_SQL", "MAX_DAYS", "MAX_MONTHS", "PAYMENTS_SQL",
    "PAYMENT_GROUPS", "REVENUE_DAILY_SQL", "REVENUE_GROUPS", "REVENUE_SQL", "TARIFF_OF", "TRAFFIC_TOP_SQL",
    "average", "bucket_of", "day_range", "local_midnight", "month_starts", "next_month", "parse_day", "parse_month",
]

MAX_DAYS: Final = 3660
"""The longest range of a report read from the database (ten years)."""

MAX_MONTHS: Final = 120
"""The most months a churn report covers."""

AGING: Final = (("0-30", 0, 30), ("31-60", 31, 60), ("61-90", 61, 90), ("90+", 91, None))
"""The debtors' aging buckets: (name, first day, last day or None), by whole days in debt."""

# ---------------------------------------------------------------------------------------------------------------
# Revenue: every charge of [$1, $2) ($3: now, the end of an open usage period), with whether it is final.
CHARGES: Final = """
run AS (SELECT coalesce(max(last_now), '-infinity'::timestamptz) AS at FROM periodic_runs),
c AS (
    SELECT p.account_id, p.service_id, p.period_start AS since, p.period_end AS until, NULL::bigint AS link_id,
           'periodic' AS kind, p.charged AS amount, p.period_end <= run.at AS final
      FROM periodic_charges p, run WHERE p.period_start >= $1 AND p.period_start < $2 AND p.charged <> 0
    UNION ALL
    SELECT u.account_id, u.service_id, u.period_start, coalesce(s.period_end, $3), NULL,
           'usage', u.charged, s.account_id IS NOT NULL
      FROM usage_counters u LEFT JOIN period_summaries s ON s.account_id = u.account_id
           AND s.period_start = u.period_start
     WHERE u.period_start >= $1 AND u.period_start < $2 AND u.charged <> 0
    UNION ALL
    SELECT o.account_id, o.service_id, o.charged_at, o.charged_at, o.link_id, 'once', o.amount, true
      FROM once_charges o WHERE o.charged_at >= $1 AND o.charged_at < $2 AND o.amount <> 0
)
"""

# The tariff each charge of ``c`` was charged by: f.id/f.name (NULL: no link includes the service any more).
TARIFF_OF: Final = """
  LEFT JOIN LATERAL (
       SELECT t.tariff_id FROM account_tariffs t
         JOIN tariff_services ts ON ts.tariff_id = t.tariff_id AND ts.service_id = c.service_id
        WHERE t.account_id = c.account_id
          AND (t.id = c.link_id OR c.link_id IS NULL AND t.valid_from <= greatest(c.since, c.until - interval '1 microsecond')
               AND (t.valid_to IS NULL OR t.valid_to > c.since))
        ORDER BY t.valid_from DESC LIMIT 1) l ON true
  LEFT JOIN tariffs f ON f.id = l.tariff_id
"""

# Per tariff and kind/finality, per tariff, and in all, from one scan (GROUPING SETS); reports.revenue.
REVENUE_SQL: Final = "WITH " + CHARGES + """
SELECT f.id AS tariff_id, f.name, c.kind, c.final, coalesce(sum(c.amount), 0) AS amount,
       count(DISTINCT c.account_id) AS accounts,
       GROUPING(c.kind, c.final) = 3 AS tariff_total, GROUPING(f.id, f.name) = 3 AS grand_total
  FROM c""" + TARIFF_OF + """
 GROUP BY GROUPING SETS ((f.id, f.name, c.kind, c.final), (f.id, f.name), ())
"""

# reports.revenue_daily's group key (id, name) per group word; $4 is the installation's time zone name.
REVENUE_GROUPS: Final = {
    "day": ("NULL::bigint", "to_char((c.since AT TIME ZONE $4)::date, 'YYYY-MM-DD')"),
    "service": ("c.service_id", "coalesce(s.name, '(service ' || c.service_id || ')')"),
    "tariff": ("f.id", "coalesce(f.name, '(no tariff)')"),
}


def REVENUE_DAILY_SQL(group: str) -> str:  # noqa: N802 - a statement, named like the others
    """Revenue per day (the local day a charge's period starts, a once-off fee's booking day), service or
    tariff: ``key_id, key, accounts, final, provisional, amount, periodic, usage, once``, ordered by key."""
    key_id, key = REVENUE_GROUPS[group]
    return "WITH " + CHARGES + f"""
SELECT {key_id} AS key_id, {key} AS key, count(DISTINCT c.account_id) AS accounts,
       coalesce(sum(c.amount) FILTER (WHERE c.final), 0) AS final_amount,
       coalesce(sum(c.amount) FILTER (WHERE NOT c.final), 0) AS provisional_amount,
       sum(c.amount) AS amount,
       coalesce(sum(c.amount) FILTER (WHERE c.kind = 'periodic'), 0) AS periodic_amount,
       coalesce(sum(c.amount) FILTER (WHERE c.kind = 'usage'), 0) AS usage_amount,
       coalesce(sum(c.amount) FILTER (WHERE c.kind = 'once'), 0) AS once_amount
  FROM c""" + TARIFF_OF + """
  LEFT JOIN services s ON s.id = c.service_id
 GROUP BY 1, 2 ORDER BY 2, 1
"""


# ---------------------------------------------------------------------------------------------------------------
# Payments of [$1, $2): a payment counts when and by whom it was taken, a cancellation when and by whom it was
# cancelled (its amount taken back); $3 is the time zone name.
PAYMENT_GROUPS: Final = {
    "day": "to_char((e.at AT TIME ZONE $3)::date, 'YYYY-MM-DD')",
    "method": "e.method",
    "operator": "e.who",
}


def PAYMENTS_SQL(group: str) -> str:  # noqa: N802
    """``key, payments, paid, cancellations, cancelled, net`` per group key, ordered by key."""
    key = PAYMENT_GROUPS[group]
    return f"""
WITH e AS (
    SELECT created_at AS at, method, operator AS who, 1 AS n, amount, 0 AS cn, 0::bigint AS back
      FROM payments WHERE created_at >= $1 AND created_at < $2
    UNION ALL
    SELECT cancelled_at, method, cancelled_by, 0, 0::bigint, 1, amount
      FROM payments WHERE cancelled_at >= $1 AND cancelled_at < $2
)
SELECT {key} AS key, sum(e.n) AS payments, sum(e.amount) AS paid, sum(e.cn) AS cancellations,
       sum(e.back) AS cancelled, sum(e.amount) - sum(e.back) AS net
  FROM e GROUP BY 1 ORDER BY 1
"""


# ---------------------------------------------------------------------------------------------------------------
# Debtors at $1: each account's balance is its last ledger row's balance_after before $1 (the chain, in id
# order: one backward probe of ledger_account per account, not a scan of the whole ledger); a debtor's debt began
# at the first row after its last row with balance_after >= 0 (or its first row ever): the latest time its balance
# went from >= 0 to < 0. Age: whole days from then to $1.
DEBTORS_SQL: Final = """
SELECT a.id AS account_id, a.user_id, u.login, u.full_name, b.balance, a.credit, w.since,
       floor(extract(epoch FROM $1 - w.since) / 86400)::bigint AS days
  FROM accounts a
  CROSS JOIN LATERAL (
       SELECT l.balance_after AS balance FROM ledger l
        WHERE l.account_id = a.id AND l.created_at < $1 ORDER BY l.id DESC LIMIT 1) b
  JOIN users u ON u.id = a.user_id
  CROSS JOIN LATERAL (
       SELECT l.created_at AS since FROM ledger l
        WHERE l.account_id = a.id AND l.created_at < $1
          AND l.id > coalesce((SELECT max(p.id) FROM ledger p WHERE p.account_id = a.id
                                  AND p.created_at < $1 AND p.balance_after >= 0), 0)
        ORDER BY l.id LIMIT 1) w
 WHERE b.balance < 0
 ORDER BY a.id
"""


# ---------------------------------------------------------------------------------------------------------------
# ARPU of the month [$1, $2): per tariff, subscribers = accounts with a link to it in force at some time in the
# month and not closed before the month began; charged accounts and amounts as revenue counts them.
ARPU_SQL: Final = "WITH " + CHARGES + """,
closed AS (SELECT account_id, min(at) AS at FROM dunning_steps WHERE step = 'closed' GROUP BY account_id),
subs AS (
    SELECT t.tariff_id, count(DISTINCT t.account_id) AS subscribers
      FROM account_tariffs t JOIN accounts a ON a.id = t.account_id
      LEFT JOIN closed x ON x.account_id = t.account_id
     WHERE t.valid_from < $2 AND (t.valid_to IS NULL OR t.valid_to > $1) AND (x.at IS NULL OR x.at >= $1)
       AND (a.status = 'active' OR x.at IS NOT NULL)
     GROUP BY 1
),
rev AS (
    SELECT f.id AS tariff_id, count(DISTINCT c.account_id) AS charged, sum(c.amount) AS amount,
           coalesce(sum(c.amount) FILTER (WHERE c.final), 0) AS final_amount
      FROM c""" + TARIFF_OF + """
     GROUP BY 1
)
SELECT coalesce(r.tariff_id, s.tariff_id) AS tariff_id, coalesce(t.name, '(no tariff)') AS name,
       coalesce(s.subscribers, 0) AS subscribers, coalesce(r.charged, 0) AS charged,
       coalesce(r.amount, 0) AS amount, coalesce(r.final_amount, 0) AS final_amount
  FROM rev r FULL JOIN subs s ON s.tariff_id = r.tariff_id
  LEFT JOIN tariffs t ON t.id = coalesce(r.tariff_id, s.tariff_id)
 ORDER BY coalesce(r.tariff_id, s.tariff_id) NULLS LAST
"""


# ---------------------------------------------------------------------------------------------------------------
# Churn per month ($1: month starts, consecutive; $2: month ends). An account leaves when dunning closes it (the
# only way an account is closed; dunning_steps 'closed' dates it). It stayed blocked when an operator's or the
# system's block was active the whole month (set at or before its start, not lifted before its end) and it did not
# leave by the end. A subscriber's own block (a holiday) is not churn.
#
# One pass over the accounts, whatever the number of months: width_bucket(t, $1) is how many month starts are at
# or before t, so the accounts opened (closed) before month i began are those whose bucket is below i, a running
# sum over at most 121 groups. Only blocks of 27 days or more can span a month; the rest never meet the months.
CHURN_SQL: Final = """
WITH m AS (SELECT * FROM unnest($1::timestamptz[], $2::timestamptz[]) WITH ORDINALITY AS m(start, stop, i)),
closed AS (SELECT account_id, min(at) AS at FROM dunning_steps WHERE step = 'closed' GROUP BY account_id),
acc AS (
    SELECT a.created_at, x.at AS closed_at FROM accounts a LEFT JOIN closed x ON x.account_id = a.id
     WHERE a.status = 'active' OR x.at IS NOT NULL
),
opened AS (SELECT width_bucket(created_at, $1::timestamptz[]) AS b, count(*) AS n FROM acc GROUP BY 1),
shut AS (SELECT width_bucket(closed_at, $1::timestamptz[]) AS b, count(*) AS n FROM acc
          WHERE closed_at IS NOT NULL GROUP BY 1),
long AS (
    SELECT b.account_id, b.set_at, b.lifted_at FROM blocks b
     WHERE b.kind IN ('admin', 'system') AND b.set_at <= $1[cardinality($1)]
       AND (b.lifted_at IS NULL OR b.lifted_at >= $1[1] AND b.lifted_at - b.set_at >= interval '27 days')
),
blocked AS (
    SELECT m.i, count(DISTINCT l.account_id) AS n
      FROM m JOIN long l ON l.set_at <= m.start AND (l.lifted_at IS NULL OR l.lifted_at >= m.stop)
      LEFT JOIN closed x ON x.account_id = l.account_id
     WHERE x.at IS NULL OR x.at >= m.stop
     GROUP BY m.i
)
SELECT m.start,
       coalesce((SELECT sum(n) FROM opened WHERE b < m.i), 0)
         - coalesce((SELECT sum(n) FROM shut WHERE b < m.i), 0) AS active,
       (SELECT count(*) FROM closed x WHERE x.at >= m.start AND x.at < m.stop) AS left_,
       coalesce(k.n, 0) AS blocked
  FROM m LEFT JOIN blocked k ON k.i = m.i
 ORDER BY m.start
"""


# ---------------------------------------------------------------------------------------------------------------
# The top $4 accounts per class by volume over the local days [$1, $2) of usage_daily ($3: one class or NULL).
TRAFFIC_TOP_SQL: Final = """
WITH per AS (
    SELECT d.class_id, d.account_id, sum(d.quantity) AS quantity, sum(d.amount) AS amount,
           row_number() OVER (PARTITION BY d.class_id ORDER BY sum(d.quantity) DESC, d.account_id) AS rank
      FROM usage_daily d
     WHERE d.day >= $1 AND d.day < $2 AND ($3::bigint IS NULL OR d.class_id = $3)
     GROUP BY d.class_id, d.account_id
)
SELECT p.class_id, coalesce(k.name, CASE WHEN p.class_id = -1 THEN '(session time)' ELSE '(class ' || p.class_id || ')' END),
       p.rank, p.account_id, u.login, p.quantity, p.amount
  FROM per p JOIN accounts a ON a.id = p.account_id JOIN users u ON u.id = a.user_id
  LEFT JOIN traffic_classes k ON k.id = p.class_id
 WHERE p.rank <= $4
 ORDER BY p.class_id, p.rank
"""


# ---------------------------------------------------------------------------------------------------------------
def parse_day(value: object, what: str) -> date:
    """An ISO date ("YYYY-MM-DD") from outside."""
    if type(value) is not str:
        raise InvalidValue(f"{what} must be an ISO date string (YYYY-MM-DD)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidValue(f"{what} is not an ISO date (YYYY-MM-DD)") from None


def parse_month(value: object, what: str) -> date:
    """The first day of a month given as "YYYY-MM" (or any ISO date in it)."""
    if type(value) is not str:
        raise InvalidValue(f"{what} must be a month (YYYY-MM)")
    try:
        day = date.fromisoformat(value + "-01" if len(value) == 7 else value)
    except ValueError:
        raise InvalidValue(f"{what} is not a month (YYYY-MM)") from None
    return day.replace(day=1)


def day_range(since: object, until: object, max_days: int = MAX_DAYS) -> tuple[date, date]:
    """[since, until) as dates, since < until, at most ``max_days`` days."""
    first, last = parse_day(since, "since"), parse_day(until, "until")
    if not first < last:
        raise InvalidValue("since must be before until")
    if (last - first).days > max_days:
        raise InvalidValue(f"the range is longer than {max_days} days")
    return first, last


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def month_starts(first: date, stop: date) -> list[date]:
    """The first days of the months from ``first``'s up to (excluding) the one ``stop`` begins, at most
    `MAX_MONTHS`."""
    out: list[date] = []
    day = first.replace(day=1)
    while day < stop:
        if len(out) >= MAX_MONTHS:
            raise InvalidValue(f"at most {MAX_MONTHS} months")
        out.append(day)
        day = next_month(day)
    return out


def local_midnight(day: date, tz: tzinfo) -> datetime:
    """The instant a local day begins in ``tz``."""
    return datetime.combine(day, time(), tzinfo=tz)


def bucket_of(days: int) -> str:
    """The aging bucket of a debt ``days`` whole days old."""
    for name, _first, last in AGING:
        if last is None or days <= last:
            return name
    raise AssertionError("the last bucket is open")


def average(amount: int, count: int) -> int:
    """``amount / count`` in micro-units, rounded half away from zero (0 when nothing is counted)."""
    if count <= 0:
        return 0
    q, r = divmod(abs(amount), count)
    q += 2 * r >= count
    return q if amount >= 0 else -q
