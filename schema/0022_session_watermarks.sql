-- Issue 19, "Every second charged": a RADIUS session's charged seconds live on
-- its own row, so its ingest_watermarks row can go when the session ends.
--
-- radius_sessions.charged_time: the Acct-Session-Time up to which the session's
-- time is committed (commit_usage).  While the session is open its
-- ingest_watermarks row ('radius:<nas id>:<Acct-Session-Id>') holds the same
-- value; every path that ends a session deletes that row in the same
-- transaction, and a late Interim/Stop of the ended session charges only the
-- seconds above charged_time (billcore.radius.accounting).
ALTER TABLE radius_sessions ADD COLUMN charged_time bigint NOT NULL DEFAULT 0 CHECK (charged_time >= 0);
COMMENT ON COLUMN radius_sessions.charged_time IS
    'Acct-Session-Time up to which this session''s time is committed (its watermark once it ended)';

-- the source name of billcore.radius.accounting.usage_source
CREATE FUNCTION pg_temp.radius_source(nas_id bigint, session_id text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length('radius:' || nas_id || ':' || session_id) <= 128
                THEN 'radius:' || nas_id || ':' || session_id
                ELSE 'radius:' || nas_id || ':sha256:' || encode(sha256(convert_to(session_id, 'UTF8')), 'hex') END
$$;

UPDATE radius_sessions s SET charged_time = w.watermark FROM ingest_watermarks w
 WHERE w.watermark > 0 AND w.source = pg_temp.radius_source(s.nas_id, s.session_id);

-- the rows of sessions that ended are not needed any more
DELETE FROM ingest_watermarks w USING radius_sessions s
 WHERE s.ended_at IS NOT NULL AND w.source = pg_temp.radius_source(s.nas_id, s.session_id);

-- the rows left (sessions deleted with their link, before this migration) are
-- pruned by the stale sweep once older than the horizon: it finds them by age
CREATE INDEX ingest_watermarks_radius_age ON ingest_watermarks(updated_at) WHERE source LIKE 'radius:%';
DROP FUNCTION pg_temp.radius_source(bigint, text);
