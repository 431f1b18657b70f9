"""The NetFlow shipper's plan (netflow.plan), driven by events and a clock: no sockets, no sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netflow.plan import CutBatch, Finish, Idle, PlanError, Replay, ShipPlan, Skip, Submit, Wait


def started(committed: int = -1, raw_mark: int | None = None, keeps_raw: bool = False, oldest: int = 0,
            now: float = 100.0, interval: float = 1.0) -> ShipPlan:
    plan = ShipPlan(interval, keeps_raw, behind_bytes=1000)
    plan.acknowledged(committed)
    plan.raw_flushed(raw_mark)
    plan.start(oldest, now)
    return plan


def test_replay_starts_at_the_lower_watermark_within_the_journal() -> None:
    plan = ShipPlan(1.0, keeps_raw=False)
    plan.acknowledged(500)
    assert plan.start(oldest=0, now=0.0) == Replay(500)
    plan = ShipPlan(1.0, keeps_raw=True)
    plan.acknowledged(500)
    plan.raw_flushed(300)
    assert plan.start(oldest=0, now=0.0) == Replay(300)  # the raw store lacks [300, 500)
    plan = ShipPlan(1.0, keeps_raw=True)
    plan.acknowledged(500)
    assert plan.start(oldest=0, now=0.0) == Replay(0)  # raw kept, nothing flushed yet: all of it
    plan = ShipPlan(1.0, keeps_raw=False)
    plan.acknowledged(500)
    assert plan.start(oldest=800, now=0.0) == Replay(800)  # a lifted run: nothing below 800 exists
    plan = ShipPlan(1.0, keeps_raw=False)
    assert plan.start(oldest=0, now=0.0) == Replay(0)  # never counted (-1)
    with pytest.raises(PlanError):
        plan.start(oldest=0, now=0.0)


def test_ships_every_interval_and_at_once_when_behind_or_stopping() -> None:
    plan = started(committed=0, now=100.0, interval=1.0)
    assert plan.next_action(100.0) == Idle(101.0)  # nothing journaled
    assert plan.next_action(100.0, stopping=True) == Finish()
    plan.journaled(200)
    assert plan.next_action(100.4) == Wait(101.0)
    assert plan.next_action(100.4, stopping=True) == CutBatch(0, 200)  # stopping ships what is there
    assert plan.cut(200) == Submit(0, 200)
    plan.acknowledged(200)
    plan.batch_done(100.5)
    plan.journaled(400)
    assert plan.next_action(101.0) == Wait(101.5)  # the interval counts from the last batch
    assert plan.next_action(101.5) == CutBatch(200, 400)
    assert plan.cut(300) == Submit(200, 300)  # the decoder may stop early (batch_packets, MAX_ROWS)
    plan.acknowledged(300)
    plan.batch_done(101.6)
    plan.journaled(1400)  # 1100 waiting > behind_bytes: no waiting for the interval
    assert plan.next_action(101.6) == CutBatch(300, 1400)


def test_replayed_batches_end_at_the_watermark_and_are_not_sent_again() -> None:
    plan = started(committed=500, raw_mark=100, keeps_raw=True, now=0.0)
    plan.journaled(900)
    action = plan.next_action(0.0)  # below the watermark: at once, whatever the interval
    assert action == CutBatch(100, 500)
    assert plan.cut(400) == Skip(100, 400)
    plan.batch_done(0.0)
    assert plan.next_action(0.0) == CutBatch(400, 500)
    assert plan.cut(500) == Skip(400, 500)
    plan.batch_done(0.0)
    assert plan.next_action(5.0) == CutBatch(500, 900)
    assert plan.cut(900) == Submit(500, 900)


def test_the_plan_refuses_a_batch_outside_what_it_asked_for() -> None:
    plan = started(committed=500, now=0.0)
    plan.journaled(900)
    with pytest.raises(PlanError):
        plan.cut(600)  # nothing was asked for
    assert plan.next_action(5.0) == CutBatch(500, 900)
    with pytest.raises(PlanError):
        plan.next_action(5.0)  # the open batch was not cut
    with pytest.raises(PlanError):
        plan.cut(901)
    with pytest.raises(PlanError):
        plan.cut(500)  # empty


def test_a_higher_watermark_from_the_core_limits_the_next_batch() -> None:
    plan = started(committed=0, now=0.0)
    plan.journaled(1000)
    assert plan.next_action(5.0) == CutBatch(0, 1000)
    assert plan.cut(200) == Submit(0, 200)
    plan.acknowledged(600)  # the core already counted more (an earlier run's submit, answered late)
    plan.batch_done(5.0)
    assert plan.next_action(5.0) == CutBatch(200, 600)


def test_trim_floor_and_lag() -> None:
    plan = started(committed=-1, now=0.0)
    assert plan.trim_below() is None
    plan.acknowledged(700)
    plan.journaled(1000)
    assert plan.trim_below() == 700 and plan.lag() == 300
    raw = started(committed=700, keeps_raw=True, now=0.0)
    assert raw.trim_below() is None  # the raw store flushed nothing yet: keep the journal
    raw.raw_flushed(650)
    assert raw.trim_below() == 650


# -- exactly once across restarts, against a model of the core --------------------------------------

class Core:
    """What netflow.submit does with a batch: counts its records and moves the watermark, unless its end
    is at or below the watermark (then it is a repeat and changes nothing)."""

    def __init__(self) -> None:
        self.watermark = -1
        self.counted: dict[int, int] = {}

    def submit(self, records: list[int], end: int) -> int:
        if end > self.watermark:
            for record in records:
                self.counted[record] = self.counted.get(record, 0) + 1
            self.watermark = end
        return self.watermark


steps = st.lists(st.tuples(st.sampled_from(["receive", "ship", "tick", "crash", "crash_unacked", "flush_raw"]),
                           st.integers(1, 5)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40), runs=st.lists(steps, min_size=1, max_size=5),
       keeps_raw=st.booleans())
def test_every_journaled_record_is_counted_exactly_once_across_restarts(
        sizes: list[int], runs: list[list[tuple[str, int]]], keeps_raw: bool) -> None:
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]  # record k spans [ends[k-1], ends[k])
    starts = [0, *ends[:-1]]
    core, raw_mark, received = Core(), None, 0
    now = 0.0

    def run(script: list[tuple[str, int]], final: bool) -> None:
        nonlocal raw_mark, received, now
        plan = ShipPlan(1.0, keeps_raw, behind_bytes=60)
        plan.acknowledged(core.watermark)
        plan.raw_flushed(raw_mark)
        position = plan.start(oldest=0, now=now).offset
        assert position in (0, *ends)
        plan.journaled(ends[received - 1] if received else 0)
        script = script + [("drain", 0)] if final else script
        dies_unanswered = False  # the next submit commits, and the worker dies before the answer
        for what, n in script:
            if what == "receive":
                received = min(len(ends), received + n)
                plan.journaled(ends[received - 1])
            elif what == "tick":
                now += n * 0.3
            elif what == "flush_raw" and keeps_raw:
                raw_mark = max(raw_mark or 0, min(position, max(core.watermark, 0)))  # raw trails the core
            elif what == "crash":
                return
            elif what == "crash_unacked":
                dies_unanswered = True
            elif what in ("ship", "drain"):
                for _ in range(1000 if what == "drain" else n):
                    action = plan.next_action(now, stopping=what == "drain")
                    if isinstance(action, (Idle, Finish)):
                        break
                    if isinstance(action, Wait):
                        now = action.until
                        continue
                    assert isinstance(action, CutBatch)
                    # the decoder stops at a record end, at or below the limit, after one record at least
                    fits = [e for e in ends if action.start < e <= action.limit]
                    assert fits, "a batch limit is a record end"
                    end = fits[min(len(fits), n) - 1]
                    decision = plan.cut(end)
                    position = end
                    if isinstance(decision, Submit):
                        assert decision.start >= core.watermark, "a shipped batch crosses the watermark"
                        batch = [k for k in range(len(ends)) if decision.start <= starts[k] and ends[k] <= end]
                        answer = core.submit(batch, end)
                        if dies_unanswered:
                            return
                        plan.acknowledged(answer)
                    else:
                        assert end <= core.watermark
                    plan.batch_done(now)
        if final:
            assert isinstance(plan.next_action(now, stopping=True), Finish)

    for script in runs:
        run(script, final=False)
    received = len(ends)
    run([], final=True)
    assert core.counted == dict.fromkeys(range(len(ends)), 1)
    assert core.watermark == ends[-1]
