"""MS-CHAPv2 end to end: a real ``billcore serve`` (core, radius process,
PostgreSQL), FreeRADIUS's radclient as the NAS sending MS-CHAP-Challenge and
MS-CHAP2-Response computed here (RFC 2759 client side), and the replies
checked as a NAS reads them: MS-CHAP2-Success against the authenticator
response the client expects, the MPPE keys radclient decrypts with the shared
secret against the RFC 3079 keys, MS-CHAP-Error codes on rejection.

Skips without radclient (Debian freeradius-utils); fails under CI=true.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

import pytest

from billcore.common.sysfiles import service_password_file
from billcore.radius import mschap
from tests.test_radius_e2e import (
    PAID,
    Stack,
    radclient,
    radclient_ok,
    radius_stack,
    subscriber,
    wait_until,
)
from urfa.client import connect

PASSWORD = "Pässword-1"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                template_dsn: str) -> AsyncIterator[Stack]:
    async with radius_stack(tmp_path_factory, pg_server_dsn, "radius-mschap") as s:
        admin = s.admin
        for login in ("carol", "dave"):
            s.accounts[login] = await subscriber(admin, login, PAID)
            s.links[login] = await admin.call("radius.link_add", {
                "account_id": s.accounts[login], "login": login, "password": PASSWORD,
                "static_ip": "10.78.1.5" if login == "carol" else "10.78.1.6", "rate_limit": "8M/16M",
                "interim_interval": 120})
        await admin.call("blocks.set", {"account_id": s.accounts["dave"], "reason": "e2e mschap"})
        # the radius process reloads its NAS table on the radius.nas event
        await wait_until(lambda: radclient_ok(s, "auth", f'User-Name = "carol", User-Password = "{PASSWORD}"'),
                         timeout=30)
        yield s


def mschap_attrs(login: str, password: str, ident: int = 0x42) -> tuple[str, bytes, bytes, bytes]:
    """radclient's input for one MS-CHAPv2 attempt, and (challenge, peer challenge, NT-Response)."""
    challenge, peer = os.urandom(16), os.urandom(16)
    nt = mschap.generate_nt_response(challenge, peer, login.encode(), password.encode())
    response = bytes([ident, 0]) + peer + bytes(8) + nt
    attrs = (f'User-Name = "{login}", MS-CHAP-Challenge = 0x{challenge.hex()},'
             f' MS-CHAP2-Response = 0x{response.hex()}, Message-Authenticator = 0x00')
    return attrs, challenge, peer, nt


def printed(out: str, name: str) -> bytes:
    """The octets radclient printed for attribute ``name`` of the reply: hex
    (octets) or a quoted string with C escapes (MS-CHAP-Error is a string in
    FreeRADIUS's dictionary)."""
    match = re.search(rf"^\s*{name} = (?:0x([0-9a-fA-F]+)|\"(.*)\")\s*$", out, re.MULTILINE)
    assert match is not None, f"{name} not in:\n{out}"
    if match.group(1) is not None:
        return bytes.fromhex(match.group(1))
    return re.sub(rb"\\([0-7]{3}|.)", lambda m: bytes([int(m.group(1), 8)]) if len(m.group(1)) == 3
                  else m.group(1), match.group(2).encode())


async def test_mschapv2_accept_proves_the_server_and_hands_the_mppe_keys(stack: Stack) -> None:
    attrs, challenge, peer, nt = mschap_attrs("carol", PASSWORD)
    rc, out = await radclient(stack.auth_port, "auth", attrs)
    assert rc == 0 and "Access-Accept" in out, out
    assert "Framed-IP-Address = 10.78.1.5" in out and 'Mikrotik-Rate-Limit = "8M/16M"' in out, out
    assert "Acct-Interim-Interval = 120" in out, out
    # the peer checks this before it trusts the link (RFC 2759 s.8.8)
    expected = b"\x42" + mschap.generate_authenticator_response(PASSWORD.encode(), nt, peer, challenge, b"carol")
    assert printed(out, "MS-CHAP2-Success") == expected
    # radclient decrypted the keys with the shared secret and this request's authenticator
    send, recv = mschap.server_mppe_keys(PASSWORD.encode(), nt)
    master = mschap.master_key(mschap.hash_nt_password_hash(mschap.nt_password_hash(PASSWORD.encode())), nt)
    assert send == mschap.asymmetric_start_key(master, 16, is_send=True, is_server=True)
    assert printed(out, "MS-MPPE-Send-Key") == send
    assert printed(out, "MS-MPPE-Recv-Key") == recv
    assert "MS-MPPE-Encryption-Policy = Encryption-Allowed" in out, out
    assert "MS-MPPE-Encryption-Types" in out, out


async def test_mschapv2_wrong_password_is_691(stack: Stack) -> None:
    attrs, *_ = mschap_attrs("carol", "not-the-password", ident=0x17)
    _, out = await radclient(stack.auth_port, "auth", attrs)
    assert "Access-Reject" in out, out
    error = printed(out, "MS-CHAP-Error")
    assert re.fullmatch(rb"\x17E=691 R=0 C=[0-9A-F]{32} V=3 M=wrong login or password", error), error
    assert "wrong login or password" in out


async def test_mschapv2_blocked_account_is_647(stack: Stack) -> None:
    attrs, *_ = mschap_attrs("dave", PASSWORD, ident=0x18)
    _, out = await radclient(stack.auth_port, "auth", attrs)
    assert "Access-Reject" in out, out
    assert re.fullmatch(rb"\x18E=647 R=0 C=[0-9A-F]{32} V=3 M=account blocked", printed(out, "MS-CHAP-Error"))


async def test_malformed_mschap2_response_is_rejected_as_malformed(stack: Stack) -> None:
    _, challenge, peer, nt = mschap_attrs("carol", PASSWORD)
    short = bytes([1, 0]) + peer + bytes(8) + nt[:23]   # 49 octets
    _, out = await radclient(stack.auth_port, "auth", f'User-Name = "carol", MS-CHAP-Challenge = 0x{challenge.hex()},'
                                                       f' MS-CHAP2-Response = 0x{short.hex()}')
    assert "Access-Reject" in out and "malformed MS-CHAP" in out, out
    assert "internal" not in out


async def test_mschapv2_under_required_message_authenticator(stack: Stack) -> None:
    await stack.admin.call("radius.nas_edit", {"id": stack.nas_id, "require_message_authenticator": True})
    try:
        attrs, *_ = mschap_attrs("carol", PASSWORD)
        # the radius process reloads the NAS table on the radius.nas event: a request
        # without Message-Authenticator gets no answer once it has
        bare = attrs.replace(", Message-Authenticator = 0x00", "")

        async def unanswered() -> bool:
            _, out = await radclient(stack.auth_port, "auth", bare, timeout=0.5, retries=1)
            return "Access-Accept" not in out and "Access-Reject" not in out

        await wait_until(unanswered, timeout=30)
        rc, out = await radclient(stack.auth_port, "auth", attrs)
        assert rc == 0 and "Access-Accept" in out, out
    finally:
        await stack.admin.call("radius.nas_edit", {"id": stack.nas_id, "require_message_authenticator": False})


async def test_many_mschapv2_requests_in_one_authorize_many_batch(stack: Stack) -> None:
    """The radius process's own call, as the ``radius`` system principal over
    URFA: one batch of MS-CHAPv2 requests, answered in order, bytes intact."""
    password = service_password_file(stack.bc.workdir / "var", "radius").read_text().strip()
    client = await connect("127.0.0.1", stack.bc.urfa_port)
    try:
        await client.login("system", "radius", password)
        requests, expected = [], []
        for i in range(60):
            login, right = ("dave", True) if i % 15 == 7 else ("carol", i % 4 != 3)
            challenge, peer = os.urandom(16), os.urandom(16)
            nt = mschap.generate_nt_response(challenge, peer, login.encode(),
                                             (PASSWORD if right else f"guess-{i}").encode())
            requests.append({"nas": "127.0.0.1", "login": login, "method": "mschapv2", "mschap_challenge": challenge,
                             "mschap_response": bytes([i, 0]) + peer + bytes(8) + nt})
            expected.append((login, right, challenge, peer, nt))
        requests.append({"nas": "127.0.0.1", "login": "carol", "method": "mschapv2",
                         "mschap_challenge": os.urandom(16), "mschap_response": os.urandom(12)})
        decisions = await client.call("radius.authorize_many", {"requests": requests})
    finally:
        await client.close()
    assert len(decisions) == len(requests)
    for i, (decision, (login, right, challenge, peer, nt)) in enumerate(zip(decisions, expected)):
        reply = {name: value for name, value in decision["reply"]}
        if login == "carol" and right:
            assert decision["accept"] is True, (i, decision)
            assert reply["MS-CHAP2-Success"] == bytes([i]) + mschap.generate_authenticator_response(
                PASSWORD.encode(), nt, peer, challenge, b"carol")
            assert (reply["MS-MPPE-Send-Key"], reply["MS-MPPE-Recv-Key"]) == mschap.server_mppe_keys(
                PASSWORD.encode(), nt)
        else:
            code = 647 if login == "dave" else 691
            assert decision["accept"] is False, (i, decision)
            assert re.fullmatch(rb".E=%d R=0 C=[0-9A-F]{32} V=3 M=.+" % code, reply["MS-CHAP-Error"], re.DOTALL)
            assert reply["MS-CHAP-Error"][0] == i
    assert decisions[-1] == {"accept": False, "reason": "malformed MS-CHAP",
                             "reply": [["Reply-Message", "malformed MS-CHAP"]]}
