"""Operating billcore: backup and restore, import from another billing
system, operator checks beyond the ledger's, and the metrics they add.

The commands are registered through ``billcore.ops.cli.add_commands``.
"""
