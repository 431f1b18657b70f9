"""Loading the classifier snapshot from its streamed chunks (sans-IO).

Theory of operation. ``netflow.snapshot`` grows with the IP bindings (a
million subscribers: tens of MB), so it never travels as one frame: the core
streams chunks of bindings as binary columns (16-byte flow-space address,
int16 prefix length, int64 account, valid-from and valid-to in epoch ms, all
big-endian; -1 for "no end"), then chunks of rules in match order, and
answers with ``{"version", "bindings", "rules"}``. Every chunk comes from one
database snapshot, so the version names exactly these rows.

`SnapshotLoader` turns each chunk into numpy columns as it arrives (the
chunk's bytes are dropped at once: memory per binding is its 42 bytes of
columns, then the classifier's own), checks that the counts in the answer
match what arrived (a chunk lost or doubled is a refused snapshot, never a
silently smaller one) and builds the classifier `Snapshot`.

Consistency across a change made during the load: a binding change
committed after the core's database snapshot bumps the version past the one
loaded and NOTIFYs at commit; the core publishes the ``classifier`` event
with that version, and the worker, seeing a version newer than its own,
loads once more (`Worker.stale`). A change committed before is in the
chunks, and its event (however late) asks for no second load.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from netflow.classifier import TIME_LIMIT, BindingColumns, Snapshot, TrafficRule
from netflow.errors import ClassifierError

__all__ = ["SnapshotLoader", "rules_from_wire", "MAX_CHUNK_ROWS"]

MAX_CHUNK_ROWS = 1 << 20  # bindings in one chunk at most (the core sends 12 483 at the default 1 MB frame)
_COLUMNS = (("address", 16), ("bits", 2), ("account", 8), ("from_ms", 8), ("to_ms", 8))


class SnapshotLoader:
    """Feed it the chunks of one ``netflow.snapshot`` call, then its answer."""

    def __init__(self) -> None:
        self._parts: list[BindingColumns] = []
        self._rules: list[dict[str, Any]] = []
        self.bindings = 0
        self.chunks = 0

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise ClassifierError("snapshot chunk is not a map")
        self.chunks += 1
        kind = chunk.get("kind")
        if kind == "bindings":
            self._parts.append(_binding_chunk(chunk))
            self.bindings += len(self._parts[-1])
        elif kind == "rules" and isinstance(chunk.get("rules"), list):
            self._rules.extend(chunk["rules"])
        else:
            raise ClassifierError(f"unknown snapshot chunk {kind!r}")

    def finish(self, answer: Any, default_class: int = 0) -> tuple[Snapshot, int]:
        """The snapshot and its version; refuses one whose counts differ from the answer's."""
        if not isinstance(answer, dict) or type(answer.get("version")) is not int:
            raise ClassifierError("snapshot answer has no version")
        if answer.get("bindings") != self.bindings or answer.get("rules") != len(self._rules):
            raise ClassifierError(
                f"snapshot incomplete: {self.bindings} bindings and {len(self._rules)} rules arrived, "
                f"the core sent {answer.get('bindings')} and {answer.get('rules')}")
        bindings = BindingColumns.concat(self._parts)
        self._parts = []
        return Snapshot(bindings, rules_from_wire(self._rules), default_class), int(answer["version"])


def _binding_chunk(chunk: dict[str, Any]) -> BindingColumns:
    n = chunk.get("n")
    if type(n) is not int or not 0 < n <= MAX_CHUNK_ROWS:
        raise ClassifierError("snapshot chunk: bad row count")
    for name, width in _COLUMNS:
        raw = chunk.get(name)
        if not isinstance(raw, bytes) or len(raw) != n * width:
            raise ClassifierError(f"snapshot chunk: column {name} is not {n} x {width} bytes")
    to_ms = np.frombuffer(chunk["to_ms"], dtype=">i8").astype(np.int64)
    to_ms[to_ms == -1] = TIME_LIMIT + 1  # no end: until further notice
    return BindingColumns.from_prefixes(
        np.frombuffer(chunk["address"], dtype="S16"),
        np.frombuffer(chunk["bits"], dtype=">i2").astype(np.int64),
        np.frombuffer(chunk["account"], dtype=">i8").astype(np.int64),
        np.frombuffer(chunk["from_ms"], dtype=">i8").astype(np.int64),
        to_ms)


def rules_from_wire(rules: list[dict[str, Any]]) -> tuple[TrafficRule, ...]:
    """Rules in match order -> classifier rules.

    A rule's ``iface`` matches the input or the output interface: it becomes
    two consecutive rules of the same class. Flows no rule matches get class
    0, which is never charged (they are kept in raw storage).
    """
    out: list[TrafficRule] = []
    for rule in rules:
        common: dict[str, Any] = {
            "class_id": int(rule["class_id"]), "skip": bool(rule.get("skip")),
            "local": (rule["local_net"],) if rule.get("local_net") else (),
            "remote": (rule["remote_net"],) if rule.get("remote_net") else (),
            "local_ports": (tuple(rule["local_ports"]),) if rule.get("local_ports") else (),
            "remote_ports": (tuple(rule["remote_ports"]),) if rule.get("remote_ports") else (),
            "protocols": (int(rule["protocol"]),) if rule.get("protocol") is not None else (),
            "exporters": (rule["exporter"],) if rule.get("exporter") else (),
        }
        if rule.get("iface") is not None:
            out.append(TrafficRule(**common, input_if=(int(rule["iface"]),)))
            out.append(TrafficRule(**common, output_if=(int(rule["iface"]),)))
        else:
            out.append(TrafficRule(**common))
    return tuple(out)
