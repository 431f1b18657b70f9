-- Reports (issue 17): what reports.payments reads by time.
--
-- reports.payments takes the payments created in a range and the
-- cancellations made in it; without these it reads every payment ever
-- taken to answer for one day.  Payments are few next to ledger or usage
-- rows, so the indexes cost the cashier's insert next to nothing.  (The
-- revenue and traffic reports read usage_counters and usage_daily, whose
-- keys lead with the account; they are not indexed by time here on
-- purpose: those tables take every NetFlow batch, and a report is a
-- sequential scan an operator waits for once, while an index is paid on
-- every batch.)
CREATE INDEX payments_created ON payments(created_at);
CREATE INDEX payments_cancelled ON payments(cancelled_at) WHERE cancelled_at IS NOT NULL;
