-- The outbox's operator rights (issue 18): outbox.read (stats, list) is
-- already in every "*.read"; support may also retry dead deliveries
-- (outbox.write), as it may block, unblock and disconnect.  superusers hold "*".
UPDATE admin_groups SET rights = rights || '{outbox.write}'::text[]
 WHERE name = 'support' AND NOT ('outbox.write' = ANY(rights));
