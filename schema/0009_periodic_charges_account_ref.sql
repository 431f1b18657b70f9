-- periodic_charges.account_id keeps every guarantee of its foreign key, but
-- is checked once per statement instead of once per row: a monthly run
-- inserts one row per account, and the per-row RI query was ~7 % of a
-- 1M-account run.  (service_id keeps its ordinary foreign key.)
--
-- * Insert: the referenced accounts are locked FOR KEY SHARE, as the RI
--   check locks them (a concurrent DELETE or key change waits for us), and
--   each must exist, else foreign_key_violation (23503).
-- * The account of a periodic charge never changes (refused).
-- * Deleting or re-keying an account that a periodic charge refers to is a
--   foreign_key_violation, checked after the row changed (after waiting for
--   any inserter holding its KEY SHARE lock), as the RI action trigger does.
--   Every periodic charge is written with a ledger row of the same account
--   in the same transaction, so the ledger's own foreign key backs this up.
ALTER TABLE periodic_charges DROP CONSTRAINT periodic_charges_account_id_fkey;

CREATE FUNCTION periodic_charges_account_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    locked bigint;
    missing bigint;
BEGIN
    SELECT array_agg(DISTINCT account_id ORDER BY account_id) INTO ids FROM new_rows;
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    -- = ANY with the BETWEEN bounds: an index range scan, never the whole table
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM accounts a WHERE a.id = ANY (ids) AND a.id BETWEEN ids[1] AND ids[cardinality(ids)]
        ORDER BY a.id FOR KEY SHARE OF a) l;
    IF locked <> cardinality(ids) THEN
        SELECT i INTO missing FROM unnest(ids) AS i WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = i) LIMIT 1;
        RAISE foreign_key_violation USING
            MESSAGE = format('insert into periodic_charges: account %s does not exist', missing),
            TABLE = 'periodic_charges', CONSTRAINT = 'periodic_charges_account_check';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER periodic_charges_account_check AFTER INSERT ON periodic_charges
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION periodic_charges_account_check();

CREATE FUNCTION periodic_charges_account_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE foreign_key_violation USING
        MESSAGE = format('periodic_charges: the account of a periodic charge never changes (%s)', OLD.account_id),
        TABLE = 'periodic_charges', CONSTRAINT = 'periodic_charges_account_check';
END $$;

CREATE TRIGGER periodic_charges_account_fixed BEFORE UPDATE OF account_id ON periodic_charges
    FOR EACH ROW WHEN (OLD.account_id IS DISTINCT FROM NEW.account_id)
    EXECUTE FUNCTION periodic_charges_account_fixed();

CREATE FUNCTION periodic_charges_account_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM periodic_charges p WHERE p.account_id = OLD.id) THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('account %s is still referenced from periodic_charges', OLD.id),
            TABLE = 'accounts', CONSTRAINT = 'periodic_charges_account_check';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER periodic_charges_account_deleted AFTER DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION periodic_charges_account_kept();
CREATE TRIGGER periodic_charges_account_rekeyed AFTER UPDATE OF id ON accounts
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION periodic_charges_account_kept();
