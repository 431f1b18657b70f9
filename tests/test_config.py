import dataclasses
from pathlib import Path

import pytest

from billcore.common.config import ConfigError, config_from_dict, example_config, load_config


def test_no_file_means_defaults() -> None:
    config = load_config(None)
    assert config.urfa.port == 11758
    assert config.database.dsn == ""
    assert config.urfa.session_timeout == 1800
    assert config.httpapi.enabled is False and config.httpapi.port == 8446 and config.httpapi.host == "127.0.0.1"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"urfa": {"port": "abc"}}, "urfa.port: expected an integer, got 'abc'"),
        ({"urfa": {"prot": 1}}, "urfa.prot: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown section"),
        ({"metrics": {"enabled": "yes"}}, "metrics.enabled: expected true or false"),
        ({"urfa": {"port": True}}, "urfa.port: expected an integer, got True"),
        ({"urfa": {"port": 70000}}, "urfa.port: not a TCP port"),
        ({"core": {"timezone": "Mars/Olympus"}}, "core.timezone: unknown time zone"),
        ({"urfa": {"tls_cert": "a.pem"}}, "urfa.tls_cert and urfa.tls_key go together"),
        ({"database": {"pool_min": 20, "pool_max": 5}}, "database.pool_min"),
        ({"urfa": 5}, "urfa: expected a [urfa] table"),
        ({"httpapi": {"host": "0.0.0.0"}}, "httpapi.host: '0.0.0.0' is not a loopback address"),
        ({"httpapi": {"tls_cert": "a.pem"}}, "httpapi.tls_cert and httpapi.tls_key go together"),
        ({"httpapi": {"rate": 0}}, "httpapi.rate: must be positive"),
        ({"httpapi": {"max_body": -1}}, "httpapi.max_body: must be positive"),
        ({"httpapi": {"port": 0}}, "httpapi.port: not a TCP port"),
    ],
)
def test_bad_config_names_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert message in str(err.value)


def test_int_accepted_where_a_number_is_expected() -> None:
    assert config_from_dict({"database": {"connect_timeout": 3}}).database.connect_timeout == 3.0


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[urfa\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_example_is_valid_and_committed_copy_is_current(tmp_path: Path) -> None:
    text = example_config()
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert dataclasses.replace(load_config(path), source="") == load_config(None)
    committed = Path(__file__).parent.parent / "docs" / "billcore.example.toml"
    assert committed.read_text() == text, "regenerate with: billcore config example > docs/billcore.example.toml"


def test_cli_refuses_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from billcore.cli import main

    path = tmp_path / "c.toml"
    path.write_text("[urfa]\nport = 'x'\n")
    assert main(["-c", str(path), "config", "check"]) == 2
    assert "urfa.port: expected an integer" in capsys.readouterr().err
