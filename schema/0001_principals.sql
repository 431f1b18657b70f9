-- Who may log in over URFA: administrators (with permission groups),
-- services (system logins: radius, netflow workers, the web office) and
-- subscribers (users). Only SCRAM-SHA-256 verifiers are stored: salt,
-- iteration count, StoredKey and ServerKey; never a password.

CREATE TABLE admin_groups (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    rights      text[] NOT NULL DEFAULT '{}',
    description text NOT NULL DEFAULT ''
);

CREATE TABLE admins (
    id               bigserial PRIMARY KEY,
    login            text NOT NULL UNIQUE CHECK (length(login) BETWEEN 1 AND 128),
    full_name        text NOT NULL DEFAULT '',
    scram_salt       bytea NOT NULL,
    scram_iterations integer NOT NULL CHECK (scram_iterations >= 4096),
    scram_stored_key bytea NOT NULL,
    scram_server_key bytea NOT NULL,
    disabled         boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE admin_group_members (
    admin_id bigint NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
    group_id bigint NOT NULL REFERENCES admin_groups(id) ON DELETE CASCADE,
    PRIMARY KEY (admin_id, group_id)
);

CREATE TABLE system_logins (
    id               bigserial PRIMARY KEY,
    login            text NOT NULL UNIQUE CHECK (length(login) BETWEEN 1 AND 128),
    rights           text[] NOT NULL DEFAULT '{}',
    scram_salt       bytea NOT NULL,
    scram_iterations integer NOT NULL CHECK (scram_iterations >= 4096),
    scram_stored_key bytea NOT NULL,
    scram_server_key bytea NOT NULL,
    disabled         boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Subscribers. Their accounts, ledger and blocks come in later migrations.
CREATE TABLE users (
    id               bigserial PRIMARY KEY,
    login            text NOT NULL UNIQUE CHECK (length(login) BETWEEN 1 AND 128),
    full_name        text NOT NULL DEFAULT '',
    email            text NOT NULL DEFAULT '',
    phone            text NOT NULL DEFAULT '',
    address          text NOT NULL DEFAULT '',
    external_id      text UNIQUE,
    scram_salt       bytea NOT NULL,
    scram_iterations integer NOT NULL CHECK (scram_iterations >= 4096),
    scram_stored_key bytea NOT NULL,
    scram_server_key bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);

INSERT INTO admin_groups(name, rights, description) VALUES
    ('superusers', '{*}', 'Every right, present and future'),
    ('cashiers', '{payments.*,users.read,accounts.read}', 'Take and cancel payments; read subscribers');
