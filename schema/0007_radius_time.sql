-- RADIUS time charging moves to the tariff engine.
--
-- Until now a RADIUS link was time-based when its own price_per_hour was
-- above zero, and accounting booked floor(seconds × price / 3600) per
-- session through the ledger, recorded in radius_time_charges.  From here
-- on an account's time is priced by the time service of its tariff
-- (services kind 'time', service_rates per time range, session_limit,
-- max_sessions; schema 0003): Interim/Stop commit the session's new seconds
-- with billcore.billing.usage.commit_usage, source
-- 'radius:<nas id>:<Acct-Session-Id>' and the Acct-Session-Time as the
-- watermark, so usage_counters, usage_daily and the ledger hold the charge.
--
-- price_per_hour is dropped rather than kept as a fallback: two pricing
-- paths for the same seconds would disagree (day/night ranges, periods,
-- prepaid time) and one of them would be the one nobody tests.  A link that
-- still has a price is not silently made free: the migration stops, and
-- the operator first gives those accounts a tariff with a time service and
-- sets the link's price to 0 (radius.link_edit) with the old version.
DO $$
DECLARE
    priced bigint;
BEGIN
    SELECT count(*) INTO priced FROM radius_links WHERE price_per_hour > 0;
    IF priced > 0 THEN
        RAISE EXCEPTION '% RADIUS link(s) still have price_per_hour > 0: give their accounts a tariff with a time service and set the links'' price to 0 before upgrading', priced
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END $$;

ALTER TABLE radius_links DROP COLUMN price_per_hour;

-- The old per-session booking log.  Every amount it recorded is a ledger row
-- (idempotency key 'radius:<session pk>:<session time>', reference
-- 'time <Acct-Session-Id>'), which stays; nothing writes this table any more.
DROP TABLE radius_time_charges;

-- radius_sessions.charged stays: the micro-units booked for the session so
-- far (the sum of its commit_usage charges), shown to the subscriber.
COMMENT ON COLUMN radius_sessions.charged IS
    'micro-units booked for this session through its time service (commit_usage), cumulative';
