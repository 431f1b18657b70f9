"""The radius role wired to the core over URFA.

Theory of operation
-------------------
Start: log in to the core as the ``radius`` system principal (password file
``<data_dir>/system/radius.password``, provisioned by the core), fetch
``radius.nas_list``, bind the ports (``PortInUse`` stops the role with a
clear message), subscribe to ``blocks``, ``radius.nas`` and
``radius.disconnect``.  Then:

* every Access-/Accounting-Request is one URFA call (``UrfaDecider``); when
  the connection is down the call fails fast, nothing is answered and the
  NAS retries; a reconnect loop resumes the session;
* a ``blocks`` event with action ``set`` → ``radius.sessions`` for the
  account → Disconnect-Request, or a CoA to the NAS's blocked profile;
* ``radius.nas`` → reload the NAS table; ``radius.disconnect`` → send it;
* every ``stale_check`` seconds, ``radius.close_stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from urfa.client import Client, connect
from urfa.errors import URFAError

from .coa import CoaTimeout, send_dynauth, session_attributes
from .server import Decision, DecisionUnavailable, Nas, NasTable, PortInUse, RadiusServer, load_dictionary

__all__ = ["RadiusSettings", "UrfaDecider", "run_process"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RadiusSettings:
    """The [radius] config keys (defaults here until the section exists)."""

    host: str = "0.0.0.0"
    auth_port: int = 1812
    acct_port: int = 1813
    max_inflight: int = 1024
    decision_timeout: float = 3.0
    dedup_ttl: float = 30.0
    dedup_max: int = 65536
    stale_timeout: int = 0  # 0: 3 × the longest interim interval is the core's business; here a fixed default
    stale_check: float = 60.0
    coa_timeout: float = 2.0
    coa_retries: int = 2

    @classmethod
    def from_config(cls, config: Any) -> RadiusSettings:
        section = getattr(config, "radius", None)
        if section is None:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(section, k) for k in names if hasattr(section, k)})


class UrfaDecider:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def authorize(self, nas: Nas, request: dict[str, Any]) -> Decision:
        try:
            return Decision.from_wire(await self.client.call("radius.authorize", {"request": request}))
        except URFAError as exc:
            raise DecisionUnavailable(str(exc)) from exc

    async def account(self, nas: Nas, record: dict[str, Any]) -> None:
        try:
            await self.client.call("radius.accounting", {"record": record})
        except URFAError as exc:
            raise DecisionUnavailable(str(exc)) from exc


async def _login(config: Any) -> Client:
    from billcore.principals import service_password_file  # the shared file convention

    password = service_password_file(config.data_dir, "radius").read_text().strip()
    sock = config.urfa_socket
    client = await (connect(unix=str(sock)) if sock is not None else connect(config.urfa.host, config.urfa.port))
    await client.login("system", "radius", password)
    await client.subscribe("blocks", "radius.nas", "radius.disconnect")
    return client


async def _load_nas(client: Client, table: NasTable) -> None:
    table.replace(Nas.from_wire(r) for r in await client.call("radius.nas_list", {}))
    log.info("NAS table loaded", extra={"nas": len(table)})


async def dynauth_sessions(sessions: list[dict[str, Any]], table: NasTable, settings: RadiusSettings,
                           dictionary: Any) -> list[bool]:
    """Disconnect (or CoA to the blocked profile) each session; ACKed flags."""
    results = []
    for s in sessions:
        nas = table.get(s["nas_ip"])
        if nas is None:
            results.append(False)
            continue
        attrs = session_attributes(s)
        kind = "disconnect"
        if nas.disconnect_mode == "coa" and nas.blocked_profile:
            kind = "coa"
            attrs += list(nas.blocked_profile)
        try:
            result = await send_dynauth(nas.address, nas.coa_port, nas.secret, kind, attrs, dictionary,
                                        timeout=settings.coa_timeout, retries=settings.coa_retries)
            results.append(result.acked)
            if not result.acked:
                log.warning("%s of session %s refused by %s (Error-Cause %s)", kind, s["session_id"],
                            nas.address, result.error_cause)
        except CoaTimeout as exc:
            log.warning("%s", exc)
            results.append(False)
    return results


async def run_process(config: Any, stop: asyncio.Event) -> None:
    settings = RadiusSettings.from_config(config)
    dictionary = load_dictionary()
    client = await _login(config)
    table = NasTable()
    await _load_nas(client, table)
    server = RadiusServer(decider=UrfaDecider(client), nas_table=table, dictionary=dictionary,
                          max_inflight=settings.max_inflight, decision_timeout=settings.decision_timeout)
    from .dedup import DedupCache

    server.dedup = DedupCache(settings.dedup_ttl, settings.dedup_max)
    try:
        await server.listen(settings.host, settings.auth_port, settings.acct_port)
    except PortInUse as exc:
        log.error("%s", exc)
        await client.close()
        raise
    log.info("radius serving", extra={"auth": settings.auth_port, "acct": settings.acct_port})

    async def events() -> None:
        while True:
            event = await client.next_event()
            if event.topic == "radius.nas":
                await _load_nas(client, table)
            elif event.topic == "radius.disconnect":
                await dynauth_sessions(event.payload["sessions"], table, settings, dictionary)
            elif event.topic == "blocks" and event.payload.get("action") == "set":
                sessions = await client.call("radius.sessions", {"account_id": event.payload["account_id"]})
                await dynauth_sessions(sessions, table, settings, dictionary)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(settings.stale_check)
            with contextlib.suppress(URFAError):
                await client.call("radius.close_stale", {"timeout": settings.stale_timeout or 3 * 3600})

    tasks = [asyncio.create_task(events()), asyncio.create_task(sweep())]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await server.close()
        await client.close()
