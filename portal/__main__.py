"""``python -m portal``: run the web office by hand, pointed at a running core.

Under the supervisor the office is the ``portal`` role (``portal.app:run``)
and takes everything from billcore's config.  This entry point is for a
web server away from the core (or for trying the office out): it reads the
config file for the ``[portal]`` section and the core's address when one is
given, and flags override both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

from billcore.common.config import PortalSection
from webedge import http
from webedge.core_link import CoreLink
from webedge.settings import read_or_make_secret

from .app import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m portal", description="billcore subscribers' web office")
    p.add_argument("--core-host", default="127.0.0.1")
    p.add_argument("--core-port", type=int, default=11758)
    p.add_argument("--core-unix", help="the core's URFA Unix socket (instead of TCP)")
    p.add_argument("--login", default="portal", help="the office's system login (right session.proxy)")
    p.add_argument("--password-file", required=True, type=Path, help="file holding that login's password")
    p.add_argument("--secret-file", required=True, type=Path, help="CSRF signing key (created if absent)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tls-cert", default="")
    p.add_argument("--tls-key", default="")
    p.add_argument("--insecure-cookie", action="store_true", help="allow the session cookie over plain HTTP")
    p.add_argument("--language", default="en", choices=("en", "ru"))
    args = p.parse_args(argv)
    section = dataclasses.replace(PortalSection(), enabled=True, host=args.host, port=args.port,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                                  cookie_secure=not args.insecure_cookie, language=args.language)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s portal %(levelname)s %(message)s")

    async def main_async() -> None:
        stop = http.stop_on_signals()
        link = CoreLink.for_endpoint(host=args.core_host, port=args.core_port, unix=args.core_unix,
                                     login=args.login, password=lambda: args.password_file.read_text().strip(),
                                     timeout=section.core_timeout)
        runner = await serve(section, link, read_or_make_secret(args.secret_file))
        logging.getLogger("portal").info("portal serving on %s:%s", args.host, args.port)
        await http.serve_until(stop, runner, link)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
