"""The URFA connection state machine, sans-IO, for both roles.

Theory of operation
-------------------
A ``Connection`` is bytes in (``receive_data``), messages out
(``next_event``), messages in (``send``), bytes out (``data_to_send``), and
time in (``handle_timer(now)``).  It never touches a socket or a clock.

Both ends run the same machine: every message moves the shared state
according to ``TRANSITIONS`` — (state, sender role, message type) → next
state — whether we sent it or received it.  A message that has no entry for
the current state is illegal: sending one raises ``LocalProtocolError``;
receiving one raises ``RemoteProtocolError`` and puts the connection in
ERROR, after which ``fail`` queues a ``bye`` for the peer and the transport
closes.

    HELLO ─hello(S)→ AUTH ─login(C)→ CHALLENGE ─challenge(S)→ PROOF
                       │                                        │ proof(C)
                       └─resume(C)→ RESUME ─welcome(S)→ OPEN ←welcome(S)─ VERIFY
                                                         ↑                 │ otp(S)
                                        OTP_VERIFY ─welcome(S)┘   OTP ←────┘
                                            ↑                      │
                                            └─────otp_code(C)──────┘
    any state ─bye(either)→ CLOSED;  bad input / handshake timeout → ERROR

Until OPEN the connection has a *handshake deadline*; ``handle_timer`` past
it puts it in ERROR with code ``timeout``, so a peer that dribbles bytes
cannot hold a connection open.  A login with a second factor (``otp``) gets
``otp_timeout`` more seconds: a person reads the code off their phone.  In OPEN the server side counts calls in
flight; a call over the cap is answered ``busy`` right here and never
reaches the application.
"""

from __future__ import annotations

import enum
from typing import Any

from .errors import (
    BUSY, TIMEOUT, VERSION, LocalProtocolError, RemoteProtocolError,
)
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, FrameEncoder
from .messages import (
    PROTO_VERSIONS, Bye, Call, Cancel, Challenge, Chunk, Error, Event, Hello, Login,
    Message, Otp, OtpCode, Ping, Pong, Proof, Result, Resume, Welcome, parse, parse_call, to_wire,
)

__all__ = ["Role", "State", "Connection", "Closed", "TRANSITIONS"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    HELLO = "HELLO"          # server has not sent hello yet / client waits for it
    AUTH = "AUTH"            # hello seen; client must log in or resume
    CHALLENGE = "CHALLENGE"  # login sent; waiting for the challenge
    PROOF = "PROOF"          # challenge sent; waiting for the client's proof
    VERIFY = "VERIFY"        # proof sent; waiting for welcome, otp (or bye)
    OTP = "OTP"              # otp sent; waiting for the client's code
    OTP_VERIFY = "OTP_VERIFY"  # code sent; waiting for welcome (or bye)
    RESUME = "RESUME"        # resume sent; waiting for welcome (or bye)
    OPEN = "OPEN"            # logged in: calls, results, events
    CLOSED = "CLOSED"        # bye exchanged or transport closed
    ERROR = "ERROR"          # protocol violation or timeout; must close


class Closed:
    """Event: the transport reached end of stream."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Closed()"


C, S = Role.CLIENT, Role.SERVER
TRANSITIONS: dict[tuple[State, Role, type], State] = {
    (State.HELLO, S, Hello): State.AUTH,
    (State.AUTH, C, Login): State.CHALLENGE,
    (State.AUTH, C, Resume): State.RESUME,
    (State.CHALLENGE, S, Challenge): State.PROOF,
    (State.PROOF, C, Proof): State.VERIFY,
    (State.VERIFY, S, Welcome): State.OPEN,
    (State.VERIFY, S, Otp): State.OTP,
    (State.OTP, C, OtpCode): State.OTP_VERIFY,
    (State.OTP_VERIFY, S, Welcome): State.OPEN,
    (State.RESUME, S, Welcome): State.OPEN,
    **{(State.OPEN, C, t): State.OPEN for t in (Call, Cancel, Ping)},
    **{(State.OPEN, S, t): State.OPEN for t in (Result, Chunk, Error, Event, Pong)},
    **{(st, r, Bye): State.CLOSED for st in State if st not in (State.CLOSED, State.ERROR) for r in Role},
}
_DONE = (State.CLOSED, State.ERROR)
# The same table split per (state, sender): each connection keeps the two
# dicts of its current state, so checking a message is one dict lookup by
# its class (enum members hash in Python code, classes in C).
_NEXT: dict[tuple[State, Role], dict[type, State]] = {(st, r): {} for st in State for r in Role}
for (_st, _r, _t), _n in TRANSITIONS.items():
    _NEXT[(_st, _r)][_t] = _n
del _st, _r, _t, _n


class Connection:
    """One URFA connection's protocol state (either role)."""

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = 10.0,
        max_inflight: int = 64,
        otp_timeout: float = 120.0,
    ) -> None:
        self.role = role
        self.deadline: float | None = now + handshake_timeout
        self.otp_timeout = otp_timeout
        self.max_inflight = max_inflight
        self.inflight: set[int] = set()   # server role: call ids not yet answered
        self.error: RemoteProtocolError | None = None
        self._peer = C if role is S else S
        self._server = role is S
        self._decoder = FrameDecoder(max_frame)
        self._encoder = FrameEncoder(max_frame)
        self._out: list[bytes] = []
        self._eof = False
        self._state = State.HELLO
        self._takes_calls = False
        self._rx: dict[type, State] = _NEXT[(State.HELLO, self._peer)]
        self._tx: dict[type, State] = _NEXT[(State.HELLO, role)]

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        self._takes_calls = self._server and Call in _NEXT[(state, self._peer)]
        self._rx = _NEXT[(state, self._peer)]
        self._tx = _NEXT[(state, self.role)]

    # -- time ------------------------------------------------------------
    def handle_timer(self, now: float) -> bool:
        """Enforce the handshake deadline; True if it expired just now."""
        if self.deadline is None or now < self.deadline or self._state in _DONE:
            return False
        self.fail(RemoteProtocolError("handshake not finished in time", TIMEOUT))
        return True

    # -- bytes in, messages out ------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Give the machine bytes read from the peer; ``b""`` means EOF."""
        if self._state in _DONE:
            return
        if not data:
            self._eof = True
            return
        try:
            self._decoder.feed(data)
        except RemoteProtocolError as exc:
            self._to_error(exc)
            raise

    def next_event(self) -> Message | Closed | None:
        """The next message from the peer, ``Closed()`` at EOF, or ``None``.

        Raises ``RemoteProtocolError`` (state becomes ERROR) on bad input.
        """
        if self._state in _DONE:
            return None
        next_message = self._decoder.next_message
        try:
            while True:
                raw = next_message()
                if raw is None:
                    if self._eof:
                        self.state = State.CLOSED
                        return Closed()
                    return None
                if self._takes_calls and raw.get("t") == "call":
                    # The hot path: what ``_advance`` does for a call in OPEN.
                    call = parse_call(raw)
                    inflight = self.inflight
                    if call.id not in inflight and len(inflight) < self.max_inflight:
                        inflight.add(call.id)
                        return call
                    self._admit_call(call)   # raises, or answers busy
                    continue
                msg = parse(raw)
                if self._advance(self._peer, msg):
                    return msg
        except RemoteProtocolError as exc:
            self._to_error(exc)
            raise

    def _to_error(self, exc: RemoteProtocolError) -> None:
        self.state = State.ERROR
        self.error = exc

    # -- messages in, bytes out ------------------------------------------
    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the peer; ``LocalProtocolError`` if illegal now."""
        self._advance(self.role, msg)
        self._out.append(self._encoder.encode(to_wire(msg)))

    def send_result(self, call_id: int, value: Any) -> bool:
        """``send(Result(call_id, value))`` without building the message.

        False (nothing queued) once the connection is CLOSED or in ERROR.
        """
        if Result not in self._tx:
            if self._state in _DONE:
                return False
            raise LocalProtocolError(f"cannot send result in state {self._state.value}")
        self.inflight.discard(call_id)
        self._out.append(self._encoder.encode({"t": "result", "id": call_id, "value": value}))
        return True

    def send_error(self, call_id: int, code: str, message: str) -> bool:
        """``send(Error(call_id, code, message))``, as ``send_result``."""
        if Error not in self._tx:
            if self._state in _DONE:
                return False
            raise LocalProtocolError(f"cannot send error in state {self._state.value}")
        self.inflight.discard(call_id)
        self._out.append(self._encoder.encode({"t": "error", "id": call_id, "code": code, "msg": message}))
        return True

    def fail(self, exc: RemoteProtocolError) -> None:
        """Enter ERROR and (if we still can) tell the peer why, in a bye."""
        if self._state is State.CLOSED:
            return
        self._to_error(exc)
        self._out.append(self._encoder.encode(to_wire(Bye(exc.code, str(exc)))))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    # -- the table -------------------------------------------------------
    def _advance(self, sender: Role, msg: Message) -> bool:
        """Apply the table; False when the machine answered ``msg`` itself."""
        t = type(msg)
        local = sender is self.role
        nxt = (self._tx if local else self._rx).get(t)
        if nxt is None:
            what = f"{t.__name__.lower()} in state {self._state.value}"
            if local:
                raise LocalProtocolError(f"cannot send {what}")
            raise RemoteProtocolError(f"peer sent {what}")
        if self._server:
            if isinstance(msg, Call) and not local:
                if not self._admit_call(msg):
                    return False
            elif isinstance(msg, (Result, Error)) and local:
                self.inflight.discard(msg.id)
        if isinstance(msg, (Login, Resume)) and msg.proto not in PROTO_VERSIONS:
            text = f"protocol version {msg.proto} not supported"
            if local:
                raise LocalProtocolError(text)
            raise RemoteProtocolError(text, VERSION)
        if nxt is not self._state:
            if nxt is State.OPEN:
                self.deadline = None
            elif nxt is State.OTP and self.deadline is not None:
                self.deadline += self.otp_timeout
            self.state = nxt
        return True

    def _admit_call(self, call: Call) -> bool:
        inflight = self.inflight
        if call.id in inflight:
            raise RemoteProtocolError(f"call id {call.id} is already in flight")
        if len(inflight) >= self.max_inflight:
            # Answered here: the application never sees it, the peer learns at once.
            self._out.append(self._encoder.encode(
                {"t": "error", "id": call.id, "code": BUSY, "msg": "too many calls in flight"}))
            return False
        inflight.add(call.id)
        return True
