"""The RADIUS records against the maps the radius process sends and reads:
what the URFA boundary turns into records and back must stay the wire it was."""

from __future__ import annotations

import dataclasses

import pytest

from billcore.billing.ledger_errors import InvalidValue
from billcore.radius.records import (
    AccessRequest,
    AccountingResult,
    AcctStatus,
    AuthMethod,
    Chap,
    Decision,
    DisconnectMode,
    Malformed,
    Nas,
    Refusal,
    read_access_request,
    read_accounting_record,
)


def test_decisions_answer_the_maps_the_radius_process_reads() -> None:
    accept = Decision(True, (("Framed-IP-Address", "10.0.0.5"), ("Session-Timeout", 60)), account_id=7)
    assert accept.wire() == {"accept": True, "account_id": 7,
                             "reply": [["Framed-IP-Address", "10.0.0.5"], ["Session-Timeout", 60]]}
    reject = Decision.reject(Refusal.BLOCKED).wire()
    assert reject == {"accept": False, "reason": "account blocked", "reply": [["Reply-Message", "account blocked"]]}
    assert type(reject["reason"]) is str and type(reject["reply"][0][1]) is str   # plain text, not the enum


def test_access_requests_read_from_the_map_or_refused_alone() -> None:
    challenge, response = b"c" * 16, b"r" * 16
    assert read_access_request({"login": "a", "method": "pap", "password": b"pw"}) == \
        AccessRequest("a", AuthMethod.PAP, password=b"pw")
    assert read_access_request({"login": "a", "method": "chap",
                                "chap": {"id": 3, "challenge": challenge, "response": response}}) == \
        AccessRequest("a", AuthMethod.CHAP, chap=Chap(3, challenge, response))
    assert read_access_request({"login": "a", "method": "none"}) == AccessRequest("a", AuthMethod.NONE)
    assert read_access_request({"method": "pap", "password": b"pw"}) == Malformed(Refusal.NO_LOGIN)
    assert read_access_request({"login": "a", "method": "pap", "password": "pw"}) == \
        Malformed(Refusal.MALFORMED_PASSWORD)


def test_accounting_records_keep_a_status_billcore_does_not_act_on() -> None:
    assert read_accounting_record({"nas": "10.0.0.1", "status": "interim", "session_id": "S1"}).status \
        is AcctStatus.INTERIM
    unknown = read_accounting_record({"nas": "10.0.0.1", "status": "15"})
    assert unknown.status == "15" and not isinstance(unknown.status, AcctStatus)
    with pytest.raises(InvalidValue):
        read_accounting_record({"nas": "10.0.0.1", "status": "stop"})            # no session id
    with pytest.raises(InvalidValue):
        read_accounting_record({"nas": "nas-1", "status": "on"})                 # not an address


def test_accounting_results_answer_one_key_and_keep_hooks_and_blocks_in_the_core() -> None:
    assert AccountingResult(session=4).wire() == {"session": 4}
    assert AccountingResult(session=4, ended=True).wire() == {"session": 4, "ended": True}
    assert AccountingResult(closed=2).wire() == {"closed": 2}
    assert AccountingResult(ignored="unknown login").wire() == {"ignored": "unknown login"}


def test_a_nas_without_its_secret_has_no_secret_key_and_plain_text_modes() -> None:
    public = Nas(1, "mt1", "10.0.0.1", True, 3799, DisconnectMode.COA, [["Mikrotik-Group", "blocked"]])
    assert public.wire() == {"id": 1, "name": "mt1", "address": "10.0.0.1", "require_message_authenticator": True,
                             "coa_port": 3799, "disconnect_mode": "coa",
                             "blocked_profile": [["Mikrotik-Group", "blocked"]]}
    assert type(public.wire()["disconnect_mode"]) is str
    assert dataclasses.replace(public, secret=b"s").wire()["secret"] == b"s"
