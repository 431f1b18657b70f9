"""Errors of the NetFlow subsystem.

Every failure that the netflow package raises is a `NetflowError`. Decoders of
outside bytes raise only `DecodeError` (the exporter sent something we cannot
read) or its subclasses; the batch decoders never raise for bad input at all,
they count it. `JournalError` covers the on-disk packet journal, and
`ClassifierError` a snapshot that breaks the classifier's invariants (which is
our own side's mistake, not the exporter's).

Data that arrives before its template is not an error: it is normal on UDP
and is returned as `flows.Pending`, to be decoded once the template arrives.
"""

from __future__ import annotations


class NetflowError(Exception):
    """Root of every error raised by the netflow package."""


class DecodeError(NetflowError):
    """An exporter sent bytes that are not a valid v5/v9/IPFIX message."""


class UnsupportedVersion(DecodeError):
    """The version field names a format we do not decode."""


class TemplateError(DecodeError):
    """A template or options template record is malformed or over a limit."""


class JournalError(NetflowError):
    """The packet journal cannot be written or read as promised."""


class JournalCorrupt(JournalError):
    """A record that is not the torn tail of the last segment fails its CRC."""


class JournalFull(JournalError):
    """The journal's volume is full (ENOSPC): the record was not written, and nothing torn is left."""


class ClassifierError(NetflowError):
    """A classifier snapshot violates its invariants (e.g. overlapping bindings)."""
