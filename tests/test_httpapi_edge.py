"""The HTTP API's own rules over a live stack: problem+json statuses, money as
strings both ways, Idempotency-Key, 413, 429, a role's narrower table, a
revoked token stopping at once, and the pure cores (the OpenAPI generator,
the value conversion, the status table) on the live core's real sys.calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate

from httpapi import openapi, problems, values
from httpapi.limits import RateLimiter
from tests.console_stack import signed_example_plugin
from tests.httpapi_stack import Answer, ApiStack, httpapi_stack

RATE, BURST, MAX_BODY, MAX_ROWS = 5.0, 120, 4096, 3


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiStack]:
    plugin_dir, trusted = signed_example_plugin(tmp_path_factory.mktemp("httpapi-signing"))
    async with httpapi_stack(tmp_path_factory.mktemp("httpapi-edge"),
                             httpapi={"rate": RATE, "burst": BURST, "max_body": MAX_BODY,
                                      "max_rows": MAX_ROWS},
                             plugins={"dir": str(plugin_dir), "key_dir": str(trusted)}) as s:
        s.extra["root"] = await s.token("edge-root", ["superusers"])
        yield s


async def root_table(stack: ApiStack) -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    while page := await stack.admin.call("sys.calls", {"offset": len(table)}):
        table.extend(page)
    return table


def problem_of(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    doc: dict[str, Any] = answer.json()
    assert doc["status"] == status and doc["code"] == code and doc["type"] == f"urn:billcore:error:{code}"
    assert doc["title"]
    return doc


async def subscriber(stack: ApiStack, login: str) -> int:
    made = stack.call("users.create", stack.extra["root"], {"login": login, "password": f"{login}-pw-123"})
    assert made.status == 200, made.body
    return int(made.json()["basic_account_id"])


# -- the pure cores on the live core's own table ---------------------------------------------------

async def test_the_document_of_roots_real_table_is_valid_31_and_one_operation_per_call(stack: ApiStack) -> None:
    table = await root_table(stack)
    doc = openapi.document(table)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {f"/api/v1/calls/{e['name']}" for e in table}
    ops = {item["post"]["operationId"]: item["post"] for item in doc["paths"].values()}
    assert len(ops) == len(table)
    pay = ops["payments_add"]
    body = pay["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["account_id", "amount", "method"] and body["additionalProperties"] is False
    assert body["properties"]["amount"]["type"] == "string"
    assert body["properties"]["amount"]["pattern"] == openapi.MONEY_PATTERN
    assert [p["name"] for p in pay["parameters"]] == ["Idempotency-Key"]
    assert "parameters" not in ops["accounts_get"]              # no external_id: no idempotency header
    preview = ops["reports_preview"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert preview["properties"]["total"]["type"] == ["string", "null"]
    assert preview["properties"]["lines"]["items"]["properties"]["amount"]["pattern"] == openapi.MONEY_PATTERN
    traffic = ops["reports_traffic"]["responses"]["200"]["content"]
    assert list(traffic) == ["application/x-ndjson"]
    assert list(traffic["application/x-ndjson"]["schema"]["properties"]) == [
        "account_id", "class_id", "day", "quantity", "amount", "_result"]
    assert "requestBody" not in ops["sys_ping"]
    # a deleted (unloaded) call is left out
    assert "/api/v1/calls/sys.ping" not in openapi.document([{**e, "deleted": e["name"] == "sys.ping"}
                                                             for e in table])["paths"]


async def test_values_follow_the_declared_types_of_the_real_table(stack: ApiStack) -> None:
    table = {e["name"]: e for e in await root_table(stack)}
    pay = table["payments.add"]["args"]
    assert values.args_from_json(pay, {"account_id": 1, "amount": "0.000001", "method": "cash"})["amount"] == 1
    assert values.args_from_json(pay, {"account_id": 1, "amount": "-12.5", "method": "x"})["amount"] == -12_500_000
    for wrong in (12.5, 12, True, "12.5.0", "1e3", " 12"):
        with pytest.raises(values.ArgError):
            values.args_from_json(pay, {"account_id": 1, "amount": wrong, "method": "cash"})
    with pytest.raises(values.ArgError, match="unknown argument: amonut"):
        values.args_from_json(pay, {"account_id": 1, "amonut": "1.00", "method": "cash"})
    history = table["accounts.history"]["args"]
    since = values.args_from_json(history, {"account_id": 1, "since": "2026-01-31T15:00:00+03:00"})["since"]
    assert since == dt.datetime(2026, 1, 31, 12, tzinfo=dt.timezone.utc)
    with pytest.raises(values.ArgError, match="offset"):
        values.args_from_json(history, {"account_id": 1, "since": "2026-01-31T12:00:00"})
    # results: money where declared (nested too), instants in UTC with Z, everything else untouched
    preview = table["reports.preview"]
    got = values.result_to_json({"total": 12_340_000, "lines": [{"amount": 1, "quantity": 5}], "count": 7},
                                preview["result"], preview["fields"])
    assert got == {"total": "12.34", "lines": [{"amount": "0.000001", "quantity": 5}], "count": 7}
    search = table["users.search"]     # "total" is an int there, not money: never guessed from a name
    assert values.result_to_json({"total": 5, "users": []}, search["result"], search["fields"])["total"] == 5
    traffic = table["reports.traffic"]
    row = values.row_to_json([7, 1, "2026-01-01", 1000, 2_500_000], values.row_columns(traffic["fields"]),
                             traffic["fields"])
    assert row == {"account_id": 7, "class_id": 1, "day": "2026-01-01", "quantity": 1000, "amount": "2.50"}
    assert values.rfc3339(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)) == "2026-01-01T00:00:00Z"


def test_the_status_table() -> None:
    cases = {"bad_args": 400, "idempotency.mismatch": 400, "auth_failed": 401, "no_session": 401,
             "forbidden": 403, "not_in_table": 403, "accounts.unknown": 404, "tokens.not_found": 404,
             "core.unknown": 404, "billing.invalid": 422, "billing.money_format": 422, "tokens.name": 422,
             "tokens.expires": 422, "tokens.group": 422, "payments.conflict": 409, "core.already_exists": 409,
             "ledger.idempotency_conflict": 409, "rate_limited": 429, "busy": 429, "core.db_unavailable": 503,
             "internal": 500, "timeout": 504}
    assert {code: problems.status_of(code) for code in cases} == cases
    assert "detail" not in problems.problem(500, "internal", "a traceback")


def test_the_token_bucket() -> None:
    bucket = RateLimiter(rate=2.0, burst=3)
    assert [bucket.take(b"k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(b"k", 0.0) == pytest.approx(0.5)
    assert bucket.take(b"other", 0.0) == 0.0        # per key
    assert bucket.take(b"k", 0.5) == 0.0            # refilled one at 2/s
    assert RateLimiter.retry_after(0.01) == 1


# -- over HTTP --------------------------------------------------------------------------------------

async def test_money_goes_out_and_comes_in_as_decimal_strings(stack: ApiStack) -> None:
    root = stack.extra["root"]
    account = await subscriber(stack, "money-sam")
    paid = stack.call("payments.add", root, {"account_id": account, "amount": "0.000001", "method": "cash"})
    assert paid.status == 200 and paid.json()["balance"] == "0.000001"
    stack.call("payments.add", root, {"account_id": account, "amount": "12.5", "method": "cash"})
    got = stack.call("accounts.get", root, {"account_id": account}).json()
    assert got["balance"] == "12.500001" and got["credit"] == "0.00"
    # and the core agrees, in micro-units
    assert (await stack.admin.call("accounts.get", {"account_id": account}))["balance"] == 12_500_001
    number = stack.call("payments.add", root, {"account_id": account, "amount": 12.5, "method": "cash"})
    assert "decimal string" in problem_of(number, 400, "bad_args")["detail"]


async def test_errors_are_problems_with_the_contracts_statuses(stack: ApiStack) -> None:
    root = stack.extra["root"]
    problem_of(stack.call("accounts.get", "bct_" + "A" * 43, {"account_id": 1}), 401, "auth_failed")
    problem_of(stack.request("POST", "/api/v1/calls/sys.ping"), 401, "unauthorized")
    problem_of(stack.request("GET", "/api/v1/openapi.json", token="not-a-token"), 401, "unauthorized")
    problem_of(stack.call("accounts.get", root, {"account_id": 10**9}), 404, "accounts.unknown")
    problem_of(stack.call("No-Such-Call", root), 404, "not_in_table")
    problem_of(stack.call("accounts.get", root, {"account_id": "seven"}), 400, "bad_args")
    problem_of(stack.call("accounts.get", root, {}), 400, "bad_args")
    problem_of(stack.request("POST", "/api/v1/calls/sys.ping", token=root, raw=b"{nope",
                             headers={"Content-Type": "application/json"}), 400, "bad_json")
    problem_of(stack.call("accounts.set_credit", root, {"account_id": await subscriber(stack, "credit-cy"),
                                                        "credit": "-5.00"}), 422, "billing.amount")
    problem_of(stack.call("accounts.create", root, {"user_id": 1, "vat_bp": -1}), 422, "billing.invalid")
    problem_of(stack.request("GET", "/api/v1/calls/sys.ping", token=root), 405, "method_not_allowed")
    problem_of(stack.request("GET", "/nowhere", token=root), 404, "not_found")
    # a JSON body is read as JSON whatever its Content-Type (curl -d says form-urlencoded)
    assert stack.request("POST", "/api/v1/calls/accounts.get", token=root, raw=b'{"account_id": 1}',
                         headers={"Content-Type": "application/x-www-form-urlencoded"}).status in (200, 404)
    # four role templates, over max_rows: refused whole, never cut
    assert len(await stack.admin.call("operators.roles")) > MAX_ROWS
    problem_of(stack.call("operators.roles", root), 502, "too_many_rows")
    internal_free = stack.call("users.create", root, {"login": "x\u0000y", "password": "pw-123456"})
    assert internal_free.status in (400, 422) and internal_free.json()["code"] != "internal"


async def test_idempotency_key_fills_external_id_and_refuses_what_cannot_be_repeated(stack: ApiStack) -> None:
    root = stack.extra["root"]
    account = await subscriber(stack, "idem-ida")
    pay = {"account_id": account, "amount": "3.00", "method": "bank"}
    answers = [stack.call("payments.add", root, pay, headers={"Idempotency-Key": "bank-77"}) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert len({a.json()["payment_id"] for a in answers}) == 1
    listed = stack.call("payments.list", root, {"account_id": account}).json()
    assert [(p["amount"], p["external_id"]) for p in listed] == [("3.00", "bank-77")]
    # the same key with another amount is the core's conflict, not a second booking
    other = stack.call("payments.add", root, {**pay, "amount": "4.00"}, headers={"Idempotency-Key": "bank-77"})
    assert other.status == 409 and other.json()["code"] != "internal"
    problem_of(stack.call("payments.add", root, {**pay, "external_id": "bank-78"},
                          headers={"Idempotency-Key": "bank-79"}), 400, "idempotency.mismatch")
    problem_of(stack.call("accounts.get", root, {"account_id": account}, headers={"Idempotency-Key": "k"}),
               400, "idempotency.unsupported")


async def test_a_cashiers_token_sees_and_calls_only_its_role(stack: ApiStack) -> None:
    cashier = await stack.token("till-1", ["cashiers"])
    doc = stack.request("GET", "/api/v1/openapi.json", token=cashier).json()
    validate(doc)
    assert "/api/v1/calls/payments.add" in doc["paths"] and "/api/v1/calls/tariffs.list" not in doc["paths"]
    problem_of(stack.call("tariffs.list", cashier, {}), 403, "not_in_table")
    account = await subscriber(stack, "till-tom")
    assert stack.call("payments.add", cashier, {"account_id": account, "amount": "1.00", "method": "cash"}).status == 200
    audit = await stack.admin.call("audit.query", {"action": "payments.add", "login": "till-1"})
    assert audit and audit[0]["ip"] == "127.0.0.1"


async def test_a_revoked_token_stops_at_once(stack: ApiStack) -> None:
    token = await stack.token("short-lived", ["support"])
    assert stack.call("sys.ping", token).json() == "pong"
    listed = await stack.admin.call("tokens.list", {})
    await stack.admin.call("tokens.revoke", {"token_id": next(t["id"] for t in listed if t["name"] == "short-lived")})
    problem_of(stack.call("sys.ping", token), 401, "auth_failed")


async def test_a_body_over_max_body_is_413(stack: ApiStack) -> None:
    root = stack.extra["root"]
    big = stack.call("users.create", root, {"login": "big", "password": "p" * (MAX_BODY + 10)})
    problem_of(big, 413, "body_too_large")
    assert stack.call("sys.ping", root).status == 200        # the connection's next request is served


async def test_a_token_past_its_rate_gets_429_with_retry_after(stack: ApiStack) -> None:
    token = await stack.token("busy-bee", ["support"])
    other = await stack.token("calm-cat", ["support"])

    def burst() -> list[Answer]:
        return [stack.call("sys.ping", token) for _ in range(BURST + 20)]

    answers = await asyncio.to_thread(burst)
    limited = [a for a in answers if a.status == 429]
    assert limited and all(a.status in (200, 429) for a in answers)
    assert int(limited[0].headers["Retry-After"]) >= 1
    problem_of(limited[0], 429, "too_many_requests")
    assert stack.call("sys.ping", other).status == 200       # per token
    await asyncio.sleep(2.0)
    assert stack.call("sys.ping", token).status == 200       # refilled


async def test_more_requests_at_once_than_the_cores_inflight_cap_wait_their_turn(stack: ApiStack) -> None:
    token = await stack.token("crowd", ["superusers"])
    account = await subscriber(stack, "crowd-carl")
    many = 100                    # the core takes 64 calls in flight on one connection (urfa.max_inflight)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     connector=aiohttp.TCPConnector(limit=many)) as http:
        async def one(n: int) -> tuple[int, Any]:
            async with http.post(f"{stack.url}/api/v1/calls/payments.add",
                                 json={"account_id": account, "amount": "0.01", "method": "cash"},
                                 headers={"Idempotency-Key": f"crowd-{n}"}) as resp:
                return resp.status, await resp.json(content_type=None)

        answers = await asyncio.gather(*(one(n) for n in range(many)))
    assert [status for status, _ in answers] == [200] * many, [a for a in answers if a[0] != 200][:3]
    got = stack.call("accounts.get", token, {"account_id": account}).json()
    assert got["balance"] == "1.00"            # a hundred cents, each booked once


async def test_the_access_log_has_one_line_per_request_with_the_tokens_name(stack: ApiStack) -> None:
    token = await stack.token("logged-lou", ["support"])
    stack.call("sys.ping", token)
    stack.bc.wait_for(r"role=httpapi .*127\.0\.0\.1 logged-lou POST sys\.ping 200 [0-9.]+ms", timeout=10)


async def test_a_streamed_summary_types_its_keys_as_the_declared_row_fields(stack: ApiStack) -> None:
    run = stack.call("periodic.run", stack.extra["root"])
    assert run.status == 200 and run.headers["Content-Type"].startswith("application/x-ndjson"), run.body
    *progress, last = run.lines()
    assert set(last) == {"_result"}
    assert isinstance(last["_result"]["amount"], str)          # fields: amount money, in the summary too
    assert all(isinstance(row["amount"], str) for row in progress if "amount" in row)


async def test_a_plugins_call_appears_without_a_route_and_goes_when_unloaded(stack: ApiStack) -> None:
    before = await stack.token("plugin-watcher", ["superusers"])
    assert "/api/v1/calls/example.hello" not in stack.request("GET", "/api/v1/openapi.json", token=before).json()["paths"]
    await stack.admin.call("plugins.load", {"path": "example"})
    token = await stack.token("plugin-user", ["superusers"])      # a new token session: today's registry
    doc = stack.request("GET", "/api/v1/openapi.json", token=token).json()
    validate(doc)
    hello = doc["paths"]["/api/v1/calls/example.hello"]["post"]
    assert hello["operationId"] == "example_hello" and hello["tags"] == ["example"]
    assert hello["requestBody"]["content"]["application/json"]["schema"]["properties"] == {"name": {"type": "string"}}
    said = stack.call("example.hello", token, {"name": "integrator"})
    assert said.status == 200 and "integrator" in said.json()

    await stack.admin.call("plugins.unload", {"name": "example"})
    problem_of(stack.call("example.hello", token, {"name": "again"}), 404, "deleted")
    problem_of(stack.call("example.hello", token, {"name": "again"}), 403, "not_in_table")
    assert "/api/v1/calls/example.hello" not in stack.request("GET", "/api/v1/openapi.json",
                                                              token=token).json()["paths"]


def test_python_m_httpapi_refuses_a_public_address_without_tls(tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, "-m", "httpapi", "--password-file", str(tmp_path / "pw"),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a loopback address" in done.stderr


# last: it restarts the core under the module's stack
async def test_a_core_restart_costs_a_503_at_most_then_the_token_logs_in_again(stack: ApiStack) -> None:
    token = await stack.token("survivor", ["support"])
    assert stack.call("sys.ping", token).status == 200
    mark = len(stack.bc.log())
    os.kill(stack.bc.child_pid("core"), signal.SIGKILL)
    while_down = await asyncio.to_thread(stack.call, "sys.ping", token)
    assert while_down.status in (200, 503), while_down.body       # 200: the core was back in time
    if while_down.status == 503:
        problem_of(while_down, 503, "core_down")
        assert while_down.headers["Retry-After"]
    stack.bc.wait_for(r'role=core .*msg="core serving"', timeout=60, after=mark)
    for _ in range(100):          # the edge's link comes back on its own; the old token session is gone
        answer = await asyncio.to_thread(stack.call, "sys.ping", token)
        if answer.status == 200:
            break
        assert answer.status == 503, answer.body
        await asyncio.sleep(0.2)
    assert answer.json() == "pong"
