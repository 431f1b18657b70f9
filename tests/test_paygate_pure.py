"""The payment edge's pure parts: amounts, signatures, callback fields, account resolution, its config."""

from __future__ import annotations

import pytest

from billcore.common.config import ConfigError, config_from_dict
from paygate.app import Unresolved, resolve_account
from paygate.callback import BadField, parse_callback
from tests.gateway_sim import callback_body
from webedge.paysign import (
    AmountRefused, amount_to_micro, callback_signature, check_callback, micro_to_amount, order_ok, order_signature,
)

SECRET = b"0123456789abcdef-secret"


def test_amounts_are_exact_in_both_formats() -> None:
    assert amount_to_micro("100.50", 2) == 100_500_000
    assert amount_to_micro("100", 2) == 100_000_000
    assert amount_to_micro("0.01", 2) == 10_000
    assert amount_to_micro("10050", 2, "minor") == 100_500_000
    assert amount_to_micro("500", 0, "minor") == 500_000_000
    for bad in ("100.505", "-1.00", "+1", "1e2", " 1.00", "1,00", "0", "0.00", "", "01.00", "99999999.00"):
        with pytest.raises(AmountRefused):
            amount_to_micro(bad, 2)
    with pytest.raises(AmountRefused):
        amount_to_micro(100.5, 2)          # a float never becomes money
    assert micro_to_amount(100_500_000, 2) == "100.50"
    assert micro_to_amount(100_500_000, 2, "minor") == "10050"
    assert micro_to_amount(7_000_000, 0) == "7"
    with pytest.raises(AmountRefused):
        micro_to_amount(1, 2)              # a micro-unit the currency cannot carry


def test_signature_window_and_tampering() -> None:
    body = b'{"a": 1}'
    sig = callback_signature(SECRET, "1000", body)
    assert check_callback(SECRET, "1000", sig, body, now=1000, window=300) is None
    assert check_callback(SECRET, "1000", sig, body, now=1300, window=300) is None
    assert check_callback(SECRET, "1000", sig, body, now=1301, window=300) == "stale_timestamp"
    assert check_callback(SECRET, "1000", sig, body, now=699, window=300) == "stale_timestamp"
    assert check_callback(SECRET, "1000", sig, body + b" ", now=1000, window=300) == "bad_signature"
    assert check_callback(SECRET, "1001", sig, body, now=1000, window=300) == "bad_signature"
    assert check_callback(b"another-secret-123", "1000", sig, body, now=1000, window=300) == "bad_signature"
    assert check_callback(SECRET, "1000", sig.upper(), body, now=1000, window=300) == "bad_signature"
    assert check_callback(SECRET, None, sig, body, now=1000, window=300) == "bad_signature"
    assert check_callback(SECRET, "-5", sig, body, now=1000, window=300) == "bad_signature"
    # a stale callback with a bad signature says only "bad signature"
    assert check_callback(b"another-secret-123", "1", sig, body, now=1000, window=300) == "bad_signature"


def test_order_signature_covers_every_field() -> None:
    order = {"order_id": "ab", "account": "7", "amount": "10.00", "currency": "RUB",
             "return_url": "http://x/pay/return?a=1", "ts": "1000"}
    sig = order_signature(SECRET, order)
    assert order_ok(SECRET, order, sig)
    for name in order:
        assert not order_ok(SECRET, {**order, name: order[name] + "0"}, sig), name
    assert not order_ok(SECRET, order, None)


def test_callback_fields() -> None:
    cb = parse_callback(callback_body("T-1", "C-1042", "10.50"), "major", "RUB", 2)
    assert (cb.txn_id, cb.account, cb.amount, cb.status) == ("T-1", "C-1042", 10_500_000, "paid")
    assert parse_callback(b'{"txn_id": "T", "account": 42, "amount": "1.00", "currency": "RUB", "status": "paid"}',
                          "major", "RUB", 2).account == "42"
    cases = {
        b"[]": "body", b"not json": "body", b'{"account": "1"}': "txn_id",
        callback_body("T 1", "1", "1.00"): "txn_id", callback_body("T", "", "1.00"): "account",
        callback_body("T", "1", "1.001"): "amount",
        b'{"txn_id": "T", "account": "1", "amount": 1.5, "currency": "RUB", "status": "paid"}': "amount",
        b'{"txn_id": "T", "account": "1", "amount": 1, "currency": "RUB", "status": "paid"}': "amount",
    }
    for body, field in cases.items():
        with pytest.raises(BadField) as caught:
            parse_callback(body, "major", "RUB", 2)
        assert caught.value.field == field, body
    with pytest.raises(BadField) as caught:
        parse_callback(callback_body("T", "1", "1.00", currency="USD"), "major", "RUB", 2)
    assert caught.value.error == "wrong_currency"


def test_account_resolution() -> None:
    assert resolve_account("C-1", {"contracts": [{"contract": "C-1", "account_id": 5}], "accounts": []}) == 5
    assert resolve_account("7", {"contracts": [], "accounts": [7]}) == 7
    assert resolve_account("7", {"contracts": [{"contract": "7", "account_id": 7}], "accounts": [7]}) == 7
    with pytest.raises(Unresolved) as caught:
        resolve_account("7", {"contracts": [{"contract": "7", "account_id": 9}], "accounts": [7]})
    assert (caught.value.status, caught.value.error) == (400, "ambiguous_account")
    with pytest.raises(Unresolved) as caught:
        resolve_account("8", {"contracts": [], "accounts": []})
    assert (caught.value.status, caught.value.error) == (404, "unknown_account")


def test_config_rules() -> None:
    gateway = {"name": "sim", "secret_file": "/s"}
    assert config_from_dict({"paygate": {"gateways": [gateway]}}).paygate.gateways[0].amount_format == "major"
    refused = [
        {"host": "0.0.0.0"},                                            # plain HTTP facing a network
        {"tls_cert": "/c"},                                             # a cert without its key
        {"window": 0},
        {"gateways": [gateway, gateway]},                               # a name twice
        {"gateways": [{"name": "a b", "secret_file": "/s"}]},
        {"gateways": [{"name": "sim"}]},                                # no secret file
        {"gateways": [{**gateway, "amount_format": "cents"}]},
        {"gateways": [{**gateway, "currency": "USD"}]},                 # not the installation's
        {"gateways": [{**gateway, "colour": "red"}]},                   # an unknown key
        {"office_gateway": "nope"},
    ]
    for section in refused:
        with pytest.raises(ConfigError):
            config_from_dict({"paygate": section})
    assert config_from_dict({"paygate": {"host": "0.0.0.0", "behind_proxy": True}}).paygate.behind_proxy
    # one currency per installation, in [billing]: the gateways and the notifications follow it
    for billing in ({"currency": "rub"}, {"currency": "RUBL"}, {"minor_units": 7}, {"minor_units": -1}):
        with pytest.raises(ConfigError):
            config_from_dict({"billing": billing})
    usd = config_from_dict({"billing": {"currency": "USD"}, "paygate": {"gateways": [{**gateway, "currency": "USD"}]}})
    assert usd.paygate.gateways[0].currency == usd.billing.currency == "USD"
