"""The operator commands through ``billcore`` itself: exit codes and what
they print, as cron and an operator see them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from billcore import cli


@pytest.fixture
def ops_commands() -> Iterator[None]:
    """The ops commands are part of the billcore CLI; keep logging as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        # main() points logging at the (captured) stderr of this test: put it back
        root.handlers[:] = handlers
        root.setLevel(level)


def config_for(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "billcore.toml"
    path.write_text(f'[core]\ndata_dir = "{tmp_path / "var"}"\n[database]\ndsn = "{dsn}"\n')
    return path


def test_import_backup_restore_round(ops_commands: None, db_dsn: str, empty_db_dsn: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = config_for(tmp_path, db_dsn)
    data = tmp_path / "subs.csv"
    data.write_text("login,balance,ips\nann,12.5,10.3.0.1\nann,1,\nben,x,\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "line 3: duplicate login 'ann' (first at line 2)" in err
    assert "line 4: balance: not a money string" in err
    assert "import refused: 2 error(s), nothing was imported" in err

    data.write_text("login,balance,ips\nann,12.5,10.3.0.1\nben,-1,\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 0
    assert "dry run, nothing written: would import 2 subscriber(s)" in capsys.readouterr().out
    assert cli.main(["-c", str(src), "import", str(data)]) == 0
    out = capsys.readouterr()
    assert "imported 2 subscriber(s), 2 account(s), 2 opening balance(s) totalling 11.50" in out.out
    assert "1 account(s) blocked for debt" in out.out
    assert "writing 7/7 done in" in out.err           # plain progress lines: stderr is not a tty

    backup = tmp_path / "b.tar"
    assert cli.main(["-c", str(src), "backup", "--out", str(backup)]) == 0
    assert f"backup written to {backup}" in capsys.readouterr().out

    dst = tmp_path / "dst"
    dst.mkdir()
    target = config_for(dst, empty_db_dsn)
    assert cli.main(["-c", str(target), "restore", str(backup)]) == 0
    assert "next: `billcore migrate`" in capsys.readouterr().out
    # the second time the database is not empty
    assert cli.main(["-c", str(target), "restore", str(backup)]) == 1
    assert "restore refused: the database is not empty" in capsys.readouterr().err
    assert cli.main(["-c", str(target), "restore", str(backup), "--force"]) == 0
    capsys.readouterr()
    assert cli.main(["-c", str(target), "verify"]) == 0
    assert "verify: ok" in capsys.readouterr().out


def test_import_of_huge_opening_balances_exits_0(ops_commands: None, db_dsn: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Balances whose sum passes one amount's range: committed, summarised, exit 0 (was a traceback, exit 1)."""
    src = config_for(tmp_path, db_dsn)
    data = tmp_path / "rich.csv"
    data.write_text("login,balance\nr1,999999999999.5\nr2,999999999999.5\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 0
    assert "totalling 1999999999999.00," in capsys.readouterr().out
    assert cli.main(["-c", str(src), "import", str(data)]) == 0
    out = capsys.readouterr()
    assert "imported 2 subscriber(s), 2 account(s), 2 opening balance(s) totalling 1999999999999.00," in out.out
    assert "Traceback" not in out.err
