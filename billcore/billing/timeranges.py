"""Time ranges: which tariff window an instant falls in, in the operator's zone.

Theory of operation
-------------------
A ``TimeRange`` is a set of weekly ``Window``s (weekdays × minute-of-day) and
of whole local dates (holidays), with a priority.  ``select`` converts the
instant to the operator's wall clock (``zoneinfo``) and returns the matching
range of highest priority (ties: lowest ``range_id``), or ``None``.

A window ``[start_minute, end_minute)`` belongs to the weekday it *starts*
on.  ``start > end`` crosses midnight: "Fri 23:00–07:00" covers Friday 23:00
to Saturday 07:00.  ``start == end`` is a full 24 hours from ``start``.

Everything is decided on the wall clock, so DST needs no special case in
``select``: in Europe/Berlin the night window 23:00–07:00 lasts 7 real hours
on the March switch night and 9 on the October one, and both 02:xx hours of
the repeated October hour are "night".

``split`` cuts ``[start, end)`` into maximal pieces of constant selection.
The selection can only change where the wall clock crosses a window border
or midnight, or where the UTC offset changes (the wall clock jumps); ``split``
visits exactly those candidate instants, finding offset changes by bisection
on whole seconds, so a session over a DST switch is cut at the right second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Final

from billcore.billing.errors import InvariantViolation, TimeRangeError

__all__ = [
    "MAX_RANGES",
    "MAX_SPLIT_SPAN",
    "TimeRange",
    "TimeRangePiece",
    "Window",
    "select",
    "split",
]

MINUTES_PER_DAY: Final = 1_440
MAX_RANGES: Final = 256
MAX_WINDOWS: Final = 64
MAX_DATES: Final = 1_024
MAX_SPLIT_SPAN: Final = timedelta(days=400)
"""Longest interval ``split`` accepts (a RADIUS session piece is far shorter)."""

_ONE_SECOND: Final = timedelta(seconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _require_aware(instant: datetime, what: str) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise TimeRangeError(f"{what} must be an aware datetime")


@dataclass(frozen=True, slots=True)
class Window:
    """Weekdays (0 = Monday) × local minutes ``[start_minute, end_minute)``."""

    weekdays: frozenset[int]
    start_minute: int
    end_minute: int

    def __post_init__(self) -> None:
        if not self.weekdays or not self.weekdays <= frozenset(range(7)):
            raise TimeRangeError(f"weekdays must be a non-empty subset of 0..6: {self.weekdays}")
        for minute in (self.start_minute, self.end_minute):
            if type(minute) is not int or not 0 <= minute < MINUTES_PER_DAY:
                raise TimeRangeError(f"minute of day must be an int in 0..1439, got {minute!r}")

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether local (weekday, minute-of-day) lies in this window."""
        previous_day = (weekday - 1) % 7
        if self.start_minute < self.end_minute:
            return weekday in self.weekdays and self.start_minute <= minute < self.end_minute
        # crosses midnight (or is a full day when start == end)
        if weekday in self.weekdays and minute >= self.start_minute:
            return True
        return previous_day in self.weekdays and minute < self.end_minute


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A priced time range: weekly windows plus whole local dates (holidays)."""

    range_id: int
    priority: int
    windows: tuple[Window, ...] = ()
    dates: frozenset[date] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if type(self.range_id) is not int or self.range_id <= 0:
            raise TimeRangeError("range_id must be a positive int (0 means 'any range')")
        if len(self.windows) > MAX_WINDOWS or len(self.dates) > MAX_DATES:
            raise TimeRangeError("too many windows or dates in one time range")
        if not self.windows and not self.dates:
            raise TimeRangeError(f"time range {self.range_id} matches nothing")

    def matches(self, local: datetime) -> bool:
        """Whether a wall-clock datetime (already in the operator's zone) is in range."""
        if local.date() in self.dates:
            return True
        weekday, minute = local.weekday(), local.hour * 60 + local.minute
        return any(window.contains(weekday, minute) for window in self.windows)


def _ordered(ranges: Sequence[TimeRange]) -> list[TimeRange]:
    if len(ranges) > MAX_RANGES:
        raise TimeRangeError(f"at most {MAX_RANGES} time ranges")
    return sorted(ranges, key=lambda r: (-r.priority, r.range_id))


def select(ranges: Sequence[TimeRange], instant: datetime, tz: tzinfo) -> TimeRange | None:
    """The winning range at ``instant`` on ``tz``'s wall clock (None if none matches)."""
    _require_aware(instant, "instant")
    local = instant.astimezone(tz)
    for candidate in _ordered(ranges):
        if candidate.matches(local):
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class TimeRangePiece:
    """``[start, end)`` (UTC) during which ``range_id`` (0 = no range) is selected."""

    start: datetime
    end: datetime
    range_id: int

    @property
    def seconds(self) -> int:
        return (self.end - self.start) // _ONE_SECOND


def _border_minutes(ranges: Iterable[TimeRange]) -> list[int]:
    minutes = {0}  # midnight: the weekday and the date change there
    for time_range in ranges:
        for window in time_range.windows:
            minutes.add(window.start_minute)
            minutes.add(window.end_minute)
    return sorted(minutes)


def _next_wall_border(instant: datetime, borders: Sequence[int], tz: tzinfo) -> datetime:
    """First instant after ``instant`` whose wall time is a border minute (either fold)."""
    local_day = instant.astimezone(tz).date()
    best: datetime | None = None
    for day_offset in (0, 1, 2):
        day = local_day + timedelta(days=day_offset)
        for minute in borders:
            wall = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=tz)
            for fold in (0, 1):
                utc = wall.replace(fold=fold).astimezone(timezone.utc)
                if utc > instant and (best is None or utc < best):
                    best = utc
        if best is not None:
            return best
    raise InvariantViolation("no midnight within three local days")  # pragma: no cover


def _first_offset_change(lo: datetime, hi: datetime, tz: tzinfo) -> datetime | None:
    """First instant in ``(lo, hi]`` at which ``tz``'s UTC offset differs from ``lo``'s.

    Zone transitions happen on whole UTC seconds, so the search is a
    bisection over integer epoch seconds (bounded: 64 halvings cover 2⁶⁴ s).
    """
    base = lo.astimezone(tz).utcoffset()
    if hi.astimezone(tz).utcoffset() == base:
        return None
    low = (lo - _EPOCH) // _ONE_SECOND  # offset(low) == base: no transition in (low, lo]
    high = (hi - _EPOCH) // _ONE_SECOND  # the change at T <= hi is at T <= floor(hi)
    for _ in range(64):
        if high - low <= 1:
            return _EPOCH + timedelta(seconds=high)
        middle = (low + high) // 2
        if (_EPOCH + timedelta(seconds=middle)).astimezone(tz).utcoffset() == base:
            low = middle
        else:
            high = middle
    raise InvariantViolation("offset bisection did not converge")  # pragma: no cover


def split(
    ranges: Sequence[TimeRange], start: datetime, end: datetime, tz: tzinfo
) -> list[TimeRangePiece]:
    """Cut ``[start, end)`` into maximal pieces of constant ``select`` result (UTC)."""
    _require_aware(start, "start")
    _require_aware(end, "end")
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    if end < start or end - start > MAX_SPLIT_SPAN:
        raise TimeRangeError(f"interval must be ordered and at most {MAX_SPLIT_SPAN} long")
    ordered = _ordered(ranges)
    borders = _border_minutes(ordered)
    pieces: list[TimeRangePiece] = []
    cursor = start
    # Each step advances at least to the next wall border or offset change;
    # with midnight a border that is at most ~25 h, plus two folds and one DST
    # change per border: the bound below is generous.
    max_steps = (len(borders) * 2 + 2) * (MAX_SPLIT_SPAN.days + 2)
    for _ in range(max_steps):
        if cursor >= end:
            break
        border = min(_next_wall_border(cursor, borders, tz), end)
        change = _first_offset_change(cursor, border, tz)
        step_end = change if change is not None and change < border else border
        chosen = select(ordered, cursor, tz)
        range_id = chosen.range_id if chosen is not None else 0
        if pieces and pieces[-1].range_id == range_id and pieces[-1].end == cursor:
            pieces[-1] = TimeRangePiece(pieces[-1].start, step_end, range_id)
        else:
            pieces.append(TimeRangePiece(cursor, step_end, range_id))
        cursor = step_end
    else:
        raise InvariantViolation("split did not reach the end of the interval")
    if sum((p.end - p.start for p in pieces), timedelta()) != end - start:
        raise InvariantViolation("time-range pieces do not cover the interval exactly")
    return pieces
