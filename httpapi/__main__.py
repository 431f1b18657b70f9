"""``python -m httpapi``: run the HTTP API by hand, pointed at a running core.

Under the supervisor the API is the ``httpapi`` role (``httpapi.app:run``)
and takes everything from billcore's config (``[httpapi]``).  Here flags
give the core's address, the API's system login (right
``session.proxy_token``) and its password file.  Binding an address other
than loopback needs ``--tls-cert``/``--tls-key``: a bearer token must not
cross a network in the clear.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

from billcore.common.config import ConfigError, HttpapiSection, validate_httpapi
from webedge import http

from .app import ApiSettings, api_link, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m httpapi", description="billcore HTTP/JSON API")
    parser.add_argument("--core-host", default="127.0.0.1")
    parser.add_argument("--core-port", type=int, default=11758)
    parser.add_argument("--core-unix", help="the core's URFA Unix socket (instead of TCP)")
    parser.add_argument("--login", default="httpapi", help="the API's system login (right session.proxy_token)")
    parser.add_argument("--password-file", required=True, type=Path, help="file holding that login's password")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8446)
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
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
