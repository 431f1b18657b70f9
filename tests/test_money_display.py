"""The one money formatter (``billcore.common.money.format_money``) as people see it: billctl,
the tray, the office and error messages all show amounts through it."""

from __future__ import annotations

import pytest

from billcore.common.errors import MoneyFormatError, MoneyRangeError
from billcore.common.money import MAX_AMOUNT, MICRO, check_amount, format_money, parse_money
from webedge import render


def test_two_decimals_unless_the_amount_has_more() -> None:
    assert format_money(12_500_000) == "12.50"
    assert format_money(12_345_678) == "12.345678"
    assert format_money(-1) == "-0.000001"
    assert format_money(0) == "0.00"


def test_any_int_is_formatted_however_large() -> None:
    # a sum of balances (an import total, a report) may pass MAX_AMOUNT and even CPython's
    # 4 300-digit int-to-str limit; a display never fails on size
    assert format_money(10 * MAX_AMOUNT) == "9999999999999.99999"
    huge = 10**6000 + 5
    text = format_money(huge)
    assert text == "1" + "0" * 5994 + ".000005"      # 10⁶⁰⁰⁰ micro-units are 10⁵⁹⁹⁴ units
    assert format_money(-huge, group=",").startswith("-1,000,000,")
    assert format_money(MAX_AMOUNT) == "999999999999.999999" and parse_money(format_money(MAX_AMOUNT)) == MAX_AMOUNT


def test_only_ints_are_money() -> None:
    for bad in (1.5, True, "12.50", None):
        with pytest.raises(MoneyFormatError):
            format_money(bad)  # type: ignore[arg-type]


def test_grouping_is_for_pages_and_the_office_uses_it() -> None:
    assert format_money(1_234_567 * MICRO, group=" ") == "1 234 567.00"
    assert format_money(999 * MICRO, group=" ") == "999.00"
    assert render.money(1_234_567_890_123) == "1\u202f234\u202f567.890123"


def test_errors_show_amounts_not_micro_units() -> None:
    with pytest.raises(MoneyRangeError) as err:
        check_amount(MAX_AMOUNT + 1)
    assert str(err.value) == "amount 1000000000000.00 is outside ±999999999999.999999"
