"""Helpers shared by the plugin tests (no tests here): building, signing
and copying plugins, and a small real billing facade on a table."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import nacl.signing

from urfa.scram import make_verifier

from billcore.billing.accounts import create_account, create_user
from billcore.server.principals import USER_RIGHTS
from billcore.server.sessions import Principal

from billcore.plugins.bundle import LICENCE_FILE, read_bundle
from billcore.plugins.manifest import parse_manifest
from billcore.plugins.signing import sign_files

REPO_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
_VERIFIER = make_verifier("unused", iterations=4096)


def caller(kind: str = "admin", principal_id: int = 1,
           rights: frozenset[str] | None = None) -> SimpleNamespace:
    """A call context as the URFA server hands it to a handler: the session's principal and address."""
    if rights is None:
        rights = USER_RIGHTS if kind == "user" else frozenset({"*"})
    return SimpleNamespace(principal=Principal(kind, f"{kind}{principal_id}", principal_id, rights, _VERIFIER),
                           ip="192.0.2.7")


async def subscriber(pool: asyncpg.Pool, login: str, accounts: int = 1) -> tuple[int, list[int]]:
    """A real subscriber with ``accounts`` accounts (the first is the basic one): (user id, account ids)."""
    async with pool.acquire() as conn:
        user = await create_user(conn, login, _VERIFIER)
        ids = [int(user["basic_account_id"])]
        for _ in range(accounts - 1):
            ids.append(int((await create_account(conn, int(user["id"])))["id"]))
    return int(user["id"]), ids


class DevKey:
    """A development signing key made in the test, its public key in ``keydir``."""

    def __init__(self, keydir: Path, stem: str = "dev") -> None:
        self.key = nacl.signing.SigningKey.generate()
        keydir.mkdir(parents=True, exist_ok=True)
        (keydir / f"{stem}.pub").write_text(bytes(self.key.verify_key).hex() + "\n")

    def sign(self, plugin_dir: Path, **terms: object) -> None:
        bundle = read_bundle(plugin_dir)
        manifest = parse_manifest(bundle.files["plugin.toml"])
        licence = sign_files(bundle.signed_files(), self.key, plugin=manifest.name,
                             version=manifest.version, **terms)  # type: ignore[arg-type]
        (plugin_dir / LICENCE_FILE).write_bytes(licence.to_bytes())


def write_plugin(root: Path, name: str, *, version: str = "1.0.0", api: int = 1,
                 permanent: bool = False, calls: Iterable[str] = (), hooks: Iterable[str] = (),
                 channels: Iterable[str] = (), init: str = "def setup(api):\n    pass\n",
                 files: dict[str, str] | None = None) -> Path:
    d = root / f"{name}-{version}"
    d.mkdir(parents=True)
    calls_toml = ", ".join(f'"{c}"' for c in calls)
    hooks_toml = ", ".join(f'"{h}"' for h in hooks)
    channels_toml = ", ".join(f'"{c}"' for c in channels)
    (d / "plugin.toml").write_text(textwrap.dedent(f"""\
        name = "{name}"
        version = "{version}"
        api = {api}
        permanent = {"true" if permanent else "false"}
        description = "test plugin"
        calls = [{calls_toml}]
        hooks = [{hooks_toml}]
        channels = [{channels_toml}]
        """))
    (d / "__init__.py").write_text(textwrap.dedent(init))
    for rel, text in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(textwrap.dedent(text))
    return d


def marker_plugin(root: Path, marker: Path, **kw: object) -> Path:
    """A plugin whose import writes ``marker``: proof that its code ran."""
    init = f"""\
        from pathlib import Path
        Path({str(marker)!r}).write_text("plugin code ran")

        async def ping(ctx):
            return "pong"

        def setup(api):
            api.register_call("marked.ping", ping)
        """
    return write_plugin(root, "marked", calls=["marked.ping"], init=init, **kw)  # type: ignore[arg-type]


def copy_first_party(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(REPO_PLUGINS / name, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", LICENCE_FILE))
    return target


class TableBilling:
    """A small real ``BillingFacade``: payments in a table, idempotent per external id;
    ownership read from the core's ``accounts`` table, as the core does."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self) -> None:
        await self.pool.execute(
            "CREATE TABLE IF NOT EXISTS test_plugin_payments ("
            " id bigserial PRIMARY KEY, account_id bigint NOT NULL, amount bigint NOT NULL,"
            " external_id text NOT NULL UNIQUE, method text NOT NULL, comment text NOT NULL)")

    async def add_payment(self, account_id: int, amount: int, external_id: str,
                          method: str, comment: str) -> int:
        assert amount > 0
        async with self.pool.acquire() as conn, conn.transaction():
            pid = await conn.fetchval(
                "INSERT INTO test_plugin_payments (account_id, amount, external_id, method, comment)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (external_id) DO NOTHING RETURNING id",
                account_id, amount, external_id, method, comment)
            if pid is None:
                pid = await conn.fetchval(
                    "SELECT id FROM test_plugin_payments WHERE external_id = $1", external_id)
        return int(pid)

    async def accounts_of(self, user_id: int) -> list[int]:
        rows = await self.pool.fetch("SELECT id FROM accounts WHERE user_id = $1 ORDER BY id", user_id)
        return [int(r["id"]) for r in rows]

    async def balance(self, account_id: int) -> int:
        return int(await self.pool.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM test_plugin_payments WHERE account_id = $1",
            account_id))
