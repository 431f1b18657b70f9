"""Subscribers' notification preferences: language and opt-outs, and which events are essential.

Theory of operation
-------------------
A subscriber receives every notification event on every channel we have an
address for, unless they opted out of (event, channel) — or of ('*',
channel), every event of it.  Essential events are sent whatever the
opt-outs say, because they explain a change of the service itself that the
subscriber would otherwise take for a fault:

* ``account.blocked``, ``account.unblocked`` — the service stops or resumes;
* ``dunning.throttled``, ``dunning.blocked``, ``dunning.closed`` — the
  service is slowed, cut or the contract closed for non-payment.

Not essential: ``payment.added`` (a receipt: the payment is on the office's
history page either way), ``balance.low``, ``balance.runout_soon``,
``dunning.grace`` (warnings a subscriber who pays by standing order may not
want), the FUP notices and ``invoice.issued``.

``set_prefs`` replaces a user's language and opt-outs in one transaction and
refuses an opt-out of an essential event (``billing.invalid``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from billcore.billing.ledger_errors import InvalidValue, UnknownUser
from billcore.billing.notify_templates import EVENTS, LANGS
from billcore.db.rows import DbConnection

__all__ = ["ESSENTIAL", "OPT_CHANNELS", "Prefs", "get_prefs", "set_prefs", "check_optouts"]

ESSENTIAL = frozenset({"account.blocked", "account.unblocked", "dunning.throttled", "dunning.blocked",
                       "dunning.closed"})
OPT_CHANNELS = ("email", "text")   # channels a subscriber can opt out of (text: every plugin's short messages)
MAX_OPTOUTS = 200


@dataclass(frozen=True, slots=True)
class Prefs:
    language: str                   # '' = the installation's
    optouts: tuple[tuple[str, str], ...]   # (event or '*', channel)
    email: str

    def wire(self) -> dict[str, Any]:
        return {"language": self.language, "email": self.email,
                "optouts": [{"event": e, "channel": c} for e, c in self.optouts],
                "events": [{"event": e, "essential": e in ESSENTIAL} for e in EVENTS],
                "channels": list(OPT_CHANNELS)}


def check_optouts(optouts: object) -> list[tuple[str, str]]:
    """Checked (event, channel) pairs from ``[{event, channel}]``; essential ones are refused."""
    if not isinstance(optouts, list) or len(optouts) > MAX_OPTOUTS:
        raise InvalidValue(f"optouts must be a list of at most {MAX_OPTOUTS} {{event, channel}} maps")
    out: list[tuple[str, str]] = []
    for item in optouts:
        if not isinstance(item, dict) or set(item) != {"event", "channel"}:
            raise InvalidValue("each opt-out is a map {event, channel}")
        event, channel = item["event"], item["channel"]
        if channel not in OPT_CHANNELS:
            raise InvalidValue(f"channel must be one of {', '.join(OPT_CHANNELS)}")
        if event != "*" and event not in EVENTS:
            raise InvalidValue("event must be '*' or a notification event (notify.templates_list names them)")
        if event in ESSENTIAL:
            raise InvalidValue(f"{event} is essential: it is always sent")
        out.append((event, channel))
    return sorted(set(out))


async def get_prefs(conn: DbConnection, user_id: int) -> Prefs:
    row = await conn.fetchrow(
        "SELECT u.language, u.email, coalesce((SELECT array_agg(o.event || ' ' || o.channel ORDER BY o.event, o.channel)"
        " FROM notify_optouts o WHERE o.user_id = u.id), '{}') AS optouts"
        " FROM users u WHERE u.id = $1 AND u.deleted_at IS NULL", user_id)
    if row is None:
        raise UnknownUser("this user no longer exists")
    pairs = tuple((p.split(" ")[0], p.split(" ")[1]) for p in row["optouts"])
    return Prefs(row["language"], pairs, row["email"])


async def set_prefs(conn: DbConnection, user_id: int, language: str | None,
                    optouts: Sequence[tuple[str, str]] | None) -> Prefs:
    """Replace what is given (``None``: leave it) inside the caller's transaction."""
    if language is not None:
        if language not in ("", *LANGS):
            raise InvalidValue(f"language must be '' (the installation's) or one of {', '.join(LANGS)}")
        done = await conn.execute("UPDATE users SET language = $2 WHERE id = $1 AND deleted_at IS NULL",
                                  user_id, language)
        if done.endswith(" 0"):
            raise UnknownUser("this user no longer exists")
    if optouts is not None:
        await conn.execute("DELETE FROM notify_optouts WHERE user_id = $1", user_id)
        await _insert(conn, user_id, optouts)
    return await get_prefs(conn, user_id)


async def _insert(conn: DbConnection, user_id: int, pairs: Iterable[tuple[str, str]]) -> None:
    pairs = list(pairs)
    if pairs:
        await conn.execute(
            "INSERT INTO notify_optouts (user_id, event, channel) SELECT $1, e, c FROM unnest($2::text[], $3::text[])"
            " AS t(e, c) ON CONFLICT DO NOTHING", user_id, [p[0] for p in pairs], [p[1] for p in pairs])
