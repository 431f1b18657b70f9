"""The flags every web edge's ``python -m`` entry point shares.

Under the supervisor an edge takes everything from billcore's config; run
by hand (away from the core, or to try it out) it is told the core's
address, its own system login and password file, and where to listen.
``edge_parser`` makes that parser; the edge adds its own flags after.
Cookie-holding edges (office, console) add ``cookie_flags``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["edge_parser", "cookie_flags"]


def edge_parser(prog: str, description: str, *, login: str, right: str, port: int) -> argparse.ArgumentParser:
    """The core's address (TCP or Unix socket), the edge's system login holding ``right`` and its
    password file, and the listening address (loopback by default; TLS files optional)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--core-host", default="127.0.0.1")
    parser.add_argument("--core-port", type=int, default=11758)
    parser.add_argument("--core-unix", help="the core's URFA Unix socket (instead of TCP)")
    parser.add_argument("--login", default=login, help=f"the edge's system login (right {right})")
    parser.add_argument("--password-file", required=True, type=Path, help="file holding that login's password")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    return parser


def cookie_flags(parser: argparse.ArgumentParser) -> None:
    """A browser edge's CSRF key file, cookie security and language."""
    parser.add_argument("--secret-file", required=True, type=Path, help="CSRF signing key (created if absent)")
    parser.add_argument("--insecure-cookie", action="store_true",
                        help="allow the session cookie over plain HTTP (loopback only)")
    parser.add_argument("--language", default="en", choices=("en", "ru"))
    parser.add_argument("--config", help="billcore config to take [billing] (the currency every amount is shown"
                                         " in) and [documents] (the issuer on invoices) from (default: the defaults)")
