"""A real ``billcore serve`` with the operators' console on, for end-to-end tests.

The supervisor starts the core and the console child (and RADIUS, NetFlow
when a test asks); ``root`` is made with the CLI, as an installer does, and
every other operator over URFA or through the console's own pages. Tests
reach the console only over HTTP — a browser (Playwright with Debian's
Chromium) or a plain HTTP client that logs in the way the login page's
script does — and the core only over URFA, as any client would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port, need_peer
from tests.running import BillcoreProcess, serving_with_root
from tests.test_portal_e2e import CHROMIUM
from urfa.client import Client, connect

REPO = Path(__file__).resolve().parent.parent

ROOT_PASSWORD = "root-console-pw-1"


@dataclass
class ConsoleStack:
    bc: BillcoreProcess
    admin: Client                      # root over URFA: the test's own eyes on the core
    url: str                           # the console, http://127.0.0.1:PORT
    console_port: int
    extra: dict[str, Any] = field(default_factory=dict)

    def console_pid(self) -> int:
        return self.bc.child_pid("console")

    def core_pid(self) -> int:
        return self.bc.child_pid("core")

    async def operator(self, login: str, password: str, groups: list[str], full_name: str = "") -> dict[str, Any]:
        """An operator made by root over URFA (the console's own form is tested in the operator day)."""
        made: dict[str, Any] = await self.admin.call(
            "operators.create", {"login": login, "password": password, "full_name": full_name or login,
                                 "groups": groups})
        return made

    async def urfa_login(self, login: str, password: str) -> Client:
        client = await connect("127.0.0.1", self.bc.urfa_port)
        await client.login("admin", login, password)
        return client


def need_chromium() -> None:
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")


def plugin_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "billcore.cli", "plugin", *args],
                          capture_output=True, text=True, timeout=60)


def signed_example_plugin(tmp: Path) -> tuple[Path, Path]:
    """plugins/example signed with a fresh key; (plugin dir, trusted key dir)."""
    keys, plugin_dir, trusted = tmp / "keys", tmp / "plugins", tmp / "trusted"
    trusted.mkdir(parents=True)
    assert plugin_cli("keygen", "--out", str(keys), "--name", "day").returncode == 0
    shutil.copy(keys / "day.pub", trusted / "day.pub")
    shutil.copytree(REPO / "plugins" / "example", plugin_dir / "example",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    signed = plugin_cli("sign", str(plugin_dir / "example"), "--key", str(keys / "day.key"))
    assert signed.returncode == 0, signed.stderr
    return plugin_dir, trusted


@asynccontextmanager
async def console_stack(workdir: Path, dsn: str = "", **sections: dict[str, Any]) -> AsyncIterator[ConsoleStack]:
    """``billcore serve`` with the console on loopback over plain HTTP (``workdir``'s name names its directory).

    ``dsn`` empty: the supervisor starts an embedded PostgreSQL in the
    work directory (the default deployment, and the config then names no
    database at all)."""
    port = free_port()
    console = {"enabled": True, "host": "127.0.0.1", "port": port, "cookie_secure": False,
               **sections.pop("console", {})}
    async with serving_with_root(workdir.name, "console", ROOT_PASSWORD, dsn, console=console,
                                 **sections) as (bc, admin):
        yield ConsoleStack(bc, admin, f"http://127.0.0.1:{port}", port)
