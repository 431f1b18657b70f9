"""Periods, exact proration and idempotent periodic charges."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billcore.common.errors import PeriodError
from billcore.common.money import MAX_AMOUNT, parse_money
from billcore.billing.periods import (
    ChargeMode,
    Period,
    PeriodicCharge,
    PeriodicKey,
    PeriodicService,
    PeriodKind,
    PeriodSpec,
    ServiceLink,
    cumulative_fee,
    due_charges,
    next_boundary,
    period_containing,
    period_fee,
    prorate,
)

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def local(year: int, month: int, day: int, hour: int = 0) -> datetime:
    """A Berlin wall-clock time, as the UTC instant it names."""
    return datetime(year, month, day, hour, tzinfo=BERLIN).astimezone(UTC)


def starts(spec: PeriodSpec, first: datetime, count: int) -> list[date]:
    out, period = [], period_containing(spec, first, BERLIN)
    for _ in range(count):
        out.append(period.start.astimezone(BERLIN).date())
        period = period_containing(spec, period.end, BERLIN)
    return out


def test_monthly_from_january_31_clamps_and_never_drifts() -> None:
    spec = PeriodSpec(PeriodKind.MONTHLY, date(2023, 1, 31))
    assert starts(spec, local(2023, 1, 31), 6) == [
        date(2023, 1, 31), date(2023, 2, 28), date(2023, 3, 31),
        date(2023, 4, 30), date(2023, 5, 31), date(2023, 6, 30),
    ]
    assert starts(spec, local(2024, 2, 1), 2) == [date(2024, 1, 31), date(2024, 2, 29)]
    # an instant before the anchor lies in a period with a negative index
    before = period_containing(spec, local(2022, 12, 1), BERLIN)
    assert before.index == -2 and before.start == local(2022, 11, 30)


def test_yearly_on_february_29_and_weekly_daily_custom() -> None:
    yearly = PeriodSpec(PeriodKind.YEARLY, date(2024, 2, 29))
    assert starts(yearly, local(2024, 3, 1), 3) == [date(2024, 2, 29), date(2025, 2, 28), date(2026, 2, 28)]
    weekly = PeriodSpec(PeriodKind.WEEKLY, date(2024, 1, 1))
    assert starts(weekly, local(2024, 1, 10), 2) == [date(2024, 1, 8), date(2024, 1, 15)]
    custom = PeriodSpec(PeriodKind.CUSTOM, date(2024, 1, 1), days=10)
    assert starts(custom, local(2024, 1, 25), 2) == [date(2024, 1, 21), date(2024, 1, 31)]
    with pytest.raises(PeriodError):
        PeriodSpec(PeriodKind.CUSTOM, date(2024, 1, 1))
    with pytest.raises(PeriodError):
        PeriodSpec(PeriodKind.MONTHLY, date(2024, 1, 1), days=3)


def test_boundary_instant_belongs_to_the_new_period_and_dst_days_have_true_length() -> None:
    daily = PeriodSpec(PeriodKind.DAILY, date(2024, 1, 1))
    midnight = local(2024, 3, 31)
    assert period_containing(daily, midnight, BERLIN).start == midnight
    assert period_containing(daily, midnight - timedelta(microseconds=1), BERLIN).end == midnight
    assert next_boundary(daily, midnight, BERLIN) == local(2024, 4, 1)
    assert period_containing(daily, midnight, BERLIN).seconds == 23 * 3600
    assert period_containing(daily, local(2024, 10, 27, 12), BERLIN).seconds == 25 * 3600
    with pytest.raises(PeriodError):
        period_containing(daily, datetime(2024, 1, 1), BERLIN)


specs = st.one_of(
    st.builds(PeriodSpec, st.sampled_from([PeriodKind.DAILY, PeriodKind.WEEKLY,
                                           PeriodKind.MONTHLY, PeriodKind.YEARLY]),
              st.dates(date(2000, 1, 1), date(2030, 12, 31))),
    st.builds(PeriodSpec, st.just(PeriodKind.CUSTOM), st.dates(date(2000, 1, 1), date(2030, 12, 31)),
              st.integers(1, 400)),
)
instants = st.datetimes(datetime(2001, 1, 1), datetime(2035, 1, 1), timezones=st.just(UTC))


@settings(deadline=None)
@given(specs, instants, st.sampled_from(["Europe/Berlin", "Europe/Moscow", "America/Sao_Paulo"]))
def test_period_containing_holds_the_instant_and_tiles_time(
    spec: PeriodSpec, instant: datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    period = period_containing(spec, instant, tz)
    assert period.start <= instant < period.end
    assert type(period.seconds) is int and period.seconds > 0
    assert period_containing(spec, period.end, tz).start == period.end
    assert period_containing(spec, period.end, tz).index == period.index + 1
    assert period.start == period_containing(spec, period.start, tz).start


MARCH = Period(local(2024, 3, 1), local(2024, 4, 1), 0)  # 31 days minus the DST hour


def test_prorate_zero_full_and_pieces() -> None:
    fee = parse_money("10.00")
    assert prorate(fee, MARCH, []) == 0
    assert prorate(fee, MARCH, [(local(2024, 3, 5), local(2024, 3, 5))]) == 0
    assert prorate(fee, MARCH, [(MARCH.start, MARCH.end)]) == fee
    assert prorate(fee, MARCH, [(local(2024, 1, 1), local(2024, 6, 1))]) == fee  # clipped
    # overlapping intervals are merged, not double charged
    half = [(MARCH.start, local(2024, 3, 20)), (local(2024, 3, 10), local(2024, 3, 20))]
    assert prorate(fee, MARCH, half) == prorate(fee, MARCH, [(MARCH.start, local(2024, 3, 20))])
    with pytest.raises(PeriodError):
        prorate(fee, MARCH, [(local(2024, 3, 5), local(2024, 3, 4))])


@given(
    st.integers(-MAX_AMOUNT, MAX_AMOUNT),
    st.lists(st.integers(0, MARCH.seconds), max_size=30),
)
def test_pieces_of_a_full_period_sum_exactly_to_the_fee(fee: int, cuts: list[int]) -> None:
    points = [MARCH.start] + sorted(MARCH.start + timedelta(seconds=c) for c in cuts) + [MARCH.end]
    pieces = [prorate(fee, MARCH, [(a, b)]) for a, b in zip(points, points[1:])]
    assert all(type(p) is int for p in pieces)
    assert sum(pieces) == fee
    if fee >= 0:
        assert all(0 <= p <= fee for p in pieces)
    # cumulative rule: a piece is the difference of floored cumulative values
    for (a, b), piece in zip(zip(points, points[1:]), pieces):
        assert piece == cumulative_fee(fee, MARCH, b) - cumulative_fee(fee, MARCH, a)


@given(st.integers(1, MAX_AMOUNT), st.integers(1, MAX_AMOUNT), st.integers(0, MARCH.seconds))
def test_tariff_change_mid_period_old_plus_new_without_drift(old: int, new: int, cut: int) -> None:
    change = MARCH.start + timedelta(seconds=cut)
    old_part = prorate(old, MARCH, [(MARCH.start, change)])
    new_part = prorate(new, MARCH, [(change, MARCH.end)])
    if old == new:
        assert old_part + new_part == old
    exact_old = old * cut // MARCH.seconds
    assert old_part == exact_old
    assert new_part == new - new * cut // MARCH.seconds


MONTHLY = PeriodSpec(PeriodKind.MONTHLY, date(2024, 1, 1))
FEE = parse_money("300.00")


def service(mode: ChargeMode, service_id: int = 1, fee: int = FEE) -> dict[int, PeriodicService]:
    return {service_id: PeriodicService(service_id, fee, MONTHLY, mode)}


def run_until(services: dict[int, PeriodicService], links: list[ServiceLink],
              times: list[datetime]) -> tuple[dict[PeriodicKey, int], list[PeriodicCharge]]:
    """Drive the scheduler over ``times``, booking what it asks for, like the core would."""
    booked: dict[PeriodicKey, int] = {}
    history: list[PeriodicCharge] = []
    since = times[0]
    for now in times:
        for charge in due_charges(services, links, booked, now, since=since, tz=BERLIN):
            assert booked.get(charge.key, 0) == charge.previous
            assert charge.amount == charge.cumulative - charge.previous
            assert type(charge.amount) is int
            booked[charge.key] = charge.cumulative
            history.append(charge)
        # idempotent: asking again at the same instant asks for nothing more
        assert due_charges(services, links, booked, now, since=since, tz=BERLIN) == []
        since = now
    return booked, history


def test_start_mode_charges_prorated_fee_when_the_link_begins() -> None:
    # April 2024 in Berlin: 30 days, no DST change. Link from Apr 16 00:00: 15/30.
    links = [ServiceLink(7, 1, local(2024, 4, 16))]
    booked, history = run_until(service(ChargeMode.START), links,
                                [local(2024, 4, 15), local(2024, 4, 16), local(2024, 4, 20)])
    assert [c.amount for c in history] == [FEE // 2]
    assert history[0].key == PeriodicKey(7, 1, local(2024, 4, 1))
    assert booked == {PeriodicKey(7, 1, local(2024, 4, 1)): FEE // 2}


def test_start_mode_refunds_when_a_link_ends_mid_period() -> None:
    services = service(ChargeMode.START)
    links = [ServiceLink(7, 1, local(2024, 3, 20))]
    booked, _ = run_until(services, links, [local(2024, 4, 1, 1)])
    key = PeriodicKey(7, 1, local(2024, 4, 1))
    assert booked[key] == FEE
    ended = [ServiceLink(7, 1, local(2024, 3, 20), local(2024, 4, 11))]
    charges = due_charges(services, ended, booked, local(2024, 4, 11, 1), since=local(2024, 4, 1, 1), tz=BERLIN)
    assert [(c.key, c.amount) for c in charges] == [(key, -(FEE * 20 // 30))]


def test_tariff_change_mid_period_charges_both_tariffs_pro_rata() -> None:
    services = {1: PeriodicService(1, FEE, MONTHLY, ChargeMode.END),
                2: PeriodicService(2, parse_money("600.00"), MONTHLY, ChargeMode.END)}
    change = local(2024, 4, 11)  # 10 of April's 30 days on the old tariff
    links = [ServiceLink(7, 1, local(2024, 1, 1), change), ServiceLink(7, 2, change)]
    booked, history = run_until(services, links, [local(2024, 4, 5), local(2024, 4, 30), local(2024, 5, 1)])
    april = local(2024, 4, 1)
    assert booked == {PeriodicKey(7, 1, april): FEE // 3,
                      PeriodicKey(7, 2, april): parse_money("400.00")}
    assert all(c.key.period_start == april for c in history)  # nothing before the period ends
    april_period = Period(april, local(2024, 5, 1), 3)
    assert period_fee(services[2], april_period, links) == parse_money("400.00")
    assert period_fee(services[1], april_period, links) == FEE // 3
    with pytest.raises(PeriodError):
        period_fee(services[2], april_period, links + [ServiceLink(8, 2, april)])


def test_daily_spread_sums_exactly_to_the_fee_over_a_dst_month() -> None:
    fee = parse_money("100.00")  # March 2024 has a 23-hour day; shares are by seconds
    services = service(ChargeMode.DAILY, fee=fee)
    links = [ServiceLink(7, 1, local(2024, 2, 1))]
    days = [local(2024, 3, 1) + timedelta(days=d, hours=1) for d in range(32)]
    booked, history = run_until(services, links, days)
    march = [c for c in history if c.key.period_start == local(2024, 3, 1)]
    assert len(march) == 31 and all(c.amount > 0 for c in march)
    assert sum(c.amount for c in march) == fee == booked[PeriodicKey(7, 1, local(2024, 3, 1))]
    short_day = march[30].amount  # Mar 31, 23 hours
    assert short_day < march[0].amount


def test_due_charges_refuses_unknown_service_and_bad_since() -> None:
    links = [ServiceLink(7, 99, local(2024, 1, 1))]
    with pytest.raises(PeriodError):
        due_charges(service(ChargeMode.END), links, {}, local(2024, 2, 1), since=local(2024, 1, 1), tz=BERLIN)
    with pytest.raises(PeriodError):
        due_charges(service(ChargeMode.END), [], {}, local(2024, 1, 1), since=local(2024, 2, 1), tz=BERLIN)
    with pytest.raises(PeriodError):
        ServiceLink(7, 1, local(2024, 2, 1), local(2024, 1, 1))
