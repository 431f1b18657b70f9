"""The shipper's decisions, without I/O: where replay starts, where a batch may end, when to ship.

Theory of operation
-------------------
`ShipPlan` is fed what happened — the receiver made the journal durable up
to an offset (`journaled`), the core acknowledged a watermark
(`acknowledged`), the raw store flushed up to an offset (`raw_flushed`), a
batch was decoded up to an offset (`cut`), a batch is done at time ``now``
(`batch_done`) — and answers with what to do next (`next_action`):

* `Idle`: nothing journaled beyond the tail; wait for the receiver, at most until ``until``;
* `Finish`: nothing left and the worker is stopping;
* `Wait`: journal is waiting but the ship interval has not passed; wait until ``until``;
* `CutBatch`: decode a batch from ``start`` that ends at or below ``limit``.

`cut` answers `Submit` (send it to the core) or `Skip` (the core already
counts it: its end is at or below the committed watermark; only the decoder
checkpoint is written, and raw flows, which trail the watermark, are kept).

The rules it keeps, each the reason for one line of `next_action` or `cut`:

* Replay starts at the lower of the committed watermark and the raw store's
  watermark (when raw flows are kept), never below the journal's oldest
  offset: both stores then get exactly what they lack.
* A batch never straddles the committed watermark W: while the tail is below
  W the limit is W, so every batch ends at or below W (skipped) or starts at
  or above it (submitted). A straddling batch would charge [start, W) twice.
* Ship every ``ship_interval`` seconds; at once when more than
  ``behind_bytes`` wait, when replaying below W (nothing is sent), or when
  stopping.
* The journal may be trimmed below the same floor replay starts from.

Time is passed in (``now``, seconds on any monotonic clock), so tests drive
it; the worker (`netflow.worker`) does the waiting, reading and calling.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BEHIND_BYTES", "ShipPlan", "Replay", "Idle", "Finish", "Wait", "CutBatch", "Submit", "Skip",
           "PlanError"]

BEHIND_BYTES = 32 << 20  # journal waiting beyond this is shipped at once rather than at ship_interval


class PlanError(Exception):
    """An event the plan cannot accept (a bug in the worker that feeds it)."""


@dataclass(frozen=True, slots=True)
class Replay:
    offset: int  # the journal offset the tail starts reading from (its decoder checkpoint is loaded)


@dataclass(frozen=True, slots=True)
class Idle:
    until: float


@dataclass(frozen=True, slots=True)
class Finish:
    pass


@dataclass(frozen=True, slots=True)
class Wait:
    until: float


@dataclass(frozen=True, slots=True)
class CutBatch:
    start: int
    limit: int


@dataclass(frozen=True, slots=True)
class Submit:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Skip:
    start: int
    end: int


Action = Idle | Finish | Wait | CutBatch


class ShipPlan:
    """One run's shipping decisions; a restarted worker makes a new plan (`start`)."""

    def __init__(self, ship_interval: float, keeps_raw: bool, behind_bytes: int = BEHIND_BYTES) -> None:
        self.ship_interval = ship_interval
        self.keeps_raw = keeps_raw
        self.behind_bytes = behind_bytes
        self.committed = -1  # the core's watermark (-1: it counts nothing of this worker yet)
        self.raw_mark: int | None = None  # the raw store's watermark (None: nothing flushed yet)
        self.durable = 0
        self.position: int | None = None  # the tail's offset; None until `start`
        self._last_ship = 0.0
        self._open: CutBatch | None = None

    # -- events ---------------------------------------------------------------
    def acknowledged(self, watermark: int) -> None:
        """The core counts everything below ``watermark`` (it never goes back)."""
        self.committed = max(self.committed, watermark)

    def raw_flushed(self, mark: int | None) -> None:
        self.raw_mark = mark

    def journaled(self, durable: int) -> None:
        """The journal is on disk up to ``durable``."""
        self.durable = max(self.durable, durable)

    def start(self, oldest: int, now: float) -> Replay:
        """Where this run's tail starts: the floor both stores agree on, within the journal."""
        if self.position is not None:
            raise PlanError("the plan has started already")
        self.position = max(self.floor(), oldest)
        self.durable = max(self.durable, self.position)
        self._last_ship = now
        return Replay(self.position)

    def cut(self, end: int) -> Submit | Skip:
        """The batch `next_action` asked for was decoded up to ``end``."""
        batch = self._open
        if batch is None:
            raise PlanError("no batch was asked for")
        if not batch.start < end <= batch.limit:
            raise PlanError(f"batch [{batch.start}, {end}) is outside [{batch.start}, {batch.limit}]")
        self._open = None
        self.position = end
        if end <= self.committed:
            return Skip(batch.start, end)
        if batch.start < self.committed:
            raise PlanError(f"batch [{batch.start}, {end}) straddles the committed watermark {self.committed}")
        return Submit(batch.start, end)

    def batch_done(self, now: float) -> None:
        """The batch is submitted and acknowledged, or skipped; the ship interval counts from ``now``."""
        self._last_ship = now

    # -- decisions ------------------------------------------------------------
    def floor(self) -> int:
        """Below this offset both the core and the raw store have everything."""
        floor = max(self.committed, 0)
        if self.keeps_raw:
            floor = min(floor, self.raw_mark or 0)
        return floor

    def trim_below(self) -> int | None:
        """The offset the journal and the checkpoints may be trimmed below, if any."""
        floor = self.floor()
        return floor if floor > 0 else None

    def lag(self) -> int:
        """Journal bytes on disk that the core does not count yet."""
        return max(0, self.durable - max(self.committed, 0))

    def next_action(self, now: float, stopping: bool = False) -> Action:
        position = self.position
        if position is None:
            raise PlanError("start the plan first")
        if self._open is not None:
            raise PlanError("the last batch was not cut")
        if position >= self.durable:
            return Finish() if stopping else Idle(now + min(1.0, self.ship_interval))
        behind = self.durable - position > self.behind_bytes or position < self.committed
        due = self._last_ship + self.ship_interval
        if now < due and not behind and not stopping:
            return Wait(due)
        limit = self.durable if position >= self.committed else min(self.durable, self.committed)
        self._open = CutBatch(position, limit)
        return self._open
