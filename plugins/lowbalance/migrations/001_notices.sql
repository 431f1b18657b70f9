-- At most one unsent notice per account: a second drop below the threshold
-- refreshes the pending notice instead of queueing another.
CREATE TABLE notices (
    id         bigserial PRIMARY KEY,
    account_id bigint NOT NULL,
    balance    bigint NOT NULL,
    threshold  bigint NOT NULL,
    reason     text NOT NULL,
    queued_at  timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz
);
CREATE UNIQUE INDEX notices_one_pending ON notices (account_id) WHERE sent_at IS NULL;
