"""Apply an account's current rate to its open sessions: CoA, or Disconnect when refused.

Theory of operation
-------------------
The outbox's ``radius`` channel delivers ``{"action": "rate", "account_id"}``
after a rate event (``billcore.billing.fup.RATE_EVENTS``: a quota reached, a
period's restore, a dunning throttle or its end).  The message carries no
rate: ``apply_rate`` asks the core what is true *now* (``radius.rate_state``:
per open session its NAS, the session's identification and the attributes),
so a throttle and its restore delivered in any order, or twice, end in the
same state.

Per session, one CoA-Request (RFC 5176) with the session's identification
(``coa.session_attributes``) and the rate attributes.  When the NAS answers
CoA-NAK — or the core has no attributes to send it (a Cisco NAS without
AV-pairs for the link's own rate) — and the NAS's ``coa_nak_action`` is
``disconnect``, a Disconnect-Request follows: the subscriber reconnects and
Access-Accept gives the right rate.  With ``none``, the session keeps its
rate until it ends.

``apply_rate`` answers True when every session was handled (ACKed, or
NAKed and disconnected or left alone as configured); False makes the outbox
retry the delivery later (a NAS that did not answer, a NAS not in the
table, the core away).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from urfa.link import Link

from .coa import CoaTimeout, send_dynauth, session_attributes
from .process import RadiusSettings, core_call
from .server import DecisionUnavailable, NasTable, RadiusError

__all__ = ["apply_rate", "apply_session_rate"]

log = logging.getLogger(__name__)


async def apply_session_rate(session: dict[str, Any], table: NasTable, settings: RadiusSettings,
                             dictionary: Any) -> bool:
    """One session of a ``radius.rate_state`` answer: CoA, then Disconnect if refused and so configured."""
    nas = table.get(session["nas_ip"])
    if nas is None:
        log.warning("session %s: NAS %s is not in the table; rate not applied", session["session_id"],
                    session["nas_ip"])
        return False
    ident = session_attributes(session)
    attrs = [(str(name), value) for name, value in session.get("attributes") or []]
    try:
        if attrs:
            result = await send_dynauth(nas.address, nas.coa_port, nas.secret, "coa", ident + attrs, dictionary,
                                        timeout=settings.coa_timeout, retries=settings.coa_retries)
            if result.acked:
                log.info("rate applied", extra={"session": session["session_id"], "nas": nas.address,
                                                "profile": session.get("profile", "")})
                return True
            log.warning("CoA of session %s refused by %s (Error-Cause %s)", session["session_id"], nas.address,
                        result.error_cause)
        if session.get("coa_nak_action", "disconnect") != "disconnect":
            return True   # configured to leave the session as it is: handled
        result = await send_dynauth(nas.address, nas.coa_port, nas.secret, "disconnect", ident, dictionary,
                                    timeout=settings.coa_timeout, retries=settings.coa_retries)
    except (CoaTimeout, OSError) as exc:
        log.warning("rate of session %s: %s", session["session_id"], exc)
        return False
    if not result.acked:
        # Session-Context-Not-Found: the session is gone already, nothing left to limit
        log.warning("Disconnect of session %s refused by %s (Error-Cause %s)", session["session_id"],
                    nas.address, result.error_cause)
    return True


async def apply_rate(link: Link, account_id: int, table: NasTable, settings: RadiusSettings,
                     dictionary: Any) -> bool:
    """Apply the account's current rate to every open session; True when every one was handled."""
    try:
        sessions = await core_call(link, "radius.rate_state", {"account_id": account_id}, timeout=10.0)
    except (DecisionUnavailable, RadiusError) as exc:
        log.warning("radius.rate_state of account %s: %s", account_id, exc)
        return False
    if not sessions:
        return True
    done = await asyncio.gather(*(apply_session_rate(s, table, settings, dictionary) for s in sessions))
    return all(done)
