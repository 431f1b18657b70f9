"""billcore.server.argcheck without a server: what reaches a handler is bounded and
storable at every depth, and the refusal names the place, not the value."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from billcore.server.argcheck import MAX_DEPTH, MAX_ITEMS, MAX_TEXT, check_args

SCHEMA = {"id": "int", "amount": "money?", "name": "str?", "fields": "map?", "ids": "list?", "at": "time?",
          "ip": "ip?", "blob": "bytes?", "anything": "any?"}


def deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.parametrize("args, where", [
    ({"id": 2**63}, "integer at id is outside -2^63..2^63-1"),
    ({"id": -(2**63) - 1}, "integer at id is outside"),
    ({"id": True}, "must be int"),
    ({"id": 1, "amount": 1.0}, "must be money"),
    ({"id": 1, "name": "bo\0b"}, "text at name must not contain NUL"),
    ({"id": 1, "name": "x" * (MAX_TEXT + 1)}, "longer than"),
    ({"id": 1, "fields": {"full_name": "bo\0b"}}, "fields['full_name'] must not contain NUL"),
    ({"id": 1, "fields": {"a\0": 1}}, "must not contain NUL"),
    ({"id": 1, "ids": ["a\0b"]}, "ids[0] must not contain NUL"),
    ({"id": 1, "ids": [{"days": "mon\0"}]}, "ids[0]['days']"),
    ({"id": 1, "ids": [2**64 - 1]}, "integer at ids[0] is outside"),
    ({"id": 1, "anything": [float("nan")]}, "must be finite"),
    ({"id": 1, "anything": deep(MAX_DEPTH + 1)}, "nests deeper"),
    ({"id": 1, "ids": list(range(MAX_ITEMS + 1))}, f"more than {MAX_ITEMS}"),
    ({"id": 1, "ip": "192.0.2.1\0"}, "must be ip"),
    ({"id": 1, "ip": "x" * 100}, "must be ip"),
    ({"id": None}, "may not be nil"),
    ({}, "missing argument 'id'"),
    ({"id": 1, "nope": 1}, "unknown argument 'nope'"),
])
def test_a_bad_value_is_refused_by_its_place(args: dict[str, Any], where: str) -> None:
    problem = check_args(SCHEMA, args)
    assert problem is not None and where in problem, problem
    assert "x" * 100 not in problem          # the value itself is not echoed


def test_values_the_core_can_store_pass() -> None:
    ok = {"id": 2**63 - 1, "amount": -(2**63), "name": "", "fields": {"k": [None, True, 1.5, b"\0", "ü"]},
          "ids": list(range(1000)), "at": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "ip": "2001:db8::1",
          "blob": b"\0" * 100_000, "anything": deep(MAX_DEPTH - 1)}
    assert check_args(SCHEMA, ok) is None
    assert check_args(SCHEMA, {"id": 1, "name": None}) is None      # an optional argument may be nil
