"""Replay bookkeeping of a NetFlow worker: decoder checkpoints per watermark, and the journal's identity.

Theory of operation
-------------------
Exactly once. The decoder has state: v9/IPFIX templates, sampling, sequence
counters, and data sets still waiting for their template. Before a batch
ending at W is shipped, that state is written to a checkpoint file named W
(`Checkpoints`). A restarted worker asks the core for its watermark W, loads
checkpoint W and replays the journal from W: the decoder is in exactly the
state it had when W was shipped, so the replay decodes exactly what the
crashed run would have, and the pending data sets below W (not yet charged)
come back with the checkpoint. So the watermark may pass a pending packet
without losing it: its sets are charged in the batch where its template
arrives, and that batch's watermark is what says so.

Journal identity. At start the worker asks the core for its watermark W and
the epoch of the journal W counts (``netflow.journal``) and compares them
with the journal it opened (`plan_resume`). Its own journal, intact: replay
from W. Anything else (a wiped or new directory, a journal from elsewhere,
its own cut below W): the journal's offsets for this run are lifted to start
at W (`Journal.lift_run`), so everything received from now on ends above W
and is charged, and a new epoch is recorded with the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from netflow.journal import JournalIdentity

__all__ = ["Checkpoints", "Resume", "plan_resume", "CHECKPOINTS_KEPT"]

CHECKPOINTS_KEPT = 64


class Checkpoints:
    """Decoder state as of a watermark, one file per watermark (written before shipping it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, watermark: int) -> Path:
        return self.directory / f"{watermark:020d}.ckpt"

    def save(self, watermark: int, data: bytes) -> None:
        path = self._path(watermark)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, watermark: int) -> bytes | None:
        try:
            return self._path(watermark).read_bytes()
        except FileNotFoundError:
            return None

    def marks(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.ckpt") if p.stem.isdigit())

    def prune(self, keep_from: int) -> None:
        """Delete checkpoints below ``keep_from`` (it stays), leaving at least a few."""
        marks = self.marks()
        for mark in marks[:-CHECKPOINTS_KEPT]:
            if mark < keep_from:
                self._path(mark).unlink(missing_ok=True)

@dataclass(frozen=True, slots=True)
class Resume:
    """What a starting worker does about its journal's identity (`plan_resume`)."""

    identity: JournalIdentity  # the journal's identity from now on
    reason: str | None  # why the core's epoch changes (`EPOCH_REASONS` of billcore.billing.usage); None: it does not

def plan_resume(identity: JournalIdentity | None, journal_end: int, watermark: int, epoch: str | None) -> Resume:
    """Compare the journal a worker opened (its ``identity``, where it ended, ``journal_end``)
    with what the core counts (``watermark`` of journal ``epoch``).

    Whatever the answer, the worker lifts this run's offsets above ``watermark``
    when ``journal_end`` is below it; this decides the epoch and the alarm.
    """
    if identity is not None and identity.epoch == epoch:
        if journal_end >= watermark:
            return Resume(identity, None)  # its own journal, intact: replay from the watermark
        return Resume(JournalIdentity.mint(), "truncated")
    if epoch is None and watermark < 0:
        return Resume(identity or JournalIdentity.mint(), "first")  # nothing was ever counted
    if epoch is None and identity is None:
        # a journal and a watermark from before identities: the same one, unless it cannot be
        return Resume(JournalIdentity.mint(), "adopted" if journal_end >= watermark else "truncated")
    return Resume(identity or JournalIdentity.mint(), "replaced")

