-- Documents (issue 17): invoices and credit notes, their lines and their
-- gapless numbering.
--
-- An invoice covers one account over [period_start, period_end): its lines
-- are the ledger's charge rows created in that range (kinds periodic,
-- traffic, charge, charge_reversal; a credit note's own ledger row is not
-- one), grouped by what they charge for (ledger_charge_of below), so that
-- an invoice's total is exactly minus the sum of those ledger rows.
-- Payments, their cancellations and corrections are not invoiced: a
-- statement shows them.
--
-- An account's invoices form a chain: invoicing.invoiced_until is the end
-- of its latest invoice, the next one starts there, and no two invoices of
-- an account overlap (the exclusion constraint).  Issued documents are
-- never updated or deleted (the trigger); a correction is a credit note
-- that references the invoice and credits the account in the ledger with
-- one charge_reversal row (idem_key 'credit_note:<id>').
--
-- Numbers are sequential per (series, year) with no gap and no duplicate:
-- invoice_series.last_no is moved in the transaction that inserts the
-- documents, so a rollback (a core killed mid-run) takes the numbers back
-- with the documents, and the row lock orders concurrent issuers.
--
-- VAT: accounts.vat_bp basis points, the amounts in the ledger include it.
-- A line's VAT is total * vat_bp / (10000 + vat_bp) rounded half away from
-- zero to a micro-unit; net = total - vat; a document's figures are the
-- sums of its lines' (docs/documents.md).

CREATE TABLE invoice_series (
    series   text    NOT NULL CHECK (series ~ '^[A-Z0-9]{1,12}$'),
    year     integer NOT NULL CHECK (year BETWEEN 2000 AND 9999),
    last_no  bigint  NOT NULL DEFAULT 0 CHECK (last_no >= 0),
    PRIMARY KEY (series, year)
);

CREATE TABLE invoices (
    id            bigserial PRIMARY KEY,
    kind          text    NOT NULL CHECK (kind IN ('invoice', 'credit_note')),
    series        text    NOT NULL,
    year          integer NOT NULL,
    number        bigint  NOT NULL CHECK (number > 0),
    account_id    bigint  NOT NULL REFERENCES accounts(id),
    period_start  timestamptz NOT NULL,
    period_end    timestamptz NOT NULL,
    credits       bigint  REFERENCES invoices(id),      -- a credit note: the invoice it corrects
    ledger_id     bigint  UNIQUE REFERENCES ledger(id), -- a credit note: its charge_reversal row
    issued_at     timestamptz NOT NULL,
    issued_by     text    NOT NULL,
    vat_bp        integer NOT NULL CHECK (vat_bp BETWEEN 0 AND 10000),
    net           bigint  NOT NULL,
    vat           bigint  NOT NULL,
    total         bigint  NOT NULL,                     -- invoice: what was charged; credit note: negative
    reason        text    NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    customer      jsonb   NOT NULL,                     -- the subscriber as at issue: login, full_name, address
    FOREIGN KEY (series, year) REFERENCES invoice_series(series, year),
    UNIQUE (series, year, number),
    CHECK (period_end > period_start),
    CHECK ((kind = 'credit_note') = (credits IS NOT NULL)),
    CHECK ((kind = 'credit_note') = (ledger_id IS NOT NULL)),
    CHECK (total = net + vat),
    CHECK (kind = 'invoice' OR total < 0),
    EXCLUDE USING gist (int8range(account_id, account_id, '[]') WITH &&,
                        tstzrange(period_start, period_end) WITH &&) WHERE (kind = 'invoice')
);
CREATE INDEX invoices_account ON invoices(account_id, period_start);
CREATE INDEX invoices_issued ON invoices(issued_at);
CREATE INDEX invoices_credits ON invoices(credits) WHERE credits IS NOT NULL;

-- line_kind: periodic | traffic | time | once | other.  service_id and
-- class_id as ledger_charge_of gives them (NULL when the row does not say);
-- description is the service's (and class's) name at issue.  A credit
-- note's line credits line_no of the invoice it corrects (same numbers).
CREATE TABLE invoice_lines (
    invoice_id   bigint  NOT NULL REFERENCES invoices(id),
    line_no      integer NOT NULL CHECK (line_no > 0),
    line_kind    text    NOT NULL CHECK (line_kind IN ('periodic', 'traffic', 'time', 'once', 'other')),
    service_id   bigint,
    class_id     bigint,
    description  text    NOT NULL,
    quantity     bigint,                                -- bytes (traffic) or seconds (time), when known
    net          bigint  NOT NULL,
    vat          bigint  NOT NULL,
    total        bigint  NOT NULL,
    PRIMARY KEY (invoice_id, line_no),
    CHECK (total = net + vat)
);

-- The end of each account's latest invoice: where its next one starts.
CREATE TABLE invoicing (
    account_id      bigint PRIMARY KEY REFERENCES accounts(id),
    invoiced_until  timestamptz NOT NULL
);

CREATE FUNCTION documents_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'issued documents are immutable: % refused (issue a credit note)', TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();

-- What a ledger row charges for, read from its idempotency key (the key
-- formats are billcore.billing.usage._usage_keys, scheduler._periodic_key
-- and the once-off key; tests/test_invoices.py pins them):
--   usage:<source>:<mark>:<account>:<service>:<class>:<range>:<epoch>
--   periodic:<account>:<service>:<epoch>:r<revision>
--   once:<account>:<service>:<link>
-- A key of no such shape (a hashed usage key, an imported row) charges for
-- "other": no service, no class.  Time usage has class -1: no class.
CREATE FUNCTION ledger_charge_kind(kind text, idem_key text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN kind = 'periodic' THEN 'periodic'
        WHEN kind = 'traffic' THEN 'traffic'
        WHEN kind = 'charge' AND idem_key ~ '^once:[0-9]+:[0-9]+:[0-9]+$' THEN 'once'
        WHEN kind = 'charge' AND idem_key ~ '^usage:.+:-?[0-9]+:[0-9]+:[0-9]+:-1:[0-9]+:-?[0-9]+$' THEN 'time'
        ELSE 'other' END
$$;

CREATE FUNCTION ledger_charge_service(kind text, idem_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN kind IN ('traffic', 'charge') AND idem_key ~ '^usage:.+:-?[0-9]+:[0-9]+:[0-9]{1,18}:-?[0-9]+:[0-9]+:-?[0-9]+$'
            THEN split_part(idem_key, ':', -4)::bigint
        WHEN kind = 'periodic' AND idem_key ~ '^periodic:[0-9]+:[0-9]{1,18}:-?[0-9]+:r[0-9]+$'
            THEN split_part(idem_key, ':', 3)::bigint
        WHEN kind = 'charge' AND idem_key ~ '^once:[0-9]+:[0-9]{1,18}:[0-9]+$'
            THEN split_part(idem_key, ':', 3)::bigint
        ELSE NULL END
$$;

CREATE FUNCTION ledger_charge_class(kind text, idem_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN kind = 'traffic' AND idem_key ~ '^usage:.+:-?[0-9]+:[0-9]+:[0-9]+:[0-9]{1,18}:[0-9]+:-?[0-9]+$'
            THEN split_part(idem_key, ':', -3)::bigint
        ELSE NULL END
$$;

-- An account's ledger rows by time: invoices and statements read ranges.
CREATE INDEX ledger_account_time ON ledger(account_id, created_at);

-- Rights: invoices.read (every "*.read" has it), invoices.write (issue,
-- credit, run); accountants read everything money and issue documents.
INSERT INTO admin_groups(name, rights, description) VALUES
    ('accountants', '{invoices.*,reports.read,payments.read,users.read,accounts.read,tariffs.read}',
     'Invoices, credit notes, statements, exports and reports')
ON CONFLICT (name) DO NOTHING;
