"""Rating: cumulative counters, tiers, prepaid, split invariance, rules for flags."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billcore.common.errors import MoneyRangeError, TariffError, UsageError
from billcore.common.money import GB, HOUR, MB, Price, parse_money
from billcore.billing.periods import (
    ChargeMode,
    PeriodicService,
    PeriodKind,
    PeriodSpec,
    ServiceLink,
)
from billcore.billing.rating import (
    ANY_RANGE,
    TIME_CLASS,
    AccountPlan,
    CounterKey,
    Meter,
    MeterRule,
    RatingBook,
    RatingResult,
    ServiceKind,
    ServiceTariff,
    SessionUsage,
    Tier,
    TrafficUsage,
    Usage,
    preview,
    rate,
    resolve,
    settle,
)
from billcore.billing.timeranges import TimeRange, Window

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NIGHT = TimeRange(1, 10, (Window(frozenset(range(7)), 23 * 60, 7 * 60),))
MONTHLY = PeriodSpec(PeriodKind.MONTHLY, date(2024, 1, 1))
NOW = datetime(2024, 4, 30, 12, tzinfo=UTC)
APRIL = datetime(2024, 3, 31, 22, tzinfo=UTC)  # April 1st, 00:00 in Berlin

TIERED = Meter(10 * GB, (Tier(0, Price.parse("0.50", GB)), Tier(10 * GB, Price.parse("0.30", GB))))
INTERNET, LOCAL, DIALUP = 1, 2, 3


def book(*, unlimited: bool = False, blocked: bool = False, meter: Meter = TIERED) -> RatingBook:
    traffic = ServiceTariff(10, ServiceKind.TRAFFIC, (
        MeterRule(INTERNET, ANY_RANGE, meter),
        MeterRule(LOCAL, NIGHT.range_id, Meter.flat(Price(0, 1))),
        MeterRule(LOCAL, ANY_RANGE, Meter.flat(Price.parse("0.01", MB))),
    ))
    dialup = ServiceTariff(20, ServiceKind.TIME, (
        MeterRule(TIME_CLASS, NIGHT.range_id, Meter.flat(Price.parse("1.00", HOUR))),
        MeterRule(TIME_CLASS, ANY_RANGE, Meter.flat(Price.parse("3.00", HOUR), prepaid=HOUR)),
    ))
    accounts = {7: AccountPlan(7, MONTHLY, (10, 20), unlimited=unlimited, blocked=blocked),
                8: AccountPlan(8, MONTHLY, (10,))}
    return RatingBook(BERLIN, (NIGHT,), {10: traffic, 20: dialup}, accounts)


def key(klass: int = INTERNET, range_id: int = ANY_RANGE, service: int = 10,
        account: int = 7) -> CounterKey:
    return CounterKey(account, service, klass, range_id, APRIL)


def noon(day: int) -> datetime:
    return datetime(2024, 4, day, 10, tzinfo=UTC)


def reference_charge(meter: Meter, total: int) -> int:
    """The formula of ARCHITECTURE.md, written naively with Fractions."""
    billable = max(0, total - meter.prepaid)
    exact = Fraction(0)
    for i, tier in enumerate(meter.tiers):
        upper = meter.tiers[i + 1].start if i + 1 < len(meter.tiers) else billable
        segment = max(0, min(billable, upper) - tier.start)
        exact += Fraction(segment * tier.price.micro_per_unit, tier.price.unit_size)
    return exact.__floor__()


def test_prepaid_and_tier_borders_at_exact_bytes() -> None:
    per_byte = Meter(1_000, (Tier(0, Price(7, 1)), Tier(500, Price(3, 1))))
    assert per_byte.charged(1_000) == 0  # total == prepaid
    assert per_byte.charged(1_001) == 7  # one byte over: floor(price of one byte)
    assert per_byte.charged(1_500) == 500 * 7  # exactly at the tier border
    assert per_byte.charged(1_501) == 500 * 7 + 3  # first byte of the second tier
    # a batch that crosses the tier border inside itself
    result = rate([TrafficUsage(7, INTERNET, noon(2), 600)],
                  {key(): 1_100}, book(meter=per_byte), NOW)
    assert [e.amount for e in result.entries] == [400 * 7 + 200 * 3]
    assert result.counters == {key(): 1_700}
    gb_price = TIERED
    assert gb_price.charged(10 * GB) == 0
    assert gb_price.charged(10 * GB + 1) == 0  # 0.5 micro-units, floored
    assert gb_price.charged(10 * GB + 2_000) == 1
    assert gb_price.charged(30 * GB) == parse_money("8.00")


def test_entries_reference_the_counter_move_and_merge_per_key() -> None:
    batch = [TrafficUsage(7, INTERNET, noon(d), 5 * GB) for d in (2, 3, 4, 5)]
    result = rate(batch, {}, book(), NOW)
    assert len(result.entries) == 1
    entry = result.entries[0]
    assert (entry.key, entry.counter_before, entry.counter_after) == (key(), 0, 20 * GB)
    assert entry.amount == parse_money("5.00") and entry.kind is ServiceKind.TRAFFIC
    assert result.total == parse_money("5.00")


def test_time_range_and_per_range_rules() -> None:
    # 23:30 Berlin (CEST, 21:30Z) is night: local traffic is free then, but counted
    night = datetime(2024, 4, 10, 21, 30, tzinfo=UTC)
    result = rate([TrafficUsage(7, LOCAL, night, 100 * MB),
                   TrafficUsage(7, LOCAL, noon(10), 100 * MB)], {}, book(), NOW)
    assert result.counters == {key(LOCAL, NIGHT.range_id): 100 * MB, key(LOCAL): 100 * MB}
    assert [(e.key.range_id, e.amount) for e in result.entries] == [(ANY_RANGE, parse_money("1.00"))]


def test_unlimited_counts_but_charges_nothing_blocked_is_charged() -> None:
    batch = [TrafficUsage(7, INTERNET, noon(3), 20 * GB)]
    unlimited = rate(batch, {}, book(unlimited=True), NOW)
    assert unlimited.entries == () and unlimited.counters == {key(): 20 * GB}
    # lifting the flag charges only later traffic, at the position already reached
    later = rate(batch, unlimited.counters, book(), NOW)
    assert later.total == parse_money("6.00")
    blocked = rate(batch, {}, book(blocked=True), NOW)
    assert blocked.total == rate(batch, {}, book(), NOW).total == parse_money("5.00")


def test_unratable_usage_is_returned_not_dropped() -> None:
    batch: list[Usage] = [
        TrafficUsage(99, INTERNET, noon(3), 1),  # unknown account
        TrafficUsage(7, 42, noon(3), 1),  # no rule for class 42
        TrafficUsage(7, INTERNET, NOW + timedelta(hours=1), 1),  # from the future
        TrafficUsage(7, INTERNET, noon(3), 1, service_id=20),  # a time service
        SessionUsage(8, noon(3), 60),  # account 8 has no time service
        TrafficUsage(7, INTERNET, noon(3), GB * 11),
    ]
    result = rate(batch, {}, book(), NOW)
    assert [r.reason for r in result.rejected] == [
        "unknown_account", "no_rate", "future", "no_service", "no_service"]
    assert [r.usage for r in result.rejected] == batch[:5]
    assert result.counters == {key(): 11 * GB}


def test_ambiguous_service_is_rejected() -> None:
    base = book()
    second = ServiceTariff(11, ServiceKind.TRAFFIC, base.services[10].rules)
    accounts = {7: AccountPlan(7, MONTHLY, (10, 11))}
    ambiguous = RatingBook(BERLIN, (NIGHT,), {10: base.services[10], 11: second}, accounts)
    result = rate([TrafficUsage(7, INTERNET, noon(3), 1)], {}, ambiguous, NOW)
    assert [r.reason for r in result.rejected] == ["ambiguous_service"]
    explicit = rate([TrafficUsage(7, INTERNET, noon(3), 20 * GB, service_id=11)], {}, ambiguous, NOW)
    assert [e.key.service_id for e in explicit.entries] == [11]


def test_absurd_amounts_stop_rating_instead_of_booking() -> None:
    absurd = Meter.flat(Price(10**9, 1))  # 1000 currency units per byte
    with pytest.raises(MoneyRangeError):
        rate([TrafficUsage(7, INTERNET, noon(2), 10**10)], {}, book(meter=absurd), NOW)


def test_malformed_input_raises() -> None:
    for bad in (TrafficUsage(7, INTERNET, noon(3), -1),
                TrafficUsage(7, INTERNET, noon(3), 1.5),  # type: ignore[arg-type]
                TrafficUsage(7, INTERNET, datetime(2024, 4, 3), 1),
                SessionUsage(7, noon(3).replace(microsecond=5), 10)):
        with pytest.raises(UsageError):
            rate([bad], {}, book(), NOW)
    with pytest.raises(UsageError):
        rate([], {}, book(), datetime(2024, 4, 3))
    with pytest.raises(TariffError):
        Meter(0, (Tier(5, Price(1, 1)),))
    with pytest.raises(TariffError):
        Meter(0, (Tier(0, Price(1, 1)), Tier(0, Price(2, 1))))


def test_session_split_by_time_range_period_and_prepaid() -> None:
    # 21:00 Apr 30 .. 03:00 May 1 (Berlin, CEST): the month boundary at midnight
    # and the night range from 23:00 cut the session into three counters.
    start = datetime(2024, 4, 30, 19, tzinfo=UTC)  # 21:00 CEST, Apr 30
    session = SessionUsage(7, start, 6 * HOUR)  # until 01:00Z May 1 = 03:00 CEST
    result = rate([session], {}, book(), datetime(2024, 5, 2, tzinfo=UTC))
    may = datetime(2024, 4, 30, 22, tzinfo=UTC)
    assert result.counters == {
        CounterKey(7, 20, TIME_CLASS, ANY_RANGE, APRIL): 2 * HOUR,  # 21:00-23:00 day
        CounterKey(7, 20, TIME_CLASS, NIGHT.range_id, APRIL): 1 * HOUR,  # 23:00-00:00
        CounterKey(7, 20, TIME_CLASS, NIGHT.range_id, may): 3 * HOUR,  # 00:00-03:00
    }
    # day hours: one prepaid hour, then 3.00/h; night hours 1.00/h
    assert result.total == parse_money("3.00") + parse_money("1.00") + parse_money("3.00")


meters = st.builds(
    lambda prepaid, borders, prices: Meter(
        prepaid, tuple(Tier(b, p) for b, p in zip([0, *sorted(set(borders))], prices))),
    st.integers(0, 10**12),
    st.lists(st.integers(1, 10**12), max_size=3),
    st.lists(st.builds(Price, st.integers(0, 10**5),
                       st.sampled_from([1, 1000, MB, GB, 1 << 20, 1 << 30, 7])),
             min_size=4, max_size=4),
)


@given(meters, st.lists(st.integers(0, 10**11), min_size=1, max_size=20))
def test_traffic_charge_is_split_invariant(meter: Meter, parts: list[int]) -> None:
    rating = book(meter=meter)
    counters: dict[CounterKey, int] = {}
    charged = 0
    for part in parts:
        result = rate([TrafficUsage(7, INTERNET, noon(2), part)], counters, rating, NOW)
        assert all(type(e.amount) is int and e.amount > 0 for e in result.entries)
        charged += result.total
        counters.update(result.counters)
    whole = rate([TrafficUsage(7, INTERNET, noon(2), sum(parts))], {}, rating, NOW)
    assert charged == whole.total == meter.charged(sum(parts)) == reference_charge(meter, sum(parts))


usages = st.lists(st.one_of(
    st.builds(TrafficUsage, st.sampled_from([7, 8, 9]), st.sampled_from([INTERNET, LOCAL, 99]),
              st.builds(lambda h: APRIL + timedelta(hours=h), st.integers(-30 * 24, 31 * 24)),
              st.integers(0, 50 * GB)),
    st.builds(SessionUsage, st.just(7),
              st.builds(lambda s: APRIL + timedelta(seconds=s), st.integers(-86400, 30 * 86400)),
              st.integers(0, 30 * HOUR)),
), max_size=25)


@settings(deadline=None, max_examples=200)
@given(usages, st.dictionaries(st.integers(0, 5), st.integers(0, 40 * GB), max_size=6), st.booleans(),
       meters)
def test_resolve_then_settle_is_rate(batch: list[Usage], stored: dict[int, int], unlimited: bool,
                                     meter: Meter) -> None:
    """The database path (resolve once, lock, settle) books exactly what ``rate`` books:
    the same entries in the same order, the same counters, the same rejects."""
    rating = book(unlimited=unlimited, meter=meter)
    resolved = resolve(batch, rating, NOW)
    keys = sorted(resolved.deltas)
    counters = {CounterKey(*keys[i]): q for i, q in stored.items() if i < len(keys)}
    result = rate(batch, counters, rating, NOW)
    moves = settle(resolved, {(k.account_id, k.service_id, k.klass, k.range_id, k.period_start): q
                              for k, q in counters.items()})
    assert [(CounterKey(*k), after) for k, _, after, _, _ in moves] == list(result.counters.items())
    assert [(m[0][0], m[3], m[4], CounterKey(*m[0]), m[1], m[2]) for m in moves if m[3]] == \
        [(e.account_id, e.amount, e.kind, e.key, e.counter_before, e.counter_after) for e in result.entries]
    assert resolved.rejected == result.rejected


@given(meters, st.integers(0, 10**13), st.integers(0, 10**13))
def test_meter_is_monotone_and_returns_int(meter: Meter, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert type(meter.charged(low)) is int
    assert 0 <= meter.charged(low) <= meter.charged(high)


@settings(deadline=None, max_examples=50)
@given(st.integers(0, 60 * 86400), st.lists(st.integers(0, 20 * HOUR), min_size=1, max_size=8))
def test_session_charge_is_split_invariant_across_ranges_dst_and_periods(
    offset: int, parts: list[int]
) -> None:
    rating = book()
    start = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(seconds=offset)
    now = start + timedelta(days=30)
    counters: dict[CounterKey, int] = {}
    charged, cursor = 0, start
    for part in parts:
        result: RatingResult = rate([SessionUsage(7, cursor, part)], counters, rating, now)
        charged += result.total
        counters.update(result.counters)
        cursor += timedelta(seconds=part)
    whole = rate([SessionUsage(7, start, sum(parts))], {}, rating, now)
    assert whole.counters == {k: v for k, v in counters.items() if v}
    assert charged == whole.total
    assert sum(whole.counters.values()) == sum(parts)


def test_preview_adds_usage_so_far_and_periodic_fees() -> None:
    periodic = {30: PeriodicService(30, parse_money("300.00"), MONTHLY, ChargeMode.START),
                31: PeriodicService(31, parse_money("600.00"), MONTHLY, ChargeMode.START)}
    change = datetime(2024, 4, 20, 22, tzinfo=UTC)  # Apr 21 00:00 Berlin: 20 days old, 10 new
    links = [ServiceLink(7, 30, datetime(2024, 1, 1, tzinfo=UTC), change),
             ServiceLink(7, 31, change),
             ServiceLink(8, 30, datetime(2024, 1, 1, tzinfo=UTC))]
    counters = {key(): 30 * GB, key(LOCAL): 200 * MB, key(account=8): 99 * GB,
                CounterKey(7, 10, INTERNET, ANY_RANGE, APRIL - timedelta(days=31)): 99 * GB}
    shown = preview(7, book(), counters, periodic, links, datetime(2024, 4, 10, tzinfo=UTC))
    assert shown.period.start == APRIL
    amounts = {(line.kind, line.service_id, line.klass): line.amount for line in shown.lines}
    assert amounts == {
        ("traffic", 10, INTERNET): parse_money("8.00"),
        ("traffic", 10, LOCAL): parse_money("2.00"),
        ("periodic", 30, None): parse_money("200.00"),
        ("periodic", 31, None): parse_money("200.00"),
    }
    assert shown.total == parse_money("410.00") and type(shown.total) is int
    flat = preview(7, book(unlimited=True), counters, {}, [], datetime(2024, 4, 10, tzinfo=UTC))
    assert flat.total == 0 and {line.quantity for line in flat.lines} == {30 * GB, 200 * MB}
