-- One row per card.  The code itself is never stored: only its SHA-256,
-- so a database dump cannot be redeemed.
CREATE TABLE vouchers (
    serial      bigserial PRIMARY KEY,
    code_hash   bytea NOT NULL UNIQUE,
    amount      bigint NOT NULL CHECK (amount > 0),
    batch       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    redeemed_by bigint,
    redeemed_at timestamptz,
    credited_at timestamptz,
    payment_id  bigint,
    CHECK ((redeemed_by IS NULL) = (redeemed_at IS NULL)),
    CHECK (credited_at IS NULL OR redeemed_at IS NOT NULL)
);
CREATE INDEX vouchers_batch ON vouchers (batch, serial);
