"""Checking a call's arguments against its schema, nested values included.

Theory of operation
-------------------
A call's arguments come from outside, so they are checked before any
handler runs, in one place, and refused with ``bad_args`` and a message
that names where the problem is (``fields['full_name']``) without echoing
the value.  The top level is checked against the schema's type words
(docs/protocol.md §3); every value, at any depth inside a ``list``, ``map``
or ``any`` argument, is checked against what the core can store at all:

* text holds no NUL (PostgreSQL text cannot) and is at most ``MAX_TEXT``
  characters; map keys are text;
* integers fit a BIGINT (−2⁶³ … 2⁶³−1), the width of every id and amount;
* floats are finite (no NaN or infinity reaches a comparison);
* nesting is at most ``MAX_DEPTH`` deep and one argument holds at most
  ``MAX_ITEMS`` values in all (bytes are bounded by the frame cap alone:
  ``netflow.submit`` ships columns as bytes).

The handlers still check meaning (a list of ids, a known weekday); this
module guarantees they only ever see values of a bounded, storable shape.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "MAX_TEXT", "INT_MIN", "INT_MAX", "check_args", "check_value"]

MAX_DEPTH = 16
MAX_ITEMS = 100_000
MAX_TEXT = 65_536
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class _Bad(Exception):
    """One argument does not fit; the message names where."""


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int,
    "money": lambda v: type(v) is int,
    "str": lambda v: type(v) is str,
    "bool": lambda v: type(v) is bool,
    "bytes": lambda v: type(v) is bytes,
    "list": lambda v: type(v) is list,
    "map": lambda v: type(v) is dict,
    "time": lambda v: type(v) is datetime,
    "ip": lambda v: type(v) is str and "\0" not in v and len(v) <= 64 and _is_ip(v),
    "any": lambda v: True,
}


def check_value(where: str, value: Any) -> None:
    """Raise ``_Bad`` naming the first place in ``value`` the core cannot take."""
    budget = [MAX_ITEMS]
    _walk(where, value, 0, budget)


def _walk(where: str, value: Any, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _Bad(f"more than {MAX_ITEMS} values in all")
    t = type(value)
    if t is str:
        if "\0" in value:
            raise _Bad(f"text at {where} must not contain NUL")
        if len(value) > MAX_TEXT:
            raise _Bad(f"text at {where} is longer than {MAX_TEXT} characters")
    elif t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise _Bad(f"integer at {where} is outside -2^63..2^63-1")
    elif t is float:
        if not math.isfinite(value):
            raise _Bad(f"number at {where} must be finite")
    elif t is list or t is dict:
        if depth >= MAX_DEPTH:
            raise _Bad(f"{where} nests deeper than {MAX_DEPTH} levels")
        if t is list:
            for i, item in enumerate(value):
                _walk(f"{where}[{i}]", item, depth + 1, budget)
        else:
            for key, item in value.items():
                if type(key) is not str:
                    raise _Bad(f"map keys at {where} must be text")
                _walk(f"{where}[{_label(key)}]", key, depth + 1, budget)
                _walk(f"{where}[{_label(key)}]", item, depth + 1, budget)
    elif value is None or t is bool or t is bytes or t is datetime:
        pass
    else:   # the wire decoder yields nothing else; a plugin's in-process caller might
        raise _Bad(f"{where} holds a value of an unsupported type")


def _label(key: str) -> str:
    """A map key as shown in a message: short, printable, no NUL."""
    shown = key[:32].replace("\0", "\\0")
    return repr(shown + ("…" if len(key) > 32 else ""))


def check_args(schema: Mapping[str, str], args: Mapping[str, Any]) -> str | None:
    """Why ``args`` do not fit ``schema``, or ``None`` if they do."""
    for name, value in args.items():
        word = schema.get(name)
        if word is None:
            return f"unknown argument {_label(name) if type(name) is str else '?'}"
        if value is None and word.endswith("?"):
            continue
        base = word.rstrip("?")
        check = _TYPE_CHECKS.get(base)
        if check is not None and not check(value):
            if value is None:
                return f"argument {name!r} may not be nil"
            return f"argument {name!r} must be {base}"
        try:
            check_value(name, value)
        except _Bad as exc:
            return f"argument {name!r}: {exc}"
    if len(args) < len(schema):
        for name, word in schema.items():
            if name not in args and not word.endswith("?"):
                return f"missing argument {name!r}"
    return None
