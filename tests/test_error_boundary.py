"""The error boundary of a real ``billcore serve``: every registered call,
driven with wrong arguments by an administrator holding every right, a
system login holding every right, and a subscriber.

What a client must never see, whatever it sends: the code ``internal``, or
text from PostgreSQL or Python (``asyncpg``, ``violates``, ``Traceback``,
``relation``, ``column``...).  What the operator must never see: a
traceback in the core's log for a call that was only bad input.  Each
refusal carries a code from the documented table (docs/protocol.md §10).

The calls are found the way a client finds them (``sys.calls`` of each
session), so a call added later is covered without touching this file.
Cases per call: each argument replaced by every wrong type, NULs nested at
any depth, out-of-range numbers, huge strings and lists, deep nesting,
each required argument left out, an extra argument; then hypothesis draws
arbitrary values (bounded examples) for random calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billcore.server.principals import create_admin, create_system_login, set_user_password
from tests.conftest import TEMPLATE, _create_db, _drop_db, with_database
from tests.running import BillcoreProcess
from urfa import client as uc
from urfa.errors import CallFailed, ConnectionLost, LoginFailed

ADMIN_PW = "admin-password-14"
SYSTEM_PW = "system-password-14"
USER_PW = "user-password-14"
# words that only database or Python internals put into a message
LEAKS = re.compile(r"asyncpg|violates|traceback|relation|column|constraint|syntax error|"
                   r"\bsql|postgres|psycopg|exception|object has no attribute|not subscriptable|"
                   r"unexpected keyword|positional argument|errno|\.py\b|key \(", re.I)
# calls that end the caller's own session when they succeed: still driven,
# the client simply logs in again
# calls that may end the caller's own session (operators.*: when the operator is the caller)
ENDS_SESSION = {"session.logout", "operators.set_password", "operators.disable", "operators.edit"}

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def plausible(word: str) -> Any:
    """A value of the right type for a schema word (ids that may exist)."""
    return {
        "int": 1, "money": 1_000_000, "str": "x", "bool": True, "bytes": b"x", "list": [],
        "map": {}, "time": NOW, "ip": "192.0.2.1", "any": "x",
    }[word.rstrip("?")]


def nest_nul(depth: int) -> Any:
    """A NUL inside ``depth`` levels of lists and maps."""
    value: Any = "a\0b"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_VALUES: list[Any] = [
    None, True, 0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, "", "x" * 300_000, "a\0b", "\ud7ff\uffff",
    "1e308", "-1", "NaN", "192.0.2.1/33", b"", b"\0" * 100_000, [], [None], ["a\0b"], [1.5], [2**64 - 1],
    [[[[[]]]]], list(range(100_000)), ["x" * 1000] * 500, {}, {"a\0b": 1}, {"k": "a\0b"},
    {"days": "mon\0", "from": "00:00", "to": "24:00"}, [{"days": "mon\0"}], [{"k": [1, {"x": "\0"}]}],
    nest_nul(3), nest_nul(12), nested(64), nested(200), 1.5, float("nan"), float("inf"), NOW,
    dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone.utc),
]


def cases(schema: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Argument maps that are wrong in one place each (plus the plausible one)."""
    base = {name: plausible(word) for name, word in schema.items() if not word.endswith("?")}
    yield dict(base)
    yield {name: plausible(word) for name, word in schema.items()}
    for name in schema:
        for bad in BAD_VALUES:
            yield {**base, name: bad}
        if not schema[name].endswith("?"):
            yield {k: v for k, v in base.items() if k != name}
    yield {**base, "no_such_argument": 1}
    yield {**base, "a\0b": 1}


class Who:
    """One login; logs in again when a call ended its session."""

    def __init__(self, port: int, dsn: str, kind: str, login: str, password: str) -> None:
        self.port, self.dsn, self.kind, self.login, self.password = port, dsn, kind, login, password
        self.client: uc.Client | None = None

    async def connect(self) -> uc.Client:
        if self.client is None or self.client.closed:
            try:
                self.client = await self._login()
            except LoginFailed:        # a fuzzed call changed or deleted this login: put it back
                await self.restore()
                self.client = await self._login()
        return self.client

    async def _login(self) -> uc.Client:
        client = await uc.connect("127.0.0.1", self.port)
        try:
            await client.login(self.kind, self.login, self.password)
        except BaseException:
            await client.close()
            raise
        return client

    async def restore(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            if self.kind == "user":
                user_id = await conn.fetchval("UPDATE users SET deleted_at = NULL"
                                              " WHERE login = $1 RETURNING id", self.login)
                await set_user_password(conn, user_id, self.password)
            elif self.kind == "system":
                await create_system_login(conn, self.login, self.password, ["*"])
            elif self.kind == "admin":   # operators.* on themselves: password, disabled, groups, second factor
                await conn.execute("DELETE FROM admins WHERE login = $1", self.login)
                await create_admin(conn, self.login, self.password, ["superusers"])
        finally:
            await conn.close()

    async def call(self, fn: str, args: dict[str, Any], streaming: bool = False) -> tuple[str, str]:
        client = await self.connect()
        try:
            value = await (self._drain(client, fn, args) if streaming else client.call(fn, args, timeout=60))
        except CallFailed as exc:
            return exc.code, exc.message
        except ConnectionLost as exc:
            self.client = None
            if fn in ENDS_SESSION:
                return "ok", ""
            return f"connection lost ({exc.code})", str(exc)
        if fn in ENDS_SESSION:      # the bye follows the result
            await self.close()
            self.client = None
        return "ok", repr(value)[:200]

    @staticmethod
    async def _drain(client: uc.Client, fn: str, args: dict[str, Any]) -> Any:
        """A streaming call's result, its chunks read and dropped (subscribers.export)."""
        async def read() -> Any:
            stream = client.stream(fn, args)
            async for _ in stream:
                pass
            return stream.result

        return await asyncio.wait_for(read(), 60)

    async def close(self) -> None:
        if self.client is not None and not self.client.closed:
            await self.client.close()


@pytest.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
               template_dsn: str) -> AsyncIterator[dict[str, Any]]:
    db = await _create_db(pg_server_dsn, TEMPLATE)
    dsn = with_database(pg_server_dsn, db)
    bc = BillcoreProcess(tmp_path_factory.mktemp("errors"), dsn=dsn, periodic={"enabled": False},
                         urfa={"login_failures_per_minute": 1000, "max_frame": 4 << 20})
    bc.start()
    who: list[Who] = []
    try:
        bc.child_pid("core")
        conn = await asyncpg.connect(dsn)
        try:
            await create_admin(conn, "root", ADMIN_PW, ["superusers"])
            await create_system_login(conn, "everything", SYSTEM_PW, ["*"])
        finally:
            await conn.close()
        admin = Who(bc.urfa_port, dsn, "admin", "root", ADMIN_PW)
        made = await (await admin.connect()).call("users.create", {"login": "sub", "password": USER_PW})
        await (await admin.connect()).call("payments.add", {"account_id": made["basic_account_id"],
                                                            "amount": 5_000_000, "method": "cash"})
        who = [admin, Who(bc.urfa_port, dsn, "system", "everything", SYSTEM_PW),
               Who(bc.urfa_port, dsn, "user", "sub", USER_PW)]
        tables = {w.kind: await (await w.connect()).call("sys.calls") for w in who}
        yield {"bc": bc, "who": who, "tables": tables}
    finally:
        for w in who:
            await w.close()
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


def problems(fn: str, args: dict[str, Any], code: str, message: str) -> list[str]:
    found = []
    if code == "internal" or code.startswith("connection lost"):
        found.append(f"{fn} answered {code}")
    if code != "ok" and LEAKS.search(message):
        found.append(f"{fn} leaked internals: {message[:160]!r}")
    return [f"{p} for {short(args)}" for p in found]


def short(args: dict[str, Any]) -> str:
    return re.sub(r"(.)\1{20,}", lambda m: f"{m.group(1)}*{len(m.group(0))}", repr(args))[:160]


def report(found: list[str]) -> str:
    """One line per call and kind of problem (the first case of each), then the count."""
    first: dict[str, str] = {}
    for line in found:
        first.setdefault(line.split(" for ")[0].split(": {")[0][:80], line)
    return "\n".join(list(first.values())[:80]) + f"\n... {len(found)} problems in all"


def tracebacks(log: str) -> list[str]:
    return [line[:600] for line in log.splitlines()
            if "role=core" in line and ("Traceback" in line or "level=error" in line)]


async def test_every_call_answers_wrong_arguments_with_a_clear_code(live: dict[str, Any]) -> None:
    bc: BillcoreProcess = live["bc"]
    start = len(bc.log())
    found: list[str] = []
    driven = 0
    for w in live["who"]:
        for entry in live["tables"][w.kind]:
            for args in cases(entry["args"]):
                code, message = await w.call(entry["name"], args, entry["streaming"])
                driven += 1
                found.extend(f"{w.kind}: {p}" for p in problems(entry["name"], args, code, message))
    print(f"{driven} calls driven")
    assert driven > 3000       # every call of three tables, dozens of cases each
    found.extend(tracebacks(bc.log()[start:]))
    assert not found, report(found)


# -- hypothesis: arbitrary msgpack values for random calls -----------------------------------

texts = st.text(max_size=40) | st.sampled_from(["", "\0", "a\0", "mon", "00:00", "192.0.2.1", "10.0.0.0/8",
                                                "monthly", "start", "traffic", "periodic", "1.50"])
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.integers(-3, 3)
leaves = st.none() | st.booleans() | ints | texts | st.binary(max_size=20) | st.floats(allow_nan=True)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


async def test_arbitrary_values_for_random_calls(live: dict[str, Any]) -> None:
    bc: BillcoreProcess = live["bc"]
    start = len(bc.log())
    calls = [(w, e) for w in live["who"] for e in live["tables"][w.kind]]
    found: list[str] = []

    @settings(max_examples=600, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def drive(data: st.DataObject) -> None:
        w, entry = data.draw(st.sampled_from(calls), label="call")
        args: dict[str, Any] = {}
        for name, word in entry["args"].items():   # each argument: plausible, arbitrary, or left out
            how = data.draw(st.sampled_from(["plausible", "arbitrary", "arbitrary", "absent"]), label=name)
            if how != "absent":
                args[name] = plausible(word) if how == "plausible" else data.draw(values, label=name)
        if data.draw(st.integers(0, 9), label="extra") == 0:
            args["extra"] = 1
        code, message = asyncio.run_coroutine_threadsafe(w.call(entry["name"], args, entry["streaming"]), loop).result(90)
        found.extend(problems(entry["name"], args, code, message))

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(drive)
    found.extend(tracebacks(bc.log()[start:]))
    assert not found, report(found)


async def test_the_reported_cases_answer_their_documented_codes(live: dict[str, Any]) -> None:
    """Issue 14 item 4, case by case: the code a client gets and a message it can read."""
    admin: Who = live["who"][0]
    period = {"kind": "monthly", "anchor": "2024-01-01"}
    expected: list[tuple[str, dict[str, Any], str, str]] = [
        ("services.add", {"name": "fee", "kind": "periodic", "fee": 1, "period": period, "charge_mode": "weekly"},
         "billing.tariff", "charge_mode must be one of"),
        ("users.edit", {"user_id": 1, "fields": {"full_name": "bo\0b"}}, "bad_args", "fields['full_name']"),
        ("tariffs.add", {"name": "t", "service_ids": ["a\0b"]}, "bad_args", "service_ids[0]"),
        ("timeranges.add", {"name": "r", "windows": [{"days": "mon\0"}]}, "bad_args", "windows[0]['days']"),
        ("timeranges.add", {"name": "r", "windows": [{"days": "mon"}]}, "billing.timerange", "a window needs time"),
        ("radius.nas_add", {"name": "a", "address": "192.0.2.200", "secret": "s1"}, "ok", ""),
        ("radius.nas_add", {"name": "b", "address": "192.0.2.200", "secret": "s2"},
         "core.already_exists", "address"),
        ("radius.nas_add", {"name": "c", "address": "192.0.2.201", "secret": "s3", "disconnect_mode": "shout"},
         "billing.invalid", "disconnect_mode"),
        ("radius.pool_add", {"name": "p", "first": "10.9.0.9", "last": "10.9.0.1"}, "billing.invalid", ""),
        ("radius.link_add", {"account_id": 1, "login": "dup", "password": "pw"}, "ok", ""),
        ("radius.link_add", {"account_id": 1, "login": "dup", "password": "pw"}, "core.already_exists", "login"),
        ("radius.link_add", {"account_id": 2**62, "login": "nobody", "password": "pw"}, "core.unknown", ""),
        ("radius.link_add", {"account_id": 1, "login": "p", "password": "pw", "pool": "none"},
         "core.unknown", "no IP pool"),
        ("radius.close_stale", {"timeout": 2**63 - 1}, "not_in_table", ""),   # a system call: admins lack it
        ("tariffs.link", {"account_id": 1}, "ok", ""),                       # tariff_id is optional
    ]
    for fn, args, code, words in expected:
        got, message = await admin.call(fn, args)
        assert (got, words in message) == (code, True), (fn, args, got, message)
        assert not LEAKS.search(message), (fn, message)


def test_every_common_code_is_in_the_documented_table() -> None:
    from pathlib import Path

    from billcore.server.wire_errors import WIRE_CODES

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("## 10. Error codes", 1)[1].split("## 11.", 1)[0]
    assert [c for c in WIRE_CODES if f"| `{c}` |" not in section] == []
