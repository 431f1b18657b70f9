-- Every change to IP bindings, traffic classes or rules -- made by an admin
-- call, by RADIUS accounting, by an import or by hand in psql -- tells the
-- core at commit (NOTIFY is transactional), and the core publishes the URFA
-- event `classifier` that makes the NetFlow workers reload their snapshot.
CREATE OR REPLACE FUNCTION classifier_bump() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE classifier_version SET version = version + 1 RETURNING version INTO v;
    PERFORM pg_notify('billcore_classifier', v::text);
    RETURN NULL;
END $$;
