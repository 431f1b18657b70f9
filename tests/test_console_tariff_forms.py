"""What the console's tariff forms read and show (``console.pages.tariff_forms``),
without a browser or a core: a price typed as money per GB reaches the core as
the micro-units per byte count docs/tariffs.md writes by hand, exactly, and
reads back as it was typed."""

from __future__ import annotations

import pytest

from console.pages.tariff_forms import (
    FormInvalid, field_of, parse_ports, parse_price, parse_quantity, show_price, show_quantity, window_text,
)

GB = 10**9


def test_volumes_typed_in_a_unit_are_exact_bytes_or_refused() -> None:
    assert parse_quantity("10", GB, "prepaid") == 10_000_000_000          # the cookbook's 10 GB prepaid
    assert parse_quantity("1.5", GB, "prepaid") == 1_500_000_000
    assert parse_quantity("0.000000001", GB, "prepaid") == 1
    assert parse_quantity("2", 3600, "prepaid") == 7200
    for bad in ("", "-1", "1e9", "1,5", "0.5", " ten "):
        unit = 1 if bad == "0.5" else GB                                   # half a byte is not a byte
        with pytest.raises(FormInvalid) as refused:
            parse_quantity(bad, unit, "prepaid")
        assert refused.value.field == "prepaid" and refused.value.error.key == "form.bad_quantity"
    with pytest.raises(FormInvalid):
        parse_quantity("9" * 19, GB, "prepaid")                            # past a BIGINT of bytes


def test_prices_are_the_cores_money_and_its_words_when_bad() -> None:
    assert parse_price("0.50", "tiers") == 500_000
    assert parse_price("-0.50", "tiers") == -500_000     # sent: the core says what is wrong with it
    with pytest.raises(FormInvalid) as refused:
        parse_price("0,50", "tiers")
    assert refused.value.field == "tiers" and "not a money string" in refused.value.error.text


def test_what_was_typed_reads_back_the_same() -> None:
    assert show_price(500_000, GB, "traffic") == "0.50 / GB"
    assert show_price(100_000, 3600, "time") == "0.10 / hour"
    assert show_price(1, 1000, "traffic") == "0.000001 / 1000 B"       # a unit the form does not offer
    assert show_quantity(20 * GB, GB) == "20 GB"
    assert show_quantity(1_500_000_000, GB) == "1.5 GB"
    assert show_quantity(7, 1000) == "7"
    assert window_text({"weekdays": [0, 1, 2, 3, 4, 5, 6], "start_minute": 1380, "end_minute": 420}) \
        == "all 23:00-07:00"
    assert window_text({"weekdays": [0, 4], "start_minute": 480, "end_minute": 0}) == "mon,fri 08:00-00:00"


def test_ports_and_the_field_a_core_message_is_about() -> None:
    assert parse_ports("443", "remote_ports") == [443, 443]
    assert parse_ports(" 1024-65535 ", "remote_ports") == [1024, 65535]
    assert parse_ports("", "remote_ports") is None
    for bad in ("80-", "-", "http"):
        with pytest.raises(FormInvalid):
            parse_ports(bad, "local_ports")
    words = (("tier price", "tiers"), ("prepaid", "prepaid"), ("unit_size", "unit"))
    assert field_of("tier price must be an int in 0..999, got -500000", words, "name") == "tiers"
    assert field_of("prepaid must be an int in 0..9", words, "name") == "prepaid"
    assert field_of("something else", words, "name") == "name"
