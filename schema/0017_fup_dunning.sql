-- Fair usage (FUP) and dunning (issue 18).
--
-- rate_profiles: a named speed (down/up kbit/s) and how each kind of NAS is
-- told it: MikroTik's Mikrotik-Rate-Limit is built from the two numbers,
-- Cisco gets the profile's policy names (Cisco-AVPair
-- subscriber:sub-qos-policy-in/out=...), a generic NAS the profile's own
-- attribute list ([[name, value], ...]).  billcore.radius.ratelimit builds them.
--
-- fup_quotas: bytes per accounting period of one traffic service and one
-- traffic class (class_id NULL: every class of the service); a counter sum
-- that goes from below to at-or-above the quota throttles the account to
-- the quota's profile until the period ends (billcore.billing.fup).
--
-- account_throttles: the speed limits in force or past.  source 'fup' (cause
-- = the quota and period) or 'dunning' (cause = the debt cycle); an account
-- is throttled while a row has restored_at NULL and until is NULL or later
-- than now.  UNIQUE (account, source, cause): a cause throttles once.
--
-- dunning_policies: one per tariff; dunning_state: one row per account in a
-- dunning cycle (cycle counts the account's debts); dunning_steps: the step
-- log, UNIQUE (account, cycle, step), so a step is taken once per cycle
-- whatever restarts or replays happen (billcore.billing.dunning).
CREATE TABLE rate_profiles (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    down_kbps    integer NOT NULL CHECK (down_kbps BETWEEN 1 AND 100000000),
    up_kbps      integer NOT NULL CHECK (up_kbps BETWEEN 1 AND 100000000),
    cisco_in     text NOT NULL DEFAULT '' CHECK (length(cisco_in) <= 128),
    cisco_out    text NOT NULL DEFAULT '' CHECK (length(cisco_out) <= 128),
    attributes   jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(attributes) = 'array'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE fup_quotas (
    id           bigserial PRIMARY KEY,
    service_id   bigint NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    class_id     bigint REFERENCES traffic_classes(id) ON DELETE CASCADE,
    quota_bytes  bigint NOT NULL CHECK (quota_bytes > 0),
    profile_id   bigint NOT NULL REFERENCES rate_profiles(id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX fup_quotas_one ON fup_quotas(service_id, coalesce(class_id, -1));

CREATE TABLE account_throttles (
    id           bigserial PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts(id),
    source       text NOT NULL CHECK (source IN ('fup', 'dunning')),
    cause_key    text NOT NULL CHECK (length(cause_key) BETWEEN 1 AND 200),
    profile_id   bigint NOT NULL REFERENCES rate_profiles(id),
    since        timestamptz NOT NULL,
    until        timestamptz,
    restored_at  timestamptz,
    UNIQUE (account_id, source, cause_key),
    CHECK (until IS NULL OR until > since)
);
CREATE INDEX account_throttles_open ON account_throttles(account_id) WHERE restored_at IS NULL;
CREATE INDEX account_throttles_due ON account_throttles(until) WHERE restored_at IS NULL AND until IS NOT NULL;

-- How a NAS is told a rate, and what to do when it refuses a CoA.
ALTER TABLE radius_nas
    ADD COLUMN kind text NOT NULL DEFAULT 'mikrotik' CHECK (kind IN ('generic', 'mikrotik', 'cisco')),
    ADD COLUMN coa_nak_action text NOT NULL DEFAULT 'disconnect' CHECK (coa_nak_action IN ('disconnect', 'none'));

-- Days are counted from the day the balance went past the credit (debt_since).
CREATE TABLE dunning_policies (
    tariff_id         bigint PRIMARY KEY REFERENCES tariffs(id) ON DELETE CASCADE,
    reminder_days     integer NOT NULL DEFAULT 3 CHECK (reminder_days BETWEEN 0 AND 366),
    grace_days        integer NOT NULL DEFAULT 0 CHECK (grace_days BETWEEN 0 AND 366),
    throttle_profile  bigint REFERENCES rate_profiles(id),
    block_after_days  integer NOT NULL DEFAULT 0 CHECK (block_after_days BETWEEN 0 AND 366),
    close_after_days  integer CHECK (close_after_days BETWEEN 1 AND 3660),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (block_after_days >= grace_days),
    CHECK (close_after_days IS NULL OR close_after_days >= block_after_days)
);

CREATE TABLE dunning_state (
    account_id   bigint PRIMARY KEY REFERENCES accounts(id),
    cycle        integer NOT NULL CHECK (cycle >= 1),
    step         text NOT NULL CHECK (step IN ('grace', 'throttled', 'blocked', 'closed', 'cleared')),
    debt_since   timestamptz,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX dunning_state_open ON dunning_state(account_id) WHERE step <> 'cleared';

CREATE TABLE dunning_steps (
    account_id   bigint NOT NULL REFERENCES accounts(id),
    cycle        integer NOT NULL,
    step         text NOT NULL CHECK (step IN ('reminder', 'grace', 'throttled', 'blocked', 'closed', 'cleared')),
    balance      bigint NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (account_id, cycle, step)
);
