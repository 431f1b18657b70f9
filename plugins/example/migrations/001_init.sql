-- Runs once, in this plugin's own schema (plugin_<name>).
CREATE TABLE seen_payments (
    external_id text PRIMARY KEY,
    account_id  bigint NOT NULL,
    amount      bigint NOT NULL
);
