"""The shipped deployment files: the production config is one the loader
accepts and says what it promises; the unit keeps its hardening."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

from billcore.common.config import load_config
from tests.conftest import need_peer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_production_config_loads_with_external_db_tls_and_edges() -> None:
    config = load_config(DEPLOY / "billcore.production.toml")
    assert config.database.dsn.startswith("postgresql://") and "sslmode=verify-full" in config.database.dsn
    assert config.urfa.tls_cert and config.urfa.tls_key
    assert config.portal.tls_cert and config.portal.tls_key and config.portal.cookie_secure
    assert config.radius.enabled and config.netflow.enabled and config.portal.enabled
    assert config.console.enabled and config.console.tls_cert and config.console.cookie_secure
    assert (config.radius.auth_port, config.radius.acct_port) == (1812, 1813)
    # the secret key lives outside data_dir, so backups of data_dir do not carry it
    assert not config.secret_key_path.is_relative_to(config.data_dir)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / name)
    return parser


def test_service_unit_is_hardened() -> None:
    s = unit("billcore.service")["Service"]
    assert s["User"] == "billcore" and s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE" == s["CapabilityBoundingSet"]
    assert s["ExecStart"].endswith("billcore serve") and s["KillMode"] == "mixed"
    for name in ("billcore-backup.service", "billcore-verify.service"):
        assert unit(name)["Service"]["User"] == "billcore"


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    need_peer(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian systemd) is not installed")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, sorted(DEPLOY.glob("*.service")))],
                          capture_output=True, text=True, timeout=60)
    # missing binaries/users on a build machine are expected; syntax errors are not
    bad = [line for line in done.stderr.splitlines()
           if "Unknown key" in line or "Unknown section" in line or "Invalid" in line]
    assert bad == []
