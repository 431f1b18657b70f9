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

-- subscribers.search by tariff: the accounts on a tariff now, in account id
-- order, from the index alone (the validity columns ride along), so a
-- search that starts from a small tariff reads its accounts in the order it
-- shows them and stops after a page.  It replaces account_tariffs_tariff
-- (its leading column serves the same look-ups: deleting a tariff checks
-- for links).  Tariff links change rarely: a wider index costs little.
CREATE INDEX account_tariffs_tariff_account ON account_tariffs(tariff_id, account_id) INCLUDE (valid_from, valid_to);
DROP INDEX account_tariffs_tariff;
