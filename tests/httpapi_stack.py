"""A real ``billcore serve`` with the HTTP API on, for end-to-end tests of ``httpapi``.

The supervisor starts the core and the ``httpapi`` child (loopback, plain
HTTP, as ``[httpapi]`` allows there); ``root`` is made with the CLI as an
installer does, and tokens over URFA (``tokens.create``) as root would.
Tests reach the API only over HTTP and the core only over URFA.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.running import BillcoreProcess, serving_with_root
from urfa.client import Client

ROOT_PASSWORD = "root-httpapi-pw-1"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class ApiStack:
    bc: BillcoreProcess
    admin: Client                      # root over URFA: the test's own eyes on the core
    url: str                           # the API, http://127.0.0.1:PORT (https with a tls_cert)
    port: int
    extra: dict[str, Any] = field(default_factory=dict)   # "tls": the ssl context requests use

    def api_pid(self) -> int:
        return self.bc.child_pid("httpapi")

    async def token(self, name: str, groups: list[str], expires_at: Any = None) -> str:
        """A new API token (root's ``tokens.create``); the token string itself."""
        args: dict[str, Any] = {"name": name, "groups": groups}
        if expires_at is not None:
            args["expires_at"] = expires_at
        made: dict[str, Any] = await self.admin.call("tokens.create", args)
        return str(made["token"])

    def request(self, method: str, path: str, *, token: str | None = None, body: Any = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 60.0) -> Answer:
        """One plain HTTP request (urllib: no client library between the test and the API)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.extra.get("tls")) as resp:
                return Answer(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, dict(exc.headers), exc.read())

    def call(self, name: str, token: str, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        return self.request("POST", f"/api/v1/calls/{name}", token=token, body=body, headers=headers)


@asynccontextmanager
async def httpapi_stack(workdir: Path, dsn: str = "", **sections: dict[str, Any]) -> AsyncIterator[ApiStack]:
    """``billcore serve`` with ``[httpapi]`` on loopback (``workdir``'s name names its directory).

    ``dsn`` empty: the supervisor starts an embedded PostgreSQL in the work
    directory (the default deployment)."""
    port = free_port()
    api = {"enabled": True, "host": "127.0.0.1", "port": port, **sections.pop("httpapi", {})}
    scheme = "https" if api.get("tls_cert") else "http"
    async with serving_with_root(workdir.name, "httpapi", ROOT_PASSWORD, dsn, httpapi=api, **sections) as (bc, admin):
        yield ApiStack(bc, admin, f"{scheme}://127.0.0.1:{port}", port)
