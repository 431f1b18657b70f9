"""``python -m portal``: run the web office by hand, pointed at a running core.

Under the supervisor the office is the ``portal`` role (``portal.app:run``)
and takes everything from billcore's config.  This entry point is for a
web server away from the core (or for trying the office out): it reads the
config file for the ``[portal]`` section and the core's address when one is
given, and flags override both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from billcore.common.config import ConfigError, PortalSection, load_config
from documents.view import Issuer
from webedge import http
from webedge.cli import cookie_flags, edge_parser
from webedge.core_link import CoreLink
from webedge.render import Currency
from webedge.settings import read_or_make_secret

from .app import serve


def main(argv: list[str] | None = None) -> int:
    p = edge_parser("python -m portal", "billcore subscribers' web office", login="portal",
                    right="session.proxy", port=8080)
    cookie_flags(p)
    args = p.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"python -m portal: {exc}", file=sys.stderr)
        return 2
    section = dataclasses.replace(PortalSection(), enabled=True, host=args.host, port=args.port,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                                  cookie_secure=not args.insecure_cookie, language=args.language)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s portal %(levelname)s %(message)s")

    async def main_async() -> None:
        stop = http.stop_on_signals()
        link = CoreLink.for_endpoint(host=args.core_host, port=args.core_port, unix=args.core_unix,
                                     login=args.login, password=lambda: args.password_file.read_text().strip(),
                                     timeout=section.core_timeout)
        runner = await serve(section, link, read_or_make_secret(args.secret_file), currency=Currency.of(config),
                             issuer=Issuer.of(config))
        logging.getLogger("portal").info("portal serving on %s:%s", args.host, args.port)
        await http.serve_until(stop, runner, link)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
