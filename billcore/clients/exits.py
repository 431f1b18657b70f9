"""What the command-line clients' exit codes mean, said once for both.

0 ok, 1 the core refused a call, 2 usage, 3 login refused, 4 cannot talk
to the core (docs/portal.md and the tools' help repeat it).
"""

from __future__ import annotations

import sys

from urfa.errors import CallFailed, LoginFailed

__all__ = ["OK", "REFUSED", "USAGE", "LOGIN_REFUSED", "UNREACHABLE", "UsageError", "report"]

OK, REFUSED, USAGE, LOGIN_REFUSED, UNREACHABLE = 0, 1, 2, 3, 4


class UsageError(Exception):
    """The command line is wrong; the message says how (exit ``USAGE``).

    It lives here, not in billctl, so that billctl's command modules raise the
    class billctl's ``main`` catches also under ``python -m
    billcore.clients.billctl`` (where billctl itself is ``__main__``)."""


def report(prog: str, failure: Exception) -> int:
    """Say on stderr why talking to the core failed (a URFA error or an OSError); the exit code."""
    if isinstance(failure, LoginFailed):
        text, code = f"login refused: {failure}", LOGIN_REFUSED
    elif isinstance(failure, CallFailed):
        text, code = f"{failure.code}: {failure.message}", REFUSED
    else:
        text, code = f"cannot talk to the core: {failure}", UNREACHABLE
    print(f"{prog}: {text}", file=sys.stderr)
    return code
