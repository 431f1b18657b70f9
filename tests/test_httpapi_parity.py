"""Every call a token's role reaches over URFA answers the same over HTTP, call by call.

For a token of each role template (``superusers``, ``cashiers``,
``support``, ``tariff_managers``, and ``cashiers`` with ``support``) and an
operator of the same groups, logged in as a **proxied** operator session (a system login holding
``session.proxy_admin``, as the console does): the test walks the token's
own call table (``sys.calls`` over HTTP) and runs every call in it both
ways — over URFA as the operator, and ``POST /api/v1/calls/{name}`` with
the token — and compares the answers after converting the HTTP one back to
URFA values by the call's declared types (money strings to micro-units,
RFC 3339 strings to instants, base64 to bytes). The HTTP side is encoded
here from the declared argument types too, independently of the edge's
own code.

What is "safe to repeat" decides how a call is run (``CASES``):

* ``read`` — the same arguments both ways, nothing written in between:
  the answers must be equal;
* ``write`` — each side writes on its own scratch objects, made alike
  beforehand (a subscriber, an account, a tariff, an operator… per side):
  the answers must be equal except for the ids, times and secrets the
  write itself made (``VOLATILE``) and the side's own tag in names;
* ``refuse`` — a call that must not really run here (load a plugin,
  disconnect a session, apply a bulk change) is asked with an argument
  that the core refuses the same way both times: the same wire code;
* ``shape`` — answers that differ by nature (the clock, a new random
  secret, the caller's identity): the same keys and types.

A call in a token's table that has no case fails the test: a new call
must say how it is compared. Calls outside the role are 403 over HTTP and
``not_in_table`` over URFA, every one of them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from billcore.common.money import format_money, parse_money
from tests.httpapi_stack import ApiStack, httpapi_stack
from tests.test_e2e_core import billcore_cli
from urfa.client import Client, connect
from urfa.errors import CallFailed

pytestmark = pytest.mark.timeout(600)

# each role template, and two at once (a token's rights are the union of its groups', as an operator's)
ROLES = ["superusers", "cashiers", "support", "tariff_managers", "cashiers+support"]
ROOT = "root"                       # made by the stack (tests/httpapi_stack.py)
RELAY = ("parity-relay", "parity-relay-pw-1")
OPERATOR_PW = "parity-operator-pw-1"
IP = "127.0.0.1"
# What an operator's proxied table has and a token's never does (API_CONTRACT: "a token
# session never gets session.*proxy* calls or events.subscribe"; nor the operator's own
# self.* calls, which act on an operator's id, even with * in its groups)
ONLY_OPERATORS = {"events.subscribe", "events.unsubscribe", "self.otp_begin", "self.otp_confirm", "self.otp_disable"}
NEVER_A_TOKENS = ("events.", "self.", "session.proxy", "session.token")
# Ends the very session the comparison runs in (over HTTP the edge logs the token in again)
NOT_RUN = {"session.logout": "ends the session the other calls run in"}
# Written by a write itself: compared by type only
VOLATILE = {"id", "sid", "token", "secret", "uri", "created_at", "updated_at", "at", "started_at", "ended_at",
            "valid_from", "valid_to", "cancelled_at", "last_used_at", "expires_at", "booked_at", "deleted_at",
            "recovery_codes", "notice", "by"}
SINCE = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
UNTIL = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


# -- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    how: str                                      # read | write | refuse | shape
    args: Callable[[dict[str, Any]], dict[str, Any]]


def R(args: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: {}) -> Case:
    return Case("read", args)


def W(args: Callable[[dict[str, Any]], dict[str, Any]]) -> Case:
    return Case("write", args)


def X(args: Callable[[dict[str, Any]], dict[str, Any]]) -> Case:
    return Case("refuse", args)


def S(args: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: {}) -> Case:
    return Case("shape", args)


NOBODY = 987_654_321           # an id no object has

CASES: dict[str, Case] = {
    # reads, on the shared objects
    "accounts.audit": R(lambda c: {"account_id": c["account"], "limit": 50}),
    "accounts.get": R(lambda c: {"account_id": c["account"]}),
    "accounts.history": R(lambda c: {"account_id": c["account"], "limit": 50}),
    "audit.query": R(lambda c: {"login": ROOT, "limit": 100}),
    "bindings.list": R(lambda c: {"account_id": c["account"]}),
    "blocks.list": R(lambda c: {"account_id": c["account"]}),
    "classes.list": R(lambda c: {"limit": 100}),
    "netflow.raw": R(lambda c: {"account_id": c["account"], "since": SINCE, "until": SINCE + dt.timedelta(days=30)}),
    "operators.get": R(lambda c: {"operator_id": c["operator"]}),
    "operators.list": R(lambda c: {"limit": 1000}),
    "operators.roles": R(),
    "payments.list": R(lambda c: {"account_id": c["account"]}),
    "payments.lookup": R(lambda c: {"contracts": ["no-such-contract"], "account_ids": [c["account"]]}),
    "plugins.list": R(),
    "radius.history": R(lambda c: {"account_id": c["account"]}),
    "radius.link_list": R(lambda c: {"account_id": c["account"]}),
    "radius.nas_show": R(),
    "radius.pool_list": R(),
    "radius.sessions": R(),
    "invoices.list": R(lambda c: {"account_id": c["account"]}),
    "statements.get": R(lambda c: {"account_id": c["account"], "since": SINCE, "until": UNTIL}),
    "reports.charges": R(lambda c: {"since": SINCE, "until": UNTIL}),
    "reports.preview": R(lambda c: {"account_id": c["account"]}),
    "reports.revenue": R(lambda c: {"since": SINCE, "until": UNTIL}),
    "reports.traffic": R(lambda c: {"since": "2026-01-01", "until": "2030-01-01"}),
    "reports.revenue_daily": R(lambda c: {"since": "2026-01-01", "until": "2030-01-01", "group": "tariff"}),
    "reports.payments": R(lambda c: {"since": "2026-01-01", "until": "2030-01-01", "group": "method"}),
    "reports.debtors": R(lambda c: {"as_of": "2026-01-01"}),
    "reports.arpu": R(lambda c: {"month": "2026-01"}),
    "reports.churn": R(lambda c: {"since": "2026-01", "until": "2027-01"}),
    "reports.traffic_top": R(lambda c: {"since": "2026-01-01", "until": "2030-01-01"}),
    "reports.flows": R(lambda c: {"account_id": c["account"], "since": "2026-01-01", "until": "2026-01-02"}),
    "reports.whatif": R(lambda c: {"tariff_id": c["tariff"], "month": "2026-01", "all": True}),
    "invoices.export": R(lambda c: {"since": SINCE, "until": UNTIL}),
    "services.list": R(),
    "subscribers.export": R(lambda c: {"text": "parity"}),
    "subscribers.search": R(lambda c: {"text": "parity", "limit": 50}),
    "sys.ping": R(),
    "tariffs.history": R(lambda c: {"account_id": c["account"]}),
    "tariffs.list": R(),
    "tariffs.quote": R(lambda c: {"service_ids": [c["service"]], "days": 30}),
    "timeranges.list": R(),
    "users.get": R(lambda c: {"user_id": c["user"]}),
    "users.search": R(lambda c: {"text": "parity"}),
    "events.unsubscribe": R(lambda c: {"topics": ["blocks"]}),
    # differ by nature
    "sys.time": S(),
    "sys.whoami": S(),
    "sys.health": S(),
    "tokens.list": S(),
    "self.otp_begin": S(),
    # writes, each side on its own scratch objects
    "accounts.create": W(lambda c: {"user_id": c["w_user"], "credit": 1_500_000}),
    "accounts.edit": W(lambda c: {"account_id": c["w_account"], "credit": 2_000_000, "vat_bp": 2000}),
    "accounts.set_credit": W(lambda c: {"account_id": c["w_account"], "credit": 3_250_000}),
    "bindings.add": W(lambda c: {"account_id": c["w_account"], "prefix": c["w_prefix"]}),
    "bindings.end": W(lambda c: {"binding_id": c["w_binding"]}),
    "blocks.set": W(lambda c: {"account_id": c["w_account"], "reason": "parity"}),
    "blocks.lift": W(lambda c: {"account_id": c["w_blocked"]}),
    "classes.add": W(lambda c: {"name": f"parity-{c['tag']}-class-new", "comment": "parity"}),
    "classes.add_rule": W(lambda c: {"class_id": c["w_class"], "remote_net": "198.51.100.0/24"}),
    "classes.delete": W(lambda c: {"class_id": c["w_class2"]}),
    "operators.create": W(lambda c: {"login": f"parity-{c['tag']}-op-new", "password": OPERATOR_PW,
                                     "groups": ["support"], "full_name": "New Operator"}),
    "operators.disable": W(lambda c: {"operator_id": c["w_operator"]}),
    "operators.enable": W(lambda c: {"operator_id": c["w_operator_off"]}),
    "operators.edit": W(lambda c: {"operator_id": c["w_operator2"], "full_name": "Edited Operator"}),
    "operators.reset_otp": W(lambda c: {"operator_id": c["w_operator2"]}),
    "operators.set_password": W(lambda c: {"operator_id": c["w_operator2"], "password": "parity-new-pw-2"}),
    "payments.add": W(lambda c: {"account_id": c["w_account"], "amount": 12_340_000, "method": "cash",
                                 "external_id": f"parity-{c['tag']}-pay", "comment": "parity"}),
    "payments.cancel": W(lambda c: {"payment_id": c["w_payment"], "reason": "parity"}),
    "payments.promised": W(lambda c: {"account_id": c["w_debtor"], "amount": 5_000_000, "days": 3}),
    "periodic.run": W(lambda c: {}),
    "radius.link_add": W(lambda c: {"account_id": c["w_account"], "login": f"parity-{c['tag']}-link-new",
                                    "password": "link-pw-1"}),
    "radius.link_delete": W(lambda c: {"id": c["w_link2"]}),
    "radius.link_edit": W(lambda c: {"id": c["w_link"], "max_sessions": 2}),
    "radius.nas_add": W(lambda c: {"name": f"parity-{c['tag']}-nas-new", "address": c["w_nas_ip"],
                                   "secret": "nas-secret-1"}),
    "radius.nas_delete": W(lambda c: {"id": c["w_nas2"]}),
    "radius.nas_edit": W(lambda c: {"id": c["w_nas"], "coa_port": 3799}),
    "radius.pool_add": W(lambda c: {"name": f"parity-{c['tag']}-pool-new", "first": c["w_pool_first"],
                                    "last": c["w_pool_last"]}),
    "radius.pool_delete": W(lambda c: {"id": c["w_pool2"]}),
    "radius.pool_edit": W(lambda c: {"id": c["w_pool"], "name": f"parity-{c['tag']}-pool-renamed"}),
    "services.add": W(lambda c: {"name": f"parity-{c['tag']}-svc-new", "kind": "once", "fee": 7_000_000}),
    "services.delete": W(lambda c: {"service_id": c["w_service2"]}),
    "services.set_rate": W(lambda c: {"service_id": c["w_traffic_service"], "unit_size": 1_000_000_000,
                                      "tiers": [[0, 500_000]], "class_id": c["class"]}),
    "tariffs.add": W(lambda c: {"name": f"parity-{c['tag']}-tariff-new", "service_ids": [c["service"]]}),
    "tariffs.delete": W(lambda c: {"tariff_id": c["w_tariff2"]}),
    "tariffs.link": W(lambda c: {"account_id": c["w_account"], "tariff_id": c["tariff"]}),
    "tariffs.set_services": W(lambda c: {"tariff_id": c["w_tariff"], "service_ids": [c["service"]]}),
    "timeranges.add": W(lambda c: {"name": f"parity-{c['tag']}-range-new", "priority": 5,
                                   "windows": [{"days": "sat-sun", "time": "00:00-24:00"}]}),
    "timeranges.delete": W(lambda c: {"range_id": c["w_range2"]}),
    "tokens.create": W(lambda c: {"name": f"parity-{c['tag']}-token-new", "groups": ["cashiers"]}),
    "tokens.revoke": W(lambda c: {"token_id": c["w_token"]}),
    "users.create": W(lambda c: {"login": f"parity-{c['tag']}-user-new", "password": "user-pw-12",
                                 "full_name": "New Parity User", "external_id": f"parity-{c['tag']}-crm"}),
    "users.delete": W(lambda c: {"user_id": c["w_user2"]}),
    "users.edit": W(lambda c: {"user_id": c["w_user"], "fields": {"phone": "+7 900 000 0000"}}),
    "users.set_password": W(lambda c: {"user_id": c["w_user"], "password": "parity-new-pw-3"}),
    # must not really run here: the same refusal both ways
    "bulk.apply": X(lambda c: {"token": "not-a-preview-token", "expect_count": 1}),
    "invoices.issue": X(lambda c: {"account_id": NOBODY}),
    "invoices.credit": X(lambda c: {"invoice_id": NOBODY, "reason": "parity"}),
    "invoices.get": X(lambda c: {"invoice_id": NOBODY}),
    "invoices.run": X(lambda c: {"period_end": dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc)}),
    "bulk.preview": X(lambda c: {"filter": {}, "action": "no-such-action"}),
    "classes.delete_rule": X(lambda c: {"rule_id": NOBODY}),
    "plugins.load": X(lambda c: {"path": "/nonexistent/parity-plugin"}),
    "plugins.unload": X(lambda c: {"name": "no-such-plugin"}),
    "radius.disconnect": X(lambda c: {"session": NOBODY}),
    "self.otp_confirm": X(lambda c: {"code": "000000"}),
    "self.otp_disable": X(lambda c: {"code": "000000"}),
    # notifications (docs/automation/notify.md)
    "notify.templates_list": R(),
    "notify.templates_get": R(lambda c: {"event": "balance.low", "lang": "en"}),
    "notify.templates_preview": R(lambda c: {"event": "balance.low", "lang": "ru"}),
    "notify.templates_set": W(lambda c: {"event": "payment.added", "lang": "en", "subject": "Paid",
                                         "body": "Thank you, {{ login }}."}),
    "notify.templates_reset": X(lambda c: {"event": "balance.low", "lang": "de"}),
    "webhooks.list": S(),
    "webhooks.add": W(lambda c: {"name": f"parity-{c['tag']}-hook", "url": "https://hooks.example.test/in",
                                 "events": ["*"]}),
    "webhooks.edit": X(lambda c: {"webhook_id": NOBODY, "enabled": False}),
    "webhooks.delete": X(lambda c: {"webhook_id": NOBODY}),
    "webhooks.test": X(lambda c: {"webhook_id": NOBODY}),
    # the outbox, fair usage and dunning (docs/automation.md)
    "outbox.stats": S(),
    "outbox.list": S(lambda c: {"state": "dead", "limit": 10}),
    "outbox.retry": W(lambda c: {"ids": [NOBODY]}),
    "fup.profiles_list": S(),
    "fup.profiles_set": W(lambda c: {"name": f"parity-{c['tag']}-slow", "down_kbps": 512, "up_kbps": 256}),
    "fup.profiles_delete": W(lambda c: {"id": NOBODY}),   # (false: no such profile)
    "fup.quotas_list": S(),
    "fup.quotas_set": X(lambda c: {"service_id": NOBODY, "quota_bytes": 10**9, "profile_id": NOBODY}),
    "fup.quotas_delete": W(lambda c: {"id": NOBODY}),
    "fup.nas_set": W(lambda c: {"id": c["w_nas"], "kind": "mikrotik", "coa_nak_action": "disconnect"}),
    "fup.state": R(lambda c: {"account_id": c["account"]}),
    "dunning.policies_get": R(lambda c: {"tariff_id": c["tariff"]}),
    "dunning.policies_set": W(lambda c: {"tariff_id": c["w_tariff"], "grace_days": 3, "block_after_days": 5}),
    "dunning.policies_delete": W(lambda c: {"tariff_id": c["w_tariff"]}),
    "dunning.state": R(lambda c: {"account_id": c["account"]}),
}


# -- types: JSON <-> URFA by the declared schema ------------------------------------------------


def _time_to_json(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def encode_args(args: dict[str, Any], schema: dict[str, str]) -> dict[str, Any]:
    """URFA argument values as the API takes them, by the call's declared argument types."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        kind = schema.get(name, "any").rstrip("?")
        if value is None:
            out[name] = None
        elif kind == "money":
            out[name] = format_money(value)
        elif kind == "time":
            out[name] = _time_to_json(value)
        elif kind == "bytes":
            out[name] = base64.b64encode(value).decode()
        else:
            out[name] = value
    return out


def _decode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "money":
        assert isinstance(value, str), f"money must come as a string, got {value!r}"
        return parse_money(value)
    if kind == "time":
        assert isinstance(value, str) and value.endswith("Z"), f"time must be RFC 3339 UTC, got {value!r}"
        return dt.datetime.fromisoformat(value)
    if kind == "bytes":
        return base64.b64decode(value, validate=True)
    return value


def decode_value(value: Any, result: str, fields: dict[str, str], prefix: str = "") -> Any:
    """An HTTP answer back in URFA values, by the call's ``result`` type and ``fields``."""
    if prefix == "" and result in ("money", "time", "bytes"):
        return _decode(value, result)
    if isinstance(value, list):
        return [decode_value(item, result, fields, prefix) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = f"{prefix}{key}"
            kind = fields.get(name, "")
            if kind in ("money", "time", "bytes"):
                out[key] = _decode(item, kind)
            elif isinstance(item, (list, dict)) and any(f.startswith(name + ".") for f in fields):
                out[key] = decode_value(item, result, fields, name + ".")
            else:
                out[key] = item
        return out
    return value


def _as_instant(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else None
    return None


def differences(urfa: Any, http: Any, loose: bool, tags: tuple[str, str], where: str = "") -> list[str]:
    """Where ``http`` (decoded) is not ``urfa``; ``loose``: ids, times and secrets by type only."""
    if isinstance(urfa, dt.datetime):
        other = _as_instant(http)
        if other is None:
            return [f"{where}: time {urfa} came as {http!r}"]
        return [] if loose or other == urfa else [f"{where}: {urfa} != {other}"]
    if isinstance(urfa, bytes):
        raw = base64.b64decode(http) if isinstance(http, str) else http
        return [] if loose or raw == urfa else [f"{where}: bytes differ"]
    if isinstance(urfa, dict):
        if not isinstance(http, dict):
            return [f"{where}: a map came as {type(http).__name__}"]
        if set(urfa) != set(http):
            return [f"{where}: keys {sorted(urfa)} != {sorted(http)}"]
        found: list[str] = []
        for key in urfa:
            volatile = loose and (key in VOLATILE or key.endswith("_id") or key.endswith("_ids"))
            if volatile:
                if urfa[key] is not None and http[key] is not None and not isinstance(urfa[key], dt.datetime) \
                        and type(urfa[key]) is not type(http[key]):
                    found.append(f"{where}.{key}: {type(urfa[key]).__name__} != {type(http[key]).__name__}")
                continue
            found += differences(urfa[key], http[key], loose, tags, f"{where}.{key}")
        return found
    if isinstance(urfa, list):
        if not isinstance(http, list) or len(urfa) != len(http):
            return [f"{where}: list of {len(urfa)} came as {http!r:.200}"]
        return [d for i, (a, b) in enumerate(zip(urfa, http)) for d in differences(a, b, loose, tags, f"{where}[{i}]")]
    if loose and where == "" and type(urfa) is int and type(http) is int:
        return []                   # a write that answers the id it made
    if loose and isinstance(urfa, str) and isinstance(http, str):
        urfa, http = urfa.replace(f"-{tags[0]}-", "-*-"), http.replace(f"-{tags[1]}-", "-*-")
    if type(urfa) is not type(http) or urfa != http:
        return [f"{where}: {urfa!r:.200} != {http!r:.200}"]
    return []


def shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, dt.datetime):
        return "time"
    return type(value).__name__


# -- the two ways in ------------------------------------------------------------------------------


@dataclass
class Answer:
    ok: bool
    value: Any = None                 # the result (a streamed call: {"rows": [...], "result": ...})
    code: str = ""
    status: int = 0
    positional: bool = False          # URFA: the streamed rows were lists (columns = the fields, in order)
    row_keys: list[list[str]] = field(default_factory=list)     # HTTP: each streamed row's keys, in order


def _rows(chunks: list[Any], fields: dict[str, str]) -> list[Any]:
    rows: list[Any] = []
    for chunk in chunks:
        rows.extend(chunk if isinstance(chunk, list) and (not chunk or isinstance(chunk[0], (list, dict))) else [chunk])
    columns = [name for name in fields if "." not in name]
    return [dict(zip(columns, row)) if isinstance(row, list) else row for row in rows]


@dataclass
class UrfaWay:
    """The operator's proxied session, through the relay's system session."""

    relay: Client
    sid: bytes

    async def call(self, name: str, args: dict[str, Any], entry: dict[str, Any]) -> Answer:
        try:
            if entry.get("streaming"):
                stream = self.relay.stream(name, args, as_sid=self.sid, as_ip=IP)
                chunks = [chunk async for chunk in stream]
                positional = any(isinstance(row, list) for chunk in chunks if isinstance(chunk, list) for row in chunk)
                return Answer(True, {"rows": _rows(chunks, entry["fields"]), "result": stream.result},
                              positional=positional)
            return Answer(True, await self.relay.call(name, args, as_sid=self.sid, as_ip=IP))
        except CallFailed as exc:
            return Answer(False, code=exc.code)


@dataclass
class HttpWay:
    """The token, over the API."""

    http: aiohttp.ClientSession
    base: str
    token: str

    async def post(self, name: str, body: Any, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        return await self.http.post(f"{self.base}/api/v1/calls/{name}", data=json.dumps(body),
                                    headers={"Authorization": f"Bearer {self.token}",
                                             "Content-Type": "application/json", **(headers or {})})

    async def call(self, name: str, args: dict[str, Any], entry: dict[str, Any]) -> Answer:
        response = await self.post(name, encode_args(args, entry.get("args", {})))
        async with response:
            text = await response.text()
            kind = response.headers.get("Content-Type", "").split(";")[0]
            if response.status != 200:
                assert kind == "application/problem+json", (name, response.status, kind, text[:300])
                problem = json.loads(text)
                assert problem["status"] == response.status and problem["code"], problem
                return Answer(False, code=problem["code"], status=response.status)
        fields, result = entry.get("fields", {}), entry.get("result", "any")
        if entry.get("streaming"):
            assert kind == "application/x-ndjson", (name, kind)
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            assert lines and set(lines[-1]) == {"_result"}, f"{name}: the stream does not end with _result"
            rows = [decode_value(row, "map", fields) for row in lines[:-1]]
            # the summary is typed by the same fields as the rows where its keys are theirs
            return Answer(True, {"rows": rows, "result": decode_value(lines[-1]["_result"], result, fields)},
                          row_keys=[list(row) for row in lines[:-1]])
        assert kind == "application/json", (name, kind)
        return Answer(True, decode_value(json.loads(text), result, fields))


async def call_table(call: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    while True:
        page = await call("sys.calls", {"limit": 500, "offset": len(entries)})
        entries += page
        if len(page) < 500:
            return {entry["name"]: entry for entry in entries}


# -- the stack and its objects ------------------------------------------------------------------


@asynccontextmanager
async def api_stack(name: str) -> AsyncIterator[ApiStack]:
    """The edge's live stack (periodic charges off, the rate limit out of the way of a whole table's
    calls) and the relay login through which operators log in proxied, as the console's do."""
    async with httpapi_stack(Path(name), periodic={"enabled": False},
                             httpapi={"rate": 1000.0, "burst": 1000}) as st:
        made = billcore_cli(st.bc.config_path, "system", "create", RELAY[0], "--rights", "session.proxy_admin",
                            "--password-env", "PW", env={"PW": RELAY[1]})
        assert made.returncode == 0, made.stderr
        yield st


async def shared_objects(admin: Client) -> dict[str, Any]:
    """What the reads read: a subscriber with history, a tariff, a class, an operator."""
    user = await admin.call("users.create", {"login": "parity-reader", "password": "reader-pw-1",
                                             "full_name": "Parity Reader", "email": "reader@parity.example"})
    account = user["basic_account_id"]
    await admin.call("payments.add", {"account_id": account, "amount": 25_500_001, "method": "cash",
                                      "external_id": "parity-shared-1"})
    await admin.call("payments.add", {"account_id": account, "amount": 1_000_000, "method": "card"})
    await admin.call("blocks.set", {"account_id": account, "reason": "parity read"})
    await admin.call("blocks.lift", {"account_id": account})
    service = (await admin.call("services.add", {"name": "parity-monthly", "kind": "periodic", "fee": 30_000_000,
                                                 "period": {"kind": "monthly", "anchor": "2026-01-01"},
                                                 "charge_mode": "start"}))
    service_id = service["id"] if isinstance(service, dict) else service
    tariff = await admin.call("tariffs.add", {"name": "parity-tariff", "service_ids": [service_id]})
    tariff_id = tariff["id"] if isinstance(tariff, dict) else tariff
    await admin.call("tariffs.link", {"account_id": account, "tariff_id": tariff_id})
    klass = await admin.call("classes.add", {"name": "parity-class"})
    await admin.call("bindings.add", {"account_id": account, "prefix": "10.200.0.1/32"})
    operator = await admin.call("operators.create", {"login": "parity-someone", "password": OPERATOR_PW,
                                                     "groups": ["support"], "full_name": "Someone"})
    return {"user": user["id"], "account": account, "service": service_id, "tariff": tariff_id,
            "class": klass["id"] if isinstance(klass, dict) else klass, "operator": operator["id"]}


def _id(made: Any) -> int:
    return int(made["id"] if isinstance(made, dict) else made)


async def scratch_objects(admin: Client, tag: str, n: int, shared: dict[str, Any]) -> dict[str, Any]:
    """One side's objects for the writes, made alike for both sides (``n`` keeps addresses apart)."""
    c: dict[str, Any] = {"tag": tag, **shared}

    async def user(suffix: str) -> dict[str, Any]:
        made: dict[str, Any] = await admin.call("users.create", {"login": f"parity-{tag}-{suffix}",
                                                                  "password": "scratch-pw-1",
                                                                  "full_name": f"Scratch {suffix}"})
        return made

    first = await user("user")
    c["w_user"], c["w_account"] = first["id"], first["basic_account_id"]
    c["w_user2"] = (await user("user2"))["id"]
    blocked = await user("blocked")
    c["w_blocked"] = blocked["basic_account_id"]
    await admin.call("blocks.set", {"account_id": c["w_blocked"], "reason": "to lift"})
    debtor = await user("debtor")
    c["w_debtor"] = debtor["basic_account_id"]
    paid = await admin.call("payments.add", {"account_id": c["w_account"], "amount": 9_990_000, "method": "cash",
                                             "external_id": f"parity-{tag}-first"})
    c["w_payment"] = paid["payment_id"]
    c["w_prefix"] = f"10.210.{n}.1/32"
    c["w_binding"] = _id(await admin.call("bindings.add", {"account_id": c["w_account"],
                                                           "prefix": f"10.220.{n}.1/32"}))
    c["w_class"] = _id(await admin.call("classes.add", {"name": f"parity-{tag}-class"}))
    c["w_class2"] = _id(await admin.call("classes.add", {"name": f"parity-{tag}-class2"}))
    ops = {}
    for key in ("w_operator", "w_operator_off", "w_operator2"):
        ops[key] = _id(await admin.call("operators.create", {"login": f"parity-{tag}-{key[2:]}",
                                                             "password": OPERATOR_PW, "groups": ["cashiers"],
                                                             "full_name": "Scratch Operator"}))
    await admin.call("operators.disable", {"operator_id": ops["w_operator_off"]})
    c.update(ops)
    c["w_link"] = _id(await admin.call("radius.link_add", {"account_id": c["w_account"],
                                                           "login": f"parity-{tag}-link", "password": "link-pw-1"}))
    c["w_link2"] = _id(await admin.call("radius.link_add", {"account_id": c["w_account"],
                                                            "login": f"parity-{tag}-link2", "password": "link-pw-1"}))
    c["w_nas"] = _id(await admin.call("radius.nas_add", {"name": f"parity-{tag}-nas", "address": f"192.0.2.{n}",
                                                         "secret": "nas-secret-1"}))
    c["w_nas2"] = _id(await admin.call("radius.nas_add", {"name": f"parity-{tag}-nas2",
                                                          "address": f"192.0.2.{n + 10}", "secret": "nas-secret-1"}))
    c["w_nas_ip"] = f"192.0.2.{n + 20}"
    c["w_pool"] = _id(await admin.call("radius.pool_add", {"name": f"parity-{tag}-pool", "first": f"100.64.{n}.1",
                                                           "last": f"100.64.{n}.50"}))
    c["w_pool2"] = _id(await admin.call("radius.pool_add", {"name": f"parity-{tag}-pool2",
                                                            "first": f"100.64.{n}.100", "last": f"100.64.{n}.150"}))
    c["w_pool_first"], c["w_pool_last"] = f"100.65.{n}.1", f"100.65.{n}.50"
    c["w_service2"] = _id(await admin.call("services.add", {"name": f"parity-{tag}-svc2", "kind": "once",
                                                            "fee": 1_000_000}))
    c["w_traffic_service"] = _id(await admin.call("services.add", {"name": f"parity-{tag}-traffic",
                                                                   "kind": "traffic"}))
    c["w_tariff"] = _id(await admin.call("tariffs.add", {"name": f"parity-{tag}-tariff", "service_ids": []}))
    c["w_tariff2"] = _id(await admin.call("tariffs.add", {"name": f"parity-{tag}-tariff2", "service_ids": []}))
    c["w_range2"] = _id(await admin.call("timeranges.add", {"name": f"parity-{tag}-range2", "priority": 1,
                                                            "windows": [{"days": "mon-fri", "time": "08:00-18:00"}]}))
    c["w_token"] = _id(await admin.call("tokens.create", {"name": f"parity-{tag}-token", "groups": ["support"]}))
    return c


# -- running the comparison ----------------------------------------------------------------------


async def proxied_operator(st: ApiStack, role: str) -> UrfaWay:
    login = f"parity-{role}".replace("+", "-")
    await st.admin.call("operators.create", {"login": login, "password": OPERATOR_PW, "groups": role.split("+"),
                                             "full_name": f"Parity {role}"})
    relay = await connect("127.0.0.1", st.bc.urfa_port)
    await relay.login("system", *RELAY)
    info = await relay.proxy_login(login, OPERATOR_PW, IP, kind="admin")
    return UrfaWay(relay, info.sid)


async def compare(name: str, case: Case, entry: dict[str, Any], ways: tuple[Any, Any],
                  contexts: tuple[dict[str, Any], dict[str, Any]]) -> list[str]:
    """What differs between the two ways' answers to ``name`` (empty: the same)."""
    urfa_ctx, http_ctx = contexts
    u = await ways[0].call(name, case.args(urfa_ctx), entry)
    try:
        h = await ways[1].call(name, case.args(http_ctx if case.how == "write" else urfa_ctx), entry)
    except AssertionError as exc:
        return [f"{name}: the HTTP answer breaks the contract: {exc}"]
    if case.how == "refuse":
        if u.ok or h.ok:
            return [f"{name}: expected a refusal both ways, got URFA {u}, HTTP {h}"]
        if u.code in ("bad_args", "internal"):
            return [f"{name}: the case's refusal is {u.code}: fix the case's arguments"]
        return [] if u.code == h.code else [f"{name}: refused {u.code} over URFA, {h.code} over HTTP"]
    if not u.ok or not h.ok:
        return [f"{name}: URFA {'ok' if u.ok else u.code}, HTTP {'ok' if h.ok else (h.status, h.code)}"]
    columns = [f for f in entry.get("fields", {}) if "." not in f]
    if u.positional and any(keys != columns for keys in h.row_keys):
        return [f"{name}: streamed rows' keys are not the fields {columns} in order"]
    if case.how == "shape":
        a, b = shape(u.value), shape(h.value)
        return [] if _same_shape(u.value, h.value) else [f"{name}: shapes differ: {a} != {b}"]
    found = differences(u.value, h.value, case.how == "write", (urfa_ctx["tag"], http_ctx["tag"]))
    return [f"{name}: {d}" for d in found[:5]]


def _same_shape(urfa: Any, http: Any) -> bool:
    if isinstance(urfa, dt.datetime):
        return _as_instant(http) is not None
    if isinstance(urfa, bytes):                 # undeclared bytes come as base64
        return isinstance(http, str)
    if isinstance(urfa, dict):
        return isinstance(http, dict) and set(urfa) == set(http) and all(_same_shape(urfa[k], http[k]) for k in urfa)
    if isinstance(urfa, list):
        return isinstance(http, list) and (not urfa or not http or _same_shape(urfa[0], http[0]))
    return urfa is None or http is None or type(urfa) is type(http)


ORDER = {"read": 0, "shape": 1, "refuse": 2, "write": 3}


async def run_all(names: list[str], table: dict[str, dict[str, Any]], ways: tuple[Any, Any],
                  contexts: tuple[dict[str, Any], dict[str, Any]]) -> tuple[list[str], int]:
    """Every call compared, the reads before any write; (the differences, calls compared)."""
    failures: list[str] = []
    todo = sorted((n for n in names if n in CASES), key=lambda n: (ORDER[CASES[n].how], n))
    for name in todo:
        failures += await compare(name, CASES[name], table[name], ways, contexts)
    return failures, len(todo)


@pytest.mark.parametrize("role", ROLES)
async def test_every_call_of_a_role_answers_the_same_over_http_and_urfa(role: str) -> None:
    async with api_stack(f"parity-{role}".replace("+", "-")) as st, aiohttp.ClientSession() as http:
        shared = await shared_objects(st.admin)
        contexts = (await scratch_objects(st.admin, "urfa", 1, shared), await scratch_objects(st.admin, "http", 2, shared))
        async for _ in st.admin.stream("periodic.run", {}):
            pass                            # what is due is charged now: the compared runs find nothing new
        urfa = await proxied_operator(st, role)
        try:
            token = (await st.admin.call("tokens.create", {"name": f"parity-{role}".replace("+", "-"),
                                                           "groups": role.split("+")}))["token"]
            api = HttpWay(http, st.url, token)

            async def urfa_call(fn: str, args: dict[str, Any]) -> Any:
                return await urfa.relay.call(fn, args, as_sid=urfa.sid, as_ip=IP)

            async def http_call(fn: str, args: dict[str, Any]) -> Any:
                answer = await api.call(fn, args, {"args": {"limit": "int?", "offset": "int?"}})
                assert answer.ok, (fn, answer)
                return answer.value

            operator_table, token_table = await call_table(urfa_call), await call_table(http_call)
            everything = await call_table(lambda fn, args: st.admin.call(fn, args))

            # the same table, but for what only an operator's session has
            assert set(token_table) <= set(operator_table)
            assert set(operator_table) - set(token_table) <= ONLY_OPERATORS, set(operator_table) - set(token_table)
            assert not [name for name in token_table if name.startswith(NEVER_A_TOKENS)]
            for name, entry in token_table.items():
                assert entry == operator_table[name], f"{name}: sys.calls differs: {entry} != {operator_table[name]}"
            if role != "superusers":
                assert len(token_table) < len(everything)

            # every call of the token's table has a way to be compared
            missing = set(token_table) - set(CASES) - set(NOT_RUN) - {"sys.calls"}
            assert not missing, f"calls with no parity case (add them to CASES): {sorted(missing)}"

            failures, compared = await run_all(sorted(token_table), token_table, (urfa, api), contexts)
            assert not failures, "\n".join(failures)
            assert compared >= len(token_table) - len(NOT_RUN) - 1

            # and every call outside the role: 403 over HTTP, not_in_table over URFA
            outside = sorted(set(everything) - set(token_table))
            for name in outside:
                response = await api.post(name, {})
                async with response:
                    problem = await response.json(content_type=None)
                    assert response.status == 403, (name, response.status, problem)
                    assert problem["code"] in ("not_in_table", "forbidden"), (name, problem)
                if name not in operator_table:
                    with pytest.raises(CallFailed) as refused:
                        await urfa_call(name, {})
                    assert refused.value.code == "not_in_table", name
        finally:
            await urfa.relay.close()


async def test_a_cashiers_token_cannot_read_tariffs_and_a_revoked_token_stops_at_once() -> None:
    async with api_stack("parity-cashiers-token") as st, aiohttp.ClientSession() as http:
        user = await st.admin.call("users.create", {"login": "parity-payer", "password": "payer-pw-12"})
        made = await st.admin.call("tokens.create", {"name": "till-1", "groups": ["cashiers"]})
        till = HttpWay(http, st.url, made["token"])
        entry = {"args": {"account_id": "int", "amount": "money", "method": "str", "external_id": "str?"},
                 "result": "map", "fields": {"balance": "money"}}
        paid = await till.call("payments.add", {"account_id": user["basic_account_id"], "amount": 4_200_000,
                                                "method": "cash"}, entry)
        assert paid.ok and paid.value["balance"] == 4_200_000
        me = await till.call("sys.whoami", {}, {"result": "map"})
        assert (me.value["kind"], me.value["login"]) == ("token", "till-1")
        # the payment is the token's in the audit log, from the HTTP client's address
        rows = await st.admin.call("audit.query", {"login": "till-1"})
        assert [(row["principal_kind"], row["action"], str(row["ip"])) for row in rows
                if row["action"].startswith("payments")] == [("token", "payments.add", IP)], rows

        for name in ("tariffs.list", "services.list", "tariffs.quote"):
            refused = await till.call(name, {}, {})
            assert (refused.ok, refused.status) == (False, 403), (name, refused)
        async with http.get(f"{st.url}/api/v1/openapi.json",
                            headers={"Authorization": f"Bearer {made['token']}"}) as response:
            document = await response.json()
        assert "/api/v1/calls/payments.add" in document["paths"]
        assert not [path for path in document["paths"] if "tariffs." in path or "services." in path]

        # revoked over URFA by an operator: the very next request is 401
        assert (await till.call("users.get", {"user_id": user["id"]}, {"result": "map"})).ok
        assert await st.admin.call("tokens.revoke", {"token_id": made["id"]}) is True
        after = await till.call("users.get", {"user_id": user["id"]}, {"result": "map"})
        assert (after.ok, after.status) == (False, 401), after
        assert (await st.admin.call("accounts.get", {"account_id": user["basic_account_id"]}))["balance"] == 4_200_000
