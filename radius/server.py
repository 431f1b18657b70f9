"""The RADIUS server process: NAS datagrams in, core decisions out.

Theory of operation
-------------------
pyrad gives us the dictionary and the reply codec (Response Authenticator,
Message-Authenticator as the first attribute, Proxy-State handling).  The
transport is ours, on purpose:

* pyrad's ``ServerAsync`` binds with SO_REUSEPORT, so a second instance on
  the same port silently takes half the traffic.  ``bind_udp`` binds without
  SO_REUSEPORT/SO_REUSEADDR: a port already taken — by anyone, with or
  without reuse — fails start with ``PortInUse`` naming the port.
  With ``[radius] processes`` above 1 the supervisor binds the ports as one
  SO_REUSEPORT group instead (``billcore.common.udpgroup``: an exclusive
  probe first, then a check of the kernel's socket table for strangers) and
  hands each process its sockets (``listen_sockets``).
* pyrad's handlers are plain methods.  ``datagram_received`` here is plain
  too, and does only cheap, bounded work: size and framing check, NAS
  lookup, authenticator check (before any decoding), duplicate check
  (``DedupCache``), then it starts one asyncio task per new request.  At most
  ``max_inflight`` tasks run; a request over the cap is dropped and counted
  (the NAS retransmits).
* Status-Server (RFC 5997) is answered at once on both ports, never cached.
* A request comes in through an ``Endpoint`` and its reply goes back through
  it: a UDP port (``_Endpoint``) or a RadSec TLS stream (``radius.radsec``,
  kind "radsec", both request kinds on one stream, the NAS's secret replaced
  by "radsec").  ``receive`` is the same for both.
* Every decision is the ``Decider``'s (the core, over URFA).  When it is
  unreachable or slow, nothing is sent: the NAS retries or fails over, and
  the dedup entry is dropped so the retry is decided afresh (accounting is
  idempotent in the core).

Every drop is counted in ``billcore_radius_dropped{reason}``; a known NAS's
request dropped for its authenticity (no Message-Authenticator where it is
required, a wrong one, a wrong secret), and a request from an address that
is no NAS, is also said in the log, naming the NAS or address, at most once
a minute per address and reason (``notices``).  Every request
handed to the decider ends in ``billcore_radius_decisions{kind,outcome}`` and
its time from acceptance to reply (or to giving up) in
``billcore_radius_decision_seconds{kind}``; both are tallied in memory and
flushed each second, like the request and reply counters.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from pyrad.dictionary import Dictionary
from pyrad.packet import AccessAccept, AccessReject, AccountingResponse

from billcore.common.udpgroup import PortTaken, bind_exclusive

from .auth import (
    ACCESS_REQUEST,
    ACCOUNTING_REQUEST,
    MAX_PACKET,
    STATUS_SERVER,
    Header,
    MalformedPacket,
    message_authenticator_ok,
    parse_header,
    request_authenticator_ok,
)
from .dedup import DedupCache, DedupKey, Verdict
from .notices import DropNotices
from .replies import ReplyEncoder, finish_reply
from .requests import BadUserName, accounting_record, auth_request, raw_attributes

__all__ = [
    "Nas",
    "NasTable",
    "Decision",
    "Decider",
    "DecisionUnavailable",
    "Endpoint",
    "PortInUse",
    "RadiusServer",
    "bind_udp",
    "load_dictionary",
    "run",
]

log = logging.getLogger(__name__)

DICTIONARY_DIR = Path(__file__).parent / "dictionaries"

REQUESTS = Counter("billcore_radius_requests", "RADIUS requests accepted for processing, by kind", ["kind"])
DROPPED = Counter("billcore_radius_dropped", "RADIUS datagrams dropped without an answer, by reason", ["reason"])
DUPLICATES = Counter("billcore_radius_duplicates", "Retransmissions answered from the duplicate cache")
REFUSED = Counter("billcore_radius_refused", "Access-Requests rejected here without asking the core, by reason",
                  ["reason"])
REPLIES = Counter("billcore_radius_replies", "RADIUS replies sent, by code", ["code"])
DECISIONS = Counter("billcore_radius_decisions", "RADIUS requests the core was asked to decide, by kind"
                    " (auth, acct) and outcome (accept, reject, recorded; unavailable, malformed, error:"
                    " no reply)", ["kind", "outcome"])
# a NAS gives up on a server after a few seconds: the buckets resolve the
# sub-millisecond batches and end at the decision timeout
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DECISION_SECONDS = Histogram("billcore_radius_decision_seconds", "Seconds from accepting a RADIUS request"
                             " to its reply (or to giving it up), by kind (auth, acct)", ["kind"],
                             buckets=DECISION_BUCKETS)
INFLIGHT = Gauge("billcore_radius_inflight", "RADIUS requests being decided (sampled each second)",
                 multiprocess_mode="livesum")

_REPLY_NAMES = {AccessAccept: "access_accept", AccessReject: "access_reject", AccountingResponse: "accounting_response"}
# label children bound once: in multiprocess mode every ``labels()`` and ``inc()`` costs
_REPLIED = {code: REPLIES.labels(name) for code, name in _REPLY_NAMES.items()}
_ACCESS = REQUESTS.labels("access")
_ACCOUNTING = REQUESTS.labels("accounting")
# bound at import, so the histogram is on the endpoint (at zero) before the first request
_DECISION_SECONDS = {kind: DECISION_SECONDS.labels(kind) for kind in ("auth", "acct")}


@dataclass(slots=True)
class DecisionTally:
    """Decision times and outcomes since the last flush, for one kind.

    A multiprocess histogram costs two mmap writes per observation; here a
    decision costs a bisect and two additions, and ``flush`` writes each
    non-empty bucket once.
    """

    kind: str
    counts: list[int] = field(default_factory=lambda: [0] * (len(DECISION_BUCKETS) + 1))
    total: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)

    def observe(self, seconds: float, outcome: str) -> None:
        self.counts[bisect.bisect_left(DECISION_BUCKETS, seconds)] += 1   # le: bound is inclusive
        self.total += seconds
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def flush(self) -> None:
        if not any(self.counts):
            return
        # Histogram.observe adds to _sum and to the first bucket whose bound
        # holds the value (+Inf last); this adds n observations the same way.
        child = _DECISION_SECONDS[self.kind]
        child._sum.inc(self.total)
        for i, n in enumerate(self.counts):
            if n:
                child._buckets[i].inc(n)
        for outcome, n in self.outcomes.items():
            DECISIONS.labels(self.kind, outcome).inc(n)
        self.counts = [0] * len(self.counts)
        self.total = 0.0
        self.outcomes = {}


class RadiusError(Exception):
    """Root of the radius package's own errors."""


class PortInUse(RadiusError, PortTaken):
    """Another process (maybe another billcore radius) holds the port."""


class DecisionUnavailable(RadiusError):
    """The core could not be asked (down, reconnecting, timed out)."""


@dataclass(frozen=True, slots=True)
class Nas:
    """A NAS device as the core describes it in ``radius.nas_list``."""

    address: str
    secret: bytes
    name: str = ""
    require_message_authenticator: bool = False
    coa_port: int = 3799
    disconnect_mode: str = "disconnect"  # or "coa": move to a blocked profile
    blocked_profile: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_wire(cls, rec: dict[str, Any]) -> Nas:
        secret = rec["secret"]
        return cls(
            address=str(ipaddress.ip_address(rec["address"])),
            secret=secret.encode() if isinstance(secret, str) else bytes(secret),
            name=rec.get("name", ""),
            require_message_authenticator=bool(rec.get("require_message_authenticator", False)),
            coa_port=int(rec.get("coa_port", 3799)),
            disconnect_mode=rec.get("disconnect_mode", "disconnect"),
            blocked_profile=tuple((str(k), v) for k, v in rec.get("blocked_profile", ())),
        )


class NasTable:
    """Source address → Nas; replaced whole when the core's list changes."""

    def __init__(self, entries: Iterable[Nas] | None = None) -> None:
        self._by_addr: dict[str, Nas] = {}
        self.loaded = False  # False until the core's list came once: drops are "core_unavailable"
        if entries is not None:
            self.replace(entries)

    def replace(self, entries: Iterable[Nas]) -> None:
        self._by_addr = {n.address: n for n in entries}
        self.loaded = True

    def get(self, address: str) -> Nas | None:
        nas = self._by_addr.get(address)
        if nas is None and address.startswith("::ffff:"):
            nas = self._by_addr.get(address[7:])
        return nas

    def __len__(self) -> int:
        return len(self._by_addr)

    def __iter__(self) -> Any:
        return iter(self._by_addr.values())


@dataclass(frozen=True, slots=True)
class Decision:
    accept: bool
    # reply attributes as (dictionary name, value), e.g. ("Framed-IP-Address", "10.0.0.5")
    reply: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_wire(cls, rec: dict[str, Any]) -> Decision:
        # the pairs stay as they came ([name, value] lists): the reply encoder
        # checks each name and value, so no per-pair copy here
        return cls(rec["accept"] is True, rec.get("reply") or ())


_BAD_USER_NAME = Decision(False, (("Reply-Message", "wrong login or password"),))


class Decider(Protocol):
    """Where decisions come from.  ``authorize`` may be a coroutine function
    or return a future (the batching URFA decider does); either may raise
    ``DecisionUnavailable``.  A decider may also have
    ``authorize_then(nas, request, done)``, which the server then uses for
    Access-Requests instead: it raises ``DecisionUnavailable`` at once or
    calls ``done`` exactly once, later (never from within the call), with the
    ``Decision`` or the exception — no future per request."""

    def authorize(self, nas: Nas, request: dict[str, Any]) -> Awaitable[Decision]: ...

    def account(self, nas: Nas, record: dict[str, Any]) -> Awaitable[None]: ...


def load_dictionary() -> Dictionary:
    return Dictionary(str(DICTIONARY_DIR / "dictionary"))


def bind_udp(host: str, port: int, rcvbuf: int = 4 << 20) -> socket.socket:
    """A UDP socket bound *exclusively*: no SO_REUSEPORT, no SO_REUSEADDR."""
    try:
        return bind_exclusive(host, port, rcvbuf)
    except PortTaken as exc:
        raise PortInUse(str(exc)) from exc.__cause__


class Endpoint(Protocol):
    """Where a request came in and where its reply goes: a UDP port
    (``_Endpoint``) or a RadSec TLS stream (``radius.radsec``).

    ``kind`` says which request codes it takes: "auth" (Access-Request),
    "acct" (Accounting-Request) or "radsec" (both, on one stream; RFC 6614);
    Status-Server on any.  ``nas_for`` finds the NAS of a source address —
    over RadSec the same row with the fixed secret "radsec" (RFC 6614 s.2.3)."""

    kind: str

    def send(self, data: bytes, addr: tuple[Any, ...], code: int) -> None: ...

    def nas_for(self, table: NasTable, address: str) -> Nas | None: ...


# request codes each kind of endpoint takes
_ALLOWED = {"auth": (ACCESS_REQUEST, STATUS_SERVER), "acct": (ACCOUNTING_REQUEST, STATUS_SERVER),
            "radsec": (ACCESS_REQUEST, ACCOUNTING_REQUEST, STATUS_SERVER)}


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: RadiusServer, kind: str) -> None:
        self.server = server
        self.kind = kind  # "auth" or "acct"
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.receive(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.warning("radius %s socket error: %s", self.kind, exc)

    def send(self, data: bytes, addr: tuple[Any, ...], code: int) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)
            tally = self.server.tally
            tally[code] = tally.get(code, 0) + 1

    @staticmethod
    def nas_for(table: NasTable, address: str) -> Nas | None:
        return table.get(address)


@dataclass
class RadiusServer:
    decider: Decider
    nas_table: NasTable
    dictionary: Dictionary = field(default_factory=load_dictionary)
    dedup: DedupCache = field(default_factory=DedupCache)
    max_inflight: int = 1024
    decision_timeout: float = 5.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    inflight: int = 0
    encoder: ReplyEncoder | None = None
    notices: DropNotices = field(default_factory=DropNotices)
    _endpoints: list[_Endpoint] = field(default_factory=list)
    _pending: set[asyncio.Future[Any]] = field(default_factory=set)
    _sampler: asyncio.Task[None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None   # cached: get_running_loop() costs a getpid() per call
    # the decider's ``authorize_then`` when it has one (``UrfaDecider``): decisions by callback, no future
    _then: Callable[[Nas, dict[str, Any], Callable[[Decision | BaseException], None]], None] | None = None
    # requests (by request code) and replies (by reply code) counted here and
    # added to the Prometheus counters by ``flush_metrics`` each second: a
    # multiprocess counter costs an mmap write per increment
    tally: dict[int, int] = field(default_factory=lambda: {ACCESS_REQUEST: 0, ACCOUNTING_REQUEST: 0})
    decisions: dict[int, DecisionTally] = field(default_factory=lambda: {
        ACCESS_REQUEST: DecisionTally("auth"), ACCOUNTING_REQUEST: DecisionTally("acct")})

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = ReplyEncoder(self.dictionary)
        self._then = getattr(self.decider, "authorize_then", None)

    # -- transport ----------------------------------------------------------
    async def listen(self, host: str, auth_port: int, acct_port: int) -> tuple[int, int]:
        """Bind both ports (0 = any free port); return the bound ports."""
        socks = [bind_udp(host, auth_port)]
        try:
            socks.append(bind_udp(host, acct_port))
        except Exception:
            socks[0].close()
            raise
        return await self.listen_sockets(socks[0], socks[1])

    async def listen_sockets(self, auth: socket.socket, acct: socket.socket) -> tuple[int, int]:
        """Serve on two bound UDP sockets (one of a reuseport group, or ``bind_udp``'s); return their ports."""
        loop = self._loop = asyncio.get_running_loop()
        ports = []
        for sock, kind in zip((auth, acct), ("auth", "acct")):
            sock.setblocking(False)
            endpoint = _Endpoint(self, kind)
            await loop.create_datagram_endpoint(functools.partial(_same, endpoint), sock=sock)
            self._endpoints.append(endpoint)
            ports.append(sock.getsockname()[1])
        self._sampler = loop.create_task(self._sample_inflight())
        return ports[0], ports[1]

    async def _sample_inflight(self) -> None:
        while True:
            self.flush_metrics()
            await asyncio.sleep(1.0)

    def flush_metrics(self) -> None:
        """Publish the tallies and the in-flight gauge (sampled, not per request)."""
        INFLIGHT.set(self.inflight)
        tally, self.tally = self.tally, {ACCESS_REQUEST: 0, ACCOUNTING_REQUEST: 0}
        for code, n in tally.items():
            if not n:
                continue
            if code == ACCESS_REQUEST:
                _ACCESS.inc(n)
            elif code == ACCOUNTING_REQUEST:
                _ACCOUNTING.inc(n)
            else:
                counter = _REPLIED.get(code)
                (counter if counter is not None else REPLIES.labels(str(code))).inc(n)
        for decided in self.decisions.values():
            decided.flush()

    async def close(self, grace: float = 5.0) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        for endpoint in self._endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._endpoints.clear()
        deadline = time.monotonic() + grace
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace)
        while self.inflight and time.monotonic() < deadline:   # the decisions by callback
            await asyncio.sleep(0.01)
        self.flush_metrics()

    # -- the datagram path (plain, bounded) ---------------------------------
    def receive(self, endpoint: Endpoint, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_PACKET:
            DROPPED.labels("malformed").inc()
            return
        nas = endpoint.nas_for(self.nas_table, addr[0])
        if nas is None:
            DROPPED.labels("unknown_nas" if self.nas_table.loaded else "core_unavailable").inc()
            if self.nas_table.loaded:
                self._notice(addr[0], "", "unknown_nas", 0)
            return
        try:
            header, packet = parse_header(data)
        except MalformedPacket:
            DROPPED.labels("malformed").inc()
            return
        code = header.code
        if code not in _ALLOWED[endpoint.kind]:
            DROPPED.labels("wrong_code").inc()
            return
        reason = self._authenticity(nas, header, packet)
        if reason:
            DROPPED.labels(reason).inc()
            self._notice(nas.address, nas.name, reason, code)
            return
        if code == STATUS_SERVER:
            REQUESTS.labels("status").inc()
            self._status_reply(endpoint, nas, header, packet, addr)
            return
        key: DedupKey = (addr[0], addr[1], code, header.id, header.authenticator)
        verdict = self.dedup.lookup(key, self.clock())
        if verdict is Verdict.IN_PROGRESS:
            DROPPED.labels("duplicate_in_progress").inc()
            return
        if isinstance(verdict, bytes):
            DUPLICATES.inc()
            endpoint.send(verdict, addr, verdict[0])
            return
        if self.inflight >= self.max_inflight:
            DROPPED.labels("overload").inc()
            return
        awaitable: Awaitable[Any]
        try:
            if code == ACCESS_REQUEST:
                self.tally[ACCESS_REQUEST] += 1
                request = auth_request(packet, header.authenticator, nas.secret, nas.address)
                then = self._then
                if then is not None:   # no future per request: the decider calls back (later, once)
                    started = self.clock()
                    then(nas, request, lambda result: self._answered(result, endpoint, nas, header, packet, key, addr,
                                                                     started))
                    self.dedup.begin(key, started)   # ``then`` raised nothing: it is the core's now
                    self.inflight += 1
                    return
                awaitable = self.decider.authorize(nas, request)
            else:
                self.tally[ACCOUNTING_REQUEST] += 1
                awaitable = self.decider.account(nas, accounting_record(packet, nas.address, self.wall_clock()))
        except BadUserName:
            # no login can match: answer Reject here (a drop would make the NAS
            # retry and mark this server dead), and keep it off the core's batch
            REFUSED.labels("bad_user_name").inc()
            reply = self._auth_reply(nas, header, packet, _BAD_USER_NAME)
            self.dedup.begin(key, self.clock())
            self.dedup.finish(key, reply, self.clock())
            endpoint.send(reply, addr, reply[0])
            return
        except (MalformedPacket, DecisionUnavailable) as exc:
            self._count_failure(exc)
            return
        loop = self._loop or asyncio.get_running_loop()
        fut = asyncio.ensure_future(awaitable, loop=loop)
        started = self.clock()
        self.dedup.begin(key, started)
        self.inflight += 1
        self._pending.add(fut)
        # a decider that bounds its own calls (``bounded``) needs no timer per request
        timer = None if getattr(self.decider, "bounded", False) else loop.call_later(self.decision_timeout, fut.cancel)
        fut.add_done_callback(lambda f: self._decided(f, timer, endpoint, nas, header, packet, key, addr, started))

    def _answered(self, result: Decision | BaseException, endpoint: Endpoint, nas: Nas, header: Header,
                  packet: bytes, key: DedupKey, addr: tuple[Any, ...], started: float) -> None:
        """An Access-Request's decision (or error) from a decider's ``authorize_then``."""
        self.inflight -= 1
        try:
            if isinstance(result, BaseException):
                raise result
            reply = self._auth_reply(nas, header, packet, result)
        except Exception as exc:
            self.dedup.abandon(key)
            self._count_failure(exc)
            self.decisions[ACCESS_REQUEST].observe(self.clock() - started, _failure_outcome(exc))
            return
        now = self.clock()
        self.dedup.finish(key, reply, now)
        endpoint.send(reply, addr, reply[0])
        self.decisions[ACCESS_REQUEST].observe(now - started, "accept" if reply[0] == AccessAccept else "reject")

    def _decided(self, fut: asyncio.Future[Any], timer: asyncio.TimerHandle | None, endpoint: Endpoint, nas: Nas,
                 header: Header, packet: bytes, key: DedupKey, addr: tuple[Any, ...], started: float) -> None:
        if timer is not None:
            timer.cancel()
        self._pending.discard(fut)
        self.inflight -= 1
        try:
            if fut.cancelled():
                raise asyncio.TimeoutError()
            result = fut.result()
            if header.code == ACCESS_REQUEST:
                reply = self._auth_reply(nas, header, packet, result)
                outcome = "accept" if reply[0] == AccessAccept else "reject"
            else:
                reply = finish_reply(AccountingResponse, header.id, header.authenticator, nas.secret,
                                     self._proxy_states(header, packet), message_authenticator=False)
                outcome = "recorded"
        except Exception as exc:
            self.dedup.abandon(key)
            self._count_failure(exc)
            self.decisions[header.code].observe(self.clock() - started, _failure_outcome(exc))
            return
        now = self.clock()
        self.dedup.finish(key, reply, now)
        endpoint.send(reply, addr, reply[0])
        self.decisions[header.code].observe(now - started, outcome)

    def _notice(self, address: str, name: str, reason: str, code: int) -> None:
        """Say in the log, rate-limited, why a NAS (or an address) gets no answer."""
        if code == STATUS_SERVER and reason == "missing_message_authenticator":
            reason = "missing_message_authenticator_status"   # its own advice: RFC 5997, not the NAS setting
        notice = self.notices.note(address, name, reason, self.clock())
        if notice is not None:
            log.warning(notice.text, extra={"nas": notice.nas, "address": notice.address, "reason": notice.reason,
                                            "dropped": notice.dropped,
                                            "next_notice_in": round(self.notices.interval)})

    @staticmethod
    def _count_failure(exc: BaseException) -> None:
        if isinstance(exc, MalformedPacket):
            DROPPED.labels("malformed").inc()
        elif isinstance(exc, (asyncio.TimeoutError, DecisionUnavailable)):
            DROPPED.labels("core_unavailable").inc()
        else:
            DROPPED.labels("error").inc()
            log.error("radius request failed: %r", exc, exc_info=exc)

    @staticmethod
    def _authenticity(nas: Nas, header: Header, packet: bytes) -> str:
        """'' when the packet proves the NAS's secret, else the drop reason."""
        has_ma = header.ma_offset >= 0
        if has_ma and not message_authenticator_ok(header, packet, nas.secret):
            return "bad_message_authenticator"
        if header.code == ACCOUNTING_REQUEST:
            return "" if request_authenticator_ok(header, packet, nas.secret) else "bad_authenticator"
        if header.code == STATUS_SERVER and not has_ma:
            return "missing_message_authenticator"  # RFC 5997 s.3: MUST
        if not has_ma and nas.require_message_authenticator:
            return "missing_message_authenticator"
        return ""

    # -- replies -------------------------------------------------------------
    def _auth_reply(self, nas: Nas, header: Header, packet: bytes, decision: Decision) -> bytes:
        assert self.encoder is not None
        # the secret and the request's authenticator encrypt MPPE keys (RFC 2548 s.2.4.2)
        attrs, skipped = self.encoder.attributes(decision.reply, nas.secret, header.authenticator)
        for name, exc in skipped:
            log.warning("reply attribute %s skipped: %s", name, exc)
        return finish_reply(AccessAccept if decision.accept else AccessReject, header.id, header.authenticator,
                            nas.secret, attrs + self._proxy_states(header, packet) if header.proxy_state else attrs)

    def _status_reply(self, endpoint: Endpoint, nas: Nas, header: Header, packet: bytes, addr: tuple[Any, ...]) -> None:
        code = AccountingResponse if endpoint.kind == "acct" else AccessAccept
        # RFC 5997 s.3: signed with a Message-Authenticator over the request's authenticator
        reply = finish_reply(code, header.id, header.authenticator, nas.secret, self._proxy_states(header, packet))
        endpoint.send(reply, addr, code)

    @staticmethod
    def _proxy_states(header: Header, packet: bytes) -> bytes:
        """Proxy-State attributes of the request, unmodified and in order (RFC 2865 s.5.33)."""
        if not header.proxy_state:   # ``parse_header`` saw none: no second walk
            return b""
        return b"".join(bytes((33, len(v) + 2)) + v for v in raw_attributes(packet).get(33, ()))


def _failure_outcome(exc: BaseException) -> str:
    if isinstance(exc, MalformedPacket):
        return "malformed"
    if isinstance(exc, (asyncio.TimeoutError, DecisionUnavailable)):
        return "unavailable"
    return "error"


def _same(endpoint: _Endpoint) -> _Endpoint:
    return endpoint


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The ``radius`` role: serve NAS devices, asking the core over URFA."""
    from .process import run_process

    await run_process(config, stop, index)
