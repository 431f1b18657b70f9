"""billcore.common.totp against RFC 6238's own test vectors, and the verifier's window and replay rule."""

from __future__ import annotations

import pytest

from billcore.common.totp import b32_secret, match_step, otpauth_uri, parse_b32, totp

# RFC 6238 Appendix B: the SHA-1 rows (seed "12345678901234567890", 8 digits, X = 30 s, T0 = 0)
RFC_SECRET = b"12345678901234567890"
RFC_SHA1_ROWS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("t", "code"), RFC_SHA1_ROWS)
def test_rfc6238_appendix_b_sha1(t: int, code: str) -> None:
    assert totp(RFC_SECRET, t, digits=8) == code


def test_six_digit_vector() -> None:
    # The 6-digit code is the same truncated value mod 10^6 (RFC 4226 §5.3), so it is the RFC row's
    # last six digits; docs/protocol.md §6.5 uses the second one (with its leading zero).
    assert totp(RFC_SECRET, 59) == "287082"
    assert totp(RFC_SECRET, 1111111109) == "081804"
    assert b32_secret(RFC_SECRET) == "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"


def test_base32_round_trip_as_people_type_it() -> None:
    assert parse_b32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq") == RFC_SECRET
    assert parse_b32(b32_secret(b"\x00\xff" * 7)) == b"\x00\xff" * 7   # 14 bytes: the text needs padding back
    with pytest.raises(ValueError):
        parse_b32("not base32!")


def test_window_is_one_step_either_side() -> None:
    t = 1111111109
    step = t // 30
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t), t, last_step=0) == step
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t - 30), t, last_step=0) == step - 1
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t + 30), t, last_step=0) == step + 1
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t - 60), t, last_step=0) is None
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t + 60), t, last_step=0) is None


def test_a_code_is_accepted_once() -> None:
    t = 1111111109
    code = totp(RFC_SECRET, t)
    used = match_step(RFC_SECRET, code, t, last_step=0)
    assert used is not None
    assert match_step(RFC_SECRET, code, t, last_step=used) is None          # the replay
    assert match_step(RFC_SECRET, code, t + 20, last_step=used) is None     # still in the window: still refused
    assert match_step(RFC_SECRET, totp(RFC_SECRET, t + 30), t, last_step=used) == used + 1


def test_malformed_codes_never_match() -> None:
    t = 59
    assert match_step(RFC_SECRET, "287 082", t, last_step=0) == 1
    for bad in ("", "28708", "2870820", "abcdef", "２８７０８２"):
        assert match_step(RFC_SECRET, bad, t, last_step=0) is None


def test_otpauth_uri() -> None:
    assert otpauth_uri(RFC_SECRET, "anna") == (
        "otpauth://totp/billcore:anna?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=billcore")
