-- Tariffs: services, tariffs, account links, traffic classes, time ranges,
-- IP bindings, usage counters, ingest watermarks and periodic charges.
--
-- Money is BIGINT micro-units; quantities are BIGINT bytes or seconds.
-- Every large table carries account_id (the Citus distribution key).
--
-- No btree_gist is needed (the embedded PostgreSQL does not ship it): the
-- "no overlap" rules use GiST opclasses that are built in, inet_ops for
-- prefixes and range_ops for tstzrange / int8range (an account id becomes
-- the one-point range [id, id] so equality is range overlap).

-- A service is one of four kinds.  fee: the once-off amount, or the
-- periodic fee per period.  Traffic and time services price through
-- service_rates.
CREATE TABLE services (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    kind          text NOT NULL CHECK (kind IN ('once', 'periodic', 'traffic', 'time')),
    fee           bigint NOT NULL DEFAULT 0 CHECK (fee BETWEEN 0 AND 999999999999999999),
    period_kind   text CHECK (period_kind IN ('daily', 'weekly', 'monthly', 'yearly', 'custom')),
    period_days   integer NOT NULL DEFAULT 0 CHECK (period_days BETWEEN 0 AND 3660),
    period_anchor date,
    charge_mode   text CHECK (charge_mode IN ('start', 'end', 'daily')),
    session_limit integer CHECK (session_limit > 0),      -- time: longest session, seconds
    max_sessions  integer CHECK (max_sessions > 0),       -- time: simultaneous sessions
    comment       text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'periodic') = (period_kind IS NOT NULL AND period_anchor IS NOT NULL
                                  AND charge_mode IS NOT NULL)),
    CHECK ((period_kind = 'custom') = (period_days > 0)),
    CHECK (kind = 'time' OR (session_limit IS NULL AND max_sessions IS NULL))
);

-- Traffic classes and their ordered rules.  A flow is matched against the
-- classes in (position, id) order; inside a class, rules in (position, id)
-- order; the first matching rule decides: a normal rule puts the flow in
-- the class, a skip rule takes it out of this class (matching goes on with
-- the next class).  A NULL field matches anything.
CREATE TABLE traffic_classes (
    id        bigserial PRIMARY KEY,
    name      text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    position  integer NOT NULL DEFAULT 0,
    comment   text NOT NULL DEFAULT ''
);

CREATE TABLE traffic_class_rules (
    id           bigserial PRIMARY KEY,
    class_id     bigint NOT NULL REFERENCES traffic_classes(id) ON DELETE CASCADE,
    position     integer NOT NULL DEFAULT 0,
    skip         boolean NOT NULL DEFAULT false,
    local_net    cidr,
    remote_net   cidr,
    local_ports  int4range CHECK (local_ports <@ int4range(0, 65535, '[]')),
    remote_ports int4range CHECK (remote_ports <@ int4range(0, 65535, '[]')),
    protocol     smallint CHECK (protocol BETWEEN 0 AND 255),
    exporter     inet,
    iface        integer CHECK (iface >= 0)
);
CREATE INDEX traffic_class_rules_class ON traffic_class_rules(class_id, position, id);

-- Time ranges: weekly windows (weekday bitmask, bit 0 = Monday; minutes of
-- day, start > end crosses midnight, start = end is 24 h) plus whole dates.
CREATE TABLE time_ranges (
    id        bigserial PRIMARY KEY,
    name      text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    priority  integer NOT NULL DEFAULT 0
);

CREATE TABLE time_range_windows (
    id            bigserial PRIMARY KEY,
    range_id      bigint NOT NULL REFERENCES time_ranges(id) ON DELETE CASCADE,
    weekdays      smallint NOT NULL CHECK (weekdays BETWEEN 1 AND 127),
    start_minute  smallint NOT NULL CHECK (start_minute BETWEEN 0 AND 1439),
    end_minute    smallint NOT NULL CHECK (end_minute BETWEEN 0 AND 1439)
);
CREATE INDEX time_range_windows_range ON time_range_windows(range_id);

CREATE TABLE time_range_dates (
    range_id  bigint NOT NULL REFERENCES time_ranges(id) ON DELETE CASCADE,
    day       date NOT NULL,
    PRIMARY KEY (range_id, day)
);

-- Prices of traffic and time services per (class, time range): prepaid
-- volume per period and tiers (tier_starts[i] units beyond the prepaid
-- volume on, tier_prices[i] micro-units per unit_size units).  class_id
-- NULL: a time service; range_id NULL: any time range.
CREATE TABLE service_rates (
    id           bigserial PRIMARY KEY,
    service_id   bigint NOT NULL REFERENCES services(id) ON DELETE CASCADE,
    class_id     bigint REFERENCES traffic_classes(id),
    range_id     bigint REFERENCES time_ranges(id),
    prepaid      bigint NOT NULL DEFAULT 0 CHECK (prepaid >= 0),
    unit_size    bigint NOT NULL CHECK (unit_size > 0),
    tier_starts  bigint[] NOT NULL,
    tier_prices  bigint[] NOT NULL,
    CHECK (cardinality(tier_starts) BETWEEN 1 AND 16),
    CHECK (cardinality(tier_starts) = cardinality(tier_prices)),
    CHECK (tier_starts[1] = 0)
);
CREATE UNIQUE INDEX service_rates_one ON service_rates(
    service_id, coalesce(class_id, -1), coalesce(range_id, 0));

CREATE TABLE tariffs (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tariff_services (
    tariff_id   bigint NOT NULL REFERENCES tariffs(id) ON DELETE CASCADE,
    service_id  bigint NOT NULL REFERENCES services(id),
    PRIMARY KEY (tariff_id, service_id)
);
CREATE INDEX tariff_services_service ON tariff_services(service_id);

-- The account's accounting ("discount") period; absent: monthly on the 1st.
CREATE TABLE account_periods (
    account_id    bigint PRIMARY KEY REFERENCES accounts(id),
    period_kind   text NOT NULL CHECK (period_kind IN ('daily', 'weekly', 'monthly', 'yearly', 'custom')),
    period_days   integer NOT NULL DEFAULT 0 CHECK (period_days BETWEEN 0 AND 3660),
    period_anchor date NOT NULL,
    CHECK ((period_kind = 'custom') = (period_days > 0))
);

-- Tariff history: one tariff per account at any instant; rows are closed
-- (valid_to set), never deleted.
CREATE TABLE account_tariffs (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    tariff_id   bigint NOT NULL REFERENCES tariffs(id),
    valid_from  timestamptz NOT NULL,
    valid_to    timestamptz,
    created_at  timestamptz NOT NULL,
    created_by  text NOT NULL,
    CHECK (valid_to IS NULL OR valid_to > valid_from),
    EXCLUDE USING gist (int8range(account_id, account_id, '[]') WITH &&,
                        tstzrange(valid_from, valid_to) WITH &&)
);
CREATE INDEX account_tariffs_account ON account_tariffs(account_id, valid_from);
CREATE INDEX account_tariffs_tariff ON account_tariffs(tariff_id);

-- Static and dynamic addresses of accounts; no two overlap at any instant.
CREATE TABLE ip_bindings (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    prefix      cidr NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('static', 'dynamic')),
    source      text NOT NULL CHECK (length(source) BETWEEN 1 AND 64),
    session_ref text,
    valid_from  timestamptz NOT NULL,
    valid_to    timestamptz,
    CHECK (valid_to IS NULL OR valid_to > valid_from),
    EXCLUDE USING gist (prefix inet_ops WITH &&, tstzrange(valid_from, valid_to) WITH &&)
);
CREATE INDEX ip_bindings_account ON ip_bindings(account_id);
CREATE INDEX ip_bindings_session ON ip_bindings(session_ref) WHERE session_ref IS NOT NULL;

-- Bumped by every change to bindings, classes or rules (the NetFlow
-- workers' classifier snapshot version).
CREATE TABLE classifier_version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  bigint NOT NULL
);
INSERT INTO classifier_version VALUES (true, 1);

CREATE FUNCTION classifier_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE classifier_version SET version = version + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER ip_bindings_bump AFTER INSERT OR UPDATE OR DELETE ON ip_bindings
    FOR EACH STATEMENT EXECUTE FUNCTION classifier_bump();
CREATE TRIGGER traffic_classes_bump AFTER INSERT OR UPDATE OR DELETE ON traffic_classes
    FOR EACH STATEMENT EXECUTE FUNCTION classifier_bump();
CREATE TRIGGER traffic_class_rules_bump AFTER INSERT OR UPDATE OR DELETE ON traffic_class_rules
    FOR EACH STATEMENT EXECUTE FUNCTION classifier_bump();

-- Cumulative usage counters (rating's CounterKey): class_id -1 for time
-- services, range_id 0 for "any range".  charged = Meter.charged(quantity)
-- at the tariff in force when it was last rated.
CREATE TABLE usage_counters (
    account_id    bigint NOT NULL REFERENCES accounts(id),
    service_id    bigint NOT NULL REFERENCES services(id),
    class_id      bigint NOT NULL,
    range_id      bigint NOT NULL,
    period_start  timestamptz NOT NULL,
    quantity      bigint NOT NULL CHECK (quantity >= 0),
    charged       bigint NOT NULL CHECK (charged >= 0),
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (account_id, service_id, class_id, range_id, period_start)
);

-- Traffic and time per account, class and local day, for reports and the
-- subscriber's office (class_id -1: session seconds).
CREATE TABLE usage_daily (
    account_id  bigint NOT NULL REFERENCES accounts(id),
    class_id    bigint NOT NULL,
    day         date NOT NULL,
    quantity    bigint NOT NULL CHECK (quantity >= 0),
    amount      bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (account_id, day, class_id)
);

-- The highest input offset whose charges are committed, per source
-- (a NetFlow worker's journal, a RADIUS server's accounting stream).
CREATE TABLE ingest_watermarks (
    source      text PRIMARY KEY CHECK (length(source) BETWEEN 1 AND 128),
    watermark   bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Periodic charges: the cumulative amount booked per (account, service,
-- period).  A run books target − charged and stores target, so a rerun
-- books nothing.
CREATE TABLE periodic_charges (
    account_id    bigint NOT NULL REFERENCES accounts(id),
    service_id    bigint NOT NULL REFERENCES services(id),
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    charged       bigint NOT NULL,
    revision      integer NOT NULL CHECK (revision > 0),  -- bookings so far; part of the ledger key
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (account_id, service_id, period_start),
    CHECK (period_end > period_start)
);
CREATE INDEX periodic_charges_period ON periodic_charges(period_start, service_id);

-- Once-off services are booked once per (account, service, link).
CREATE TABLE once_charges (
    account_id  bigint NOT NULL REFERENCES accounts(id),
    service_id  bigint NOT NULL REFERENCES services(id),
    link_id     bigint NOT NULL REFERENCES account_tariffs(id),
    amount      bigint NOT NULL,
    charged_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, service_id, link_id)
);

-- One row per scheduler: the previous run's `now` (due_charges' `since`).
CREATE TABLE periodic_runs (
    name        text PRIMARY KEY,
    last_now    timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    accounts    bigint NOT NULL,
    charges     bigint NOT NULL,
    amount      bigint NOT NULL
);

-- A closed accounting period: one summary row per account and period.
CREATE TABLE period_summaries (
    account_id      bigint NOT NULL REFERENCES accounts(id),
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    traffic_bytes   bigint NOT NULL,
    session_seconds bigint NOT NULL,
    usage_amount    bigint NOT NULL,
    periodic_amount bigint NOT NULL,
    closed_at       timestamptz NOT NULL,
    PRIMARY KEY (account_id, period_start)
);
