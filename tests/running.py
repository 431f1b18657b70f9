"""A real ``billcore serve`` in a subprocess, for end-to-end tests.

It writes a config with free ports into a temporary directory, starts the
supervisor with its log in a file, and offers waits on log lines so that
tests follow what the processes say, not fixed sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from urfa.client import Client, connect


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):      # an array (of inline tables too: [[section.key]] as one line)
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


class BillcoreProcess:
    def __init__(self, workdir: Path, dsn: str = "", **sections: dict[str, Any]) -> None:
        self.workdir = workdir
        self.urfa_port = free_port()
        self.metrics_port = free_port()
        config: dict[str, dict[str, Any]] = {
            "core": {"data_dir": str(workdir / "var")},
            "database": {"dsn": dsn},
            "urfa": {"port": self.urfa_port},
            "metrics": {"port": self.metrics_port},
            # edges stay off unless a test asks for them (their ports are shared)
            "radius": {"enabled": False},
            "netflow": {"enabled": False},
            "portal": {"enabled": False},
            "console": {"enabled": False},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        lines = []
        for name, values in config.items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        self.config_path = workdir / "billcore.toml"
        self.config_path.write_text("\n".join(lines) + "\n")
        self.log_path = workdir / "billcore.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BillcoreProcess:
        env = dict(os.environ)
        env.pop("BILLCORE_CONFIG", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "billcore.cli", "-c", str(self.config_path), "serve"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0, after: int = 0) -> re.Match[str]:
        """Wait for a log line matching ``pattern`` at or after char ``after``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.log(), after)
            if m:
                return m
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log()[-4000:]}")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``
        on the metrics endpoint now (0 when there is none)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def child_pid(self, role: str, after: int = 0) -> int:
        m = self.wait_for(rf"role={role} pid=(\d+) .*msg=\"{role} serving\"", after=after)
        return int(m.group(1))

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> BillcoreProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@asynccontextmanager
async def serving_with_root(tag: str, role: str, root_password: str, dsn: str = "",
                            **sections: dict[str, Any]) -> AsyncIterator[tuple[BillcoreProcess, Client]]:
    """``billcore serve`` until the edge ``role`` and the core say they serve, with an operator
    ``root`` made by the CLI as an installer would, logged in over URFA; ``(process, root's client)``.

    ``dsn`` empty: the supervisor starts an embedded PostgreSQL. Its own user must reach its data
    directory, and another pytest run on this machine resets /tmp/pytest-of-root to 0700 whenever it
    starts, so the work directory is one of its own (named after ``tag``), removed after."""
    from tests.test_e2e_core import billcore_cli   # (that module imports this one)

    workdir = Path(tempfile.mkdtemp(prefix=f"billcore-{tag}-"))
    bc = BillcoreProcess(workdir, dsn=dsn, **sections)
    bc.start()
    admin: Client | None = None
    try:
        bc.wait_for(rf'role={role} .*msg="{role} serving"', timeout=90)
        bc.wait_for(r'role=core .*msg="core serving"', timeout=90)
        made = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                            env={"PW": root_password})
        assert made.returncode == 0, made.stderr
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", root_password)
        yield bc, admin
    except BaseException:
        print(bc.log()[-12000:])         # the processes' own account of a failure (the directory goes)
        raise
    finally:
        if admin is not None:
            await admin.close()
        bc.__exit__(None, None, None)
        shutil.rmtree(workdir, ignore_errors=True)
