"""RadSec (RADIUS over TLS, RFC 6614) end to end: a real ``billcore serve``
with ``[radius] radsec_port``, radclient → radsecproxy (UDP in, TLS out with
a client certificate made here) → billcore; and peers that misbehave, from a
Python client: no client certificate, a certificate of another CA, plain TCP,
a Length of 5 or past the limit, a sender that stalls mid-packet.  Each is
closed, counted by its reason on the metrics endpoint, nothing ``internal``
in the log, and the server keeps serving the good client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEMPLATE, _create_db, _drop_db, free_port, need_peer, with_database
from tests.running import BillcoreProcess
from tests.test_radius_e2e import ADMIN_PASSWORD, SECRET, admin_session, radclient, subscriber, wait_until
from tests.waiting import eventually
from urfa.client import Client

ROOT = Path(__file__).resolve().parent.parent
MAKE_CERTS = ROOT / "deploy" / "freeradius" / "make-test-certs.sh"
RADSECPROXY = shutil.which("radsecproxy")
PROXY_SECRET = "proxy-secret-1"
PACKET_TIMEOUT = 1.5


@dataclass
class Radsec:
    bc: BillcoreProcess
    admin: Client
    radsec_port: int
    proxy_auth: int          # radsecproxy's UDP port: radclient sends here
    certs: Path
    other: Path              # another CA and a client certificate of it
    account: int


def _certs(where: Path, *clients: str) -> None:
    done = subprocess.run([str(MAKE_CERTS), str(where), "radius.test", *clients], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
async def radsec(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                 template_dsn: str) -> AsyncIterator[Radsec]:
    need_peer(RADSECPROXY is not None, "radsecproxy (Debian radsecproxy) is not installed")
    need_peer(shutil.which("radclient") is not None, "radclient (Debian freeradius-utils) is not installed")
    need_peer(shutil.which("openssl") is not None, "openssl is not installed")
    work = tmp_path_factory.mktemp("radsec")
    certs, other = work / "certs", work / "other"
    _certs(certs, "nas1")
    _certs(other, "rogue")
    db = await _create_db(pg_server_dsn, TEMPLATE)
    radsec_port = free_port()
    bc = BillcoreProcess(work, dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": free_port(socket.SOCK_DGRAM),
        "acct_port": free_port(socket.SOCK_DGRAM), "decision_timeout": 2.0, "stale_check": 3600.0,
        "radsec_port": radsec_port, "radsec_host": "127.0.0.1", "radsec_cert": str(certs / "server.pem"),
        "radsec_key": str(certs / "server.key"), "radsec_ca": str(certs / "ca.pem"),
        "radsec_packet_timeout": PACKET_TIMEOUT, "radsec_handshake_timeout": 3.0})
    bc.start()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        made = subprocess.run(
            [sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create", "root",
             "--password-env", "E2E_ADMIN_PW"],
            env=dict(os.environ, E2E_ADMIN_PW=ADMIN_PASSWORD), cwd=work, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        admin = await admin_session(bc)
        # the proxy's TLS connection comes from 127.0.0.1: that NAS row (its secret is UDP's, unused by RadSec)
        await admin.call("radius.nas_add", {"name": "radsecproxy", "address": "127.0.0.1", "secret": SECRET,
                                            "require_message_authenticator": False})
        account = await subscriber(admin, "carol", 7_200_000)
        await admin.call("radius.link_add", {"account_id": account, "login": "carol", "password": "tls-pw-1",
                                             "static_ip": "10.79.1.5", "max_sessions": 4})

        proxy_auth = free_port(socket.SOCK_DGRAM)
        conf = work / "radsecproxy.conf"
        conf.write_text(f"""ListenUDP 127.0.0.1:{proxy_auth}
LogLevel 4
LogDestination file://{work / 'radsecproxy.log'}
PidFile {work / 'radsecproxy.pid'}
tls default {{
    CACertificateFile {certs / 'ca.pem'}
    CertificateFile {certs / 'nas1.pem'}
    CertificateKeyFile {certs / 'nas1.key'}
}}
client nas {{
    host 127.0.0.1
    type udp
    secret {PROXY_SECRET}
}}
server billcore {{
    host 127.0.0.1
    port {radsec_port}
    type tls
    tls default
    CertificateNameCheck off
}}
realm * {{
    server billcore
    accountingServer billcore
}}
""")
        proxy = subprocess.Popen([RADSECPROXY or "", "-f", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT)
        s = Radsec(bc, admin, radsec_port, proxy_auth, certs, other, account)
        await wait_until(lambda: _carol_accepted(s), timeout=30)
        yield s
        await admin.close()
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


async def _carol_accepted(s: Radsec) -> bool:
    rc, out = await radclient(s.proxy_auth, "auth", 'User-Name = "carol", User-Password = "tls-pw-1"',
                              secret=PROXY_SECRET)
    return rc == 0 and "Access-Accept" in out


def closed(s: Radsec, reason: str) -> float:
    return s.bc.metric("billcore_radius_radsec_closed_total", reason=reason)


def status_server(ident: int = 7) -> bytes:
    """A Status-Server signed with the RadSec secret (RFC 5997: Message-Authenticator required)."""
    authenticator = os.urandom(16)
    body = bytes((80, 18)) + bytes(16)
    packet = bytes((12, ident)) + (20 + len(body)).to_bytes(2, "big") + authenticator + body
    mac = hmac.new(b"radsec", packet, hashlib.md5).digest()
    return packet[:-16] + mac


def client_context(s: Radsec, cert: str | None, ca_dir: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(s.certs / "ca.pem"))
    if cert is not None:
        where = ca_dir or s.certs
        ctx.load_cert_chain(str(where / f"{cert}.pem"), str(where / f"{cert}.key"))
    return ctx


async def tls_exchange(s: Radsec, ctx: ssl.SSLContext, data: bytes, read: int = 20,
                       source: str = "127.0.0.1") -> bytes:
    """Connect over TLS, send ``data``, read; b"" when the server closed (or refused) the connection."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", s.radsec_port, ssl=ctx, local_addr=(source, 0)), 10)
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(read), 15)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_pap_accept_and_reject_over_radsecproxy(radsec: Radsec) -> None:
    rc, out = await radclient(radsec.proxy_auth, "auth", 'User-Name = "carol", User-Password = "tls-pw-1"',
                              secret=PROXY_SECRET)
    assert rc == 0 and "Access-Accept" in out and "Framed-IP-Address = 10.79.1.5" in out, out
    rc, out = await radclient(radsec.proxy_auth, "auth", 'User-Name = "carol", User-Password = "wrong"',
                              secret=PROXY_SECRET)
    assert "Access-Reject" in out, out
    assert radsec.bc.metric("billcore_radius_radsec_connections_total") >= 1


async def test_accounting_start_stop_over_radsecproxy(radsec: Radsec) -> None:
    s = radsec
    for status in ("Start", "Stop"):
        rc, out = await radclient(s.proxy_auth, "acct", f'User-Name = "carol", Acct-Session-Id = "tls-1",'
                                                        f' Acct-Status-Type = {status}, Acct-Session-Time = 3',
                                  secret=PROXY_SECRET)
        assert rc == 0 and "Accounting-Response" in out, out
        sessions = await s.admin.call("radius.sessions", {"account_id": s.account})
        assert [x["session_id"] for x in sessions] == (["tls-1"] if status == "Start" else []), sessions


async def test_mschapv2_over_radsec_keys_reach_the_nas(radsec: Radsec) -> None:
    """The MPPE keys billcore salt-encrypts with the RadSec secret "radsec" are the keys
    the NAS behind radsecproxy decrypts with its own UDP secret."""
    need_peer(importlib.util.find_spec("billcore.radius.mschap") is not None,
              "billcore's MS-CHAPv2 (the mschap helper's billcore/radius/mschap.py) is not merged")
    from billcore.radius import mschap
    from tests.test_radius_mschap_e2e import mschap_attrs, printed

    attrs, challenge, peer, nt = mschap_attrs("carol", "tls-pw-1")
    rc, out = await radclient(radsec.proxy_auth, "auth", attrs, secret=PROXY_SECRET)
    assert rc == 0 and "Access-Accept" in out, out
    send, recv = mschap.server_mppe_keys(b"tls-pw-1", nt)
    assert printed(out, "MS-MPPE-Send-Key") == send and printed(out, "MS-MPPE-Recv-Key") == recv, out
    expected = b"\x42" + mschap.generate_authenticator_response(b"tls-pw-1", nt, peer, challenge, b"carol")
    assert printed(out, "MS-CHAP2-Success") == expected


async def test_status_server_from_a_good_client(radsec: Radsec) -> None:
    reply = await tls_exchange(radsec, client_context(radsec, "nas1"), status_server(9))
    assert reply[:2] == bytes((2, 9)), reply   # Access-Accept to the same identifier


@pytest.mark.parametrize(("case", "reason"), [
    ("no_client_cert", "no_client_cert"),
    ("other_ca", "bad_client_cert"),
    ("plain_tcp", "not_tls"),
    ("length_5", "bad_length"),
    ("length_past_limit", "bad_length"),
    ("stall_mid_packet", "slow_sender"),
    ("not_a_nas", "unknown_nas"),
    ("silent_tcp", "handshake_timeout"),
])
async def test_bad_peers_are_closed_and_counted(radsec: Radsec, case: str, reason: str) -> None:
    s = radsec
    before = closed(s, reason)
    good = client_context(s, "nas1")
    if case == "no_client_cert":
        assert await tls_exchange(s, client_context(s, None), status_server()) == b""
    elif case == "other_ca":
        assert await tls_exchange(s, client_context(s, "rogue", s.other), status_server()) == b""
    elif case == "plain_tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", s.radsec_port)
        writer.write(status_server())
        assert await asyncio.wait_for(reader.read(20), 15) == b""
        writer.close()
    elif case == "length_5":
        assert await tls_exchange(s, good, bytes((1, 1, 0, 5)) + bytes(16)) == b""
    elif case == "length_past_limit":
        # a Length of 65535 (the field's most; a stream of 70000 bytes follows): cut at the header
        assert await tls_exchange(s, good, bytes((1, 1, 0xFF, 0xFF)) + bytes(70000)) == b""
    elif case == "stall_mid_packet":
        started = asyncio.get_running_loop().time()
        assert await tls_exchange(s, good, status_server()[:10]) == b""
        assert asyncio.get_running_loop().time() - started >= PACKET_TIMEOUT * 0.9
    elif case == "silent_tcp":
        # connects and says nothing: cut after radsec_handshake_timeout (3 s here)
        reader, writer = await asyncio.open_connection("127.0.0.1", s.radsec_port)
        assert await asyncio.wait_for(reader.read(20), 15) == b""
        writer.close()
    elif case == "not_a_nas":
        # a good certificate from an address that is no NAS (127.0.0.2 is loopback too)
        assert await tls_exchange(s, good, status_server(), source="127.0.0.2") == b""
    await eventually(lambda: closed(s, reason) >= before + 1, timeout=15)
    # the server still serves: a good client's Status-Server, a login through the proxy
    reply = await tls_exchange(s, good, status_server(11))
    assert reply[:2] == bytes((2, 11)), reply
    assert await _carol_accepted(s)
    log = s.bc.log()
    assert "Traceback" not in log and "radsec connection from" not in log, log[-4000:]
    assert closed(s, "error") == 0


def test_radsec_port_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    from billcore.common.config import ConfigError, load_config

    path = tmp_path / "b.toml"
    path.write_text("[radius]\nradsec_port = 2083\nradsec_cert = \"/x.pem\"\n")
    with pytest.raises(ConfigError, match="radsec_key and radsec_ca are needed"):
        load_config(path)
    path.write_text("[radius]\nradsec_port = 70000\n")
    with pytest.raises(ConfigError, match="radius.radsec_port"):
        load_config(path)


async def test_connections_past_the_cap_are_closed_at_once_and_counted(tmp_path: Path) -> None:
    """``max_connections`` bounds the open streams: one more is closed before any TLS work (a flood of TCP
    connections costs no handshakes), counted as ``too_many``; once one closes, a new one is served again."""
    need_peer(shutil.which("openssl") is not None, "openssl is not installed")
    from prometheus_client import REGISTRY

    from radius.radsec import RadsecListener, server_context
    from radius.server import NasTable, RadiusServer
    from tests.test_radius_server import TableDecider

    _certs(tmp_path, "nas1")
    server = RadiusServer(decider=TableDecider({}), nas_table=NasTable([]))
    listener = RadsecListener(server, server_context(str(tmp_path / "server.pem"), str(tmp_path / "server.key"),
                                                     str(tmp_path / "ca.pem")), max_connections=4,
                              handshake_timeout=30.0)
    port = await listener.start("127.0.0.1", 0)

    def too_many() -> float:
        return REGISTRY.get_sample_value("billcore_radius_radsec_closed_total", {"reason": "too_many"}) or 0.0

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(reader.read(1), seconds) == b""
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            return True

    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(4):   # silent TCP peers, each waiting in its handshake
            held.append(await asyncio.open_connection("127.0.0.1", port))
        before = too_many()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, 5.0), "the fifth connection is closed at once"
        writer.close()
        assert too_many() == before + 1
        for _, w in held:   # a held one is still open
            assert not w.is_closing()
        assert not await closed_within(held[0][0], 0.3)
        held[0][1].close()
        await eventually(lambda: listener._open == 3, timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((reader, writer))
        assert not await closed_within(reader, 0.5), "below the cap a connection is served again"
        assert too_many() == before + 1
    finally:
        for _, w in held:
            w.close()
        await listener.close()
