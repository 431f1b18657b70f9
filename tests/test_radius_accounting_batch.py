"""``radius.accounting_many``: a batch of Accounting-Requests applied in order
in one transaction, each record answered alone, every guarantee of
``radius.accounting`` kept (exactly once, time charged exactly, Accounting-On
in order, a bad record costs only itself).  Real PostgreSQL (the ``pool``
fixture), the real call handlers."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.api.radius import calls
from billcore.common.config import Config
from billcore.radius.nas import add_link, add_nas
from billcore.radius.secrets import SecretStore
from billcore.server.context import CoreContext
from tests.test_radius_core import T0, make_account, time_tariff

NAS = "10.0.0.1"
NAS2 = "10.0.0.2"

Handler = Callable[..., Awaitable[Any]]


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


def core_calls(pool: asyncpg.Pool, store: SecretStore,
               published: list[tuple[str, dict[str, Any]]]) -> dict[str, Handler]:
    core = CoreContext(pool, Config(), publish=lambda topic, payload: published.append((topic, payload)),
                       now=lambda: T0 + dt.timedelta(minutes=5))
    core.extras["secret_store"] = store
    return {spec.name: spec.handler for spec in calls(core)}


def rec(status: str, sid: str | None = None, login: str = "alice", nas: str = NAS, t: int = 0,
        **kw: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"nas": nas, "status": status, "login": login,
                              "event_time": (T0 + dt.timedelta(seconds=t)).timestamp(), "session_time": t, **kw}
    if sid is not None:
        record["session_id"] = sid
    return record


async def setup(pool: asyncpg.Pool, store: SecretStore, logins: int = 1, balance: int = 0,
                timed: bool = False) -> list[int]:
    accounts = []
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        await add_nas(conn, store, name="mt2", address=NAS2, secret="y")
        for i in range(logins):
            acc = await make_account(conn, f"u{i}", balance=balance)
            await add_link(conn, store, account_id=acc, login="alice" if i == 0 else f"l{i}", password="pw",
                           max_sessions=10)
            if timed:
                await time_tariff(conn, acc, 3_600_000_000)  # 1 unit (1 000 000) a second
            accounts.append(acc)
    return accounts


async def test_a_batch_of_many_sessions_starts_charges_nothing_twice_and_ends_them(pool: asyncpg.Pool,
                                                                                  store: SecretStore) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    call = core_calls(pool, store, published)
    accounts = await setup(pool, store, logins=20)
    logins = ["alice"] + [f"l{i}" for i in range(1, 20)]
    starts = [rec("start", f"S{i}", login, framed_ip=f"10.9.0.{i + 1}") for i, login in enumerate(logins)]
    interims = [rec("interim", f"S{i}", login, t=60, input_octets=1000 + i, output_octets=i)
                for i, login in enumerate(logins)]
    stops = [rec("stop", f"S{i}", login, t=90, input_octets=2000 + i, output_octets=i)
             for i, login in enumerate(logins) if i % 2 == 0]
    # Start, Interim (and for half of them Stop) in one batch, interleaved by session
    batch = [r for group in zip(starts, interims) for r in group] + stops
    answers = await call["radius.accounting_many"](None, records=batch)
    assert len(answers) == len(batch) and all("error" not in a for a in answers)
    rows = await pool.fetch("SELECT session_id, account_id, session_time, input_octets, ended_at IS NOT NULL AS ended"
                            " FROM radius_sessions ORDER BY id")
    assert len(rows) == 20
    for i, row in enumerate(rows):
        assert row["session_id"] == f"S{i}" and row["account_id"] == accounts[i]
        assert row["session_time"] == (90 if i % 2 == 0 else 60)
        assert row["input_octets"] == (2000 + i if i % 2 == 0 else 1000 + i)
        assert row["ended"] == (i % 2 == 0)
    # the open sessions keep their /32 bound, the stopped ones' binding ended
    assert await pool.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL") == 10
    assert await pool.fetchval("SELECT count(*) FROM ip_bindings") == 20
    events = [p["event"] for topic, p in published if topic == "radius.sessions"]
    assert events.count("started") == 20 and events.count("stopped") == 10
    # the same batch again (a NAS that retransmitted every one): nothing changes, nothing is published
    published.clear()
    again = await call["radius.accounting_many"](None, records=batch)
    assert all("error" not in a for a in again)
    assert [p for topic, p in published if topic == "radius.sessions"] == []
    assert await pool.fetchval("SELECT count(*) FROM radius_sessions") == 20
    assert await pool.fetchval("SELECT count(*) FROM ip_bindings") == 20


async def test_time_charged_exactly_once_within_and_across_batches(pool: asyncpg.Pool, store: SecretStore) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    call = core_calls(pool, store, published)
    [acc] = await setup(pool, store, balance=100_000_000, timed=True)
    # a retransmitted Interim and an older one arriving late, all in one batch
    batch = [rec("start", "S1"), rec("interim", "S1", t=3), rec("interim", "S1", t=3), rec("interim", "S1", t=5),
             rec("interim", "S1", t=4)]
    assert all("error" not in a for a in await call["radius.accounting_many"](None, records=batch))
    # across batches: the same records again, then the Stop twice in one batch
    assert all("error" not in a for a in await call["radius.accounting_many"](None, records=batch))
    stop = rec("stop", "S1", t=7)
    assert all("error" not in a for a in await call["radius.accounting_many"](None, records=[stop, stop]))
    assert all("error" not in a for a in await call["radius.accounting_many"](None, records=[stop]))
    assert await pool.fetchval("SELECT balance FROM accounts WHERE id = $1", acc) == 100_000_000 - 7_000_000
    assert await pool.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 AND amount < 0", acc) == 3
    assert await pool.fetchval("SELECT charged FROM radius_sessions WHERE session_id = 'S1'") == 7_000_000


async def test_time_sessions_of_many_accounts_in_one_batch_match_one_by_one(pool: asyncpg.Pool,
                                                                           store: SecretStore) -> None:
    """The same records through ``radius.accounting`` one by one and through
    one batch (other session ids) charge the same seconds."""
    call = core_calls(pool, store, [])
    accounts = await setup(pool, store, logins=6, balance=100_000_000, timed=True)
    logins = ["alice"] + [f"l{i}" for i in range(1, 6)]

    def records(prefix: str) -> list[dict[str, Any]]:
        out = []
        for i, login in enumerate(logins):
            out += [rec("start", f"{prefix}{i}", login), rec("interim", f"{prefix}{i}", login, t=10 + i),
                    rec("interim", f"{prefix}{i}", login, t=20 + i)]
            if i % 2:
                out.append(rec("stop", f"{prefix}{i}", login, t=25 + i))
        return out

    for record in records("one"):
        await call["radius.accounting"](None, record=record)
    single = {r["account_id"]: r["balance"] for r in await pool.fetch("SELECT id AS account_id, balance FROM accounts")}
    answers = await call["radius.accounting_many"](None, records=records("many"))
    assert all("error" not in a for a in answers)
    both = {r["account_id"]: r["balance"] for r in await pool.fetch("SELECT id AS account_id, balance FROM accounts")}
    for i, acc in enumerate(accounts):
        seconds = (25 if i % 2 else 20) + i
        assert single[acc] == 100_000_000 - seconds * 1_000_000
        assert both[acc] == 100_000_000 - 2 * seconds * 1_000_000


async def test_a_malformed_record_and_an_unknown_nas_fail_alone(pool: asyncpg.Pool, store: SecretStore) -> None:
    call = core_calls(pool, store, [])
    await setup(pool, store)
    batch = [rec("start", "S1"), {"nas": "not an address", "status": "start"}, rec("start", "S2", nas="10.0.0.99"),
             rec("interim", "S1", t=30)]
    answers = await call["radius.accounting_many"](None, records=batch)
    assert answers[0] == {"session": answers[3]["session"]}
    assert answers[1]["error"] == "billing.invalid" and "record.nas" in answers[1]["message"]
    assert answers[2]["error"] == "core.unknown" and "10.0.0.99" in answers[2]["message"]
    assert await pool.fetchval("SELECT session_time FROM radius_sessions WHERE session_id = 'S1'") == 30
    assert await pool.fetchval("SELECT count(*) FROM radius_sessions") == 1


async def test_a_record_the_database_refuses_rolls_back_and_the_rest_apply_once(pool: asyncpg.Pool,
                                                                               store: SecretStore) -> None:
    """A record PostgreSQL refuses mid-batch: the batch is rolled back and
    every record applied again alone; the refused one answers its code, the
    others are applied exactly once (hooks and topics once too)."""
    published: list[tuple[str, dict[str, Any]]] = []
    call = core_calls(pool, store, published)
    [acc] = await setup(pool, store, balance=100_000_000, timed=True)
    await pool.execute("""
        CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.session_id = 'BAD' THEN RAISE check_violation USING MESSAGE = 'refused'; END IF;
        RETURN NEW; END $$;
        CREATE TRIGGER refuse_bad BEFORE INSERT ON radius_sessions FOR EACH ROW EXECUTE FUNCTION refuse_bad();""")
    batch = [rec("start", "S1"), rec("interim", "S1", t=4), rec("start", "BAD"), rec("interim", "S1", t=6)]
    answers = await call["radius.accounting_many"](None, records=batch)
    assert [a.get("error") for a in answers] == [None, None, "billing.invalid", None]
    assert "refused" not in answers[2]["message"]   # no database text leaks
    assert await pool.fetchval("SELECT balance FROM accounts WHERE id = $1", acc) == 100_000_000 - 6_000_000
    assert await pool.fetchval("SELECT count(*) FROM radius_sessions") == 1
    assert [p["event"] for topic, p in published if topic == "radius.sessions"] == ["started"]


async def test_accounting_on_in_a_batch_keeps_the_order_of_its_nas(pool: asyncpg.Pool, store: SecretStore) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    call = core_calls(pool, store, published)
    await setup(pool, store, logins=2)
    batch = [rec("start", "S1", framed_ip="10.9.0.1"), rec("start", "S2", "l1", framed_ip="10.9.0.2"),
             rec("start", "X1", "l1", nas=NAS2), rec("interim", "S1", t=40),
             {"nas": NAS, "status": "on", "event_time": (T0 + dt.timedelta(seconds=50)).timestamp()},
             rec("start", "S3", t=0, framed_ip="10.9.0.3"), rec("interim", "S3", t=5)]
    answers = await call["radius.accounting_many"](None, records=batch)
    assert answers[4] == {"closed": 2}
    rows = {r["session_id"]: r for r in await pool.fetch(
        "SELECT session_id, end_reason, session_time, ended_at FROM radius_sessions")}
    assert rows["S1"]["end_reason"] == "accounting-on" and rows["S1"]["session_time"] == 40
    assert rows["S2"]["end_reason"] == "accounting-on"
    assert rows["S3"]["ended_at"] is None and rows["S3"]["session_time"] == 5   # after the On: open
    assert rows["X1"]["ended_at"] is None                                      # another NAS's: untouched
    assert await pool.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL") == 1
    events = [p["event"] for topic, p in published if topic == "radius.sessions"]
    assert events == ["started", "started", "started", "closed", "started"]


async def test_concurrent_batches_sharing_sessions_in_opposite_order(pool: asyncpg.Pool, store: SecretStore) -> None:
    """Two batches at once naming the same sessions in opposite orders: the
    sessions are locked in one order (no deadlock), both batches apply."""
    call = core_calls(pool, store, [])
    await setup(pool, store, logins=8, balance=100_000_000, timed=True)
    logins = ["alice"] + [f"l{i}" for i in range(1, 8)]
    await call["radius.accounting_many"](None, records=[rec("start", f"S{i}", login) for i, login in enumerate(logins)])
    one = [rec("interim", f"S{i}", login, t=10) for i, login in enumerate(logins)]
    two = [rec("interim", f"S{i}", login, t=20) for i, login in reversed(list(enumerate(logins)))]
    first, second = await asyncio.wait_for(asyncio.gather(call["radius.accounting_many"](None, records=one),
                                                          call["radius.accounting_many"](None, records=two)), 30)
    assert all("error" not in a for a in first + second)
    assert await pool.fetchval("SELECT sum(charged) FROM radius_sessions") == 8 * 20 * 1_000_000
    assert await pool.fetchval("SELECT count(*) FROM radius_sessions WHERE session_time = 20") == 8


async def test_a_batch_must_be_a_list_of_maps(pool: asyncpg.Pool, store: SecretStore) -> None:
    from billcore.billing.ledger_errors import InvalidValue

    call = core_calls(pool, store, [])
    for records in ([], [1], [rec("start", "S1")] * 1025):
        with pytest.raises(InvalidValue):
            await call["radius.accounting_many"](None, records=records)


async def test_batches_that_meet_take_turns_in_arrival_order_others_run_side_by_side() -> None:
    from billcore.api.radius import Turns
    from billcore.radius.records import read_accounting_record

    def records(*raws: dict[str, Any]) -> list[Any]:
        return [read_accounting_record(raw) for raw in raws]

    turns = Turns(width=3)
    log: list[str] = []
    release = asyncio.Event()

    async def batch(name: str, recs: list[Any]) -> None:
        async with turns.turn(recs):
            log.append(f"{name}+")
            await release.wait()
            log.append(f"{name}-")

    a = asyncio.create_task(batch("a", records(rec("interim", "S1", t=1))))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(batch("b", records(rec("interim", "S2", "l2", t=1))))    # meets nothing: runs
    c = asyncio.create_task(batch("c", records(rec("stop", "S1", t=2))))            # same session as a: waits
    d = asyncio.create_task(batch("d", records({"nas": NAS, "status": "on"})))       # resets a's NAS: waits
    e = asyncio.create_task(batch("e", records(rec("start", "X1", "l3", nas=NAS2)))) # another NAS: runs
    await asyncio.sleep(0.05)
    assert sorted(log) == ["a+", "b+", "e+"]
    release.set()
    await asyncio.gather(a, b, c, d, e)
    assert log.index("c+") > log.index("a-") and log.index("d+") > log.index("c-")   # arrival order kept


async def test_an_address_freed_and_bound_again_within_one_batch(pool: asyncpg.Pool, store: SecretStore) -> None:
    """Bindings of a batch's Starts are written together: an address a Stop
    of the batch frees is bound to the next session from that Stop on, and an
    IPv6 prefix two Starts of one account name is bound once."""
    call = core_calls(pool, store, [])
    [acc] = await setup(pool, store)
    stop_at = 40
    batch = [rec("start", "S1", framed_ip="10.9.0.7", ipv6_prefixes=["2001:db8:7::/64"]),
             rec("stop", "S1", t=stop_at),
             rec("start", "S2", t=0, framed_ip="10.9.0.7", event_time=(T0 + dt.timedelta(seconds=10)).timestamp()),
             rec("start", "S3", framed_ip="10.9.0.8", ipv6_prefixes=["2001:db8:8::/64"]),
             rec("start", "S4", framed_ip="10.9.0.9", ipv6_prefixes=["2001:db8:8::/64"])]
    answers = await call["radius.accounting_many"](None, records=batch)
    assert all("error" not in a for a in answers)
    rows = await pool.fetch("SELECT host(prefix) AS ip, masklen(prefix) AS len, session_ref, valid_from, valid_to"
                            " FROM ip_bindings ORDER BY valid_from, id")
    seven = [r for r in rows if r["ip"] == "10.9.0.7"]
    assert [r["session_ref"].rsplit(":", 1)[1] for r in seven] == ["S1", "S2"]
    assert seven[0]["valid_to"] == T0 + dt.timedelta(seconds=stop_at)
    assert seven[1]["valid_from"] == seven[0]["valid_to"] and seven[1]["valid_to"] is None  # from where S1 ended
    assert [r["valid_to"] for r in rows if r["ip"] == "2001:db8:7::"] == [T0 + dt.timedelta(seconds=stop_at)]
    assert len([r for r in rows if r["ip"] == "2001:db8:8::"]) == 1
    assert await pool.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL AND account_id = $1", acc) == 4
