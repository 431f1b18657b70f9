"""Money strings, the one rounding rule and prices: exact, strict, never a float."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billcore.common.errors import BillingError, MoneyFormatError, MoneyRangeError, TariffError
from billcore.common.money import (
    GB,
    HOUR,
    MAX_AMOUNT,
    MB,
    Price,
    check_amount,
    floor_div,
    format_money,
    parse_money,
)

amounts = st.integers(min_value=-MAX_AMOUNT, max_value=MAX_AMOUNT)


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("12.34", 12_340_000),
        ("0", 0),
        ("0.000001", 1),
        ("-5", -5_000_000),
        ("-0.5", -500_000),
        ("1.100000", 1_100_000),
        ("999999999999.999999", MAX_AMOUNT),
        ("-999999999999.999999", -MAX_AMOUNT),
    ],
)
def test_parse_money_examples(text: str, micro: int) -> None:
    assert parse_money(text) == micro
    assert type(parse_money(text)) is int


@pytest.mark.parametrize(
    "bad",
    [
        "1e3", " 1", "1 ", "+1", "1.", ".5", "1.0000001", "01", "1,000", "1_000",
        "\u0661\u0662",  # Arabic-Indic digits are str.isdigit() but not money
        "1000000000000", "12\n", "", "-", "NaN", "inf", "0x10",
    ],
)
def test_parse_money_rejects_loose_strings(bad: str) -> None:
    with pytest.raises(MoneyFormatError):
        parse_money(bad)


@pytest.mark.parametrize("not_a_string", [0.1, 12, True, None, b"1.00"])
def test_parse_money_rejects_non_strings_especially_floats(not_a_string: object) -> None:
    with pytest.raises(MoneyFormatError):
        parse_money(not_a_string)  # type: ignore[arg-type]


def test_format_money_examples() -> None:
    assert format_money(12_340_000) == "12.34"
    assert format_money(1) == "0.000001"
    assert format_money(-1_500_000) == "-1.50"
    assert format_money(7_000_000, min_decimals=0) == "7"
    assert format_money(MAX_AMOUNT) == "999999999999.999999"


def test_amount_range_is_enforced_and_is_a_billing_error() -> None:
    with pytest.raises(MoneyRangeError):
        check_amount(MAX_AMOUNT + 1)
    with pytest.raises(MoneyFormatError):
        check_amount(1.0)  # type: ignore[arg-type]
    with pytest.raises(BillingError):
        check_amount(True)


@given(amounts, st.integers(min_value=0, max_value=6))
def test_format_then_parse_round_trips(micro: int, decimals: int) -> None:
    text = format_money(micro, min_decimals=decimals)
    assert parse_money(text) == micro


@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**20))
def test_floor_div_is_exact_floor(numerator: int, denominator: int) -> None:
    result = floor_div(numerator, denominator)
    assert type(result) is int
    assert result <= Fraction(numerator, denominator) < result + 1


def test_floor_div_refuses_floats_and_bad_denominators() -> None:
    with pytest.raises(TypeError):
        floor_div(1.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        floor_div(1, 0)
    with pytest.raises(ValueError):
        floor_div(1, -3)


@given(
    st.integers(min_value=0, max_value=10**12),
    st.sampled_from([1, 1_000, MB, GB, 1 << 20, 1 << 30, HOUR]),
    st.integers(min_value=0, max_value=10**15),
)
def test_price_cost_is_floor_of_exact_ratio(micro: int, unit: int, quantity: int) -> None:
    exact = Fraction(quantity * micro, unit).__floor__()
    if exact > MAX_AMOUNT:  # absurd: refused instead of booked
        with pytest.raises(MoneyRangeError):
            Price(micro, unit).cost(quantity)
        return
    cost = Price(micro, unit).cost(quantity)
    assert type(cost) is int
    assert cost == exact


def test_price_examples_and_validation() -> None:
    per_gb = Price.parse("0.50", GB)
    assert per_gb == Price(500_000, GB)
    assert per_gb.cost(GB) == 500_000
    assert per_gb.cost(1) == 0  # 0.0005 micro-units floors to 0
    assert per_gb.cost(2_000) == 1
    for bad in [(-1, GB), (1, 0), (0.5, GB), (1, 1.0)]:
        with pytest.raises(TariffError):
            Price(*bad)  # type: ignore[arg-type]
    with pytest.raises(TariffError):
        per_gb.cost(-1)
