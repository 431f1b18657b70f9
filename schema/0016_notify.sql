-- Notifications (issue 18): what a subscriber is told, in which language, and
-- which outside systems hear every event.
--
-- Templates: the defaults (English and Russian, for every notification event)
-- ship in code (billcore/billing/notify_templates.py); this table holds only
-- an operator's overrides, one per (event, channel, language).  Deleting the
-- row ("reset") brings the shipped default back.
CREATE TABLE notify_templates (
    event       text NOT NULL CHECK (event ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' AND length(event) <= 64),
    channel     text NOT NULL CHECK (channel ~ '^[a-z][a-z0-9_]{0,31}$'),
    lang        text NOT NULL CHECK (lang IN ('en', 'ru')),
    subject     text NOT NULL CHECK (length(subject) <= 1000),
    body        text NOT NULL CHECK (length(body) <= 20000),
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (event, channel, lang)
);

-- A subscriber's opt-outs: no (event, channel) row means "send it".  event
-- '*' opts out of every event of the channel.  Essential events (blocked,
-- unblocked, the dunning steps that cut or close the service) are sent
-- whatever this table says: the router ignores rows for them, and the calls
-- refuse to write them (billcore.billing.notify_prefs.ESSENTIAL).
CREATE TABLE notify_optouts (
    user_id  bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    event    text NOT NULL CHECK (event = '*' OR (event ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' AND length(event) <= 64)),
    channel  text NOT NULL CHECK (channel ~ '^[a-z][a-z0-9_]{0,31}$'),
    PRIMARY KEY (user_id, event, channel)
);

-- The subscriber's language for notifications ('' = the installation's,
-- [notify] language).
ALTER TABLE users ADD COLUMN language text NOT NULL DEFAULT '' CHECK (language IN ('', 'en', 'ru'));

-- The balance under which balance.low fires for this account (micro-units;
-- NULL = [notify] low_balance).  Read by the ledger with the account lock.
ALTER TABLE accounts ADD COLUMN low_balance bigint
    CHECK (low_balance BETWEEN -999999999999999999 AND 999999999999999999);

-- Webhook endpoints: every event named in events ('*' = every event) is
-- POSTed to url, signed with HMAC-SHA256 under secret.  The secret is sealed
-- with the core's SecretStore (as NAS secrets are, schema 0005): a database
-- dump alone cannot forge a signature.
CREATE TABLE webhooks (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    url         text NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2000),
    secret_enc  bytea NOT NULL,
    events      text[] NOT NULL CHECK (cardinality(events) BETWEEN 1 AND 100),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX webhooks_events ON webhooks USING gin (events) WHERE enabled;
