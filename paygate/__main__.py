"""``python -m paygate``: run the payment callback edge by hand, pointed at a running core.

Under the supervisor the edge is the ``paygate`` role (``paygate.app:run``)
and takes everything from billcore's config (``[paygate]`` and its
``[[paygate.gateways]]``).  Here the config file (``-c``) gives the
gateways, the currency and the limits, and flags give the core's address,
the edge's system login (rights ``payments.add`` and ``payments.lookup``)
and its password file, and where to listen.  A non-loopback address needs
``--tls-cert``/``--tls-key`` or ``--behind-proxy``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from billcore.common.config import ConfigError, load_config, validate_paygate
from webedge import http
from webedge.cli import edge_parser

from .app import gateways_of, paygate_link, serve


def main(argv: list[str] | None = None) -> int:
    parser = edge_parser("python -m paygate", "billcore payment gateways' callbacks", login="paygate",
                         right="payments.add, payments.lookup", port=8447)
    parser.add_argument("-c", "--config", required=True, help="billcore's config file (its [paygate] section)")
    parser.add_argument("--behind-proxy", action="store_true",
                        help="plain HTTP on a non-loopback address: your own TLS proxy fronts the edge")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        section = dataclasses.replace(config.paygate, enabled=True, host=args.host, port=args.port,
                                      tls_cert=args.tls_cert, tls_key=args.tls_key,
                                      behind_proxy=args.behind_proxy or config.paygate.behind_proxy)
        validate_paygate(section, config.billing.currency)
        gateways = gateways_of(section, config.billing)
    except (ConfigError, ValueError) as exc:
        print(f"python -m paygate: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s paygate %(levelname)s %(message)s")

    async def main_async() -> None:
        stop = http.stop_on_signals()
        link = paygate_link(host=args.core_host, port=args.core_port, unix=args.core_unix, login=args.login,
                            password_file=args.password_file, timeout=section.core_timeout)
        runner = await serve(section, link, gateways)
        logging.getLogger("paygate").info("paygate serving on %s:%s", args.host, args.port)
        await http.serve_until(stop, runner, link)

    asyncio.run(main_async())
    return 0


if __name__ == "__main__":
    sys.exit(main())
