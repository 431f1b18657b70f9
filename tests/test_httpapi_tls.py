"""The HTTP API over its own TLS: a token crosses the network only encrypted, and the
answers say so (HSTS); the same listener refuses plain HTTP."""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.httpapi_stack import httpapi_stack


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "api.pem", where / "api.key"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return cert, key


async def test_the_api_speaks_tls_with_hsts_and_refuses_plain_http(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with httpapi_stack(tmp_path / "httpapi-tls", httpapi={"tls_cert": str(cert), "tls_key": str(key)}) as stack:
        stack.extra["tls"] = ssl.create_default_context(cafile=str(cert))    # verified, against its own cert
        assert stack.url.startswith("https://")
        token = await stack.token("tls-crm", ["support"])
        pong = stack.call("sys.ping", token)
        assert pong.status == 200 and pong.json() == "pong"
        assert pong.headers["Strict-Transport-Security"].startswith("max-age=")
        assert stack.request("GET", "/api/v1/openapi.json", token=token).json()["openapi"] == "3.1.0"
        plain = urllib.request.Request(stack.url.replace("https://", "http://") + "/api/v1/calls/sys.ping",
                                       data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"})
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as refused:
            urllib.request.urlopen(plain, timeout=10).read()
        assert not isinstance(refused.value, urllib.error.HTTPError)     # no HTTP answer at all in the clear
