"""``reports.flows``: one account's top remote hosts, ports and protocols, read with DuckDB from a raw flow
store the NetFlow workers' own writer (netflow.rawstore.RawWriter) wrote; a missing store is an empty report."""

from __future__ import annotations

import dataclasses
import ipaddress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from billcore.api import report_calls
from billcore.common.config import Config
from billcore.common.rawflows import HOUR_MS
from billcore.server.context import CoreContext
from netflow.rawstore import RAW_DTYPE, RawWriter
from tests.test_tariffs_api import Ctx

UTC = timezone.utc
T0 = datetime(2024, 3, 20, 12, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
ACCOUNT = 77


def v4(addr: str) -> tuple[int, int]:
    return 0, (0xFFFF << 32) | int(ipaddress.IPv4Address(addr))


def leg(at_ms: int, account: int, outbound: bool, remote: str, remote_port: int, proto: int, size: int,
        packets: int, sampling: int = 1) -> tuple[Any, ...]:
    """One raw leg as the writer stores it: the account's end is 10.0.0.7."""
    local, far = v4("10.0.0.7"), v4(remote)
    src, dst = (local, far) if outbound else (far, local)
    sport, dport = (40000, remote_port) if outbound else (remote_port, 40000)
    values = {"first_ms": at_ms, "last_ms": at_ms + 1000, "account": account, "klass": 1, "direction": int(outbound),
              "exporter_hi": 0, "exporter_lo": v4("192.0.2.1")[1], "src_hi": src[0], "src_lo": src[1],
              "dst_hi": dst[0], "dst_lo": dst[1], "src_port": sport, "dst_port": dport, "proto": proto,
              "tcp_flags": 0, "tos": 0, "ip_version": 4, "bytes": size, "packets": packets, "sampling": sampling,
              "input_if": 1, "output_if": 2, "domain": 0}
    return tuple(values[name] for name in RAW_DTYPE.names or ())


def write_store(root: Path) -> None:
    legs = [
        leg(T0_MS + 10, ACCOUNT, False, "203.0.113.5", 443, 6, 1000, 4),            # a download, in two legs
        leg(T0_MS + HOUR_MS + 5, ACCOUNT, False, "203.0.113.5", 443, 6, 500, 2),     # in the next hour
        leg(T0_MS + 20, ACCOUNT, True, "198.51.100.7", 53, 17, 300, 3, sampling=10),  # sampled 1 in 10
        leg(T0_MS + 30, ACCOUNT, True, "192.0.2.99", 443, 6, 200, 1),
        leg(T0_MS + 40, ACCOUNT + 1, False, "203.0.113.200", 80, 6, 10**9, 9),       # another account's
        leg(T0_MS - HOUR_MS, ACCOUNT, False, "203.0.113.250", 22, 6, 10**9, 9),      # before the range
    ]
    writer = RawWriter(root, "1", retention_days=0)   # 2024 flows: kept, whatever today is
    writer.add(np.array(legs, dtype=RAW_DTYPE), 0, len(legs))
    writer.flush()


def store_config(root: Path) -> Config:
    config = Config()
    return dataclasses.replace(config, netflow=dataclasses.replace(config.netflow, raw_dir=str(root)))


async def flows(core: CoreContext, **args: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    spec = next(s for s in report_calls.calls(core) if s.name == "reports.flows")
    ctx = Ctx("admin", 1)
    result = await spec.handler(ctx, account_id=ACCOUNT, since="2024-03-20T12:00:00+00:00",
                                until="2024-03-20T14:00:00+00:00", **args)
    return [row for chunk in ctx.chunks for row in chunk], result


async def test_top_hosts_ports_and_protocols(tmp_path: Path) -> None:
    write_store(tmp_path / "raw")
    config = store_config(tmp_path / "raw")
    core = CoreContext(None, config)  # type: ignore[arg-type]  # reads the store, not the database

    rows, result = await flows(core, by="host")
    # key, bytes, packets, flows; the sampled DNS leg counts 10x, as billed
    assert rows == [["198.51.100.7", 3000, 30, 1], ["203.0.113.5", 1500, 6, 2], ["192.0.2.99", 200, 1, 1]]
    assert (result["rows"], result["bytes"], result["flows"]) == (3, 4700, 4)

    rows, _ = await flows(core, by="port", limit=2)
    assert rows == [["53/udp", 3000, 30, 1], ["443/tcp", 1700, 7, 3]]
    rows, _ = await flows(core, by="proto")
    assert rows == [["udp", 3000, 30, 1], ["tcp", 1700, 7, 3]]


async def test_a_missing_store_is_an_empty_report(tmp_path: Path) -> None:
    config = store_config(tmp_path / "nothing-here")
    core = CoreContext(None, config)  # type: ignore[arg-type]
    rows, result = await flows(core)
    assert rows == [] and result["rows"] == 0 and result["bytes"] == 0
    write_store(tmp_path / "nothing-here")
    rows, result = await flows(core)                      # and hours the store lacks read as nothing
    assert len(rows) == 3
