"""URFA errors and the table of wire error codes.

Every error that crosses the wire carries a *code* (a short stable string
from the table below) and a human message.  Codes without a dot belong to the
protocol; application handlers may raise ``CallFailed`` with their own codes,
which must contain a dot (``"payments.duplicate"``) so they never collide
with a protocol code added later.

Exception tree (one root per subsystem, h11's split of local/remote faults)::

    URFAError
    ├── LocalProtocolError    we tried to do something the protocol forbids
    ├── RemoteProtocolError   the peer sent something the protocol forbids
    ├── CallFailed            a call ended with an error code (either side)
    ├── LoginFailed           login/resume refused, or the server not authentic
    └── ConnectionLost        the transport closed under us
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "URFAError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "CallFailed",
    "LoginFailed",
    "ConnectionLost",
    "PROTOCOL", "FRAME_TOO_LARGE", "VERSION", "TIMEOUT", "AUTH_FAILED",
    "RATE_LIMITED", "RESUME_FAILED", "NO_SESSION", "NOT_IN_TABLE", "DELETED",
    "BAD_ARGS", "FORBIDDEN", "BUSY", "CANCELLED", "INTERNAL", "SHUTDOWN",
    "LOGGED_OUT", "EXPIRED",
]

# -- the error-code table (docs/protocol.md §10 repeats it) ---------------
PROTOCOL = "protocol"              # malformed frame or message; connection closes
FRAME_TOO_LARGE = "frame_too_large"  # frame over the negotiated cap; closes
VERSION = "version"                # no common protocol version; closes
TIMEOUT = "timeout"                # handshake not finished in time; closes
AUTH_FAILED = "auth_failed"        # wrong login or password (same for unknown logins)
RATE_LIMITED = "rate_limited"      # too many login attempts (or open connections) from this IP, or for this login
RESUME_FAILED = "resume_failed"    # resume refused; the SID is gone
NO_SESSION = "no_session"          # proxied SID unknown, expired or from another IP
NOT_IN_TABLE = "not_in_table"      # function not in this session's table: log in again
DELETED = "deleted"                # function's module was unloaded since login
BAD_ARGS = "bad_args"              # arguments do not match the function's schema
FORBIDDEN = "forbidden"            # session lacks the right for this operation
BUSY = "busy"                      # too many calls in flight on this connection
CANCELLED = "cancelled"            # the call was cancelled by the client
INTERNAL = "internal"              # handler failed unexpectedly (details in server log)
SHUTDOWN = "shutdown"              # server is stopping; closes
LOGGED_OUT = "logged_out"          # session ended by session.logout; closes
EXPIRED = "expired"                # session idle too long; closes

ERROR_CODES: dict[str, str] = {
    PROTOCOL: "malformed frame or message; the connection closes",
    FRAME_TOO_LARGE: "frame longer than the cap; the connection closes",
    VERSION: "no common protocol version; the connection closes",
    TIMEOUT: "handshake not finished in time; the connection closes",
    AUTH_FAILED: "login refused (wrong login, password or kind)",
    RATE_LIMITED: "too many login attempts from this address or for this login, or too many connections open from this address",
    RESUME_FAILED: "resume refused; the session id no longer exists",
    NO_SESSION: "proxied session unknown, expired, or used from another address",
    NOT_IN_TABLE: "function not in this session's call table; log in again",
    DELETED: "function was unloaded after this session logged in",
    BAD_ARGS: "arguments do not match the function's schema",
    FORBIDDEN: "this session lacks the right for that operation",
    BUSY: "too many calls in flight on this connection; retry later",
    CANCELLED: "call cancelled at the client's request",
    INTERNAL: "the handler failed unexpectedly; see the server log",
    SHUTDOWN: "the server is stopping",
    LOGGED_OUT: "the session was logged out",
    EXPIRED: "the session expired after being idle",
}


class URFAError(Exception):
    """Root of every URFA error."""


class LocalProtocolError(URFAError):
    """We tried to send something the protocol does not allow now."""


class RemoteProtocolError(URFAError):
    """The peer sent bytes or a message the protocol does not allow."""

    def __init__(self, message: str, code: str = PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class CallFailed(URFAError):
    """A call ended with an error.  Handlers raise it to answer with ``code``."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class LoginFailed(URFAError):
    """Login or resume was refused, or the server failed mutual auth."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class ConnectionLost(URFAError):
    """The connection closed; ``code`` says why when the server told us."""

    def __init__(self, code: str = "", message: str = "") -> None:
        super().__init__(f"{code}: {message}" if code else (message or "connection lost"))
        self.code = code
        self.message = message
