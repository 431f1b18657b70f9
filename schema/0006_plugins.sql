-- Plugins: the no-rollback record.  The highest version of each plugin this
-- installation has ever loaded; a plugin older than its row is refused
-- (billcore/plugins/versions.py).  It lives in the database, not in the
-- core's state directory, so a restored backup still refuses old versions.
-- Deleting a row is how an operator deliberately re-allows an old version.

CREATE TABLE plugin_versions (
    name      text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,31}$'),
    version   text NOT NULL CHECK (version ~ '^[0-9]+(\.[0-9]+)*$'),
    signer    text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);
