"""PostgreSQL goes away under a running billcore, and so does the supervisor.

Real processes only (``billcore serve`` with its embedded PostgreSQL, a NetFlow
replay over loopback, payments and RADIUS requests over the wire), and checks
of what an operator sees: the ledger against what was sent, the metrics
endpoint, /ready, the process table.

The data directories live in a fresh ``/tmp/billcore-faults-*``, not under
pytest's tmp_path: the server runs as the ``pgserver`` user when we are root,
and every new pytest session on the machine resets pytest's base directory to
0700, which would cut that user off from a data directory below it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from billcore.db.embedded import EmbeddedPostgres
from netflow.exporter import ExportClock, FlowSpec, build_v5
from tests.conftest import free_port
from tests.running import BillcoreProcess, pid_alive
from tests.test_netflow_kill import sender
from tests.test_netflow_worker_support import charged, recent_ms, setup_accounts
from tests.waiting import eventually
from urfa.client import Client, connect
from urfa.errors import CallFailed

ADDRESSES = [f"10.41.0.{i}" for i in range(1, 21)]
FLOWS = 45_000
RATE = 15_000  # flows a second: a three-second replay
PAYMENTS = 30
SECRET = "faults-nas-secret"
ADMIN_PASSWORD = "faults-admin-password"


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="billcore-faults-"))
    try:
        yield path
    finally:
        if not os.environ.get("BILLCORE_FAULTS_KEEP"):  # keep the logs and data to look at
            shutil.rmtree(path, ignore_errors=True)


def pgdata(workdir: Path) -> Path:
    return workdir / "var" / "pg"


def embedded_dsn(workdir: Path) -> str:
    return f"postgresql://postgres@/postgres?host={pgdata(workdir)}"


def postmaster_pid(workdir: Path) -> int:
    return int((pgdata(workdir) / "postmaster.pid").read_text().split()[0])


def postgres_processes(data: Path) -> list[int]:
    """Every live postgres process (postmaster or backend) whose postmaster serves ``data``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "postgres" and str(data).encode() in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


class Scraper(threading.Thread):
    """What monitoring sees: ``billcore_db_up`` and /ready, ten times a second."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.db_up: list[float] = []
        self.ready: list[int] = []
        self.stop = threading.Event()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def run(self) -> None:
        while not self.stop.is_set():
            status, body = self.get("/metrics")
            m = re.search(r"^billcore_db_up (\S+)$", body, re.M)
            if m:
                self.db_up.append(float(m.group(1)))
            self.ready.append(self.get("/ready")[0])
            time.sleep(0.1)


    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the core's first probe has answered (before it, ``billcore_db_up`` is 0: not known up),
        so that what is recorded next starts from a known state."""
        deadline = time.monotonic() + timeout
        while self.get("/ready")[0] != 200:
            assert time.monotonic() < deadline, "the core never became ready"
            time.sleep(0.05)

    def wait_db_up(self, pattern: list[float], timeout: float = 30.0) -> None:
        """Until the changes of ``billcore_db_up`` seen so far start with ``pattern``."""
        deadline = time.monotonic() + timeout
        while changes(self.db_up)[:len(pattern)] != pattern:
            assert time.monotonic() < deadline, f"billcore_db_up seen {changes(self.db_up)}, not {pattern}"
            time.sleep(0.05)


def changes(values: list[float] | list[int]) -> list[float]:
    out: list[float] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return out


def replay(at: int) -> tuple[list[tuple[int, bytes, int]], dict[str, int]]:
    """NetFlow v5 packets (one exporter) and the bytes each address sent."""
    clock = ExportClock(at - 3_600_000, at + 10_000)
    flows, per_addr = [], {a: 0 for a in ADDRESSES}
    for i in range(FLOWS):
        local = ADDRESSES[i % len(ADDRESSES)]
        nbytes = 40 + (i * 7919) % 1_500_000
        flows.append(FlowSpec(local, f"203.0.113.{i % 250 + 1}", 1000, 443, 6, nbytes, 10, at, at + 1000))
        per_addr[local] += nbytes
    packets = build_v5(flows, clock, flow_sequence=0, engine_id=0)
    return [(0, p, 0) for p in packets], per_addr


def admin_create(bc: BillcoreProcess) -> None:
    """The operator's command line, attached to the running embedded server."""
    done = subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create",
                           "root", "--password-env", "PW"], env={**os.environ, "PW": ADMIN_PASSWORD},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def pay(admin: Client, account: int, amounts: list[int], gap: float) -> int:
    """Book each payment as a payment gateway does: retry on ``core.db_unavailable``
    (or a lost answer) with the same external id until it is booked; the retries."""
    retries = 0
    for i, amount in enumerate(amounts):
        while True:
            try:
                await admin.call("payments.add", {"account_id": account, "amount": amount, "method": "cash",
                                                  "external_id": f"fault-{i}"}, timeout=10)
                break
            except CallFailed as exc:
                assert exc.code == "core.db_unavailable", exc
            except asyncio.TimeoutError:
                pass  # it may have been booked: the same external id makes the retry harmless
            retries += 1
            await asyncio.sleep(0.2)
        await asyncio.sleep(gap)
    return retries


def access_request(login: str) -> bytes:
    from pyrad.packet import AccessRequest, AuthPacket

    from radius.server import load_dictionary

    pkt = AuthPacket(AccessRequest, secret=SECRET.encode(), dict=load_dictionary(), message_authenticator=True)
    pkt.AddAttribute("User-Name", login)
    pkt.AddAttribute("User-Password", pkt.PwCrypt("nobody-knows"))
    return bytes(pkt.RequestPacket())


async def radius_load(port: int, stop: asyncio.Event, answered: list[float]) -> list[float]:
    """An Access-Request every 0.2 s; when each answer came (monotonic), appended to
    ``answered`` as it comes (a test may wait on it) and returned at the end."""
    loop = asyncio.get_running_loop()

    class Collect(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            answered.append(time.monotonic())

    transport, _ = await loop.create_datagram_endpoint(Collect, remote_addr=("127.0.0.1", port))
    try:
        while not stop.is_set():
            transport.sendto(access_request("nobody"))
            await asyncio.sleep(0.2)
    finally:
        transport.close()
    return answered


def assert_clean_logs(log: str) -> None:
    for role in ("core", "radius", "netflow"):
        # (the netflow worker logs each refused submit at error level, by design of its own)
        bad = [line for line in log.splitlines() if f"role={role} " in line
               and ("never retrieved" in line or "Traceback" in line or ("level=error" in line and role != "netflow"))]
        assert not bad, f"{role}: unretrieved exceptions, tracebacks or errors in the log:\n" + "\n".join(bad)[:6000]
    assert 'msg="child died' not in log, "a database outage must not crash a billcore process"


async def test_postmaster_killed_under_load_recovers_by_itself(workdir: Path) -> None:
    udp = socket.SOCK_DGRAM
    nf_port, auth_port, acct_port = free_port(udp), free_port(udp), free_port(udp)
    bc = BillcoreProcess(
        workdir,
        netflow={"enabled": True, "host": "127.0.0.1", "port": nf_port, "workers": 1, "fsync_interval": 0.05,
                 "ship_interval": 0.2},
        radius={"enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port,
                "decision_timeout": 1.0, "stale_check": 3600.0},
        supervisor={"restart_backoff_initial": 0.2, "restart_backoff_max": 2.0},
    )
    scraper = Scraper(bc.metrics_port)
    with bc:
        bc.wait_for(r'role=netflow .*msg="netflow serving"', timeout=90)
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=30)
        accounts = await setup_accounts(embedded_dsn(workdir), ADDRESSES)
        bc.wait_for(rf'role=netflow .*msg="classifier loaded" .*bindings={len(ADDRESSES)}\b', timeout=30)
        admin_create(bc)
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", ADMIN_PASSWORD)
        account = (await admin.call("users.create", {"login": "payer", "password": "payer-password"}))[
            "basic_account_id"]
        await admin.call("radius.nas_add", {"name": "nas", "address": "127.0.0.1", "secret": SECRET,
                                            "require_message_authenticator": False})
        await asyncio.to_thread(scraper.wait_ready)
        scraper.start()
        await asyncio.to_thread(scraper.wait_db_up, [1.0])

        packets, per_addr = replay(recent_ms())
        sent = {accounts[a]: b for a, b in per_addr.items()}
        amounts = [1_000_000 + i for i in range(PAYMENTS)]
        done = threading.Event()
        flows = threading.Thread(target=sender, args=(nf_port, packets, RATE, done), daemon=True)
        stop_radius = asyncio.Event()
        radius_answers: list[float] = []
        radius = asyncio.create_task(radius_load(auth_port, stop_radius, radius_answers))
        payments = asyncio.create_task(pay(admin, account, amounts, gap=0.1))
        flows.start()
        await asyncio.sleep(1.0)   # part of the scenario: the fault comes while the load is running
        victim = postmaster_pid(workdir)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        await asyncio.to_thread(flows.join)
        retries = await asyncio.wait_for(payments, timeout=40)
        deadline = time.monotonic() + 40
        while (await charged(embedded_dsn(workdir)))[0] != sent and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        caught_up = time.monotonic() - killed_at
        await asyncio.to_thread(scraper.wait_db_up, [1.0, 0.0, 1.0])
        bc.wait_for(r'msg="embedded postgresql restarted"', timeout=20)
        await eventually(lambda: any(t > killed_at for t in radius_answers),
                         what="RADIUS answers again after recovery")
        stop_radius.set()
        answered = await radius
        scraper.stop.set()
        scraper.join()

        counters, ledger = await charged(embedded_dsn(workdir))
        conn = await asyncpg.connect(embedded_dsn(workdir))
        try:
            paid = await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1", account)
            balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account)
        finally:
            await conn.close()
        await admin.close()
        restarted = postmaster_pid(workdir)
        metrics_text = scraper.get("/metrics")[1]
        log = bc.log()

    print(f"postmaster killed; caught up after {caught_up:.1f} s; payment retries {retries}; "
          f"db_up seen {changes(scraper.db_up)}; /ready seen {changes(scraper.ready)}; "
          f"radius answers {len(answered)}")
    assert restarted != victim
    assert 'msg="embedded postgresql died, restarting"' in log and 'how="signal 9"' in log
    assert 'msg="embedded postgresql restarted"' in log
    # the classifier relay (NOTIFY) is listening again: binding changes reach the workers
    assert re.search(r'role=core .*msg="listening for notifications again"', log)
    # charged exactly once: what was sent, every payment once
    assert counters == sent, "NetFlow usage differs from what was sent"
    assert ledger == counters, "ledger and usage counters disagree"
    assert paid == sum(amounts) and balance == sum(amounts)
    assert retries > 0, "the payments did not meet the outage"
    # monitoring saw the outage and the recovery
    assert changes(scraper.db_up)[:3] == [1.0, 0.0, 1.0], scraper.db_up
    assert 503 in scraper.ready and scraper.ready[-1] == 200
    assert any(t > killed_at for t in answered), "RADIUS did not answer after the database came back"
    assert 'billcore_restarts_total{role="postgresql"} 1.0' in metrics_text
    assert_clean_logs(log)


def test_supervisor_killed_then_serve_again_and_stop_leaves_no_postgresql(workdir: Path) -> None:
    first = BillcoreProcess(workdir)
    with first:
        first.wait_for(r'msg="core serving"', timeout=90)
        old = postmaster_pid(workdir)
        core = first.child_pid("core")
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait()
    deadline = time.monotonic() + 15
    while pid_alive(core) and time.monotonic() < deadline:  # told by the kernel (PDEATHSIG)
        time.sleep(0.05)
    first_log = first.log()

    second = BillcoreProcess(workdir)
    second.log_path = workdir / "billcore-second.log"
    with second:
        second.wait_for(r'msg="core serving"', timeout=90)
        new = postmaster_pid(workdir)
        assert pid_alive(new)
        assert second.stop(timeout=30) == 0
    deadline = time.monotonic() + 10
    while postgres_processes(pgdata(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not postgres_processes(pgdata(workdir)), "postgresql left running after a clean stop"
    assert not pid_alive(old) and not pid_alive(new)
    assert not (pgdata(workdir) / "postmaster.pid").exists()
    for log in (first_log, second.log()):
        assert "Traceback" not in log, "\n".join(line for line in log.splitlines() if "Traceback" in line)


def test_postgresql_left_by_a_killed_user_is_adopted_watched_and_stopped(workdir: Path) -> None:
    """A command-line tool (or an older billcore) started the embedded server and
    was killed with SIGKILL: the server runs on, its user's pid still registered."""
    (workdir / "var").mkdir()
    tool = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from billcore.db.embedded import EmbeddedPostgres;"
         "EmbeddedPostgres(Path(sys.argv[1])).start(); print('up', flush=True); time.sleep(600)",
         str(workdir / "var")], stdout=subprocess.PIPE, text=True)
    try:
        assert tool.stdout is not None and tool.stdout.readline().strip() == "up"
    finally:
        tool.kill()
        tool.wait()
    orphan = postmaster_pid(workdir)
    assert pid_alive(orphan)

    bc = BillcoreProcess(workdir, supervisor={"restart_backoff_initial": 0.2})
    scraper = Scraper(bc.metrics_port)
    with bc:
        bc.wait_for(r'msg="core serving"', timeout=90)
        assert f'msg="adopted a running embedded postgresql (left by an earlier run)" postmaster_pid={orphan}' \
            in bc.log()
        scraper.wait_ready()
        scraper.start()
        scraper.wait_db_up([1.0])
        # the adopted server is no child of ours: it is watched all the same
        os.kill(orphan, signal.SIGKILL)
        bc.wait_for(r'msg="embedded postgresql restarted"', timeout=30)
        scraper.wait_db_up([1.0, 0.0, 1.0])
        scraper.stop.set()
        scraper.join()
        ours = postmaster_pid(workdir)
        assert ours != orphan
        assert bc.stop(timeout=30) == 0
    deadline = time.monotonic() + 10
    while postgres_processes(pgdata(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not postgres_processes(pgdata(workdir)), "postgresql left running after a clean stop"
    assert changes(scraper.db_up)[:3] == [1.0, 0.0, 1.0]
    assert "Traceback" not in bc.log()


async def test_external_database_outage_is_reported(workdir: Path) -> None:
    """An external database is not ours to restart: the core reports it."""
    db = EmbeddedPostgres(workdir / "external")
    dsn = db.start()
    try:
        bc = BillcoreProcess(workdir, dsn=dsn)
        scraper = Scraper(bc.metrics_port)
        with bc:
            bc.wait_for(r'msg="core serving"', timeout=60)
            await asyncio.to_thread(scraper.wait_ready)
            scraper.start()
            await asyncio.to_thread(scraper.wait_db_up, [1.0])
            assert scraper.get("/ready")[0] == 200 and scraper.get("/health")[0] == 200
            await asyncio.to_thread(db.stop)
            bc.wait_for(r'msg="database unreachable; calls answer core.db_unavailable', timeout=15)

            def not_ready() -> tuple[int, str] | None:
                got = scraper.get("/ready")
                return got if got[0] == 503 else None

            status, body = await eventually(not_ready, what="/ready answering 503")
            assert "database" in body
            assert scraper.get("/health")[0] == 200, "the core itself is alive"
            await asyncio.to_thread(db.start)
            await asyncio.to_thread(scraper.wait_db_up, [1.0, 0.0, 1.0])
            scraper.stop.set()
            scraper.join()
            assert scraper.get("/ready")[0] == 200
            log = bc.log()
        assert changes(scraper.db_up)[:3] == [1.0, 0.0, 1.0]
        assert 'msg="embedded postgresql died' not in log  # not ours: nobody restarted it
        assert_clean_logs(log)
    finally:
        db.stop()


def test_database_health_tells_only_changes_with_the_outage_length() -> None:
    from billcore.db.pool import DatabaseHealth

    heard: list[tuple[bool, float, str]] = []
    health = DatabaseHealth(lambda up, after, reason: heard.append((up, after, reason)))
    assert health.up is None  # unknown before the first probe: /ready says no
    health.observe(True, now=100.0)
    health.observe(True, now=101.0)
    health.observe(False, now=102.0, reason="ConnectionRefusedError")
    health.observe(False, now=103.0, reason="ConnectionRefusedError")
    health.observe(True, now=107.5)
    assert heard == [(True, 0.0, ""), (False, 2.0, "ConnectionRefusedError"), (True, 5.5, "")]
    assert health.up is True and health.since == 107.5


def test_a_failed_call_marks_the_database_down_until_a_later_probe_answers() -> None:
    """An outage shorter than the probe's interval (a restarted embedded server) is still seen: a
    call that met it marks the database down, and only a probe that began after that clears it —
    not one that was already in flight."""
    from billcore.db.pool import DatabaseHealth

    heard: list[bool] = []
    health = DatabaseHealth(lambda up, after, reason: heard.append(up))
    health.observe(True, now=100.0)
    health.observe(False, now=100.6, reason="ConnectionDoesNotExistError")  # a call met the outage
    health.observe(True, now=100.5)   # a probe that began before the failure was seen
    assert health.up is False
    health.observe(True, now=101.5)   # the next probe
    assert heard == [True, False, True]
