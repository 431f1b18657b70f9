"""The command-line URFA clients: ``billctl`` (administrators) and ``billcore-tray`` (subscribers).

They are edges like any other: they talk to the core only through the URFA
link in ``urfa/``.
"""
