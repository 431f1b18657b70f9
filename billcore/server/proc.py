"""Entry point of every child process: ``python -m billcore.server.proc ROLE``.

The supervisor starts each child with the config path, the database DSN and
the child's index in its environment.  This module sets up logging with the
role and pid, installs uvloop, turns SIGTERM/SIGINT into a stop event that
the role's ``run(config, dsn, index, stop)`` coroutine watches, and exits 0
after a clean stop.  Roles are looked up in ``ROLES`` by name so that a
child never imports more than its own code.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys

from billcore.common.config import ConfigError, load_config
from billcore.common.log import setup_logging

__all__ = ["ROLES", "main"]

ROLES: dict[str, str] = {
    "core": "billcore.server.core:run",
    "radius": "radius.server:run",
    "netflow": "netflow.worker:run",
    "portal": "portal.app:run",
    "console": "console.app:run",
    "httpapi": "httpapi.app:run",
    "paygate": "paygate.app:run",
    "notify": "notify.process:run",
}

ENV_CONFIG = "BILLCORE_CONFIG"
ENV_DSN = "BILLCORE_DSN"
ENV_INDEX = "BILLCORE_INDEX"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: python -m billcore.server.proc {{{','.join(ROLES)}}}", file=sys.stderr)
        return 2
    role = argv[0]
    try:
        config = load_config(os.environ.get(ENV_CONFIG) or None)
    except ConfigError as exc:
        print(f"billcore {role}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(role, config.core.log_level)
    module_name, func_name = ROLES[role].split(":")
    run = getattr(importlib.import_module(module_name), func_name)
    dsn = os.environ.get(ENV_DSN, "")
    index = int(os.environ.get(ENV_INDEX, "0"))

    async def runner() -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from billcore.server.metrics import PROCESS_UP  # the launcher reports every role, edges included

            PROCESS_UP.labels(role).set(1)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(config, dsn, index, stop)

    try:
        import uvloop

        uvloop.run(runner())
    except KeyboardInterrupt:
        pass
    except Exception:
        logging.getLogger("billcore.server.proc").exception("%s crashed", role)
        return 1
    logging.getLogger("billcore.server.proc").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
