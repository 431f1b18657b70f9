-- NetFlow journal identity (issue 23): which journal a worker's watermark counts.
--
-- ``epoch`` is the random identity of the journal whose offsets ``watermark``
-- counts.  NULL: a watermark committed before journals had identities (or a
-- source that has none, RADIUS sessions); the worker's next start adopts it
-- for the journal it finds, or starts a new epoch if that journal cannot be
-- the one counted (see docs/netflow.md, "Journal identity").
ALTER TABLE ingest_watermarks
    ADD COLUMN epoch text CHECK (epoch IS NULL OR length(epoch) BETWEEN 1 AND 64);

-- Every epoch a source began, with why, where its journal ended and where the
-- watermark stood: the operator's record of lost, wiped, moved or truncated
-- journals (the workers also log and count each one).
CREATE TABLE ingest_epochs (
    source       text NOT NULL CHECK (length(source) BETWEEN 1 AND 128),
    epoch        text NOT NULL CHECK (length(epoch) BETWEEN 1 AND 64),
    previous     text,
    reason       text NOT NULL CHECK (reason IN ('first', 'adopted', 'replaced', 'truncated')),
    watermark    bigint NOT NULL,
    journal_end  bigint NOT NULL,
    began_at     timestamptz NOT NULL,
    PRIMARY KEY (source, epoch)
);

-- Billing time never runs backwards (issue 23): the greatest ``now`` a periodic
-- run has started with, finished or not.  A run that crashed after booking some
-- batches at ``now`` has left no ``periodic_runs`` row for it; a rerun under a
-- clock stepped back must still not compute smaller targets (a refund) than
-- what those batches booked.
CREATE TABLE periodic_clock (
    name      text PRIMARY KEY,
    high_now  timestamptz NOT NULL
);
