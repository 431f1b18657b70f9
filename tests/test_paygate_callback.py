"""The payment callback edge end to end: a real ``billcore serve`` with ``[paygate]`` on (the supervisor
starts the ``paygate`` role, the core provisions its system login), a real PostgreSQL, callbacks over
real HTTP, and root's own URFA session to see what was booked.

What a gateway (and the operator) would notice: a callback books the payment once however often the
gateway repeats it; a bad signature, a stale timestamp, a wrong currency, a malformed amount, an
unknown account, or another amount under a booked transaction id each get their own answer and book
nothing; a status other than "paid" books nothing; the core away is a 503 the gateway retries.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from billcore.common.config import PaygateSection
from paygate.app import Gateway, paygate_link, serve
from tests.conftest import free_port
from tests.gateway_sim import callback_body, signed
from tests.running import serving_with_root
from urfa.client import Client

SECRET = b"sim-gateway-secret-0123456789abcdef"
ROOT_PW = "root-paygate-pw-1"
UNIT = 1_000_000


@dataclass
class Stack:
    url: str
    admin: Client
    account: int            # alice's basic account
    contract_account: int   # bob's, found by his contract number C-1042
    log: Any


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


async def payments(admin: Client, account: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await admin.call("payments.list", {"account_id": account})
    return [row for row in rows if row["method"].startswith("gateway:")]


@pytest.fixture
async def stack(tmp_path: Path, db_dsn: str) -> AsyncIterator[Stack]:
    secret_file = tmp_path / "sim.secret"
    secret_file.write_text(SECRET.decode() + "\n")
    secret_file.chmod(0o600)
    port = free_port()
    paygate = {"enabled": True, "port": port,
               "gateways": [{"name": "sim", "secret_file": str(secret_file)},
                            {"name": "kop", "secret_file": str(secret_file), "amount_format": "minor"}]}
    async with serving_with_root("paygate-cb", "paygate", ROOT_PW, db_dsn, paygate=paygate) as (bc, admin):
        alice = await admin.call("users.create", {"login": "alice", "password": "alice-password-1"})
        bob = await admin.call("users.create", {"login": "bob", "password": "bob-password-1", "external_id": "C-1042"})
        yield Stack(f"http://127.0.0.1:{port}", admin, int(alice["basic_account_id"]), int(bob["basic_account_id"]),
                    bc.log)


def send(stack: Stack, body: bytes, *, gateway: str = "sim", ts: int | None = None,
         secret: bytes = SECRET) -> tuple[int, dict[str, Any], dict[str, str]]:
    return post(f"{stack.url}/callback/{gateway}", body, signed(secret, body, ts))


async def test_duplicate_callback_books_one_payment(stack: Stack) -> None:
    body = callback_body("TX-1", str(stack.account), "150.50")
    first = send(stack, body)
    again = send(stack, body)                          # the gateway's retry: same body, new signature time
    assert first[0] == 200 and first[1]["duplicate"] is False, first
    assert again[0] == 200 and again[1]["duplicate"] is True, again
    assert first[1]["payment_id"] == again[1]["payment_id"]
    booked = await payments(stack.admin, stack.account)
    assert [(p["amount"], p["method"], p["external_id"]) for p in booked] == [(150_500_000, "gateway:sim", "sim:TX-1")]
    account = await stack.admin.call("accounts.get", {"account_id": stack.account})
    assert account["balance"] == 150_500_000
    # the decisions are in the log, without the secret or the signature
    log = stack.log()
    assert 'decision=booked' in log and 'decision=duplicate' in log
    assert SECRET.decode() not in log and signed(SECRET, body, 1)["X-Billcore-Signature"][3:13] not in log


async def test_simultaneous_duplicates_book_one_payment(stack: Stack) -> None:
    """A gateway that fires its retries without waiting: eight copies at once, one payment."""
    body = callback_body("TX-RACE", str(stack.account), "7.00")
    answers = await asyncio.gather(*(asyncio.to_thread(send, stack, body) for _ in range(8)))
    assert {status for status, _, _ in answers} == {200}
    assert len({answer["payment_id"] for _, answer, _ in answers}) == 1
    assert sorted(answer["duplicate"] for _, answer, _ in answers) == [False] + [True] * 7
    booked = await payments(stack.admin, stack.account)
    assert [(p["amount"], p["external_id"]) for p in booked] == [(7 * UNIT, "sim:TX-RACE")]


async def test_contract_number_and_minor_units(stack: Stack) -> None:
    status, answer, _ = send(stack, callback_body("K-7", "C-1042", "12345"), gateway="kop")
    assert status == 200 and answer["account_id"] == stack.contract_account, answer
    booked = await payments(stack.admin, stack.contract_account)
    assert [(p["amount"], p["method"]) for p in booked] == [(123_450_000, "gateway:kop")]


async def test_refusals_book_nothing(stack: Stack) -> None:
    acc = str(stack.account)
    good = callback_body("TX-9", acc, "10.00")
    assert send(stack, good)[0] == 200

    cases = [
        # (what, answer's status, its error, the request)
        ("bad signature", 401, "bad_signature", lambda: send(stack, callback_body("TX-2", acc, "10.00"),
                                                             secret=b"not-the-secret-0123456789")),
        ("tampered body", 401, "bad_signature", lambda: post(
            f"{stack.url}/callback/sim", callback_body("TX-3", acc, "99999.00"),
            signed(SECRET, callback_body("TX-3", acc, "1.00")))),
        ("no signature", 401, "bad_signature", lambda: post(f"{stack.url}/callback/sim",
                                                            callback_body("TX-4", acc, "1.00"), {})),
        ("stale timestamp", 401, "stale_timestamp", lambda: send(stack, callback_body("TX-5", acc, "10.00"),
                                                                 ts=int(time.time()) - 301)),
        ("future timestamp", 401, "stale_timestamp", lambda: send(stack, callback_body("TX-5", acc, "10.00"),
                                                                  ts=int(time.time()) + 400)),
        ("wrong currency", 400, "wrong_currency", lambda: send(stack, callback_body("TX-6", acc, "10.00", "USD"))),
        ("a float amount", 400, "bad_field", lambda: send(stack, json.dumps(
            {"txn_id": "TX-7", "account": acc, "amount": 10.5, "currency": "RUB", "status": "paid"}).encode())),
        ("sub-kopeck amount", 400, "bad_field", lambda: send(stack, callback_body("TX-7", acc, "10.001"))),
        ("negative amount", 400, "bad_field", lambda: send(stack, callback_body("TX-7", acc, "-10.00"))),
        ("not JSON", 400, "bad_field", lambda: send(stack, b"txn_id=1&amount=2")),
        ("unknown account", 404, "unknown_account", lambda: send(stack, callback_body("TX-8", "999999", "1.00"))),
        ("unknown contract", 404, "unknown_account", lambda: send(stack, callback_body("TX-8", "C-0000", "1.00"))),
        ("amount mismatch", 409, "conflict", lambda: send(stack, callback_body("TX-9", acc, "11.00"))),
        ("another account, same txn", 409, "conflict", lambda: send(
            stack, callback_body("TX-9", str(stack.contract_account), "10.00"))),
        ("unknown gateway", 404, "unknown_gateway", lambda: send(stack, good, gateway="nope")),
        ("body too large", 413, "too_large", lambda: send(stack, b'{"pad": "' + b"x" * 20000 + b'"}')),
    ]
    for what, status, error, request in cases:
        got, answer, _ = request()
        assert (got, answer.get("error")) == (status, error), (what, got, answer)
        assert "asyncpg" not in json.dumps(answer) and "SELECT" not in json.dumps(answer), (what, answer)
    # a pending payment is acknowledged and books nothing
    got, answer, _ = send(stack, callback_body("TX-10", acc, "5.00", status="pending"))
    assert (got, answer["result"]) == (200, "ignored")
    booked = await payments(stack.admin, stack.account)
    assert [(p["amount"], p["external_id"]) for p in booked] == [(10 * UNIT, "sim:TX-9")]
    assert await payments(stack.admin, stack.contract_account) == []


async def test_core_unavailable_is_503(tmp_path: Path) -> None:
    """The edge in front of a core that is not there: the gateway is told to retry, not that it failed."""
    password = tmp_path / "paygate.password"
    password.write_text("whatever-password\n")
    port = free_port()
    section = PaygateSection(enabled=True, port=port, core_timeout=0.5)
    link = paygate_link(host="127.0.0.1", port=free_port(), unix=None, login="paygate", password_file=password,
                        timeout=0.5)
    runner = await serve(section, link, {"sim": Gateway("sim", SECRET, "RUB", "major", 2)})
    try:
        body = callback_body("TX-1", "1", "1.00")
        # the edge runs in this loop: the blocking request goes to a thread
        status, answer, headers = await asyncio.to_thread(post, f"http://127.0.0.1:{port}/callback/sim", body,
                                                          signed(SECRET, body))
        assert (status, answer["error"]) == (503, "unavailable")
        assert headers["Retry-After"] == "30"
    finally:
        await runner.cleanup()
        await link.close()


def test_entry_point_refuses_plain_http_on_a_network(tmp_path: Path) -> None:
    """``python -m paygate`` binding a non-loopback address without TLS (or --behind-proxy) does not start."""
    config = tmp_path / "billcore.toml"
    config.write_text("[paygate]\nenabled = true\n")
    password = tmp_path / "pw"
    password.write_text("x\n")
    run = subprocess.run([sys.executable, "-m", "paygate", "-c", str(config), "--host", "0.0.0.0",
                          "--password-file", str(password)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "not a loopback address" in run.stderr, run.stderr
