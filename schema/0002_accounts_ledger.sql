-- Accounts, the append-only ledger, payments, promised payments, blocks and
-- the audit log.
--
-- Money is BIGINT micro-units (1 = 10^-6 of the currency), never a float.
-- accounts.balance is a cache of sum(ledger.amount) for the account, kept in
-- the same transaction as every ledger insert; ledger.balance_after is the
-- running balance after each row, so an edited amount breaks the chain and
-- `billcore verify` sees it even if the no-UPDATE trigger was dropped.
-- Every large table carries account_id (distribution key for Citus).

CREATE TABLE accounts (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users(id),
    is_basic    boolean NOT NULL DEFAULT false,
    balance     bigint NOT NULL DEFAULT 0
                CHECK (balance BETWEEN -999999999999999999 AND 999999999999999999),
    credit      bigint NOT NULL DEFAULT 0 CHECK (credit BETWEEN 0 AND 999999999999999999),
    vat_bp      integer NOT NULL DEFAULT 0 CHECK (vat_bp BETWEEN 0 AND 10000),
    unlimited   boolean NOT NULL DEFAULT false,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'closed')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_user ON accounts(user_id);
CREATE UNIQUE INDEX accounts_one_basic ON accounts(user_id) WHERE is_basic;

CREATE TABLE ledger (
    id            bigserial PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts(id),
    amount        bigint NOT NULL CHECK (amount <> 0),
    balance_after bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN (
                      'payment', 'payment_cancel', 'charge', 'charge_reversal',
                      'periodic', 'traffic', 'correction')),
    reference     text NOT NULL DEFAULT '',
    idem_key      text NOT NULL UNIQUE CHECK (length(idem_key) BETWEEN 1 AND 256),
    reverses      bigint UNIQUE REFERENCES ledger(id),
    actor         text NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE INDEX ledger_account ON ledger(account_id, id);

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are append-only: % refused (write a reversal row)', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

CREATE TABLE payments (
    id            bigserial PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts(id),
    amount        bigint NOT NULL CHECK (amount <> 0),
    method        text NOT NULL CHECK (method IN (
                      'cash', 'bank', 'card', 'credit', 'correction', 'voucher', 'online')),
    comment       text NOT NULL DEFAULT '',
    operator      text NOT NULL,
    external_id   text UNIQUE CHECK (length(external_id) BETWEEN 1 AND 128),
    created_at    timestamptz NOT NULL,
    ledger_id     bigint REFERENCES ledger(id),
    cancelled_at  timestamptz,
    cancelled_by  text,
    cancel_reason text,
    cancel_ledger_id bigint REFERENCES ledger(id),
    CHECK (amount > 0 OR method = 'correction'),
    CHECK ((cancelled_at IS NULL) = (cancel_ledger_id IS NULL))
);
CREATE INDEX payments_account ON payments(account_id, id);

-- A promised payment is temporary extra credit, not money: it never enters
-- the ledger.  Active while closed_at IS NULL and expires_at > now.
CREATE TABLE promised_payments (
    id           bigserial PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts(id),
    amount       bigint NOT NULL CHECK (amount > 0),
    period       date NOT NULL,            -- first day of the month it was taken in
    taken_at     timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    taken_by     text NOT NULL,
    closed_at    timestamptz,
    closed_why   text CHECK (closed_why IN ('expired', 'covered')),
    UNIQUE (account_id, period),
    CHECK ((closed_at IS NULL) = (closed_why IS NULL))
);
CREATE INDEX promised_open ON promised_payments(expires_at) WHERE closed_at IS NULL;

CREATE TABLE blocks (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    kind        text NOT NULL CHECK (kind IN ('admin', 'user', 'system')),
    reason      text NOT NULL DEFAULT '',
    set_at      timestamptz NOT NULL,
    set_by      text NOT NULL,
    lifted_at   timestamptz,
    lifted_by   text,
    CHECK ((lifted_at IS NULL) = (lifted_by IS NULL))
);
CREATE UNIQUE INDEX blocks_one_active ON blocks(account_id, kind) WHERE lifted_at IS NULL;
CREATE INDEX blocks_account ON blocks(account_id, id);

CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL,
    principal_kind  text NOT NULL,
    principal_id    bigint NOT NULL,
    principal_login text NOT NULL,
    ip              text NOT NULL,
    action          text NOT NULL,
    object          text NOT NULL,
    before          jsonb,
    after           jsonb
);
CREATE INDEX audit_object ON audit_log(object, id);
CREATE INDEX audit_at ON audit_log(at);

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log rows are append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
