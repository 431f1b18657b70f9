"""The RADIUS domain on the core's side: every rule behind the calls the
radius process (and operators) make.

The radius process (top-level ``radius/``, the pyrad edge) holds no billing
state: it turns datagrams into ``radius.authorize`` and ``radius.accounting``
calls (``billcore.api.radius``) and sends back what these return.  The
decisions live here, next to the database, one module per job:

* ``records``    — the values: requests, decisions, rows, and the string
  families of the wire as enums;
* ``secrets``    — ``SecretStore``, sealing NAS secrets and service passwords;
* ``nas``        — the NAS table, IP pools and subscribers' links;
* ``authorize``  — deciding Access-Requests, a batch at a time;
* ``timewalk``   — the seconds the money left pays for, across time ranges;
* ``accounting`` — applying Accounting-Requests and charging session time;
* ``sessions``   — ending sessions, the stale sweep, the active list.

Every write runs in the caller's transaction; block changes caused by a
charge are announced by the caller after it commits.  Nothing here registers
URFA calls, and the edge never imports this package.
"""
