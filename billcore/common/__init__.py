"""The shared kernel: pure, stdlib-only modules that the core, the edges and the tools all use.

Configuration (``config``), the log line format (``log``), money in integer
micro-units and its errors (``money``, ``errors``), the system-login
password file convention (``sysfiles``) and the raw flow store's layout
(``rawflows``).  Nothing here touches the database or the network, so an
edge (netflow, radius, portal) may import it without importing the core;
``tests/test_layers.py`` keeps it that way.
"""
