"""EAP behind FreeRADIUS, end to end: a supplicant (``eapol_test``), a real
FreeRADIUS 3.2 running the config of deploy/freeradius/ (rendered by its
render.py, certificates by its make-test-certs.sh) and a real ``billcore
serve`` as FreeRADIUS's home server.

FreeRADIUS ends the TLS tunnel (PEAP, EAP-TTLS) and proxies the inner login
to billcore: PAP as User-Password, MS-CHAPv2 as MS-CHAP-Challenge and
MS-CHAP2-Response.  Each test checks what each party sees: the supplicant's
verdict and its MPPE keys (the PMK a Wi-Fi access point needs), billcore's
decision counters, and the outer Access-Accept carrying billcore's reply
attributes and the inner login as User-Name (the NAS accounts under it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, need_peer
from tests.test_radius_e2e import SECRET, Stack, radclient, radius_stack, subscriber, wait_until
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "freeradius"
FREERADIUS = shutil.which("freeradius") or shutil.which("radiusd")
EAPOL_TEST = shutil.which("eapol_test")
AP_SECRET = "ap-secret-1"          # the access point's secret at FreeRADIUS
PASSWORD = "wonderland"


@dataclass
class Eap:
    stack: Stack
    auth_port: int                 # FreeRADIUS's ports, where the access point sends
    acct_port: int
    certs: Path
    workdir: Path
    log: Path


def mschap_in_core() -> bool:
    return importlib.util.find_spec("billcore.radius.mschap") is not None


@pytest.fixture(scope="module")
async def eap(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
              template_dsn: str) -> AsyncIterator[Eap]:
    need_peer(FREERADIUS is not None, "freeradius (Debian freeradius) is not installed")
    need_peer(EAPOL_TEST is not None, "eapol_test (Debian eapoltest) is not installed")
    need_peer(shutil.which("openssl") is not None, "openssl is not installed")
    async with radius_stack(tmp_path_factory, pg_server_dsn, "radius-eap") as s:
        s.accounts["alice"] = await subscriber(s.admin, "alice", 7_200_000)
        s.links["alice"] = await s.admin.call("radius.link_add", {
            "account_id": s.accounts["alice"], "login": "alice", "password": PASSWORD,
            "static_ip": "10.78.1.5", "interim_interval": 60, "max_sessions": 4})
        await wait_until(lambda: _pap_direct(s), timeout=30)

        work = tmp_path_factory.mktemp("freeradius")
        certs = work / "certs"
        made = subprocess.run([str(DEPLOY / "make-test-certs.sh"), str(certs), "radius.test"],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        raddb = work / "raddb"
        rendered = subprocess.run(
            [sys.executable, str(DEPLOY / "render.py"), "--out", str(raddb),
             "--billcore-host", "127.0.0.1", "--billcore-auth-port", str(s.auth_port),
             "--billcore-acct-port", str(s.acct_port), "--billcore-secret", SECRET,
             "--client", f"ap=127.0.0.1:{AP_SECRET}", "--listen-host", "127.0.0.1",
             "--auth-port", str(auth_port), "--acct-port", str(acct_port),
             "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"), "--ca", str(certs / "ca.pem")],
            capture_output=True, text=True, timeout=60)
        assert rendered.returncode == 0, rendered.stderr
        checked = subprocess.run([FREERADIUS or "", "-XC", "-d", str(raddb)], capture_output=True, text=True,
                                 timeout=60)
        assert "Configuration appears to be OK" in checked.stdout, checked.stdout[-4000:]

        log = work / "freeradius.log"
        with open(log, "wb") as out:
            # -X: foreground, one thread, the whole conversation in the log (read on failure)
            proc = subprocess.Popen([FREERADIUS or "", "-X", "-d", str(raddb)], stdout=out, stderr=subprocess.STDOUT)
        try:
            await eventually(lambda: "Ready to process requests" in log.read_text(errors="replace")
                             or proc.poll() is not None, timeout=60)
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            yield Eap(s, auth_port, acct_port, certs, work, log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _pap_direct(s: Stack) -> bool:
    rc, out = await radclient(s.auth_port, "auth", f'User-Name = "alice", User-Password = "{PASSWORD}"')
    return rc == 0 and "Access-Accept" in out


async def eapol(e: Eap, name: str, network: str) -> tuple[int, str]:
    """``eapol_test`` as the access point's supplicant; (exit code, its output)."""
    conf = e.workdir / f"{name}.conf"
    conf.write_text(f'network={{\n\tssid="billcore"\n\tkey_mgmt=WPA-EAP\n\tca_cert="{e.certs / "ca.pem"}"\n'
                    f'\tanonymous_identity="anonymous@example.net"\n{network}}}\n')
    proc = await asyncio.create_subprocess_exec(
        EAPOL_TEST or "", "-c", str(conf), "-a", "127.0.0.1", "-p", str(e.auth_port), "-s", AP_SECRET,
        "-t", "30", "-r", "0", "-M", "02:00:00:00:00:01",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(errors="replace")


def decided(e: Eap, outcome: str) -> float:
    return e.stack.bc.metric("billcore_radius_decisions_total", kind="auth", outcome=outcome)


async def accepted(e: Eap, name: str, network: str) -> str:
    """Run a login that must succeed; checks the keys, billcore's decision and the outer Accept."""
    before = decided(e, "accept")
    rc, out = await eapol(e, name, network)
    assert rc == 0 and "SUCCESS" in out, out[-6000:] + _server_log(e)
    # the point for Wi-Fi: the supplicant and the access point (the Access-Accept's
    # MS-MPPE keys) derived the same PMK
    assert "MPPE keys OK: 1  mismatch: 0" in out, out[-4000:]
    assert re.search(r"PMK from EAPOL - hexdump\(len=32\): [0-9a-f ]{95}", out), out[-4000:]
    # billcore decided the inner login (counted on its metrics endpoint)
    await eventually(lambda: decided(e, "accept") >= before + 1, timeout=10)
    # billcore's reply attributes reach the access point, and the inner login as User-Name
    assert "Attribute 8 (Framed-IP-Address) length=6" in out, out[-4000:]
    assert re.search(r"Attribute 1 \(User-Name\) length=7\s+Value: 'alice'", out), out[-4000:]
    return out


async def rejected(e: Eap, name: str, network: str) -> str:
    before = decided(e, "reject")
    rc, out = await eapol(e, name, network)
    assert rc != 0 and "SUCCESS" not in out, out[-4000:]
    assert "Access-Reject" in out or "EAP-Failure" in out or "code=3" in out, out[-4000:]
    await eventually(lambda: decided(e, "reject") >= before + 1, timeout=10)
    return out


def _server_log(e: Eap) -> str:
    return "\n--- freeradius ---\n" + e.log.read_text(errors="replace")[-8000:]


TTLS_PAP = 'eap=TTLS\n\tidentity="alice"\n\tpassword="{}"\n\tphase2="auth=PAP"\n'
TTLS_MSCHAPV2 = 'eap=TTLS\n\tidentity="alice"\n\tpassword="{}"\n\tphase2="auth=MSCHAPV2"\n'
PEAP_MSCHAPV2 = 'eap=PEAP\n\tidentity="alice"\n\tpassword="{}"\n\tphase1="peapver=0"\n\tphase2="auth=MSCHAPV2"\n'


async def test_ttls_pap_accepted_with_keys(eap: Eap) -> None:
    await accepted(eap, "ttls-pap", TTLS_PAP.format(PASSWORD))


async def test_ttls_pap_wrong_password_rejected(eap: Eap) -> None:
    await rejected(eap, "ttls-pap-wrong", TTLS_PAP.format("not-the-password"))


async def test_accounting_through_freeradius_reaches_billcore(eap: Eap) -> None:
    """The access point accounts at FreeRADIUS under the login the Accept named; billcore records it."""
    s = eap.stack
    for status in ("Start", "Stop"):
        rc, out = await radclient(eap.acct_port, "acct",
                                  f'User-Name = "alice", Acct-Session-Id = "eap-acct-1", Acct-Status-Type = {status},'
                                  f' Framed-IP-Address = 10.78.1.5, Acct-Session-Time = 5', secret=AP_SECRET)
        assert rc == 0 and "Accounting-Response" in out, out + _server_log(eap)
        if status == "Start":
            sessions = await s.admin.call("radius.sessions", {"account_id": s.accounts["alice"]})
            assert [x["session_id"] for x in sessions] == ["eap-acct-1"], sessions
    sessions = await s.admin.call("radius.sessions", {"account_id": s.accounts["alice"]})
    assert sessions == [], sessions


async def test_plain_pap_through_freeradius_is_billcores_decision(eap: Eap) -> None:
    """A hotspot's plain PAP (no EAP) is proxied to billcore as it came (the AP must sign it:
    the rendered clients.conf requires Message-Authenticator)."""
    rc, out = await radclient(eap.auth_port, "auth", f'User-Name = "alice", User-Password = "{PASSWORD}",'
                              ' Message-Authenticator = 0x00', secret=AP_SECRET)
    assert rc == 0 and "Access-Accept" in out and "Framed-IP-Address = 10.78.1.5" in out, out
    rc, out = await radclient(eap.auth_port, "auth", 'User-Name = "alice", User-Password = "nope",'
                              ' Message-Authenticator = 0x00', secret=AP_SECRET)
    assert "Access-Reject" in out, out


def _need_mschap() -> None:
    need_peer(mschap_in_core(), "billcore's MS-CHAPv2 (the mschap helper's billcore/radius/mschap.py) is not merged")


async def test_peap_mschapv2_accepted_with_keys(eap: Eap) -> None:
    _need_mschap()
    await accepted(eap, "peap", PEAP_MSCHAPV2.format(PASSWORD))


async def test_peap_mschapv2_wrong_password_rejected(eap: Eap) -> None:
    _need_mschap()
    await rejected(eap, "peap-wrong", PEAP_MSCHAPV2.format("not-the-password"))


async def test_ttls_mschapv2_accepted_with_keys(eap: Eap) -> None:
    _need_mschap()
    await accepted(eap, "ttls-mschapv2", TTLS_MSCHAPV2.format(PASSWORD))


async def test_ttls_mschapv2_wrong_password_rejected(eap: Eap) -> None:
    _need_mschap()
    await rejected(eap, "ttls-mschapv2-wrong", TTLS_MSCHAPV2.format("not-the-password"))


def test_render_refuses_bad_values(tmp_path: Path) -> None:
    """render.py names the option that is wrong and writes nothing."""
    certs = tmp_path / "c"
    certs.mkdir()
    for f in ("s.pem", "s.key", "ca.pem"):
        (certs / f).write_text("x")
    base = [sys.executable, str(DEPLOY / "render.py"), "--out", str(tmp_path / "out"), "--billcore-host", "10.0.0.2",
            "--cert", str(certs / "s.pem"), "--key", str(certs / "s.key"), "--ca", str(certs / "ca.pem")]
    cases = [
        (["--billcore-secret", 'bad"quote', "--client", "ap=10.0.0.0/24:x1"], "--billcore-secret"),
        (["--billcore-secret", "ok1", "--client", "ap=10.0.0.300:x1"], "--client ap"),
        (["--billcore-secret", "ok1", "--client", "ap=10.0.0.1:s$x"], "--client ap"),
        (["--billcore-secret", "ok1", "--client", "ap=10.0.0.1:x1", "--auth-port", "70000"], "--auth-port"),
        (["--billcore-secret", "ok1"], "--client"),
    ]
    for extra, option in cases:
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and option in done.stderr, (extra, done.stderr)
        assert not (tmp_path / "out").exists()
    # a directory render.py did not write (a distribution's config) is refused
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "radiusd.conf").write_text("# the distribution's\n")
    done = subprocess.run(base + ["--billcore-secret", "ok1", "--client", "ap=10.0.0.1:x1"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "not a render.py output" in done.stderr, done.stderr
    assert (tmp_path / "out" / "radiusd.conf").read_text() == "# the distribution's\n"
