"""`billcore plugin keygen | sign | verify | new` as a plugin author uses them."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from billcore.plugins.cli import add_commands, main

from .test_plugins_support import write_plugin


def test_add_commands_plugs_into_the_core_cli(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="billcore")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plugin", "keygen", "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert (tmp_path / "plugin-signing.pub").exists()


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugin", "keygen", "--out", str(tmp_path), "--name", "vendor"]) == 0
    assert stat.S_IMODE((tmp_path / "vendor.key").stat().st_mode) == 0o600
    assert "ed25519:" in capsys.readouterr().out
    before = (tmp_path / "vendor.key").read_bytes()
    assert main(["plugin", "keygen", "--out", str(tmp_path), "--name", "vendor"]) == 1
    assert (tmp_path / "vendor.key").read_bytes() == before
    assert "not overwriting" in capsys.readouterr().err


def test_sign_then_verify_and_every_refusal_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["plugin", "keygen", "--out", str(keys)]) == 0
    d = write_plugin(tmp_path, "acme")
    key = str(keys / "plugin-signing.key")
    assert main(["plugin", "verify", str(d), "--keydir", str(keys)]) == 1
    assert "not signed" in capsys.readouterr().err

    assert main(["plugin", "sign", str(d), "--key", key, "--not-after", "2030-01-01",
                 "--installation-id", "site-7"]) == 0
    assert main(["plugin", "verify", str(d), "--keydir", str(keys), "--installation-id", "site-7",
                 "--at", "2029-06-01"]) == 0
    assert "ok: acme 1.0.0" in capsys.readouterr().out
    cases = [
        (["--installation-id", "site-7", "--at", "2030-01-01"], "expired"),
        (["--installation-id", "site-8", "--at", "2029-06-01"], "another installation"),
        (["--installation-id", "site-7", "--at", "2029-06-01", "--api", "2"], "needs API 1"),
    ]
    for extra, reason in cases:
        assert main(["plugin", "verify", str(d), "--keydir", str(keys), *extra]) == 1
        assert reason in capsys.readouterr().err
    (d / "__init__.py").write_text("# changed\n")
    assert main(["plugin", "verify", str(d), "--keydir", str(keys), "--installation-id", "site-7",
                 "--at", "2029-06-01"]) == 1
    assert "files differ" in capsys.readouterr().err


def test_new_refuses_a_bad_name_or_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugin", "new", "Bad-Name", "--dest", str(tmp_path)]) == 1
    assert main(["plugin", "new", "payments", "--dest", str(tmp_path)]) == 1
    assert "reserved" in capsys.readouterr().err
    assert main(["plugin", "new", "mine", "--dest", str(tmp_path)]) == 0
    assert 'name = "mine"' in (tmp_path / "mine" / "plugin.toml").read_text()
    assert '"mine.hello"' in (tmp_path / "mine" / "plugin.toml").read_text()
    assert main(["plugin", "new", "mine", "--dest", str(tmp_path)]) == 1


def test_core_cli_dispatch_uses_the_configured_key_directory(tmp_path: Path) -> None:
    from billcore.common.config import load_config

    keys = tmp_path / "keys"
    assert main(["plugin", "keygen", "--out", str(keys)]) == 0
    d = write_plugin(tmp_path, "acme")
    assert main(["plugin", "sign", str(d), "--key", str(keys / "plugin-signing.key"),
                 "--installation-id", "site-7"]) == 0
    cfg = tmp_path / "billcore.toml"
    cfg.write_text(f'[plugins]\nkey_dir = "{keys}"\ninstallation_id = "site-7"\n')
    config = load_config(cfg)
    commands: dict[str, object] = {}
    parser = argparse.ArgumentParser(prog="billcore")
    add_commands(parser.add_subparsers(dest="command", required=True), commands)  # type: ignore[arg-type]
    args = parser.parse_args(["plugin", "verify", str(d)])
    assert commands["plugin"](args, config) == 0  # type: ignore[operator]
    assert main(["plugin", "verify", str(d)]) == 1  # no config: --keydir is needed
