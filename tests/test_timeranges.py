"""Time-range selection and splitting on the operator's wall clock, DST included."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billcore.common.errors import TimeRangeError
from billcore.billing.timeranges import TimeRange, TimeRangePiece, Window, select, split

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
MOSCOW = ZoneInfo("Europe/Moscow")
EVERY_DAY = frozenset(range(7))
WEEKDAYS = frozenset(range(5))

NIGHT = TimeRange(1, 10, (Window(EVERY_DAY, 23 * 60, 7 * 60),))
WORKDAY = TimeRange(2, 5, (Window(WEEKDAYS, 8 * 60, 20 * 60),))
HOLIDAY = TimeRange(3, 50, dates=frozenset({date(2024, 5, 1)}))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def chosen(ranges: tuple[TimeRange, ...], instant: datetime, tz: ZoneInfo = BERLIN) -> int:
    found = select(ranges, instant, tz)
    return 0 if found is None else found.range_id


def test_minute_boundaries_are_half_open() -> None:
    ranges = (WORKDAY,)
    # Tuesday 2024-01-09 in Berlin (UTC+1): 08:00 local = 07:00Z
    assert chosen(ranges, utc(2024, 1, 9, 6, 59, 59)) == 0
    assert chosen(ranges, utc(2024, 1, 9, 7, 0)) == 2
    assert chosen(ranges, utc(2024, 1, 9, 18, 59, 59)) == 2
    assert chosen(ranges, utc(2024, 1, 9, 19, 0)) == 0
    # Saturday: no workday window
    assert chosen(ranges, utc(2024, 1, 13, 10, 0)) == 0


def test_window_crossing_midnight_belongs_to_the_day_it_starts() -> None:
    friday_night = TimeRange(4, 1, (Window(frozenset({4}), 23 * 60, 7 * 60),))
    ranges = (friday_night,)
    # Friday 2024-01-12 23:00 CET = 22:00Z ... Saturday 07:00 CET = 06:00Z
    assert chosen(ranges, utc(2024, 1, 12, 21, 59)) == 0
    assert chosen(ranges, utc(2024, 1, 12, 22, 0)) == 4
    assert chosen(ranges, utc(2024, 1, 13, 5, 59)) == 4
    assert chosen(ranges, utc(2024, 1, 13, 6, 0)) == 0
    # Friday early morning is Thursday night's tail: Thursday is not in the set
    assert chosen(ranges, utc(2024, 1, 12, 3, 0)) == 0


def test_full_day_window_when_start_equals_end() -> None:
    sunday = TimeRange(5, 1, (Window(frozenset({6}), 0, 0),))
    assert chosen((sunday,), utc(2024, 1, 13, 22, 59)) == 0  # Sat 23:59 CET
    assert chosen((sunday,), utc(2024, 1, 13, 23, 0)) == 5  # Sun 00:00 CET
    assert chosen((sunday,), utc(2024, 1, 14, 22, 59)) == 5
    assert chosen((sunday,), utc(2024, 1, 14, 23, 0)) == 0


def test_priority_then_lowest_id_wins() -> None:
    ranges = (WORKDAY, NIGHT, HOLIDAY)
    # 2024-05-01 is a Wednesday holiday: the holiday outranks the workday
    assert chosen(ranges, utc(2024, 5, 1, 10, 0)) == 3
    assert chosen(ranges, utc(2024, 5, 2, 10, 0)) == 2
    twin = TimeRange(9, WORKDAY.priority, WORKDAY.windows)
    assert chosen((twin, WORKDAY), utc(2024, 5, 2, 10, 0)) == 2


def test_night_range_across_berlin_march_switch_lasts_seven_hours() -> None:
    # 2024-03-31 02:00 CET -> 03:00 CEST (01:00Z). Night: Sat 23:00 CET (22:00Z)
    # to Sun 07:00 CEST (05:00Z).
    start, end = utc(2024, 3, 30, 20), utc(2024, 3, 31, 8)
    for minute in range(int((end - start) / timedelta(minutes=1))):
        instant = start + timedelta(minutes=minute)
        expected = 1 if utc(2024, 3, 30, 22) <= instant < utc(2024, 3, 31, 5) else 0
        assert chosen((NIGHT,), instant) == expected, instant
    pieces = split((NIGHT,), start, end, BERLIN)
    assert [(p.start, p.end, p.range_id) for p in pieces] == [
        (utc(2024, 3, 30, 20), utc(2024, 3, 30, 22), 0),
        (utc(2024, 3, 30, 22), utc(2024, 3, 31, 5), 1),
        (utc(2024, 3, 31, 5), utc(2024, 3, 31, 8), 0),
    ]
    assert pieces[1].seconds == 7 * 3600


def test_night_range_across_berlin_october_switch_lasts_nine_hours() -> None:
    # 2024-10-27 03:00 CEST -> 02:00 CET (01:00Z): the 02:xx hour happens twice.
    start, end = utc(2024, 10, 26, 18), utc(2024, 10, 27, 9)
    for minute in range(0, int((end - start) / timedelta(minutes=1)), 7):
        instant = start + timedelta(minutes=minute)
        expected = 1 if utc(2024, 10, 26, 21) <= instant < utc(2024, 10, 27, 6) else 0
        assert chosen((NIGHT,), instant) == expected, instant
    night = [p for p in split((NIGHT,), start, end, BERLIN) if p.range_id == 1]
    assert night == [TimeRangePiece(utc(2024, 10, 26, 21), utc(2024, 10, 27, 6), 1)]
    assert night[0].seconds == 9 * 3600


def test_window_starting_inside_the_spring_gap_starts_at_the_jump() -> None:
    # 02:30-04:00 on Sunday: 02:30 does not exist on 2024-03-31; the wall clock
    # jumps from 01:59:59 CET straight into the window at 03:00 CEST (01:00Z).
    gap = TimeRange(6, 1, (Window(frozenset({6}), 150, 240),))
    pieces = split((gap,), utc(2024, 3, 30, 23), utc(2024, 3, 31, 4), BERLIN)
    assert [(p.start, p.end, p.range_id) for p in pieces] == [
        (utc(2024, 3, 30, 23), utc(2024, 3, 31, 1), 0),
        (utc(2024, 3, 31, 1), utc(2024, 3, 31, 2), 6),
        (utc(2024, 3, 31, 2), utc(2024, 3, 31, 4), 0),
    ]


def test_repeated_autumn_hour_counts_twice() -> None:
    repeated = TimeRange(7, 1, (Window(frozenset({6}), 120, 180),))
    pieces = split((repeated,), utc(2024, 10, 26, 22), utc(2024, 10, 27, 4), BERLIN)
    assert [(p.start, p.end, p.range_id) for p in pieces] == [
        (utc(2024, 10, 26, 22), utc(2024, 10, 27, 0), 0),
        (utc(2024, 10, 27, 0), utc(2024, 10, 27, 2), 7),  # 02:00 CEST .. 03:00 CET
        (utc(2024, 10, 27, 2), utc(2024, 10, 27, 4), 0),
    ]


def test_moscow_historic_offset_changes() -> None:
    # 2011-03-27 02:00 MSK(+3) -> 03:00 MSK(+4) (permanent "summer" time);
    # 2014-10-26 02:00 MSK(+4) -> 01:00 MSK(+3) (back to +3 for good).
    spring = [p for p in split((NIGHT,), utc(2011, 3, 26, 12), utc(2011, 3, 27, 12), MOSCOW)
              if p.range_id == 1]
    assert spring == [TimeRangePiece(utc(2011, 3, 26, 20), utc(2011, 3, 27, 3), 1)]
    autumn = [p for p in split((NIGHT,), utc(2014, 10, 25, 12), utc(2014, 10, 26, 12), MOSCOW)
              if p.range_id == 1]
    assert autumn == [TimeRangePiece(utc(2014, 10, 25, 19), utc(2014, 10, 26, 4), 1)]
    assert autumn[0].seconds == 9 * 3600


def test_split_without_ranges_and_empty_intervals() -> None:
    assert split((), utc(2024, 1, 1), utc(2024, 1, 3), BERLIN) == [
        TimeRangePiece(utc(2024, 1, 1), utc(2024, 1, 3), 0)
    ]
    assert split((NIGHT,), utc(2024, 1, 1), utc(2024, 1, 1), BERLIN) == []


def test_invalid_definitions_and_inputs_are_refused() -> None:
    with pytest.raises(TimeRangeError):
        Window(frozenset({7}), 0, 60)
    with pytest.raises(TimeRangeError):
        Window(EVERY_DAY, 0, 1441)          # 1440 is 24:00, the end of the day; nothing later
    with pytest.raises(TimeRangeError):
        Window(EVERY_DAY, 1440, 60)         # a window starts at 23:59 at the latest
    with pytest.raises(TimeRangeError):
        TimeRange(0, 1, (Window(EVERY_DAY, 0, 60),))
    with pytest.raises(TimeRangeError):
        TimeRange(1, 1)
    with pytest.raises(TimeRangeError):
        select((NIGHT,), datetime(2024, 1, 1), BERLIN)
    with pytest.raises(TimeRangeError):
        split((NIGHT,), utc(2024, 1, 2), utc(2024, 1, 1), BERLIN)


windows = st.builds(
    Window,
    st.frozensets(st.integers(0, 6), min_size=1),
    st.integers(0, 1439),
    st.integers(0, 1439),
)
time_ranges = st.lists(
    st.builds(
        TimeRange,
        st.integers(1, 50),
        st.integers(0, 5),
        st.lists(windows, min_size=1, max_size=3).map(tuple),
    ),
    max_size=4,
    unique_by=lambda r: r.range_id,
).map(tuple)


@settings(deadline=None, max_examples=60)
@given(
    time_ranges,
    st.sampled_from(["Europe/Berlin", "Europe/Moscow", "America/New_York", "Australia/Lord_Howe"]),
    st.integers(0, 3 * 365 * 86400),
    st.integers(0, 4 * 86400),
)
def test_split_pieces_agree_with_select_and_cover_exactly(
    ranges: tuple[TimeRange, ...], zone: str, offset: int, length: int
) -> None:
    tz = ZoneInfo(zone)
    start = utc(2010, 1, 1) + timedelta(seconds=offset)
    end = start + timedelta(seconds=length)
    pieces = split(ranges, start, end, tz)
    assert sum(p.seconds for p in pieces) == length
    assert all(type(p.seconds) is int for p in pieces)
    cursor = start
    for piece, following in zip(pieces, pieces[1:] + [None]):
        assert piece.start == cursor < piece.end
        cursor = piece.end
        if following is not None:
            assert following.range_id != piece.range_id
        for probe in (piece.start, piece.start + (piece.end - piece.start) / 2,
                      piece.end - timedelta(seconds=1)):
            assert chosen(ranges, probe, tz) == piece.range_id
    assert cursor == end


# -- as an operator writes windows -------------------------------------------

from billcore.billing.timeranges import parse_days, parse_span, window_from_spec  # noqa: E402


def test_a_day_window_can_end_at_24_00() -> None:
    """"08:00-24:00" is 16 hours, up to midnight; minute 1440 is accepted and means that midnight."""
    day = TimeRange(9, 1, (window_from_spec({"days": "all", "time": "08:00-24:00"}),))
    # Tuesday 2024-01-09 in Berlin (UTC+1)
    assert chosen((day,), utc(2024, 1, 9, 6, 59)) == 0      # 07:59 local
    assert chosen((day,), utc(2024, 1, 9, 7, 0)) == 9       # 08:00
    assert chosen((day,), utc(2024, 1, 9, 22, 59)) == 9     # 23:59
    assert chosen((day,), utc(2024, 1, 9, 23, 0)) == 0      # 00:00 Wednesday
    stored = TimeRange(9, 1, (Window(EVERY_DAY, 8 * 60, 1440),))
    pieces = split((stored,), utc(2024, 1, 8, 23), utc(2024, 1, 9, 23), BERLIN)
    assert [(p.range_id, p.seconds) for p in pieces] == [(0, 8 * 3600), (9, 16 * 3600)]
    whole = TimeRange(8, 1, (window_from_spec({"days": "sat,sun", "time": "00:00-24:00"}),))
    assert chosen((whole,), utc(2024, 1, 13, 0, 0)) == 8 and chosen((whole,), utc(2024, 1, 14, 22, 59)) == 8
    assert chosen((whole,), utc(2024, 1, 14, 23, 0)) == 0   # Monday 00:00


def test_window_text_forms() -> None:
    assert parse_span("23:00-07:00") == (1380, 420)
    assert parse_span("8:30-24:00") == (510, 1440)
    assert parse_days("mon-fri") == WEEKDAYS and parse_days("sat-mon") == {5, 6, 0}
    assert parse_days("Mon, wed-thu") == {0, 2, 3} and parse_days([6]) == {6} and parse_days("all") == EVERY_DAY
    assert window_from_spec({"weekdays": [0], "start_minute": 0, "end_minute": 1440}) == Window(frozenset({0}), 0, 0)


@pytest.mark.parametrize("spec, message", [
    ({"days": "mon-fri", "time": "08:00-24:01"}, "within 00:00..24:00"),
    ({"days": "mon-fri", "time": "24:00-08:00"}, "23:59 at the latest"),
    ({"days": "mon-fri", "time": "8-20"}, "HH:MM"),
    ({"days": "mon-fry", "time": "08:00-20:00"}, "unknown day"),
    ({"days": "mon-fri"}, "needs time"),
    ({"time": "08:00-20:00"}, "names its days once"),
    ({"days": "all", "time": "08:00-20:00", "colour": 1}, "unknown window key"),
    ({"weekdays": [0, 7], "start_minute": 0, "end_minute": 60}, r"0 \(Monday\) \.\. 6"),
    ({"weekdays": [0], "start_minute": 0, "end_minute": 1441}, "0..1440"),
    ("08:00-20:00", "a window is a map"),
])
def test_bad_windows_say_what_is_wrong(spec: object, message: str) -> None:
    with pytest.raises(TimeRangeError, match=message):
        window_from_spec(spec)
