"""RFC 5176 Disconnect/CoA: our client against the NAS simulator, and the
simulator against radclient (so the simulator itself speaks real RFC 5176)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from radius.coa import CoaTimeout, send_dynauth, session_attributes
from radius.nas_sim import NasSimulator
from radius.server import load_dictionary
from tests.conftest import need_peer
from tests.waiting import eventually

SECRET = b"nas-secret"
DICT = load_dictionary()


@pytest.fixture
async def nas() -> NasSimulator:
    sim = NasSimulator(SECRET, DICT, sessions={"S1": "alice", "S2": "bob"})
    sim.port = await sim.start()  # type: ignore[attr-defined]
    yield sim  # type: ignore[misc]
    sim.close()


async def test_disconnect_known_session_is_acked_and_gone(nas: NasSimulator) -> None:
    attrs = session_attributes({"login": "alice", "session_id": "S1", "framed_ip": "10.0.0.5", "nas_ip": "127.0.0.1"})
    result = await send_dynauth("127.0.0.1", nas.port, SECRET, "disconnect", attrs, DICT)  # type: ignore[attr-defined]
    assert result.acked and "S1" not in nas.sessions
    code, received = nas.received[-1]
    assert code == 40 and received[44] == [b"S1"] and received[1] == [b"alice"]


async def test_disconnect_unknown_session_is_nakked_with_error_cause(nas: NasSimulator) -> None:
    result = await send_dynauth("127.0.0.1", nas.port, SECRET, "disconnect", [("Acct-Session-Id", "nope")], DICT)  # type: ignore[attr-defined]
    assert not result.acked and result.error_cause == 503
    assert set(nas.sessions) == {"S1", "S2"}


async def test_coa_moves_session_to_blocked_profile(nas: NasSimulator) -> None:
    attrs = [("Acct-Session-Id", "S2"), ("Mikrotik-Rate-Limit", "64k/64k"), ("Mikrotik-Address-List", "blocked")]
    result = await send_dynauth("127.0.0.1", nas.port, SECRET, "coa", attrs, DICT)  # type: ignore[attr-defined]
    assert result.acked and "S2" in nas.sessions
    applied = nas.applied["S2"][-1]
    assert 26 in applied  # the vendor attributes arrived


async def test_wrong_secret_gets_no_answer(nas: NasSimulator) -> None:
    with pytest.raises(CoaTimeout):
        await send_dynauth("127.0.0.1", nas.port, b"wrong", "disconnect", [("Acct-Session-Id", "S1")], DICT,  # type: ignore[attr-defined]
                           timeout=0.2, retries=1)
    assert nas.dropped == 2 and "S1" in nas.sessions


async def test_retransmits_the_same_bytes_until_answered(nas: NasSimulator) -> None:
    nas.answer = False
    task = asyncio.ensure_future(
        send_dynauth("127.0.0.1", nas.port, SECRET, "disconnect", [("Acct-Session-Id", "S1")], DICT,  # type: ignore[attr-defined]
                     timeout=0.2, retries=5)
    )
    await eventually(lambda: len(nas.packets) >= 3, what="three unanswered sends")
    nas.answer = True
    result = await task
    assert result.acked
    assert len(nas.packets) >= 3
    assert all(p == nas.packets[0] for p in nas.packets)  # one encoding, retransmitted


async def test_simulator_answers_radclient_disconnect_and_coa(nas: NasSimulator) -> None:
    radclient = shutil.which("radclient")
    need_peer(radclient is not None, "radclient (Debian freeradius-utils) is not installed")
    assert radclient is not None

    async def run(command: str, attrs: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            radclient, "-x", "-t", "1", "-r", "1", f"127.0.0.1:{nas.port}", command, SECRET.decode(),  # type: ignore[attr-defined]
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(attrs.encode()), 20)
        return out.decode()

    out = await run("coa", 'Acct-Session-Id = "S2", Mikrotik-Rate-Limit = "1M/1M"')
    assert "CoA-ACK" in out, out
    out = await run("disconnect", 'Acct-Session-Id = "S1", User-Name = "alice"')
    assert "Disconnect-ACK" in out, out
    out = await run("disconnect", 'Acct-Session-Id = "S1"')
    assert "Disconnect-NAK" in out and "Session-Context-Not-Found" in out, out
