"""The values of the RADIUS domain: requests in, decisions and rows out.

Every record is a frozen dataclass; the URFA call module
(``billcore.api.radius``) turns maps into records with ``read_access_request``
and ``read_accounting_record`` (which refuse what the radius process could not
have built) and records back into maps with their ``wire()`` methods.  The
string families the wire carries (methods, statuses, refusals, NAS modes,
end reasons) are ``StrEnum``s whose values are the wire values.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from billcore.billing.blocks import BlockChange
from billcore.billing.ledger_errors import InvalidValue

__all__ = [
    "AccessRequest", "AccountingRecord", "AccountingResult", "AcctStatus", "ActiveSession", "AuthMethod", "Chap",
    "MSCHAP_CHALLENGE_LENGTH", "MSCHAP_RESPONSE_LENGTH",
    "Decision", "DisconnectMode", "EndReason", "Link", "Malformed", "Nas", "Pool", "Refusal", "ReplyValue",
    "SessionHook", "read_access_request", "read_accounting_record", "MAX_LOGIN", "MAX_EVENT_TIME",
]

MAX_LOGIN: Final = 253  # the longest User-Name an attribute can carry
MAX_TEXT: Final = 253   # the longest text attribute
MAX_EVENT_TIME: Final = 2**40   # seconds since 1970: far beyond any clock, inside a datetime
MSCHAP_CHALLENGE_LENGTH: Final = 16   # MS-CHAP-Challenge (RFC 2548 s.2.3.2)
MSCHAP_RESPONSE_LENGTH: Final = 50    # MS-CHAP2-Response: Ident Flags Peer-Challenge(16) Reserved(8) NT-Response(24)


class AuthMethod(enum.StrEnum):
    """How an Access-Request proves its password."""

    PAP = "pap"
    CHAP = "chap"
    MSCHAPV2 = "mschapv2"   # MS-CHAP-Challenge + MS-CHAP2-Response (RFC 2759, RFC 2548)
    NONE = "none"   # neither attribute: always refused


class Refusal(enum.StrEnum):
    """Why an Access-Request is rejected (also its Reply-Message)."""

    NO_LOGIN = "no login"
    MALFORMED_LOGIN = "malformed login"
    MALFORMED_PASSWORD = "malformed password"
    MALFORMED_CHAP = "malformed CHAP"
    MALFORMED_MSCHAP = "malformed MS-CHAP"
    WRONG_PASSWORD = "wrong login or password"
    DISABLED = "service disabled"
    BLOCKED = "account blocked"
    TOO_MANY_SESSIONS = "too many sessions"
    POOL_EXHAUSTED = "IP pool exhausted"
    SEVERAL_TIME_SERVICES = "tariff has several time services"
    NO_TIME_PRICE = "no time price now"
    NO_MONEY_FOR_TIME = "no money left for time"


class AcctStatus(enum.StrEnum):
    """Acct-Status-Type values billcore acts on (others are answered ``ignored``)."""

    START = "start"
    INTERIM = "interim"
    STOP = "stop"
    ON = "on"     # Accounting-On: the NAS (re)started, its sessions are gone
    OFF = "off"   # Accounting-Off


SESSION_STATUSES: Final = frozenset({AcctStatus.START, AcctStatus.INTERIM, AcctStatus.STOP})
_KNOWN_STATUSES: Final = frozenset(status.value for status in AcctStatus)


class DisconnectMode(enum.StrEnum):
    """What the radius process sends to end a session on a NAS."""

    DISCONNECT = "disconnect"   # Disconnect-Request
    COA = "coa"                 # CoA-Request moving the session to the NAS's blocked profile


class EndReason(enum.StrEnum):
    """``radius_sessions.end_reason`` when billcore, not a Stop, ends a session
    (a Stop records ``stop:<Acct-Terminate-Cause>``)."""

    NAS_DELETED = "nas-deleted"
    LINK_DELETED = "link-deleted"
    STALE = "stale"
    ACCOUNTING_ON = "accounting-on"
    ACCOUNTING_OFF = "accounting-off"

    @staticmethod
    def stop(terminate_cause: int) -> str:
        return f"stop:{terminate_cause}"


# -- authorization ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chap:
    """CHAP-Password split (RFC 1994): identifier, challenge, 16-octet response."""

    ident: int
    challenge: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class AccessRequest:
    login: str
    method: AuthMethod
    password: bytes = b""      # PAP: the unhidden User-Password
    chap: Chap | None = None   # CHAP
    mschap_challenge: bytes = b""   # MS-CHAPv2: the authenticator challenge, 16 octets
    mschap_response: bytes = b""    # MS-CHAPv2: MS-CHAP2-Response as on the wire, 50 octets


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that cannot be decided: it is refused alone, not with its batch."""

    refusal: Refusal


def read_access_request(raw: Mapping[str, Any]) -> AccessRequest | Malformed:
    """The request of a ``radius.authorize`` map, or why it cannot be decided.
    Checked before the batch's query: a NUL in a login makes PostgreSQL
    refuse the whole query."""
    login = raw.get("login")
    if not isinstance(login, str) or not login:
        return Malformed(Refusal.NO_LOGIN)
    if "\0" in login or len(login) > MAX_LOGIN:
        return Malformed(Refusal.MALFORMED_LOGIN)
    method = raw.get("method")
    if method == AuthMethod.PAP:
        password = raw.get("password")
        if not isinstance(password, bytes):
            return Malformed(Refusal.MALFORMED_PASSWORD)
        return AccessRequest(login, AuthMethod.PAP, password=password)
    if method == AuthMethod.CHAP:
        chap = raw.get("chap")
        if not (isinstance(chap, dict) and isinstance(chap.get("id"), int)
                and isinstance(chap.get("challenge"), bytes) and len(chap["challenge"]) >= 5
                and isinstance(chap.get("response"), bytes) and len(chap["response"]) == 16):
            return Malformed(Refusal.MALFORMED_CHAP)
        return AccessRequest(login, AuthMethod.CHAP, chap=Chap(chap["id"], chap["challenge"], chap["response"]))
    if method == AuthMethod.MSCHAPV2:
        challenge, response = raw.get("mschap_challenge"), raw.get("mschap_response")
        if not (isinstance(challenge, bytes) and len(challenge) == MSCHAP_CHALLENGE_LENGTH
                and isinstance(response, bytes) and len(response) == MSCHAP_RESPONSE_LENGTH):
            return Malformed(Refusal.MALFORMED_MSCHAP)
        return AccessRequest(login, AuthMethod.MSCHAPV2, mschap_challenge=challenge, mschap_response=response)
    return AccessRequest(login, AuthMethod.NONE)   # no proof: refused as a wrong password


# bytes: MS-CHAP2-Success, MS-CHAP-Error and the MPPE keys (in clear: the radius edge encrypts them)
ReplyValue = str | int | bytes


@dataclass(frozen=True, slots=True)
class Decision:
    """An Access-Accept (with its reply attributes) or an Access-Reject."""

    accept: bool
    reply: tuple[tuple[str, ReplyValue], ...]
    account_id: int | None = None    # accepted
    reason: Refusal | None = None    # rejected

    @classmethod
    def reject(cls, reason: Refusal) -> Decision:
        return cls(False, (("Reply-Message", reason.value),), reason=reason)

    def attribute(self, name: str) -> ReplyValue | None:
        """The first value of reply attribute ``name``."""
        return next((value for key, value in self.reply if key == name), None)

    def wire(self) -> dict[str, Any]:
        reply = [[key, value] for key, value in self.reply]
        if self.accept:
            return {"accept": True, "account_id": self.account_id, "reply": reply}
        assert self.reason is not None, "a rejection says why"
        return {"accept": False, "reason": self.reason.value, "reply": reply}


# -- accounting -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountingRecord:
    """An Accounting-Request as the radius process reports it
    (``radius.requests.accounting_record``)."""

    nas: str                           # the NAS's IP address
    status: AcctStatus | str           # str: a status billcore does not act on, answered ``ignored``
    session_id: str | None = None
    login: str | None = None
    nas_port_id: str | None = None
    calling_station_id: str | None = None
    multi_session_id: str | None = None
    framed_ip: str | None = None
    session_time: int = 0
    input_octets: int = 0
    output_octets: int = 0
    input_packets: int = 0
    output_packets: int = 0
    terminate_cause: int = 0
    event_time: float | None = None    # seconds since 1970; None: when it arrived
    ipv6_prefixes: tuple[str, ...] = ()  # Framed-IPv6-Prefix, Delegated-IPv6-Prefix as CIDR text


_RECORD_TEXT = ("login", "nas_port_id", "calling_station_id", "multi_session_id")
_RECORD_COUNTS = ("session_time", "input_octets", "output_octets", "input_packets", "output_packets",
                  "terminate_cause")


MAX_PREFIXES: Final = 8
"""IPv6 prefixes one accounting record may bind (a NAS sends one or two)."""


def _ipv6_prefix(value: object) -> str:
    """An IPv6 prefix as CIDR text with its host bits zero ("2001:db8:1::/64")."""
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError(value)
        network = ipaddress.IPv6Network(value, strict=False)
    except ValueError:
        raise InvalidValue("record.ipv6_prefixes must be IPv6 prefixes as CIDR text") from None
    return network.with_prefixlen


def _is_ip(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def read_accounting_record(raw: Mapping[str, Any]) -> AccountingRecord:
    """The record of a ``radius.accounting`` map; ``InvalidValue`` for one the
    radius process could not have built, before it reaches a query."""
    if not _is_ip(raw.get("nas")):
        raise InvalidValue("record.nas must be the NAS's IP address")
    status = raw.get("status")
    if not isinstance(status, str) or not 1 <= len(status) <= 32:
        raise InvalidValue("record.status must be an accounting status (start, interim, stop, on, off)")
    known = status in _KNOWN_STATUSES
    session_id = raw.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or len(session_id) > MAX_TEXT):
        raise InvalidValue("record.session_id must be text of at most 253 characters")
    if known and AcctStatus(status) in SESSION_STATUSES and not session_id:
        raise InvalidValue("record.session_id is required for start, interim and stop")
    for name in _RECORD_TEXT:
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise InvalidValue(f"record.{name} must be text of at most 253 characters")
    for name in _RECORD_COUNTS:
        value = raw.get(name)
        if value is not None and (type(value) is not int or not 0 <= value < 2**63):
            raise InvalidValue(f"record.{name} must be a non-negative int")
    event_time = raw.get("event_time")
    if event_time is not None and (type(event_time) not in (int, float) or not 0 <= event_time <= MAX_EVENT_TIME):
        raise InvalidValue("record.event_time must be seconds since 1970")
    framed_ip = raw.get("framed_ip")
    if framed_ip is not None and not _is_ip(framed_ip):
        raise InvalidValue("record.framed_ip must be an IP address")
    prefixes = raw.get("ipv6_prefixes") or []
    if not isinstance(prefixes, list | tuple) or len(prefixes) > MAX_PREFIXES:
        raise InvalidValue(f"record.ipv6_prefixes must be a list of at most {MAX_PREFIXES} IPv6 prefixes")
    ipv6 = tuple(dict.fromkeys(_ipv6_prefix(prefix) for prefix in prefixes))
    return AccountingRecord(
        nas=raw["nas"], status=AcctStatus(status) if known else status, session_id=session_id or None,
        login=raw.get("login"), nas_port_id=raw.get("nas_port_id"),
        calling_station_id=raw.get("calling_station_id"), multi_session_id=raw.get("multi_session_id"),
        framed_ip=framed_ip or None, event_time=float(event_time) if event_time else None, ipv6_prefixes=ipv6,
        **{name: raw.get(name) or 0 for name in _RECORD_COUNTS})


@dataclass(frozen=True, slots=True)
class SessionHook:
    """A plugin event about a session (``session.started``/``session.stopped``),
    fired by the caller after the commit."""

    event: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AccountingResult:
    """What applying one Accounting-Request did.  Exactly one of ``session``,
    ``closed`` and ``ignored`` is set."""

    session: int | None = None         # the session the record belongs to
    ended: bool = False                # it had ended before (a late or repeated Stop)
    closed: int | None = None          # Accounting-On/Off: sessions ended
    ignored: str | None = None         # why nothing was done
    block_changes: tuple[BlockChange, ...] = ()   # announced after the commit
    hooks: tuple[SessionHook, ...] = ()

    def wire(self) -> dict[str, Any]:
        if self.closed is not None:
            return {"closed": self.closed}
        if self.ignored is not None:
            return {"ignored": self.ignored}
        if self.ended:
            return {"session": self.session, "ended": True}
        return {"session": self.session}


# -- the admin tables -------------------------------------------------------------


class _PlainRow:
    """A row whose wire map is its fields, enums as their values."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def wire(self) -> dict[str, Any]:
        values = ((name, getattr(self, name)) for name in self.__dataclass_fields__)
        return {name: value.value if isinstance(value, enum.Enum) else value for name, value in values}


@dataclass(frozen=True, slots=True)
class Nas(_PlainRow):
    id: int
    name: str
    address: str
    require_message_authenticator: bool
    coa_port: int
    disconnect_mode: DisconnectMode
    blocked_profile: list[list[Any]]   # [[attribute, value], …] of a CoA to the blocked profile
    secret: bytes | None = None        # only for the radius process

    def wire(self) -> dict[str, Any]:
        out = _PlainRow.wire(self)
        if self.secret is None:
            del out["secret"]   # not even as nil: the map of an admin's nas_show
        return out


@dataclass(frozen=True, slots=True)
class Pool(_PlainRow):
    id: int
    name: str
    first: str
    last: str
    size: int
    leased: int


@dataclass(frozen=True, slots=True)
class Link(_PlainRow):
    """An account's RADIUS login, without its password."""

    id: int
    account_id: int
    login: str
    static_ip: str | None
    pool: str | None
    max_sessions: int
    session_limit: int | None
    interim_interval: int
    rate_limit: str
    cisco_avpairs: list[str]
    disabled: bool


@dataclass(frozen=True, slots=True)
class ActiveSession(_PlainRow):
    """An active session with what a Disconnect/CoA to its NAS needs."""

    id: int
    session_id: str
    login: str
    framed_ip: str | None
    account_id: int
    started_at: dt.datetime
    session_time: int
    input_octets: int
    output_octets: int
    nas_ip: str
    coa_port: int
    disconnect_mode: DisconnectMode
    blocked_profile: list[list[Any]]


@dataclass(frozen=True, slots=True)
class LinkState:
    """A link as authorization reads it: the link, its account's money and
    state, and the time services of the tariff in force (``authorize``)."""

    id: int
    account_id: int
    login: str
    password_enc: bytes
    static_ip: str | None
    pool_id: int | None
    max_sessions: int
    session_limit: int | None
    interim_interval: int
    rate_limit: str
    cisco_avpairs: list[str]
    disabled: bool
    balance: int
    credit: int
    unlimited: bool
    status: str                       # the account's status ("active" may go online)
    blocked: bool                     # the account has an active block
    active: int                       # the link's active sessions
    time_services: list[int] | None   # None: not time-based
    time_max_sessions: int | None
    time_session_limit: int | None
