-- Payment gateways (issue 18): a payment booked by a gateway's signed callback carries the
-- method 'gateway:<name>' (the gateway as configured in [[paygate.gateways]]), so a report can
-- tell one gateway's money from another's. The other methods stay as they were.
ALTER TABLE payments DROP CONSTRAINT payments_method_check;
ALTER TABLE payments ADD CONSTRAINT payments_method_check CHECK (
    method IN ('cash', 'bank', 'card', 'credit', 'correction', 'voucher', 'online')
    OR method ~ '^gateway:[A-Za-z0-9_-]{1,32}$');
