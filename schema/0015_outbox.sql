-- The durable outbox (issue 18): every outgoing side effect is written here
-- in the same transaction as the change that causes it, and delivered after
-- commit, at least once.
--
-- Two stages.  outbox_events: one row per event (a payment booked, a block
-- set, a quota crossed ...), inserted inside the causing transaction -- so a
-- rolled-back change has no event, and a committed one cannot lose it.  The
-- core's dispatcher then fans each event out, in one transaction, into
-- outbox_deliveries: one row per (channel, target) that must hear it (a
-- plugin's hook, the RADIUS process's CoA/Disconnect, an email address, a
-- webhook endpoint), and marks the event dispatched.  A delivery is claimed
-- with a lease (claimed_until), done or failed; a failure is retried with
-- backoff (next_at) and, after the last try, is dead (kept for an operator).
--
-- The stable id a receiver de-duplicates on is the event's id (an email's
-- Message-ID and a webhook's X-Billcore-Event carry it).  dedup_key makes an
-- event that must happen once per cause (a quota crossed in a period, a
-- dunning step) impossible to enqueue twice, even from a replayed batch.
CREATE TABLE outbox_events (
    id             bigserial PRIMARY KEY,
    event          text NOT NULL CHECK (event ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' AND length(event) <= 64),
    account_id     bigint,
    payload        jsonb NOT NULL DEFAULT '{}',
    dedup_key      text UNIQUE CHECK (length(dedup_key) BETWEEN 1 AND 200),
    created_at     timestamptz NOT NULL,
    dispatched_at  timestamptz
);
CREATE INDEX outbox_events_undispatched ON outbox_events (id) WHERE dispatched_at IS NULL;
CREATE INDEX outbox_events_account ON outbox_events (account_id, id) WHERE account_id IS NOT NULL;

CREATE TABLE outbox_deliveries (
    id             bigserial PRIMARY KEY,
    event_id       bigint NOT NULL REFERENCES outbox_events(id) ON DELETE CASCADE,
    channel        text NOT NULL CHECK (channel ~ '^[a-z][a-z0-9_]{0,31}$'),
    target         text NOT NULL DEFAULT '' CHECK (length(target) <= 320),
    message        jsonb NOT NULL DEFAULT '{}',
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_at        timestamptz NOT NULL,
    claimed_until  timestamptz,
    last_error     text NOT NULL DEFAULT '' CHECK (length(last_error) <= 1000),
    delivered_at   timestamptz,
    UNIQUE (event_id, channel, target)
);
CREATE INDEX outbox_deliveries_due ON outbox_deliveries (channel, next_at) WHERE state = 'pending';
CREATE INDEX outbox_deliveries_dead ON outbox_deliveries (channel, id) WHERE state = 'dead';

-- An insert wakes the dispatcher at commit (NOTIFY is transactional); one
-- notification per statement, so a batch of a thousand events costs one.
CREATE OR REPLACE FUNCTION outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billcore_outbox', TG_TABLE_NAME);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_events_wake AFTER INSERT ON outbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake();
CREATE TRIGGER outbox_deliveries_wake AFTER INSERT ON outbox_deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake();
