"""JSON values to URFA values and back, driven by a call's declared types.

Theory of operation
-------------------
JSON has no money, no instants and no bytes; URFA has all three (integer
micro-units, msgpack timestamps, bin).  A call's ``sys.calls`` entry says
which argument and which result field is which, with the type words of
docs/protocol.md §3, so the conversion reads the declaration and never a
key's name:

* an argument declared ``money`` is a decimal *string* (``"12.50"``,
  ``parse_money``'s strict form); a JSON number there is refused — a float
  has already lost the cent, and an integer would be ambiguous between
  units and micro-units;
* ``time`` is an RFC 3339 string with its offset (``Z`` or ``±hh:mm``); a
  time without an offset is refused rather than guessed;
* ``bytes`` is base64 (standard or URL-safe alphabet, padding optional);
* every other word passes through: the core checks ``int``, ``str``,
  ``bool``, ``ip``, ``list``, ``map`` itself and answers ``bad_args``.

Results go the other way: a value at a field declared ``money`` (a dotted
name reaches into a nested map or into every map of a nested list) becomes
``format_money``'s string, exact to the micro-unit; every instant becomes
RFC 3339 in UTC with ``Z`` and every bytes value base64, declared or not
(JSON could not carry them otherwise).  A streamed row (a list of columns)
becomes a JSON object keyed by the declared fields, in their order.

Pure: no I/O; ``ArgError`` carries the wire-style code the edge answers with.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from billcore.common.errors import BillingError
from billcore.common.money import format_money, parse_money

__all__ = ["ArgError", "base_word", "optional", "args_from_json", "result_to_json", "row_to_json",
           "row_columns", "json_value", "rfc3339"]

_UTC = dt.timezone.utc
# RFC 3339 date-time: date "T" time, optional fraction, and an offset (required)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_MAX_BYTES_TEXT = 1 << 20


class ArgError(Exception):
    """An argument the edge refuses before asking the core; ``code`` is the wire code (``bad_args``)."""

    def __init__(self, message: str, code: str = "bad_args") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def base_word(word: str) -> str:
    """``"money?"`` → ``"money"``."""
    return word.rstrip("?")


def optional(word: str) -> bool:
    return word.endswith("?")


def rfc3339(value: dt.datetime) -> str:
    """An instant as RFC 3339 in UTC with ``Z`` (microseconds only when it has them)."""
    if value.tzinfo is None:       # the core sends aware UTC instants; a naive one is read as UTC
        value = value.replace(tzinfo=_UTC)
    text = value.astimezone(_UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def _time_arg(name: str, value: object) -> dt.datetime:
    if type(value) is not str or not _RFC3339.fullmatch(value):
        raise ArgError(f"{name}: an RFC 3339 time with its offset is expected, like '2026-01-31T12:00:00Z'")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        raise ArgError(f"{name}: not a valid time: {value[:40]!r}") from None
    return parsed.astimezone(_UTC)


def _bytes_arg(name: str, value: object) -> bytes:
    if type(value) is not str or len(value) > _MAX_BYTES_TEXT:
        raise ArgError(f"{name}: a base64 string is expected")
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ArgError(f"{name}: not valid base64") from None


def _money_arg(name: str, value: object) -> int:
    if type(value) is not str:
        raise ArgError(f"{name}: money is a decimal string like \"12.50\", not a JSON "
                       f"{'number' if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__}")
    try:
        return parse_money(value)
    except BillingError as exc:
        raise ArgError(f"{name}: {exc}") from None


def _arg(name: str, word: str, value: Any) -> Any:
    if value is None:
        return None        # the core decides: nil is "absent" for an optional argument, bad_args else
    kind = base_word(word)
    if kind == "money":
        return _money_arg(name, value)
    if kind == "time":
        return _time_arg(name, value)
    if kind == "bytes":
        return _bytes_arg(name, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ArgError(f"{name}: not a finite number")
    return value


def args_from_json(declared: Mapping[str, str], body: object) -> dict[str, Any]:
    """A JSON request body (an object, or None for none) as the call's URFA arguments.

    Unknown names are refused here, as the core would (``bad_args``), so the
    answer names them before any conversion."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ArgError("the request body is a JSON object of the call's arguments")
    unknown = sorted(k for k in body if k not in declared)
    if unknown:
        raise ArgError(f"unknown argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)[:200]}"
                       f" (takes: {', '.join(declared) or 'none'})"[:400])
    return {name: _arg(name, declared[name], value) for name, value in body.items()}


def json_value(value: Any) -> Any:
    """Any URFA value as JSON can carry it (instants, bytes; money only where declared)."""
    if isinstance(value, dt.datetime):
        return rfc3339(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def _typed(value: Any, word: str | None, fields: Mapping[str, str], prefix: str) -> Any:
    kind = base_word(word) if word is not None else None
    if kind == "money" and type(value) is int:
        return format_money(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = f"{prefix}{key}"
            out[str(key)] = _typed(item, fields.get(name), fields, name + ".")
        return out
    if isinstance(value, (list, tuple)):
        # a list of maps: each map's keys are the fields under the same prefix
        return [_typed(item, word if kind == "money" else None, fields, prefix) for item in value]
    return json_value(value)


def result_to_json(value: Any, result_word: str, fields: Mapping[str, str]) -> Any:
    """A call's result as JSON: declared money as decimal strings, instants and bytes as text."""
    return _typed(value, result_word, fields, "")


def row_columns(fields: Mapping[str, str]) -> list[str]:
    """A streamed row's column names: the declared top-level fields, in order."""
    return [name for name in fields if "." not in name]


def row_to_json(row: Any, columns: Sequence[str], fields: Mapping[str, str]) -> dict[str, Any]:
    """One streamed row as a JSON object: a list row keyed by ``columns`` (extra columns ``colN``)."""
    if isinstance(row, (list, tuple)):
        named = {columns[i] if i < len(columns) else f"col{i + 1}": cell for i, cell in enumerate(row)}
    elif isinstance(row, dict):
        named = row
    else:
        named = {"value": row}
    converted = _typed(named, None, fields, "")
    assert isinstance(converted, dict)
    return converted
