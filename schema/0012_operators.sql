-- Operators (issue 16): role templates, a TOTP second factor, recovery codes.
--
-- Role templates are admin_groups rows; an operator's rights are the union of
-- their groups' rights (billcore.server.principals).  Rights match as in
-- billcore.server.calls.allows: "*" is everything, "payments.*" every right
-- under "payments.", "*.read" every right whose last part is "read".

UPDATE admin_groups SET description = 'Find subscribers; take, cancel and promise payments'
 WHERE name = 'cashiers';

INSERT INTO admin_groups(name, rights, description) VALUES
    ('support', '{*.read,blocks.write,radius.disconnect,users.password,sys.health}',
     'Read everything; block and unblock; disconnect sessions; reset a subscriber''s password'),
    ('tariff_managers', '{tariffs.*,reports.read,users.read,accounts.read}',
     'Services, tariffs, traffic classes and time ranges; reports; read subscribers')
ON CONFLICT (name) DO NOTHING;

-- users.set_password needs its own right now (users.password), so support may
-- reset a password without creating users; a group made by hand that could
-- write users keeps that power ("*" and "users.*" already cover it).
UPDATE admin_groups SET rights = rights || '{users.password}'::text[]
 WHERE 'users.write' = ANY(rights) AND NOT ('users.password' = ANY(rights));

-- The second factor.  otp_secret is the shared TOTP secret (the core must
-- read it to check a code: it cannot be hashed); otp_last_step is the RFC 6238
-- time step of the last code accepted, so a code counts once.  While an
-- operator enrolls, the new secret waits in otp_pending_secret until they
-- prove their app has it (self.otp_confirm).
ALTER TABLE admins
    ADD COLUMN otp_secret         bytea,
    ADD COLUMN otp_enrolled       boolean NOT NULL DEFAULT false,
    ADD COLUMN otp_last_step      bigint  NOT NULL DEFAULT 0,
    ADD COLUMN otp_pending_secret bytea,
    ADD CONSTRAINT admins_otp_secret_when_enrolled CHECK (NOT otp_enrolled OR otp_secret IS NOT NULL);

-- Single-use recovery codes, stored as SHA-256 of the normalised code (each
-- code is 80 random bits, so a plain hash is not guessable).
CREATE TABLE admin_recovery_codes (
    admin_id   bigint NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
    code_hash  bytea  NOT NULL CHECK (length(code_hash) = 32),
    used_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (admin_id, code_hash)
);
