-- Look-ups of the operators' console (issue 16) that stay fast at a million
-- subscribers.
--
-- Building an index reads the whole table: at a million subscribers and a
-- year of sessions, each statement below takes minutes during the upgrade
-- (the core waits for its migrations before it serves).  Plan the upgrade
-- for a quiet hour.

-- radius.history: an account's sessions, newest first.  The only index on
-- radius_sessions.account_id so far is the partial one over open sessions,
-- so a card's history read every session ever recorded (tens of millions of
-- rows after a year) to find one account's.
CREATE INDEX radius_sessions_account_started ON radius_sessions(account_id, started_at DESC, id DESC);
