"""MS-CHAPv2 crypto against the RFCs' own vectors (RFC 2759 s.9.2, RFC 3079 s.3.5)."""

from __future__ import annotations

import pytest

from billcore.radius import mschap

USER = b"User"
PASSWORD = b"clientPass"
AUTH_CHALLENGE = bytes.fromhex("5B5D7C7D7B3F2F3E3C2C602132262628")
PEER_CHALLENGE = bytes.fromhex("21402324255E262A28295F2B3A337C7E")
CHALLENGE = bytes.fromhex("D02E4386BCE91226")
PASSWORD_HASH = bytes.fromhex("44EBBA8D5312B8D611474411F56989AE")
NT_RESPONSE = bytes.fromhex("82309ECD8D708B5EA08FAA3981CD83544233114A3D85D6DF")
PASSWORD_HASH_HASH = bytes.fromhex("41C00C584BD2D91C4017A2A12FA59F3F")
AUTHENTICATOR_RESPONSE = b"S=407A5589115FD0D6209F510FE9C04566932CDA56"
MASTER_KEY = bytes.fromhex("FDECE3717A8C838CB388E527AE3CDD31")
SEND_START_KEY_128 = bytes.fromhex("8B7CDC149B993A1BA118CB153F56DCCB")


def test_rfc2759_vectors() -> None:
    assert mschap.challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER) == CHALLENGE
    assert mschap.nt_password_hash(PASSWORD) == PASSWORD_HASH
    assert mschap.challenge_response(CHALLENGE, PASSWORD_HASH) == NT_RESPONSE
    assert mschap.generate_nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, PASSWORD) == NT_RESPONSE
    assert mschap.hash_nt_password_hash(PASSWORD_HASH) == PASSWORD_HASH_HASH
    assert mschap.generate_authenticator_response(PASSWORD, NT_RESPONSE, PEER_CHALLENGE, AUTH_CHALLENGE,
                                                  USER) == AUTHENTICATOR_RESPONSE


def test_rfc3079_master_and_start_keys() -> None:
    master = mschap.master_key(PASSWORD_HASH_HASH, NT_RESPONSE)
    assert master == MASTER_KEY
    # RFC 3079 s.3.5.3 lists the server's send key (the client's receive key)
    assert mschap.asymmetric_start_key(master, 16, is_send=True, is_server=True) == SEND_START_KEY_128
    assert mschap.asymmetric_start_key(master, 16, is_send=False, is_server=False) == SEND_START_KEY_128
    send, recv = mschap.server_mppe_keys(PASSWORD, NT_RESPONSE)
    assert send == SEND_START_KEY_128
    # the server receives what the client sends
    assert recv == mschap.asymmetric_start_key(master, 16, is_send=True, is_server=False) != send
    assert len(recv) == 16
    # the 40/56-bit keys are the first 8 octets of the same derivation
    assert mschap.asymmetric_start_key(master, 8, True, True) == SEND_START_KEY_128[:8]


def test_check_nt_response_and_parse() -> None:
    wire = bytes([7, 0]) + PEER_CHALLENGE + b"\x00" * 8 + NT_RESPONSE
    response = mschap.parse_response(wire)
    assert (response.ident, response.flags, response.peer_challenge, response.nt_response) == (
        7, 0, PEER_CHALLENGE, NT_RESPONSE)
    assert mschap.check_nt_response(AUTH_CHALLENGE, response, USER, PASSWORD)
    assert not mschap.check_nt_response(AUTH_CHALLENGE, response, USER, b"clientPasS")
    assert not mschap.check_nt_response(bytes(16), response, USER, PASSWORD)
    # a Windows domain does not enter the challenge hash (RFC 2759 s.8.2)
    assert mschap.check_nt_response(AUTH_CHALLENGE, response, b"CORP\\User", PASSWORD)
    with pytest.raises(ValueError):
        mschap.parse_response(wire[:49])

