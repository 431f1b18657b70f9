"""RADIUS under bad input, through a real ``billcore serve`` on loopback:
hand-made datagrams (no pyrad on the sending side, so nothing "fixes" them)
from the NAS's address and from a forged one.

Every malformed, oversize, forged or unauthenticated datagram must be
dropped without an answer (counted in ``billcore_radius_dropped_total``),
a wrong password answered Reject, and the server must keep accepting the
right requests afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from radius.auth import pap_hide
from tests.conftest import TEMPLATE, _create_db, _drop_db, free_port, with_database
from tests.running import BillcoreProcess
from tests.waiting import wait_for
from tests.test_security_urfa import Raw, code

SECRET = b"sec-radius-secret"
ADMIN_PW = "admin-password-7"
MA = 80


def attr(t: int, value: bytes) -> bytes:
    return bytes([t, len(value) + 2]) + value


def access_request(attrs: bytes, *, ident: int | None = None, with_ma: bool = True, secret: bytes = SECRET,
                   auth: bytes | None = None, pap: bytes | None = None, code_: int = 1) -> bytes:
    auth = auth or secrets.token_bytes(16)
    if pap is not None:
        attrs += attr(2, pap_hide(pap, secret, auth))
    if with_ma:
        attrs += attr(MA, b"\0" * 16)
    ident = secrets.randbelow(256) if ident is None else ident
    packet = bytes([code_, ident]) + (20 + len(attrs)).to_bytes(2, "big") + auth + attrs
    if with_ma:
        mac = hmac.digest(secret, packet, "md5")
        packet = packet[:-16] + mac
    return packet


def user(name: str) -> bytes:
    return attr(1, name.encode())


@pytest.fixture(scope="module")
async def radius(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                 template_dsn: str) -> AsyncIterator[dict[str, Any]]:
    db = await _create_db(pg_server_dsn, TEMPLATE)
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    bc = BillcoreProcess(tmp_path_factory.mktemp("sec-radius"), dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port,
        "decision_timeout": 2.0, "stale_check": 3600.0})
    bc.start()
    try:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        done = subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create",
                               "root", "--password-env", "PW"], env={**os.environ, "PW": ADMIN_PW},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        admin = await Raw.open(bc.urfa_port, "127.0.0.1")
        await admin.login("admin", "root", ADMIN_PW)
        made = await admin.call("radius.nas_add", {"name": "nas", "address": "127.0.0.1",
                                                   "secret": SECRET.decode(), "require_message_authenticator": False})
        assert code(made) == "ok", made
        u = (await admin.call("users.create", {"login": "carol", "password": "carol-portal"}))["value"]
        linked = await admin.call("radius.link_add", {"account_id": u["basic_account_id"], "login": "carol",
                                                      "password": "wonderland"})
        assert code(linked) == "ok", linked
        yield {"bc": bc, "auth": auth_port, "acct": acct_port}
        await admin.close()
    finally:
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


class Nas:
    def __init__(self, src: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((src, 0))
        self.sock.settimeout(0.4)
        self.port = port

    def ask(self, packet: bytes, wait: float = 0.4) -> bytes | None:
        self.sock.settimeout(wait)
        self.sock.sendto(packet, ("127.0.0.1", self.port))
        try:
            return self.sock.recv(8192)
        except socket.timeout:
            return None


@pytest.fixture
def nas(radius: dict[str, Any]) -> Iterator[Nas]:
    n = Nas("127.0.0.1", radius["auth"])
    yield n
    n.sock.close()


def accepted(n: Nas, attrs: bytes, **kw: Any) -> int | None:
    answer = n.ask(access_request(attrs, **kw), wait=3.0)
    return None if answer is None else answer[0]


def wait_accept(n: Nas) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if accepted(n, user("carol"), pap=b"wonderland") == 2:
            return
        time.sleep(0.3)
    raise AssertionError("the RADIUS server never accepted a good request")


def metrics_text(radius: dict[str, Any]) -> bytes:
    return bytes(urllib.request.urlopen(f"http://127.0.0.1:{radius['bc'].metrics_port}/metrics", timeout=5).read())


def dropped(radius: dict[str, Any]) -> dict[str, float]:
    text = metrics_text(radius).decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'billcore_radius_dropped_total\{reason="(\w+)"\} ([0-9.e+]+)', text)}


def test_malformed_and_forged_datagrams_are_dropped_and_counted(radius: dict[str, Any], nas: Nas) -> None:
    wait_accept(nas)
    # part of the scenario, not a wait for a result: the radius process flushes its
    # counters each second, so a baseline read after one flush includes every earlier drop
    time.sleep(1.2)
    before = dropped(radius)
    good = access_request(user("carol"), pap=b"wonderland")
    malformed = {
        "19 octets": good[:19],
        "length field past the datagram": good[:2] + (len(good) + 40).to_bytes(2, "big") + good[4:],
        "length field over 4096": good[:2] + (5000).to_bytes(2, "big") + good[4:],
        "attribute length 0": access_request(user("carol") + b"\x1a\x00" + b"x" * 10, with_ma=False),
        "attribute length 1": access_request(user("carol") + b"\x1a\x01", with_ma=False),
        "attribute past the end": access_request(user("carol") + b"\x1a\xff" + b"x" * 10, with_ma=False),
        "Message-Authenticator of 10 octets": access_request(user("carol") + attr(MA, b"\0" * 8), with_ma=False),
        "two Message-Authenticators": access_request(user("carol") + attr(MA, b"\0" * 16)),
        "NAS-IP-Address of 3 octets": access_request(user("carol") + attr(4, b"\x7f\0\0"), pap=b"wonderland"),
        "User-Password of 15 octets": access_request(user("carol") + attr(2, b"x" * 15)),
        "CHAP-Password of 10 octets": access_request(user("carol") + attr(3, b"x" * 10)),
    }
    for name, packet in malformed.items():
        assert nas.ask(packet) is None, name
    oversize = access_request(user("carol") + attr(26, b"v" * 250) * 20, pap=b"wonderland")
    assert len(oversize) > 4096 and nas.ask(oversize) is None
    assert nas.ask(os.urandom(4096)) is None and nas.ask(b"") is None

    # authenticity: a wrong Message-Authenticator, a wrong secret, a reply code sent as a request
    assert nas.ask(access_request(user("carol"), pap=b"wonderland", secret=b"guessed-secret")) is None
    forged = bytearray(good)
    forged[-1] ^= 1
    assert nas.ask(bytes(forged)) is None
    assert nas.ask(access_request(user("carol"), pap=b"wonderland", code_=2)) is None
    # a datagram from an address that is no NAS (loopback's 127.0.0.2 spoofing the NAS's packet)
    spoof = Nas("127.0.0.2", radius["auth"])
    try:
        assert spoof.ask(good) is None
        assert spoof.ask(access_request(user("carol"), pap=b"wonderland")) is None
    finally:
        spoof.sock.close()

    want = {"malformed": len(malformed) + 2, "unknown_nas": 2, "bad_message_authenticator": 2, "wrong_code": 1}

    def grown() -> dict[str, float] | None:
        after = dropped(radius)
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return grew if all(grew.get(k, 0) >= n for k, n in want.items()) else None

    wait_for(grown, what=f"drop counters grown by at least {want}")
    # and the server still answers the NAS
    assert accepted(nas, user("carol"), pap=b"wonderland") == 2


def test_wrong_passwords_and_odd_chap_get_a_reject(radius: dict[str, Any], nas: Nas) -> None:
    wait_accept(nas)
    assert accepted(nas, user("carol"), pap=b"not-her-password") == 3
    assert accepted(nas, user("nobody"), pap=b"wonderland") == 3
    assert accepted(nas, user("carol")) == 3                                  # no password at all
    assert accepted(nas, user("carol"), pap=b"w" * 128) == 3                  # the longest PAP password
    assert accepted(nas, user("carol" * 50), pap=b"wonderland") == 3          # a 250-octet User-Name
    assert accepted(nas, attr(1, b"\xff\xfecarol"), pap=b"wonderland") == 3     # not UTF-8
    # CHAP: the right response accepted, a wrong one rejected
    challenge = secrets.token_bytes(16)
    right = hashlib.md5(b"\x07wonderland" + challenge).digest()
    assert accepted(nas, user("carol") + attr(3, b"\x07" + right) + attr(60, challenge)) == 2
    assert accepted(nas, user("carol") + attr(3, b"\x07" + right[::-1]) + attr(60, challenge)) == 3
    # a challenge of 253 octets: answered, never a crash
    long_challenge = secrets.token_bytes(253)
    answer = accepted(nas, user("carol") + attr(3, b"\x07" + hashlib.md5(b"\x07wonderland" + long_challenge).digest())
                      + attr(60, long_challenge))
    assert answer in (2, 3, None)
    assert accepted(nas, user("carol"), pap=b"wonderland") == 2


def test_a_chap_challenge_of_the_wrong_length_is_refused(radius: dict[str, Any], nas: Nas) -> None:
    # RFC 2865 s.5.40: at least 5 octets; an empty challenge would make the
    # response a fixed, replayable MD5(id + password)
    wait_accept(nas)
    for challenge in (b"", b"abcd"):
        response = hashlib.md5(b"\x07wonderland" + challenge).digest()
        answer = accepted(nas, user("carol") + attr(3, b"\x07" + response) + attr(60, challenge))
        assert answer != 2, challenge


def test_one_poisoned_request_does_not_sink_its_batch(radius: dict[str, Any], nas: Nas) -> None:
    wait_accept(nas)
    other = Nas("127.0.0.1", radius["auth"])
    try:
        poison = access_request(attr(1, b"car\x00ol"), pap=b"wonderland")
        good = access_request(user("carol"), pap=b"wonderland")
        other.sock.sendto(poison, ("127.0.0.1", radius["auth"]))
        nas.sock.sendto(good, ("127.0.0.1", radius["auth"]))        # same loop turn: same batch
        nas.sock.settimeout(3.0)
        try:
            answer = nas.sock.recv(8192)
        except socket.timeout:
            answer = b""
        assert answer[:1] == b"\x02", "the good request in the poisoned batch was not accepted"
        other.sock.settimeout(3.0)
        assert other.sock.recv(8192)[:1] == b"\x03"                 # and the poisoned one is rejected
        wait_for(lambda: re.search(rb'billcore_radius_refused_total\{reason="bad_user_name"\} [1-9]', metrics_text(radius)),
                 what="the poisoned request counted as refused")
    finally:
        other.sock.close()


def test_a_burst_of_garbage_does_not_starve_the_nas(radius: dict[str, Any], nas: Nas) -> None:
    wait_accept(nas)
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.3", 0))
    try:
        junk = [os.urandom(20 + i % 200) for i in range(64)]
        for i in range(3000):
            flood.sendto(junk[i % 64], ("127.0.0.1", radius["auth"]))
    finally:
        flood.close()
    assert accepted(nas, user("carol"), pap=b"wonderland") == 2


async def test_radius_answers_while_urfa_is_probed(radius: dict[str, Any], nas: Nas) -> None:
    """The core behind RADIUS keeps deciding while a stranger's URFA connection sends garbage."""
    wait_accept(nas)
    c = await Raw.open(radius["bc"].urfa_port, "127.0.0.9")
    c.send_bytes(b"\x91" * 50_000 + b"\xc0")
    assert await c.bye() == "protocol"
    assert await asyncio.to_thread(accepted, nas, user("carol"), pap=b"wonderland") == 2
