"""A remote NetFlow collector: the same workers, pointed at a core's URFA address.

    python -m netflow --core billing.example.net:11758 --login collector-a \
        --password-file /etc/billcore/collector-a.password [--tls --cafile ca.pem] \
        --port 2055 --workers 2 --journal-dir /var/lib/netflow/journal [--raw-dir ...]

Theory of operation: the parent process starts ``--workers`` worker processes
(this module again, with ``--worker-index k``: the `Worker` of
``netflow.worker``, receive → journal → decode → classify → ``netflow.submit``),
which share the UDP port with SO_REUSEPORT, and restarts any that dies
(backoff up to 5 s). SIGTERM or SIGINT stops them cleanly: each ships what it
journaled while the core answers, and the rest waits in its journal for the
next start. Worker ``k`` is named ``<id>-<k>`` (``--id``, default the host
name): the core keeps one watermark per name, so two collectors must not
share an id.

The login is a system login with the netflow rights, made on the core with
``billcore system`` (or ``create_system_login``). This module imports no
core code: only ``netflow``, ``urfa`` and the shared kernel ``billcore.common``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netflow.core_session import CoreAccess

log = logging.getLogger("netflow.collector")

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,60}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m netflow", description="Remote NetFlow collector for a billcore core.")
    p.add_argument("--core", required=True, help="URFA address of the core, host:port")
    p.add_argument("--login", required=True, help="system login with the netflow rights")
    p.add_argument("--password-file", required=True, type=Path, help="file holding the login's password")
    p.add_argument("--tls", action="store_true", help="speak TLS to the core")
    p.add_argument("--cafile", type=Path, help="CA bundle that signed the core's certificate (with --tls)")
    p.add_argument("--server-name", help="name in the core's certificate (default: the --core host)")
    p.add_argument("--host", default="0.0.0.0", help="address to receive NetFlow on (:: for IPv6 and IPv4)")
    p.add_argument("--port", type=int, default=2055, help="UDP port to receive NetFlow on")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per CPU)")
    p.add_argument("--journal-dir", required=True, type=Path, help="directory of the workers' journals")
    p.add_argument("--raw-dir", type=Path, help="directory of hourly Parquet raw flows (default: none kept)")
    p.add_argument("--raw-retention-days", type=int, default=90)
    p.add_argument("--id", default=socket.gethostname().split(".")[0], help="collector name (worker k is <id>-<k>)")
    p.add_argument("--exporter", action="append", default=[], help="accepted exporter prefix (repeat; default: loopback)")
    p.add_argument("--sampling", action="append", default=[], help="ADDR=N: sampling rate of an exporter (repeat)")
    p.add_argument("--rcvbuf", type=int, default=64 << 20, help="socket receive buffer to ask for, bytes")
    p.add_argument("--fsync-interval", type=float, default=0.2)
    p.add_argument("--ship-interval", type=float, default=1.0)
    p.add_argument("--segment-bytes", type=int, default=64 << 20)
    p.add_argument("--journal-max-bytes", type=int, default=16 << 30)
    p.add_argument("--log-level", default="info")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set for the children
    args = p.parse_args(argv)
    if not _ID.fullmatch(args.id):
        p.error("--id: 1..60 characters of A-Z a-z 0-9 . _ : @ -")
    if ":" not in args.core:
        p.error("--core: host:port")
    if args.cafile and not args.tls:
        p.error("--cafile needs --tls")
    return args


def settings_for(args: argparse.Namespace, index: int) -> Any:
    from netflow.worker import WorkerSettings

    wid = f"{args.id}-{index}"
    return WorkerSettings(
        worker_id=wid, host=args.host, port=args.port, journal_dir=args.journal_dir / wid,
        raw_dir=args.raw_dir, exporters=tuple(args.exporter) or ("127.0.0.1", "::1"),
        sampling=tuple(args.sampling), rcvbuf=args.rcvbuf, journal_max_bytes=args.journal_max_bytes,
        segment_bytes=args.segment_bytes, fsync_interval=args.fsync_interval, ship_interval=args.ship_interval,
        raw_retention_days=args.raw_retention_days,
    )


def core_access(args: argparse.Namespace) -> CoreAccess:
    """The core of ``--core`` (TLS with ``--tls``) and the login whose password file is read at each login."""
    from netflow.core_session import CoreAccess
    from urfa.link import Address

    context = ssl.create_default_context(cafile=str(args.cafile) if args.cafile else None) if args.tls else None
    address = Address.parse(args.core, ssl=context, server_hostname=args.server_name)
    return CoreAccess((address,), args.login, lambda: args.password_file.read_text().strip())  # it may be rotated


def worker_main(args: argparse.Namespace, index: int) -> None:
    """One worker process: serve until SIGTERM/SIGINT."""
    from netflow.worker import Worker

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(settings_for(args, index), core_access(args))
        await worker.serve(stop, ready=lambda info: log.info("netflow serving %s", info))

    asyncio.run(main())


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Start the workers, restart the ones that die, stop them all on SIGTERM/SIGINT."""
    count = args.workers or os.cpu_count() or 1
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    backoff = dict.fromkeys(range(count), 0.1)
    due = dict.fromkeys(range(count), 0.0)
    started = dict.fromkeys(range(count), 0.0)
    while not stopping:
        now = time.monotonic()
        for k in range(count):
            proc = procs.get(k)
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None:
                log.warning("worker %s died (exit %s), restarting", k, proc.returncode)
                procs.pop(k)
                backoff[k] = 0.1 if now - started[k] > 30 else min(backoff[k] * 2, 5.0)
                due[k] = now + backoff[k]
            if now >= due[k]:
                procs[k] = subprocess.Popen([sys.executable, "-m", "netflow", *argv, "--worker-index", str(k)])
                started[k] = now
        time.sleep(0.1)
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    who = args.id if args.worker_index is None else f"{args.id}-{args.worker_index}"
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s netflow[{who}] %(message)s")
    if args.worker_index is not None:
        worker_main(args, args.worker_index)
        return 0
    args.journal_dir.mkdir(parents=True, exist_ok=True)
    if not args.password_file.exists():
        print(f"no password file {args.password_file}", file=sys.stderr)
        return 2
    return supervise(args, argv)


if __name__ == "__main__":
    sys.exit(main())
