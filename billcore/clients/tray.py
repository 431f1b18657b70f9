"""``billcore-tray``: the subscriber's balance at a glance, from a terminal.

    billcore-tray LOGIN [--host H] [--port P | --unix PATH] [--tls [--cafile F]]
                        [--account-id N] [--off | --on] [--watch N [--count K]] [--json]

The UTM "wintray" equivalent: it logs in *as the subscriber* over URFA
(SCRAM: the password never crosses the wire), shows each account's balance,
credit, internet status and the prepaid traffic left this period, and with
``--watch N`` refreshes every N seconds (``--count K`` stops after K
refreshes).  ``--off`` / ``--on`` switch the subscriber's own "internet off"
block (``me.block``) before showing the status.

The password comes from ``--password-env VAR``, else ``$BILLCORE_TRAY_PASSWORD``,
else a prompt.  While watching, a dropped connection or an expired session
is followed by a fresh login with the same password; a core that is down is
shown as such and retried at the next refresh.

Exit codes (as billctl's): 0 ok, 1 the core refused a call, 2 usage, 3 login
refused, 4 cannot talk to the core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import os
import ssl
import sys
from collections.abc import Callable
from typing import Any

from billcore.common.money import format_money
from urfa.client import DEFAULT_PORT
from billcore.clients.exits import OK, USAGE, report
from urfa.errors import DELETED, NOT_IN_TABLE, CallFailed, ConnectionLost, URFAError
from urfa.link import Address, Link

__all__ = ["main", "render_status", "fetch_status"]

PASSWORD_ENV = "BILLCORE_TRAY_PASSWORD"


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            tenths = n * 10 // size
            return f"{tenths // 10}.{tenths % 10} {unit}"
    return f"{n} B"


def internet_state(blocks: list[str]) -> str:
    if not blocks:
        return "on"
    return "off (switched off by you)" if set(blocks) == {"user"} else "blocked (" + ", ".join(blocks) + ")"


def render_status(login: str, accounts: list[dict[str, Any]], tariffs: list[dict[str, Any]] | None,
                  now: dt.datetime, classes: dict[int, str] | None = None) -> str:
    """The text the tray shows: one block per account."""
    classes = classes or {}
    by_account = {t["account_id"]: t for t in tariffs or []}
    lines = [f"{login} · {now.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC"]
    for a in accounts:
        available = a["balance"] + a["credit"] + a.get("promised", 0)
        lines.append(f"account {a['id']}")
        lines.append(f"  balance   {format_money(a['balance'])}  (credit {format_money(a['credit'])},"
                     f" available {format_money(available)})")
        lines.append(f"  internet  {internet_state(a['blocks'])}")
        t = by_account.get(a["id"])
        if tariffs is None:
            lines.append("  prepaid   (this core does not tell)")
        elif t is None or not t.get("tariff"):
            lines.append("  tariff    none")
        else:
            lines.append(f"  tariff    {t['tariff']}")
            names = {s["id"]: s["name"] for s in t.get("services", [])}
            if not t.get("prepaid"):
                lines.append("  prepaid   none in this tariff")
            for p in t.get("prepaid", []):
                left, total = int(p["prepaid_left"]), int(p["prepaid"])
                what = names.get(p["service_id"], f"service {p['service_id']}")
                if p.get("class_id", -1) != -1:
                    what = classes.get(p["class_id"], f"{what}, class {p['class_id']}")
                    amount = f"{human_bytes(left)} left of {human_bytes(total)}"
                else:
                    amount = f"{left // 60} min left of {total // 60} min"
                lines.append(f"  prepaid   {what}: {amount}")
    return "\n".join(lines)


async def _optional(link: Link, fn: str, args: dict[str, Any], timeout: float) -> Any:
    """``fn``'s answer, or None when this core does not offer it."""
    try:
        return await link.call(fn, args, timeout=timeout, retry_for=timeout)
    except CallFailed as exc:
        if exc.code in (NOT_IN_TABLE, DELETED):
            return None
        raise


async def fetch_status(link: Link, account_id: int | None, timeout: float = 10.0) -> dict[str, Any]:
    """Accounts, tariffs (None: not offered) and traffic class names.

    Only reads: a call that met a dropped connection or an ended session
    is asked again on the link's new session (``retry_for``)."""
    which = {"account_id": account_id} if account_id is not None else {}
    accounts = await link.call("me.accounts", timeout=timeout, retry_for=timeout)
    if account_id is not None:
        accounts = [a for a in accounts if a["id"] == account_id]
        if not accounts:
            raise CallFailed("accounts.unknown", f"account {account_id} does not exist")
    tariffs = await _optional(link, "me.tariff", which, timeout)
    classes = await _optional(link, "me.classes", {}, timeout) or []
    return {"accounts": accounts, "tariffs": tariffs, "classes": {c["id"]: c["name"] for c in classes}}


class Tray:
    def __init__(self, args: argparse.Namespace, password: str, out: Callable[[str], None]) -> None:
        self.args = args
        self.password = password
        self.out = out

    def link(self) -> Link:
        """The subscriber's own session; a core that is down is tried again when a refresh asks."""
        a = self.args
        context = ssl.create_default_context(cafile=a.cafile) if a.tls else None
        address = Address(host=None, unix=a.unix) if a.unix else Address(a.host, a.port, ssl=context)
        return Link([address], "user", a.login, self.password, timeout=a.timeout, wait_for_core=a.timeout)

    async def once(self, link: Link) -> dict[str, Any]:
        return {"login": self.args.login, **await fetch_status(link, self.args.account_id, self.args.timeout)}

    async def switch(self, link: Link, off: bool) -> None:
        which = {"account_id": self.args.account_id} if self.args.account_id is not None else {}
        result = await link.call("me.block", {"on": off, **which}, timeout=self.args.timeout)
        state = "off" if off else "on"
        self.out(f"internet switched {state} on account {result['account_id']}"
                 + ("" if result["changed"] else f" (it was {state} already)"))

    def show(self, status: dict[str, Any]) -> None:
        if self.args.json:
            self.out(json.dumps({**status, "classes": {str(k): v for k, v in status["classes"].items()}},
                                default=_json_default, sort_keys=True))
        else:
            self.out(render_status(status["login"], status["accounts"], status["tariffs"],
                                   dt.datetime.now(dt.timezone.utc), status["classes"]))

    async def run(self) -> int:
        a = self.args
        async with self.link() as link:
            await link.ready()      # a refused login or an unreachable core is the command's answer
            if a.off or a.on:
                await self.switch(link, off=bool(a.off))
            self.show(await self.once(link))
            shown = 1
            while a.watch and (not a.count or shown < a.count):
                await asyncio.sleep(a.watch)
                try:
                    self.show(await self.once(link))
                except (ConnectionLost, OSError, asyncio.TimeoutError) as exc:
                    self.out(f"core unreachable ({exc}); retrying in {a.watch} s")
                shown += 1
        return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="billcore-tray", description="your billcore balance, prepaid traffic and internet switch")
    p.add_argument("login", help="your subscriber login")
    p.add_argument("--host", default=os.environ.get("BILLCORE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("BILLCORE_PORT", DEFAULT_PORT)))
    p.add_argument("--unix", help="the core's URFA Unix socket instead of TCP")
    p.add_argument("--tls", action="store_true", help="speak TLS to the core")
    p.add_argument("--cafile", help="CA bundle that signed the core's certificate")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the core")
    p.add_argument("--password-env", metavar="VAR", help=f"read the password from VAR (default ${PASSWORD_ENV}, else a prompt)")
    p.add_argument("--account-id", type=int, help="only this account")
    switch = p.add_mutually_exclusive_group()
    switch.add_argument("--off", action="store_true", help="switch your internet off")
    switch.add_argument("--on", action="store_true", help="switch your internet back on")
    p.add_argument("--watch", type=float, default=0.0, metavar="N", help="refresh every N seconds")
    p.add_argument("--count", type=int, default=0, metavar="K", help="with --watch: stop after K refreshes")
    p.add_argument("--json", action="store_true", help="one JSON object per refresh")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch < 0 or (args.watch and args.watch < 1) or args.count < 0:
        print("billcore-tray: --watch is at least 1 second and --count is not negative", file=sys.stderr)
        return USAGE
    var = args.password_env or PASSWORD_ENV
    password = os.environ.get(var)
    if password is None:
        if args.password_env:
            print(f"billcore-tray: environment variable {var} is unset", file=sys.stderr)
            return USAGE
        password = getpass.getpass(f"{args.login} password: ")
    tray = Tray(args, password, lambda text: print(text, flush=True))
    try:
        return asyncio.run(tray.run())
    except (URFAError, OSError) as exc:   # asyncio.TimeoutError is an OSError
        return report("billcore-tray", exc)
    except KeyboardInterrupt:
        return OK


if __name__ == "__main__":
    sys.exit(main())
