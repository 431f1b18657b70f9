-- RADIUS: NAS devices, service links (RADIUS logins of accounts), IP pools
-- and leases, active sessions and the time charges booked from accounting.
--
-- Secrets (NAS shared secrets, service passwords) are encrypted at rest with
-- a SecretBox whose key lives in a file outside the database
-- (core.secret_key_file): bytea columns *_enc hold nonce + ciphertext.
-- Framed IPs of sessions are bound to accounts in ip_bindings (0003) with
-- source 'radius' and session_ref = 'radius:<nas id>:<Acct-Session-Id>'.

CREATE TABLE radius_nas (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    address         inet NOT NULL UNIQUE,
    secret_enc      bytea NOT NULL,
    require_message_authenticator boolean NOT NULL DEFAULT true,
    coa_port        integer NOT NULL DEFAULT 3799 CHECK (coa_port BETWEEN 1 AND 65535),
    disconnect_mode text NOT NULL DEFAULT 'disconnect' CHECK (disconnect_mode IN ('disconnect', 'coa')),
    -- CoA mode: reply attributes that move a session to the blocked profile
    blocked_profile jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE radius_pools (
    id      bigserial PRIMARY KEY,
    name    text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    first   inet NOT NULL,
    last    inet NOT NULL,
    CHECK (family(first) = 4 AND family(last) = 4 AND first <= last AND last - first < 1048576)
);

-- A service link: the account's RADIUS login.  price_per_hour > 0 makes it
-- time-based (charged from Acct-Session-Time, refused when no time is left).
CREATE TABLE radius_links (
    id               bigserial PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts(id),
    login            text NOT NULL UNIQUE CHECK (length(login) BETWEEN 1 AND 253),
    password_enc     bytea NOT NULL,
    static_ip        inet UNIQUE CHECK (static_ip IS NULL OR family(static_ip) = 4),
    pool_id          bigint REFERENCES radius_pools(id),
    max_sessions     integer NOT NULL DEFAULT 1 CHECK (max_sessions > 0),
    price_per_hour   bigint NOT NULL DEFAULT 0 CHECK (price_per_hour BETWEEN 0 AND 999999999999),
    session_limit    integer CHECK (session_limit > 0),
    interim_interval integer NOT NULL DEFAULT 300 CHECK (interim_interval BETWEEN 60 AND 86400),
    rate_limit       text NOT NULL DEFAULT '',          -- Mikrotik-Rate-Limit syntax, '' = none
    cisco_avpairs    text[] NOT NULL DEFAULT '{}',
    disabled         boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (static_ip IS NULL OR pool_id IS NULL)
);
CREATE INDEX radius_links_account ON radius_links(account_id);

-- Pool addresses handed out: one row per address, so two links can never
-- get the same one (the primary key).  A lease not taken up by a session
-- Start expires at expires_at; while a session uses it, expires_at is NULL.
CREATE TABLE radius_leases (
    address    inet PRIMARY KEY,
    pool_id    bigint NOT NULL REFERENCES radius_pools(id) ON DELETE CASCADE,
    link_id    bigint NOT NULL REFERENCES radius_links(id) ON DELETE CASCADE,
    expires_at timestamptz
);
CREATE INDEX radius_leases_link ON radius_leases(link_id);

CREATE TABLE radius_sessions (
    id              bigserial PRIMARY KEY,
    nas_id          bigint NOT NULL REFERENCES radius_nas(id) ON DELETE CASCADE,
    session_id      text NOT NULL CHECK (length(session_id) BETWEEN 1 AND 253),
    account_id      bigint NOT NULL REFERENCES accounts(id),
    link_id         bigint NOT NULL REFERENCES radius_links(id) ON DELETE CASCADE,
    login           text NOT NULL,
    framed_ip       inet,
    nas_port_id     text,
    calling_station text,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    ended_at        timestamptz,
    end_reason      text,
    session_time    bigint NOT NULL DEFAULT 0 CHECK (session_time >= 0),
    input_octets    bigint NOT NULL DEFAULT 0 CHECK (input_octets >= 0),
    output_octets   bigint NOT NULL DEFAULT 0 CHECK (output_octets >= 0),
    charged         bigint NOT NULL DEFAULT 0 CHECK (charged >= 0),   -- micro-units booked so far
    UNIQUE (nas_id, session_id)
);
CREATE INDEX radius_sessions_active ON radius_sessions(account_id) WHERE ended_at IS NULL;
CREATE INDEX radius_sessions_stale ON radius_sessions(updated_at) WHERE ended_at IS NULL;
-- authorization counts a link's active sessions
CREATE INDEX radius_sessions_link_active ON radius_sessions(link_id) WHERE ended_at IS NULL;

-- One row per time charge booked: (session, Acct-Session-Time it was booked
-- at).  With the ledger's idempotency key it makes a retransmitted or
-- replayed Interim/Stop a no-op.
CREATE TABLE radius_time_charges (
    session_pk    bigint NOT NULL REFERENCES radius_sessions(id) ON DELETE CASCADE,
    session_time  bigint NOT NULL,
    account_id    bigint NOT NULL REFERENCES accounts(id),
    amount        bigint NOT NULL CHECK (amount > 0),
    ledger_id     bigint REFERENCES ledger(id),
    at            timestamptz NOT NULL,
    PRIMARY KEY (session_pk, session_time)
);
