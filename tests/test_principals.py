from pathlib import Path

import asyncpg
import pytest

from billcore.common.sysfiles import service_password_file
from billcore.server.principals import DatabaseAuth, create_admin, ensure_service_login
from urfa.scram import client_keys


async def test_admin_rights_are_the_union_of_groups(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await create_admin(conn, "cashier1", "secret-pass", ["cashiers"])
        with pytest.raises(ValueError, match="unknown admin group"):
            await create_admin(conn, "x", "secret-pass", ["nope"])
    auth = DatabaseAuth(pool)
    p = await auth.find_principal("admin", "cashier1")
    assert p is not None and p.kind == "admin"
    assert "payments.*" in p.rights and "*" not in p.rights
    # the stored verifier really verifies the password, and nothing else is stored
    keys = client_keys("secret-pass", p.verifier.salt, p.verifier.iterations)
    assert keys.stored_key == p.verifier.stored_key
    assert await auth.find_principal("admin", "nobody") is None
    assert await auth.find_principal("user", "cashier1") is None
    row = await pool.fetchrow("SELECT * FROM admins WHERE login='cashier1'")
    assert b"secret-pass" not in b"".join(bytes(v) if isinstance(v, (bytes, bytearray)) else str(v).encode() for v in row.values())


async def test_disabled_admin_is_not_found(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await create_admin(conn, "gone", "secret-pass", ["superusers"])
        await conn.execute("UPDATE admins SET disabled = true WHERE login='gone'")
    assert await DatabaseAuth(pool).find_principal("admin", "gone") is None


async def test_service_login_follows_its_password_file(pool: asyncpg.Pool, tmp_path: Path) -> None:
    async with pool.acquire() as conn:
        await ensure_service_login(conn, tmp_path, "portal")
        await ensure_service_login(conn, tmp_path, "portal")
    path = service_password_file(tmp_path, "portal")
    assert path.stat().st_mode & 0o777 == 0o600
    p = await DatabaseAuth(pool).find_principal("system", "portal")
    assert p is not None and p.rights == frozenset({"session.proxy"})
    keys = client_keys(path.read_text().strip(), p.verifier.salt, p.verifier.iterations)
    assert keys.stored_key == p.verifier.stored_key


def test_cli_admin_create(tmp_path: Path, db_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from billcore.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndsn = "{db_dsn}"\n')
    monkeypatch.setenv("ADMIN_PW", "correct horse")
    assert main(["-c", str(cfg), "admin", "create", "root", "--password-env", "ADMIN_PW"]) == 0
    assert "administrator root created" in capsys.readouterr().out
    assert main(["-c", str(cfg), "admin", "create", "root", "--password-env", "ADMIN_PW"]) == 1
    assert "exists already" in capsys.readouterr().err
