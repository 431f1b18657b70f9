"""The NetFlow worker process: receive → journal → decode → classify → ship.

Theory of operation
-------------------
Two loops share one process and meet only at the journal:

* the **receiver** (`netflow.receiver`, a thread) reads the UDP socket and
  journals every accepted packet, publishing the *durable offset* after each
  fsync; a slow core or database only makes the journal grow.
* the **shipper** (`Worker.serve`, the asyncio loop) reads the journal from
  where it stopped up to the durable offset, decodes, classifies and
  aggregates a batch (`netflow.batches`), and sends the aggregates to the core
  in one ``netflow.submit`` call carrying the journal offset that ends the
  batch. The core commits charges and that watermark in one transaction.

What the shipper does next — where replay starts, where a batch may end (never
across the committed watermark), when to ship — is decided by `ShipPlan`
(`netflow.plan`, no I/O); this module feeds it events and carries out its
answers. Exactly once rests on the decoder checkpoint written before each
batch is shipped and on the journal's identity settled with the core at start
(both in `netflow.checkpoints`); the session with the core is `netflow.core_session`.

Raw flows. Every shipped batch's classified legs go to a `RawWriter`
(``rawstore``), which writes hourly Parquet part files named after the
journal range they cover. The journal is trimmed only below both the
committed watermark and the raw store's watermark, and replay starts from
the lower of the two, so raw storage is exact across crashes too.

Bounded. A batch holds at most ``batch_packets`` packets and `MAX_ROWS`
aggregate rows. The journal has no cap: over ``journal_max_bytes`` a loud
alarm is logged and exported, nothing dropped. A checkpoint the full volume
refuses is retried, not skipped; ``netflow_journal_free_bytes`` and
``netflow_journal_disk_low`` (free < ``journal_min_free_bytes``) warn before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from netflow.batches import MAX_ROWS, Batch, BatchDecoder, DecoderState, JournalTail, cut_batch, encode_aggregates
from netflow.checkpoints import Checkpoints, plan_resume
from netflow.classifier import Classifier
from netflow.core_session import CoreAccess, CoreSession, CoreUnavailable
from netflow.flows import addr_to_pair
from netflow.journal import Journal, list_segments
from netflow.metrics import (DROPS, EPOCHS, FLOWS, JOURNAL_ALARM, JOURNAL_BYTES, JOURNAL_DISK_FULL,
                             JOURNAL_DISK_LOW, JOURNAL_FREE, JOURNAL_LAG, RCVBUF, SHIPPED, UNBILLED)
from netflow.plan import CutBatch, Finish, Idle, ShipPlan, Submit, Wait
from netflow.rawstore import RawWriter
from netflow.receiver import DISK_ERRORS, ExporterFilter, Receiver, kernel_drops, open_socket
from urfa.errors import CallFailed
from urfa.link import Address

__all__ = ["WorkerSettings", "Worker", "StoppedWhileFull", "parse_sampling", "run", "MAX_ROWS"]

log = logging.getLogger("netflow.worker")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str
    host: str
    port: int
    journal_dir: Path
    raw_dir: Path | None
    exporters: tuple[str, ...] = ("127.0.0.1", "::1")
    sampling: tuple[str, ...] = ()
    rcvbuf: int = 64 << 20
    journal_max_bytes: int = 16 << 30
    journal_min_free_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync_interval: float = 0.2
    ship_interval: float = 1.0
    raw_retention_days: int = 90
    raw_flush_rows: int = 2_000_000
    raw_flush_interval: float = 60.0
    batch_packets: int = 20_000

    @classmethod
    def from_config(cls, config: Any, index: int, worker_id: str | None = None) -> WorkerSettings:
        section = config.netflow
        base = Path(section.journal_dir) if section.journal_dir else config.data_dir / "netflow" / "journal"
        wid = worker_id if worker_id is not None else str(index)
        return cls(
            worker_id=wid, host=section.host, port=section.port, journal_dir=base / wid,
            raw_dir=Path(section.raw_dir) if section.raw_dir else config.data_dir / "netflow" / "raw",
            exporters=tuple(section.exporters), sampling=tuple(section.sampling), rcvbuf=section.rcvbuf,
            journal_max_bytes=section.journal_max_bytes, journal_min_free_bytes=section.journal_min_free_bytes,
            segment_bytes=section.segment_bytes,
            fsync_interval=section.fsync_interval, ship_interval=section.ship_interval,
            raw_retention_days=section.raw_retention_days, raw_flush_rows=section.raw_flush_rows,
            raw_flush_interval=section.raw_flush_interval,
        )

    @property
    def source(self) -> str:
        """The usage source name the core keeps this worker's watermark under."""
        return f"netflow:{self.worker_id}"


def parse_sampling(entries: tuple[str, ...]) -> dict[tuple[int, int], int]:
    """'ADDR=N' config entries -> {exporter (hi, lo): N}."""
    out = {}
    for text in entries:
        addr, _, n = text.rpartition("=")
        out[addr_to_pair(addr)] = int(n)
    return out


@dataclass(frozen=True, slots=True)
class _Meters:
    """The worker's metrics, labelled with its id once."""

    flows: Counter
    shipped: Counter
    unbilled: Counter
    undecodable: Counter
    missing: Counter
    gap: Counter
    kernel: Counter
    journal: Gauge
    lag: Gauge
    alarm: Gauge
    rcvbuf: Gauge
    free: Gauge
    low: Gauge
    full: Gauge


class StoppedWhileFull(Exception):
    """The worker was asked to stop while a write it needs was refused by a full volume."""


class Worker:
    """One NetFlow worker: `serve` runs it until ``stop`` (see the module docstring)."""

    def __init__(self, settings: WorkerSettings, core: CoreAccess) -> None:
        self.settings = settings
        self.core = CoreSession(core, settings.worker_id)
        self.classifier: Classifier | None = None
        self.classifier_version: int | None = None
        self.epoch: str | None = None
        self.sent_batches = 0
        self.granted_rcvbuf = 0
        w = settings.worker_id
        self._m = _Meters(
            flows=FLOWS.labels(w), shipped=SHIPPED.labels(w), unbilled=UNBILLED.labels(w),
            undecodable=DROPS.labels(w, "undecodable"), missing=DROPS.labels(w, "missing_template"),
            gap=DROPS.labels(w, "sequence_gap"), kernel=DROPS.labels(w, "kernel"),
            journal=JOURNAL_BYTES.labels(w), lag=JOURNAL_LAG.labels(w), alarm=JOURNAL_ALARM.labels(w),
            rcvbuf=RCVBUF.labels(w), free=JOURNAL_FREE.labels(w), low=JOURNAL_DISK_LOW.labels(w),
            full=JOURNAL_DISK_FULL.labels(w))
        self._kernel_seen = 0
        self._alarmed = False
        self._low = False

    async def refresh_classifier(self, stop: asyncio.Event) -> None:
        """Load the streamed snapshot and swap the classifier whole (see `netflow.snapshot`).

        The stale flag is cleared before asking. A change committed after the
        core's database snapshot has a newer version than the one loaded (the
        version row serializes the changes), and its event comes on the session
        that was subscribed before the load began: `stale` then holds, and the
        next loop loads once more. No change is lost.
        """
        self.core.events.snapshot_stale = False
        started = time.monotonic()
        loader, answer = await self.core.load_snapshot(stop)
        snapshot, version = loader.finish(answer)
        self.classifier = Classifier(snapshot)
        if version != self.classifier_version:
            log.info("classifier loaded", extra={
                "version": version, "bindings": loader.bindings, "chunks": loader.chunks,
                "seconds": round(time.monotonic() - started, 3), "classifier_bytes": self.classifier.nbytes()})
        self.classifier_version = version

    def stale(self) -> bool:
        """Reload? After a (re)connect (events may have been missed), or once an event announced a
        version newer than the one loaded. An event for a change the last load already held (it
        committed before the core's database snapshot, its NOTIFY came after) costs no second load:
        at a million bindings that is seconds per change."""
        events = self.core.events
        return events.snapshot_stale or events.seen_version > (self.classifier_version or 0)

    def _count(self, batch: Batch) -> None:
        m, stats, agg = self._m, batch.stats, batch.aggregates
        m.flows.inc(stats.flows)
        if stats.undecodable:
            m.undecodable.inc(stats.undecodable)
        if stats.missing_template:
            m.missing.inc(stats.missing_template)
        if stats.sequence_lost:
            m.gap.inc(stats.sequence_lost)
        unbilled = (agg.account <= 0) | (agg.klass <= 0)
        if unbilled.any():
            m.unbilled.inc(int(agg.bytes[unbilled].sum()))

    async def _on_disk(self, what: str, fn: Callable[[], Any], stop: asyncio.Event) -> Any:
        """``fn()``, retried while the journal's volume is full (the worker stays up).

        Raises `StoppedWhileFull` if the worker is asked to stop first."""
        delay, warned = 0.5, False
        while True:
            try:
                result = fn()
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    raise
                if not warned:
                    log.error("JOURNAL VOLUME FULL: cannot write; retrying until space returns",
                              extra={"what": what, "reason": str(exc)})
                    warned = True
                self._m.full.set(1)
                if stop.is_set():
                    raise StoppedWhileFull(what) from exc
                await _wait(stop, delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                self._m.full.set(0)
                log.warning("journal volume has space again", extra={"what": what})
            return result

    def _open_journal(self) -> tuple[Journal, Checkpoints]:
        settings = self.settings
        journal = Journal(settings.journal_dir, settings.segment_bytes, settings.journal_max_bytes)
        try:
            journal.start_run()  # this run's receipts begin a segment, so they can be lifted
            return journal, Checkpoints(settings.journal_dir / "checkpoints")
        except BaseException:
            journal.close()
            raise

    async def _resume(self, journal: Journal, receiver: Receiver, journal_end: int, raw: RawWriter | None,
                      stop: asyncio.Event) -> int:
        """Settle the journal's identity with the core (see `netflow.checkpoints`); the committed watermark."""
        settings = self.settings
        try:
            mark = await self.core.call("netflow.journal", {"worker": settings.worker_id}, stop)
        except CallFailed as exc:
            if exc.code != "not_in_table":
                raise
            # a core from before journal identities: offsets alone keep new traffic above the watermark
            log.warning("the core knows no journal epochs; journal identity is not checked")
            committed = int(await self.core.call("netflow.watermark", {"worker": settings.worker_id}, stop))
            if journal_end < committed:
                receiver.lift(committed)
            self.epoch = None
            return committed
        watermark, epoch = int(mark["watermark"]), mark["epoch"]
        resume = plan_resume(journal.identity, journal_end, watermark, epoch)
        raw_mark = raw.watermark() if raw is not None else None
        floor = max(watermark, raw_mark or 0, 0)
        lifted = receiver.lift(floor) if journal_end < floor else 0
        if resume.identity != journal.identity:
            await self._on_disk("journal identity", lambda: journal.set_identity(resume.identity), stop)
        if resume.reason is not None:
            answer = await self.core.call("netflow.begin_epoch", {
                "worker": settings.worker_id, "epoch": resume.identity.epoch, "expect": epoch or "",
                "reason": resume.reason, "journal_end": journal_end}, stop)
            watermark = int(answer["watermark"])
            EPOCHS.labels(settings.worker_id, resume.reason).inc()
            alarm = resume.reason in ("replaced", "truncated")
            (log.error if alarm else log.info)(
                "JOURNAL IS NOT THE ONE THE WATERMARK COUNTS: new epoch; everything received from now on is charged"
                if alarm else "journal epoch began",
                extra={"reason": resume.reason, "epoch": resume.identity.epoch, "previous": epoch,
                       "watermark": watermark, "journal_end": journal_end, "lifted_by": lifted})
        self.epoch = resume.identity.epoch
        return watermark

    async def serve(self, stop: asyncio.Event, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        settings = self.settings
        try:
            journal, checkpoints = await self._on_disk("journal open", self._open_journal, stop)
        except StoppedWhileFull:
            return
        journal_end = journal.run_base  # where the journal ended before this run received anything
        raw = None if settings.raw_dir is None else RawWriter(
            settings.raw_dir, settings.worker_id, settings.raw_retention_days, settings.raw_flush_rows,
            settings.raw_flush_interval)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def wake_shipper() -> None:  # called by the receiver thread after each fsync
            loop.call_soon_threadsafe(wake.set)

        sock, self.granted_rcvbuf = open_socket(settings.host, settings.port, settings.rcvbuf)
        self._m.rcvbuf.set(self.granted_rcvbuf)
        receiver = Receiver(sock, journal, ExporterFilter(settings.exporters), settings.fsync_interval,
                            settings.worker_id, wake=wake_shipper)
        receiver.start()
        plan = ShipPlan(settings.ship_interval, keeps_raw=raw is not None)
        try:
            plan.acknowledged(await self._resume(journal, receiver, journal_end, raw, stop))
            await self.refresh_classifier(stop)
            plan.raw_flushed(raw.watermark() if raw is not None else None)
            plan.journaled(receiver.durable)
            start = plan.start(list_segments(settings.journal_dir)[0][0], loop.time()).offset
            state_bytes = checkpoints.load(start) if start > 0 else None
            if start > 0 and state_bytes is None:
                log.error("no decoder checkpoint at the replay start; templates and pending sets start empty",
                          extra={"watermark": start})
            decoder = BatchDecoder(DecoderState.loads(state_bytes) if state_bytes else DecoderState(),
                                   parse_sampling(settings.sampling))
            tail = JournalTail(settings.journal_dir, start)
            info = {"worker": settings.worker_id, "port": settings.port, "rcvbuf": self.granted_rcvbuf,
                    "committed": plan.committed, "replay_from": start, "replay_bytes": receiver.durable - start}
            log.info("netflow serving", extra=info)
            if ready is not None:
                ready(info)
            while True:
                if receiver.error is not None:
                    raise RuntimeError("receiver thread died") from receiver.error
                plan.journaled(receiver.durable)
                self._watch(receiver, sock, plan)
                if self.stale():
                    await self.refresh_classifier(stop)
                action = plan.next_action(loop.time(), stop.is_set())
                if isinstance(action, (Idle, Finish)):
                    if raw is not None and raw.tick_due(loop.time()):
                        # raw_flush_interval and retention hold when no packet comes to trigger them
                        await asyncio.to_thread(raw.tick, loop.time())
                        self._trim(receiver, checkpoints, raw, plan)
                    if isinstance(action, Finish):
                        break
                    wake.clear()
                    await _wait(wake, action.until - loop.time())
                    continue
                if isinstance(action, Wait):
                    await _wait(stop, action.until - loop.time())
                    continue
                if not await self._ship(action, plan, decoder, tail, checkpoints, raw, stop):
                    break
                if raw is not None:
                    if raw.due(loop.time()) or stop.is_set():
                        await asyncio.to_thread(raw.flush, loop.time())
                self._trim(receiver, checkpoints, raw, plan)
            if raw is not None and raw.rows:
                await asyncio.to_thread(raw.flush, loop.time())
                self._trim(receiver, checkpoints, raw, plan)
        except CoreUnavailable:
            log.warning("stopped before the core answered")
        except StoppedWhileFull:
            log.warning("stopped while the journal volume was full")
        finally:
            receiver.stop()
            receiver.join(timeout=5)
            sock.close()
            with contextlib.suppress(Exception):
                journal.close()
            await self.core.close()

    async def _ship(self, action: CutBatch, plan: ShipPlan, decoder: BatchDecoder, tail: JournalTail,
                    checkpoints: Checkpoints, raw: RawWriter | None, stop: asyncio.Event) -> bool:
        """Decode the batch the plan asked for, checkpoint it, submit it unless the core has it; the raw
        store gets its legs once the core has the batch (its mark never passes the committed one).
        False: stopping with uncommitted journal (it is replayed at the next start)."""
        assert self.classifier is not None and tail.position == action.start
        batch = cut_batch(decoder, tail, self.classifier, action.limit, self.settings.batch_packets)
        self._count(batch)
        decision = plan.cut(tail.position)
        state = decoder.state.dumps()
        try:
            await self._on_disk("checkpoint", lambda: checkpoints.save(decision.end, state), stop)
        except StoppedWhileFull:
            log.warning("stopping with uncommitted journal; it is replayed at the next start",
                        extra={"from": action.start})
            return False
        if isinstance(decision, Submit):
            try:
                result = await self.core.call(
                    "netflow.submit", {"worker": self.settings.worker_id, "watermark": decision.end,
                                       **encode_aggregates(batch.aggregates),
                                       **({"epoch": self.epoch} if self.epoch else {})}, stop)
            except CoreUnavailable:
                log.warning("stopping with uncommitted journal; it is replayed at the next start",
                            extra={"from": action.start})
                return False
            plan.acknowledged(int(result["watermark"]))
            self._m.shipped.inc()
            self.sent_batches += 1
        now = asyncio.get_running_loop().time()
        plan.batch_done(now)
        if raw is not None:
            for chunk in batch.chunks:
                raw.add_legs(chunk.flows, chunk.legs, chunk.start, chunk.end, now)  # due() asks the same clock
        return True

    def _trim(self, receiver: Receiver, checkpoints: Checkpoints, raw: RawWriter | None, plan: ShipPlan) -> None:
        plan.raw_flushed(raw.watermark() if raw is not None else None)
        below = plan.trim_below()
        if below is not None:
            receiver.trim(below)
            checkpoints.prune(below)

    def _watch(self, receiver: Receiver, sock: socket.socket, plan: ShipPlan) -> None:
        m = self._m
        size = receiver.journal_size()
        m.journal.set(size)
        m.lag.set(plan.lag())
        over = size > self.settings.journal_max_bytes
        m.alarm.set(1 if over else 0)
        if over and not self._alarmed:
            log.error("JOURNAL OVER LIMIT: the core is not keeping up; nothing is dropped but the disk is filling",
                      extra={"journal_bytes": size, "limit": self.settings.journal_max_bytes})
        self._alarmed = over
        with contextlib.suppress(OSError):
            free = receiver.journal.free_bytes()
            m.free.set(free)
            low = free < self.settings.journal_min_free_bytes
            m.low.set(1 if low else 0)
            if low and not self._low:
                log.error("JOURNAL VOLUME LOW: packets are dropped once it is full",
                          extra={"free_bytes": free, "threshold": self.settings.journal_min_free_bytes})
            self._low = low
        drops = kernel_drops(sock)
        if drops is not None and drops > self._kernel_seen:
            m.kernel.inc(drops - self._kernel_seen)
            log.warning("kernel dropped packets (receive buffer full)",
                        extra={"dropped": drops - self._kernel_seen, "total": drops})
            self._kernel_seen = drops


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds passed."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))


# ---------------------------------------------------------------- process entry


def read_password(config: Any) -> str:
    from billcore.common.sysfiles import service_password_file

    path = Path(config.netflow.password_file) if config.netflow.password_file else \
        service_password_file(config.data_dir, "netflow")
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the core writes it at its first start
    return path.read_text().strip()


def local_core(config: Any, password: str) -> CoreAccess:
    """This host's core: ``netflow.core_address``, else the core's Unix socket, else its TCP port."""
    if config.netflow.core_address:
        address = Address.parse(config.netflow.core_address)
    elif config.urfa_socket is not None:
        address = Address(host=None, unix=str(config.urfa_socket))
    else:
        address = Address(host=config.urfa.host, port=config.urfa.port)
    return CoreAccess((address,), config.netflow.login, lambda: password)


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The supervisor's ``netflow`` role: worker ``index`` of ``config.netflow_workers``."""
    settings = WorkerSettings.from_config(config, index)
    password = await asyncio.to_thread(read_password, config)
    worker = Worker(settings, local_core(config, password))
    await worker.serve(stop)
