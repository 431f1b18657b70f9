-- Operator look-ups that stay fast at a million subscribers (issue 24).
--
-- Substring search ("part of a login, a name, a phone, a contract number")
-- needs a trigram index.  pg_trgm would be the usual answer, but the
-- embedded server billcore starts by default (the pgserver package) ships
-- no contrib extensions — only plpgsql — so CREATE EXTENSION pg_trgm fails
-- there, while Debian's postgresql-contrib has it.  The same idea works
-- with nothing but built-ins: billcore_grams() turns a text into the set of
-- its lower-cased 3-character substrings, and a GIN index over that array
-- (the built-in array_ops) finds the rows holding every trigram of the
-- search text.  The query then re-checks the exact ILIKE per column, so the
-- index only narrows; results are exactly what the plain scan returned.
-- Searches shorter than 3 characters have no trigram and scan; they are
-- capped by the caller.

-- plpgsql, not SQL: its plan is cached per session, so a row costs ~0.05 ms
-- instead of ~0.7 (the index build over a million users: minutes, not a
-- quarter of an hour).  The text is split into characters once: substr()
-- on UTF-8 walks from the start each time.  Duplicates stay in the array:
-- GIN keeps each key once per row anyway.
-- COST: evaluating it on every row is what the index saves; said so, the
-- planner stops preferring a walk of the primary key that filters each row.
CREATE FUNCTION billcore_grams(t text) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE COST 1000 AS $$
DECLARE
    ch text[] := regexp_split_to_array(lower(t), '');
    n integer := cardinality(ch) - 2;
    grams text[] := array_fill(''::text, ARRAY[greatest(n, 0)]);
BEGIN
    FOR i IN 1 .. n LOOP
        grams[i] := ch[i] || ch[i + 1] || ch[i + 2];
    END LOOP;
    RETURN grams;
END $$;

-- Every contact field an operator types a part of; U+001F between fields, so
-- a trigram spanning two fields is one no search text of theirs contains.
-- "public." because pg_restore rebuilds the index with an empty search_path
-- (billcore's tables live in public: backup and restore assume it too).
CREATE FUNCTION billcore_user_grams(login text, full_name text, email text, phone text, address text,
                                    external_id text) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT public.billcore_grams(login || chr(31) || full_name || chr(31) || email || chr(31) || phone
                          || chr(31) || address || chr(31) || coalesce(external_id, ''))
$$;

CREATE INDEX users_search_grams ON users
    USING gin (billcore_user_grams(login, full_name, email, phone, address, external_id));

-- Reports by period (reports.charges, reports.revenue) select usage counters
-- by period start: without an index, every month's report reads every
-- month's counters.
CREATE INDEX usage_counters_period ON usage_counters(period_start);

-- reports.traffic selects a range of days from a year of daily usage (365
-- rows per account: 365 M at a million subscribers).  Rows arrive day by
-- day, so the table is in day order and a BRIN index — a few pages, not the
-- gigabytes a B-tree over every row would take — skips all other days.
CREATE INDEX usage_daily_day ON usage_daily USING brin (day);
