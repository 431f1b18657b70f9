"""``python -m httpapi``: run the HTTP API by hand, pointed at a running core.

Under the supervisor the API is the ``httpapi`` role (``httpapi.app:run``)
and takes everything from billcore's config (``[httpapi]``).  Here flags
give the core's address, the API's system login (right
``session.proxy_token``) and its password file.  Binding an address other
than loopback needs ``--tls-cert``/``--tls-key``: a bearer token must not
cross a network in the clear.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from billcore.common.config import ConfigError, HttpapiSection, validate_httpapi
from webedge import http
from webedge.cli import edge_parser

from .app import ApiSettings, api_link, serve


def main(argv: list[str] | None = None) -> int:
    parser = edge_parser("python -m httpapi", "billcore HTTP/JSON API", login="httpapi",
                         right="session.proxy_token", port=8446)
    args = parser.parse_args(argv)
    section = dataclasses.replace(HttpapiSection(), enabled=True, host=args.host, port=args.port,
                                  tls_cert=args.tls_cert, tls_key=args.tls_key)
    try:
        validate_httpapi(section)
    except ConfigError as exc:
        print(f"python -m httpapi: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s httpapi %(levelname)s %(message)s")
    settings = ApiSettings(section=section, core_host=args.core_host, core_port=args.core_port,
                           core_unix=args.core_unix, password_file=args.password_file, login=args.login)

    async def main_async() -> None:
        stop = http.stop_on_signals()
        link = api_link(settings)
        runner = await serve(section, link)
        logging.getLogger("httpapi").info("httpapi serving on %s:%s", args.host, args.port)
        await http.serve_until(stop, runner, link)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
