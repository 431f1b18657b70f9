"""An OpenAPI 3.1 document from ``sys.calls`` entries: one pure function.

Theory of operation
-------------------
The call registry is the only source of truth: ``document(entries)`` turns
each entry of a session's ``sys.calls`` into one operation, ``POST
/api/v1/calls/{name}`` with ``operationId`` = the name with ``.`` → ``_``,
tagged with the name's first part.  So a plugin's new call appears in the
document as soon as it is in the token's table; nothing here names a call.

* Arguments (``args``) become the JSON request body, an object that admits
  no other keys; a word ending in ``?`` is optional (not ``required``).  A
  call without arguments has no request body.
* ``fields`` become the result's schema: a map's properties, a list's item
  properties, or, for a streaming call, the properties of each line of the
  ``application/x-ndjson`` answer (whose last line is ``{"_result": …}``).
  A dotted name is a property of the nested object (or of the items of the
  nested list) its head names.  Result properties are never ``required``
  and may be ``null``: a declaration says what a value *is*, not that it
  is always there.  An ``any`` result with fields is a list when the call
  pages (``bound`` ``page:N``), else an object.
* Money is a decimal string (``pattern`` below), time a ``date-time``
  string, bytes a base64 string (``contentEncoding``), ``ip`` a string;
  ``list``/``map`` are an array/object of anything, ``any`` is any value.
* A call that takes ``external_id`` documents the ``Idempotency-Key``
  header.  Every error is ``application/problem+json`` (``Problem``).

Shaped for real generators as well as for 3.1: nullable values are
``type: [T, "null"]`` (3.1) rather than 3.0's ``nullable``; every schema of a
body or result is inline (generators name them after the operation), and
the streamed answer is described, since generators read NDJSON as bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["document", "operation_id", "call_path", "MONEY_PATTERN", "PREFIX", "IDEMPOTENCY_HEADER"]

PREFIX: Final = "/api/v1"
MONEY_PATTERN: Final = r"^-?[0-9]{1,13}(\.[0-9]{1,6})?$"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
NDJSON: Final = "application/x-ndjson"
_ERROR_STATUSES: Final = ("400", "401", "403", "404", "409", "413", "422", "429", "500", "503", "504")

_LEAF: Final[dict[str, dict[str, Any]]] = {
    "int": {"type": "integer"},
    "money": {"type": "string", "pattern": MONEY_PATTERN,
              "description": "An amount as a decimal string, exact to the micro-unit (like \"12.50\")."},
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "ip": {"type": "string", "description": "An IPv4 or IPv6 address."},
    "time": {"type": "string", "format": "date-time"},
    "bytes": {"type": "string", "contentEncoding": "base64"},
    "list": {"type": "array", "items": {}},
    "map": {"type": "object", "additionalProperties": True},
    "any": {},
}


def operation_id(name: str) -> str:
    return name.replace(".", "_")


def call_path(name: str) -> str:
    return f"{PREFIX}/calls/{name}"


def _word_schema(word: str, *, nullable: bool) -> dict[str, Any]:
    schema = dict(_LEAF.get(word.rstrip("?"), {}))
    if nullable and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    return schema


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": True}


def _fields_tree(fields: Mapping[str, str]) -> dict[str, Any]:
    """``{"lines": "list", "lines.amount": "money"}`` → ``{"lines": ("list", {"amount": ("money", {})})}``."""
    tree: dict[str, Any] = {}
    for name, word in fields.items():
        node = tree
        parts = name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, [None, {}])[1]
        leaf = node.setdefault(parts[-1], [None, {}])
        leaf[0] = word
    return tree


def _node_schema(word: str | None, children: dict[str, Any], *, nullable: bool) -> dict[str, Any]:
    if not children:
        return _word_schema(word or "any", nullable=nullable)
    props = {name: _node_schema(w, kids, nullable=True) for name, (w, kids) in children.items()}
    inner = _object(props)
    schema: dict[str, Any] = {"type": "array", "items": inner} if (word or "").rstrip("?") == "list" else inner
    if nullable:
        schema["type"] = [str(schema["type"]), "null"]
    return schema


def result_schema(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of a (non-streamed) call's JSON result."""
    fields: Mapping[str, str] = entry.get("fields") or {}
    word = str(entry.get("result") or "any").rstrip("?")
    if not fields:
        return _word_schema(word, nullable=False)
    if word == "any":
        word = "list" if str(entry.get("bound") or "").startswith("page:") else "map"
    if word not in ("list", "map"):
        return _word_schema(word, nullable=False)
    return _node_schema(word, _fields_tree(fields), nullable=False)


def row_schema(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One line of a streamed answer: a row's fields, or the last line's ``_result``."""
    tree = _fields_tree(entry.get("fields") or {})
    props = {name: _node_schema(w, kids, nullable=True) for name, (w, kids) in tree.items()}
    props["_result"] = {**_word_schema(str(entry.get("result") or "any"), nullable=False),
                        "description": "Only on the last line: the call's summary result."}
    return {**_object(props), "description": "One row per line, keys in the declared order; the last line is "
                                             "{\"_result\": …}, the call's summary."}


def _body_schema(args: Mapping[str, str]) -> dict[str, Any]:
    props = {name: _word_schema(word, nullable=False) for name, word in args.items()}
    required = [name for name, word in args.items() if not word.endswith("?")]
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _summary(doc: str, name: str) -> str:
    first = doc.split("\n", 1)[0].strip()
    return (first if len(first) <= 120 else first[:117].rstrip() + "…") or name


def _operation(entry: Mapping[str, Any]) -> dict[str, Any]:
    name = str(entry["name"])
    args: Mapping[str, str] = entry.get("args") or {}
    doc = str(entry.get("doc") or "")
    notes = [f"URFA call `{name}`."]
    if entry.get("right"):
        notes.append(f"Right: `{entry['right']}`.")
    if entry.get("bound"):
        notes.append(f"Bound: `{entry['bound']}`.")
    op: dict[str, Any] = {
        "operationId": operation_id(name),
        "summary": _summary(doc, name),
        "description": "\n\n".join(p for p in (doc, " ".join(notes)) if p),
        "tags": [name.split(".", 1)[0]],
    }
    if "external_id" in args:
        op["parameters"] = [{
            "name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
            "description": "Fills `external_id`: a retry with the same key is answered by the same booking.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
        }]
    if args:
        op["requestBody"] = {
            "required": any(not word.endswith("?") for word in args.values()),
            "content": {"application/json": {"schema": _body_schema(args)}},
        }
    if entry.get("streaming"):
        ok = {"description": "The rows as JSON lines, then the summary line.",
              "content": {NDJSON: {"schema": row_schema(entry)}}}
    else:
        ok = {"description": "The call's result.", "content": {"application/json": {"schema": result_schema(entry)}}}
    op["responses"] = {"200": ok, **{status: {"$ref": "#/components/responses/Problem"} for status in _ERROR_STATUSES}}
    return op


_PROBLEM_SCHEMA: Final = {
    "type": "object",
    "description": "An RFC 9457 problem; `code` is billcore's wire error code.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
    "required": ["type", "title", "status", "code"],
}


def document(entries: Iterable[Mapping[str, Any]], *, title: str = "billcore HTTP API",
             version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``entries`` (a session's ``sys.calls``), deleted calls left out."""
    paths: dict[str, Any] = {}
    seen: set[str] = set()
    for entry in sorted(entries, key=lambda e: str(e["name"])):
        if entry.get("deleted"):
            continue
        op = _operation(entry)
        if op["operationId"] in seen:       # "a.b_c" and "a_b.c" would share one: the first keeps it
            op["operationId"] += "_" + str(len(seen))
        seen.add(op["operationId"])
        paths[call_path(str(entry["name"]))] = {"post": op}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title, "version": version,
            "description": "Generated from the caller's call table (`sys.calls`): every call the token may make "
                           "is one operation. Money is a decimal string; errors are RFC 9457 problems whose "
                           "`code` is billcore's wire error code.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Problem": _PROBLEM_SCHEMA},
            "responses": {"Problem": {
                "description": "An error (RFC 9457 problem details).",
                "headers": {"Retry-After": {"description": "Seconds to wait (429, 503).",
                                            "schema": {"type": "integer"}}},
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "bct_…",
                                           "description": "An API token (billctl tokens create)."}},
        },
        "security": [{"bearer": []}],
    }
