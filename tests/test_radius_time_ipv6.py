"""IPv6 prefixes from accounting: the radius edge reads Framed-IPv6-Prefix
(97) and Delegated-IPv6-Prefix (123) off the wire, the core checks them and
binds them to the account for the session (a real PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest
from pyrad.packet import AccountingRequest, AcctPacket

from billcore.billing.ledger_errors import InvalidValue
from billcore.radius.accounting import sweep
from billcore.radius.nas import add_nas
from billcore.radius.records import read_accounting_record
from billcore.radius.secrets import SecretStore
from radius.auth import MalformedPacket, parse_header
from radius.requests import accounting_record
from radius.server import load_dictionary
from tests.test_radius_time import NAS, TZ, acct, local, store, subscriber  # noqa: F401  (store: a fixture)
from billcore.radius.accounting import apply_accounting

DICT = load_dictionary()


def wire(**attrs: object) -> bytes:
    packet = AcctPacket(AccountingRequest, secret=b"s", dict=DICT)
    packet.AddAttribute("Acct-Status-Type", "Start")
    packet.AddAttribute("Acct-Session-Id", "s1")
    for name, value in attrs.items():
        packet.AddAttribute(name.replace("_", "-"), value)
    return parse_header(packet.RequestPacket())[1]


def test_the_edge_reads_both_prefixes_as_cidr_text() -> None:
    rec = accounting_record(wire(Framed_IPv6_Prefix="2001:db8:1::/64", Delegated_IPv6_Prefix="2001:db8:aa00::/56"),
                            "10.0.0.1", 1000.0)
    assert rec["ipv6_prefixes"] == ["2001:db8:1::/64", "2001:db8:aa00::/56"]
    assert "ipv6_prefixes" not in accounting_record(wire(), "10.0.0.1", 1000.0)


def test_a_malformed_prefix_is_a_malformed_packet() -> None:
    packet = bytearray(wire(Framed_IPv6_Prefix="2001:db8:1::/64"))
    at = 20                                                # walk the attributes: a 97 may be in the authenticator
    while packet[at] != 97:
        at += packet[at + 1]
    packet[at + 3] = 129                                   # a prefix length past 128
    with pytest.raises(MalformedPacket, match="97"):
        accounting_record(bytes(packet), "10.0.0.1", 1000.0)


def test_the_core_checks_the_prefixes() -> None:
    base = {"nas": NAS, "status": "start", "session_id": "s1", "login": "alice"}
    rec = read_accounting_record({**base, "ipv6_prefixes": ["2001:db8:1::5/64", "2001:db8:1::/64"]})
    assert rec.ipv6_prefixes == ("2001:db8:1::/64",)       # host bits cleared, once
    for bad in (["10.0.0.0/8"], ["nonsense"], "2001:db8::/32", [7], ["2001:db8::/32"] * 9):
        with pytest.raises(InvalidValue, match="ipv6_prefixes"):
            read_accounting_record({**base, "ipv6_prefixes": bad})


async def start(conn: asyncpg.Connection, sid: str, login: str, at: dt.datetime, prefixes: list[str]) -> None:
    record = read_accounting_record({"nas": NAS, "status": "start", "session_id": sid, "login": login,
                                     "event_time": at.timestamp(), "ipv6_prefixes": prefixes})
    async with conn.transaction():
        await apply_accounting(conn, record, at, tz=TZ)


async def bindings(conn: asyncpg.Connection) -> list[tuple[str, int, bool]]:
    rows = await conn.fetch("SELECT prefix::text AS p, account_id, valid_to IS NULL AS open FROM ip_bindings"
                            " ORDER BY id")
    return [(r["p"], r["account_id"], r["open"]) for r in rows]


async def test_start_binds_the_prefixes_and_every_end_unbinds_them(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        alice = await subscriber(conn, store, "alice", 0)
        bob = await subscriber(conn, store, "bob", 0)
        await start(conn, "S1", "alice", local(3, 10), ["2001:db8:1::/64", "2001:db8:aa00::/56"])
        assert await bindings(conn) == [("2001:db8:1::/64", alice, True), ("2001:db8:aa00::/56", alice, True)]
        # bob's NAS hands out a prefix inside alice's (a NAS misconfigured): not rebound
        await start(conn, "S2", "bob", local(3, 10, 5), ["2001:db8:aa00:1::/64"])
        assert len(await bindings(conn)) == 2
        await acct(conn, "stop", "S1", local(3, 11), 3600)
        assert await bindings(conn) == [("2001:db8:1::/64", alice, False), ("2001:db8:aa00::/56", alice, False)]
        # the prefix is free again: bob's next session gets it, and the stale sweep ends it
        await start(conn, "S3", "bob", local(3, 11, 30), ["2001:db8:aa00::/56"])
        assert (await bindings(conn))[-1] == ("2001:db8:aa00::/56", bob, True)
        async with conn.transaction():
            assert (await sweep(conn, local(3, 14), dt.timedelta(hours=1), tz=TZ)).closed == 2
        assert all(not open_ for *_, open_ in await bindings(conn))
