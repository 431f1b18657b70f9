-- API tokens (issue 22): bearer credentials for the HTTP/JSON API.
--
-- A token acts as a narrow operator: its rights are the union of the rights
-- of its admin groups, read at each token login (so a group's new rights
-- reach a token's next session, as an operator's).  Only the SHA-256 of the
-- token's secret is kept: the token (bct_ + 43 urlsafe-base64 characters,
-- 256 random bits) is shown once, by tokens.create, and a hash of 256
-- random bits cannot be guessed back.  A token is never deleted, only
-- revoked: the audit log names it, and the name stays taken.
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    groups       text[] NOT NULL CHECK (cardinality(groups) BETWEEN 1 AND 64),
    secret_hash  bytea NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    CHECK (expires_at IS NULL OR expires_at > created_at)
);
