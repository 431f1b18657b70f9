"""``python -m console``: run the operators' console by hand, pointed at a running core.

Under the supervisor the console is the ``console`` role (``console.app:run``)
and takes everything from billcore's config.  This entry point is for a
console away from the core (or for trying it out): flags give the core's
address, the console's system login and its password file.  Binding an
address other than loopback needs ``--tls-cert``/``--tls-key``: the login's
WebCrypto runs only on a secure page, and an operator's session must not
cross a network in the clear.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from billcore.common.config import ConfigError, ConsoleSection, load_config, validate_console
from documents.view import Issuer
from webedge import http
from webedge.render import Currency
from webedge.cli import cookie_flags, edge_parser
from webedge.settings import EdgeSettings, read_or_make_secret

from .app import console_link, serve
from .live import LiveHub


def main(argv: list[str] | None = None) -> int:
    parser = edge_parser("python -m console", "billcore operators' console", login="console",
                         right="session.proxy_admin", port=8445)
    cookie_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"python -m console: {exc}", file=sys.stderr)
        return 2
    section = dataclasses.replace(ConsoleSection(), enabled=True, host=args.host, port=args.port,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key,
                                  cookie_secure=not args.insecure_cookie, language=args.language)
    try:
        validate_console(section)
    except ConfigError as exc:
        print(f"python -m console: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s console %(levelname)s %(message)s")
    settings = EdgeSettings(section=section, core_host=args.core_host, core_port=args.core_port,
                            core_unix=args.core_unix, password_file=args.password_file,
                            secret_file=args.secret_file, login=args.login)

    async def main_async() -> None:
        stop = http.stop_on_signals()
        live = LiveHub()
        link = console_link(settings, live)
        runner = await serve(section, link, read_or_make_secret(args.secret_file), live,
                             currency=Currency.of(config), issuer=Issuer.of(config))
        logging.getLogger("console").info("console serving on %s:%s", args.host, args.port)
        await http.serve_until(stop, runner, link)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
