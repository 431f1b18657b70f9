"""The link's reconnect decisions, driven by a clock we pass in: no socket, no sleep."""

from __future__ import annotations

import pytest

from urfa import errors
from urfa.reconnect import (
    CONNECTION_FAILED, DB_UNAVAILABLE, RETRY, Attempt, Backoff, GiveUp, LinkPlan, Verdict, verdict,
)


def test_the_retry_table_separates_what_a_retry_can_fix() -> None:
    for code in (CONNECTION_FAILED, errors.TIMEOUT, errors.SHUTDOWN, errors.EXPIRED, errors.LOGGED_OUT,
                 errors.RESUME_FAILED):
        assert verdict(code) is Verdict.RECONNECT, code
    for code in (errors.BUSY, errors.RATE_LIMITED, DB_UNAVAILABLE):
        assert verdict(code) is Verdict.LATER, code
    for code in (errors.AUTH_FAILED, errors.BAD_ARGS, errors.FORBIDDEN, errors.NOT_IN_TABLE, errors.DELETED,
                 errors.VERSION, errors.INTERNAL, errors.CANCELLED, errors.NO_SESSION):
        assert verdict(code) is Verdict.NEVER, code
    # an application's own code is not retried unless the table names it
    assert verdict("payments.duplicate") is Verdict.NEVER
    # every protocol code has a row: a code added later must be decided, not defaulted
    assert set(errors.ERROR_CODES) <= set(RETRY)


def test_backoff_doubles_to_its_cap_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_delay() == 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_every_address_is_tried_before_a_pause_and_the_pauses_grow() -> None:
    plan = LinkPlan(3, can_resume=False, first_delay=1.0, max_delay=4.0)
    assert plan.start(now=100.0) == Attempt(0, 100.0, False)
    assert plan.failed(100.5, CONNECTION_FAILED) == Attempt(1, 100.5, False)   # the standby, at once
    assert plan.failed(100.6, CONNECTION_FAILED) == Attempt(2, 100.6, False)
    assert plan.failed(100.7, CONNECTION_FAILED) == Attempt(0, 101.7, False)   # a round over: pause 1 s
    for _ in range(2):
        plan.failed(101.8, CONNECTION_FAILED)
    assert plan.failed(101.9, CONNECTION_FAILED) == Attempt(0, 103.9, False)   # then 2 s
    for _ in range(2):
        plan.failed(104.0, CONNECTION_FAILED)
    assert plan.failed(104.1, CONNECTION_FAILED) == Attempt(0, 108.1, False)   # then 4 s, the cap
    for _ in range(2):
        plan.failed(108.2, CONNECTION_FAILED)
    assert plan.failed(108.3, CONNECTION_FAILED) == Attempt(0, 112.3, False)


def test_the_address_that_worked_is_tried_first_after_a_loss() -> None:
    plan = LinkPlan(2, can_resume=True)
    plan.start(0.0)
    assert plan.failed(1.0, CONNECTION_FAILED) == Attempt(1, 1.0, False)
    plan.connected(1.1)
    # a blink: back to the standby that served us, resuming the session it holds
    assert plan.lost(50.0) == Attempt(1, 50.0, True)
    # it is gone too: the first address, where our session does not live (so a login)
    assert plan.failed(50.1, CONNECTION_FAILED) == Attempt(0, 50.1, False)


def test_a_core_that_lost_the_session_gets_a_fresh_login_at_once() -> None:
    plan = LinkPlan(1, can_resume=True, first_delay=0.5)
    plan.start(0.0)
    plan.connected(0.0)
    assert plan.lost(10.0) == Attempt(0, 10.0, True)
    assert plan.failed(10.1, CONNECTION_FAILED) == Attempt(0, 10.6, True)   # down: pause, resume next time
    assert plan.failed(10.7, errors.RESUME_FAILED) == Attempt(0, 10.7, False)
    # and a later pause does not bring the dead session back
    assert plan.failed(10.8, CONNECTION_FAILED) == Attempt(0, 11.8, False)


def test_only_system_sessions_resume() -> None:
    plan = LinkPlan(1, can_resume=False)
    plan.start(0.0)
    plan.connected(0.0)
    assert plan.lost(1.0) == Attempt(0, 1.0, False)


def test_a_refused_login_ends_a_tool_and_slows_a_service() -> None:
    tool = LinkPlan(2, can_resume=False, persistent=False)
    tool.start(0.0)
    refused = tool.failed(0.1, errors.AUTH_FAILED)
    assert isinstance(refused, GiveUp) and refused.code == errors.AUTH_FAILED
    service = LinkPlan(2, can_resume=False, first_delay=0.1, max_delay=30.0)
    service.start(0.0)
    # the same core again, after the longest pause (the operator may be fixing the password file)
    assert service.failed(0.1, errors.AUTH_FAILED) == Attempt(0, 30.1, False)


def test_rounds_bound_the_attempts() -> None:
    plan = LinkPlan(2, can_resume=False, rounds=2, first_delay=1.0)
    plan.start(0.0)
    assert plan.failed(0.0, CONNECTION_FAILED) == Attempt(1, 0.0, False)
    assert plan.failed(0.0, CONNECTION_FAILED) == Attempt(0, 1.0, False)
    assert plan.failed(1.0, CONNECTION_FAILED) == Attempt(1, 1.0, False)
    ended = plan.failed(1.0, CONNECTION_FAILED)
    assert isinstance(ended, GiveUp) and ended.code == CONNECTION_FAILED
    assert plan.attempts == 4


def test_a_rate_limited_login_waits_like_a_down_core() -> None:
    plan = LinkPlan(1, can_resume=False, first_delay=2.0)
    plan.start(0.0)
    assert plan.failed(0.0, errors.RATE_LIMITED) == Attempt(0, 2.0, False)


def test_a_kick_brings_the_waiting_attempt_forward_never_back() -> None:
    plan = LinkPlan(1, can_resume=True, first_delay=5.0, max_delay=5.0)
    plan.start(0.0)
    waiting = plan.failed(0.0, CONNECTION_FAILED)
    assert isinstance(waiting, Attempt) and waiting.at == 5.0
    assert plan.kicked(1.0, waiting) == Attempt(0, 1.0, False)
    assert plan.kicked(9.0, waiting) == waiting


def test_a_plan_needs_an_address() -> None:
    with pytest.raises(ValueError):
        LinkPlan(0, can_resume=False)
