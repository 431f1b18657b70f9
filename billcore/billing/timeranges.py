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
An end of 24:00 (minute 1440), as an operator writes a day window
"08:00-24:00", is midnight at the end of the day: it is kept as minute 0,
which the crossing rule already reads as "until midnight", so "08:00-24:00"
is 16 hours and "00:00-24:00" the whole day.

Operators write windows as text: ``window_from_spec`` takes
``{"days": "mon-fri", "time": "08:00-24:00"}`` as well as the stored form
``{"weekdays": [0, 1, 2, 3, 4], "start_minute": 480, "end_minute": 1440}``
and says in words what is wrong with a bad one.

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

from billcore.common.errors import InvariantViolation, TimeRangeError

__all__ = [
    "MAX_RANGES",
    "MAX_SPLIT_SPAN",
    "TimeRange",
    "TimeRangePiece",
    "Window",
    "parse_days",
    "parse_span",
    "select",
    "split",
    "window_from_spec",
]

MINUTES_PER_DAY: Final = 1_440
DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
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
        if type(self.start_minute) is not int or not 0 <= self.start_minute < MINUTES_PER_DAY:
            raise TimeRangeError(f"start minute of day must be an int in 0..1439, got {self.start_minute!r}")
        if type(self.end_minute) is not int or not 0 <= self.end_minute <= MINUTES_PER_DAY:
            raise TimeRangeError(f"end minute of day must be an int in 0..1440 (24:00), got {self.end_minute!r}")
        if self.end_minute == MINUTES_PER_DAY:
            # 24:00 is the midnight that ends the day: minute 0 of the next, which start > end reads as such
            object.__setattr__(self, "end_minute", 0)

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether local (weekday, minute-of-day) lies in this window."""
        previous_day = (weekday - 1) % 7
        if self.start_minute < self.end_minute:
            return weekday in self.weekdays and self.start_minute <= minute < self.end_minute
        # crosses midnight (or is a full day when start == end)
        if weekday in self.weekdays and minute >= self.start_minute:
            return True
        return previous_day in self.weekdays and minute < self.end_minute


def _minute(text: str, what: str) -> int:
    hours, sep, minutes = text.strip().partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2 or len(hours) > 2:
        raise TimeRangeError(f"{what} must be HH:MM, got {text.strip()!r}")
    minute = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or minute > MINUTES_PER_DAY:
        raise TimeRangeError(f"{what} must be within 00:00..24:00, got {text.strip()!r}")
    return minute


def parse_span(text: str) -> tuple[int, int]:
    """``"08:00-24:00"`` → (480, 1440): start and end minute of day; an end at or before the start
    crosses midnight (``"23:00-07:00"``), and an end equal to the start is a whole day."""
    if type(text) is not str or text.count("-") != 1:
        raise TimeRangeError(f"a time span is HH:MM-HH:MM, e.g. 08:00-24:00, got {text!r}")
    start, end = text.split("-")
    first = _minute(start, "a span's start")
    if first == MINUTES_PER_DAY:
        raise TimeRangeError("a span starts at 23:59 at the latest (24:00 is the next day's 00:00)")
    return first, _minute(end, "a span's end")


def parse_days(value: object) -> frozenset[int]:
    """Weekdays (0 = Monday) from ``[0, 4]``, ``"mon-fri"``, ``"sat,sun"``, ``"mon,wed-fri"`` or ``"all"``."""
    if isinstance(value, (list, tuple)):
        if not all(type(d) is int and 0 <= d <= 6 for d in value) or not value:
            raise TimeRangeError(f"weekdays are numbers 0 (Monday) .. 6 (Sunday), got {value!r}")
        return frozenset(value)
    if type(value) is not str or not value.strip():
        raise TimeRangeError(f"days are names such as \"mon-fri\" or \"sat,sun\", got {value!r}")
    if value.strip().lower() in ("all", "daily", "every day"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in value.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in DAY_NAMES or (last and last not in DAY_NAMES):
            raise TimeRangeError(f"unknown day in {value!r}: days are {', '.join(DAY_NAMES)}")
        start, end = DAY_NAMES.index(first), DAY_NAMES.index(last or first)
        # "sat-mon" wraps over the week's end
        days.update(range(start, end + 1) if start <= end else [*range(start, 7), *range(0, end + 1)])
    return frozenset(days)


def window_from_spec(spec: object) -> Window:
    """A window from ``{"days": "mon-fri", "time": "08:00-24:00"}`` or the stored form ``{"weekdays",
    "start_minute", "end_minute"}`` (either key of each pair)."""
    if not isinstance(spec, dict):
        raise TimeRangeError(f"a window is a map such as {{\"days\": \"mon-fri\", \"time\": \"08:00-20:00\"}}, "
                             f"got {spec!r}")
    unknown = set(spec) - {"days", "weekdays", "time", "start_minute", "end_minute"}
    if unknown:
        raise TimeRangeError(f"unknown window key(s) {sorted(unknown)}: use days and time")
    if ("days" in spec) == ("weekdays" in spec):
        raise TimeRangeError("a window names its days once: days (\"mon-fri\") or weekdays ([0, 4])")
    weekdays = parse_days(spec["days"] if "days" in spec else spec["weekdays"])
    if "time" in spec:
        if "start_minute" in spec or "end_minute" in spec:
            raise TimeRangeError("a window has time or start_minute/end_minute, not both")
        start, end = parse_span(spec["time"])
    elif "start_minute" in spec and "end_minute" in spec:
        start, end = spec["start_minute"], spec["end_minute"]
    else:
        raise TimeRangeError("a window needs time (\"08:00-20:00\") or start_minute and end_minute")
    return Window(weekdays, start, end)


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
    return sorted(ranges, key=lambda time_range: (-time_range.priority, time_range.range_id))


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
    if sum((piece.end - piece.start for piece in pieces), timedelta()) != end - start:
        raise InvariantViolation("time-range pieces do not cover the interval exactly")
    return pieces
