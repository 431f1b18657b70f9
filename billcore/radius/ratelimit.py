"""Rate-limit attributes per NAS kind, from a rate profile (pure).

Theory of operation
-------------------
A *rate profile* (``rate_profiles``, schema 0017) is a speed — down and up
kbit/s, from the subscriber's point of view — plus what a NAS that cannot be
told numbers needs: Cisco policy-map names and a generic attribute list.
Each NAS kind (``radius_nas.kind``) is told a profile its own way:

* ``mikrotik`` — ``Mikrotik-Rate-Limit = "rx/tx"`` from the *router's* view:
  what the router receives from the subscriber (their upload) first, then
  what it sends (their download): 512 kbit/s up, 2 Mbit/s down is
  ``"512k/2M"``;
* ``cisco`` — ``Cisco-AVPair = "subscriber:sub-qos-policy-in=<in>"`` and
  ``"…-out=<out>"`` (ISG/IOS-XE policy maps configured on the router);
* ``generic`` — the profile's own ``[[attribute, value], …]`` list verbatim.

An Access-Accept does not know which kind of NAS asked (the request carries
no kind), so ``accept_attributes`` gives all three: every NAS ignores the
vendor attributes of another vendor.  A CoA is addressed to one NAS, so
``coa_attributes`` gives that kind's only.

Attribute names of a generic profile must exist in the dictionaries the
radius process loads (``radius/dictionaries``): ``check_attributes`` reads
their ATTRIBUTE lines once (a file read, no import of the edge).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from billcore.billing.ledger_errors import InvalidValue

__all__ = ["NAS_KINDS", "COA_NAK_ACTIONS", "RateProfile", "Attribute", "ProfileError", "mikrotik_rate",
           "coa_attributes", "link_attributes", "accept_attributes", "check_attributes", "known_attributes", "MAX_ATTRIBUTES"]

NAS_KINDS: Final = ("generic", "mikrotik", "cisco")
COA_NAK_ACTIONS: Final = ("disconnect", "none")
MAX_ATTRIBUTES: Final = 32
MAX_VALUE: Final = 253          # one RADIUS attribute's value
DICTIONARIES: Final = Path(__file__).resolve().parents[2] / "radius" / "dictionaries"

Attribute = tuple[str, str | int]


class ProfileError(InvalidValue):
    """A rate profile that cannot be sent to a NAS (unknown attribute, bad value): ``billing.invalid``."""


@dataclass(frozen=True, slots=True)
class RateProfile:
    id: int
    name: str
    down_kbps: int
    up_kbps: int
    cisco_in: str = ""
    cisco_out: str = ""
    attributes: tuple[Attribute, ...] = ()

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> RateProfile:
        attrs = row["attributes"]
        return cls(int(row["id"]), str(row["name"]), int(row["down_kbps"]), int(row["up_kbps"]),
                   str(row["cisco_in"]), str(row["cisco_out"]), tuple((str(a), v) for a, v in attrs))

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "down_kbps": self.down_kbps, "up_kbps": self.up_kbps,
                "cisco_in": self.cisco_in, "cisco_out": self.cisco_out,
                "attributes": [list(pair) for pair in self.attributes]}


def _rate(kbps: int) -> str:
    """kbit/s as RouterOS writes it: whole megabits as ``M``, else ``k``."""
    return f"{kbps // 1000}M" if kbps % 1000 == 0 else f"{kbps}k"


def mikrotik_rate(profile: RateProfile) -> str:
    """``Mikrotik-Rate-Limit``: rx/tx of the router = the subscriber's upload/download."""
    return f"{_rate(profile.up_kbps)}/{_rate(profile.down_kbps)}"


def _cisco(profile: RateProfile) -> list[Attribute]:
    out: list[Attribute] = []
    if profile.cisco_in:
        out.append(("Cisco-AVPair", f"subscriber:sub-qos-policy-in={profile.cisco_in}"))
    if profile.cisco_out:
        out.append(("Cisco-AVPair", f"subscriber:sub-qos-policy-out={profile.cisco_out}"))
    return out


def coa_attributes(kind: str, profile: RateProfile) -> list[Attribute]:
    """What a CoA-Request to a NAS of ``kind`` carries to apply ``profile``."""
    if kind == "mikrotik":
        return [("Mikrotik-Rate-Limit", mikrotik_rate(profile))]
    if kind == "cisco":
        return _cisco(profile)
    if kind == "generic":
        return list(profile.attributes)
    raise ProfileError(f"NAS kind must be one of {', '.join(NAS_KINDS)}")


def link_attributes(kind: str, rate_limit: str, cisco_avpairs: Sequence[str]) -> list[Attribute]:
    """What a CoA carries to give a session back its link's own rate (the end of a throttle).

    MikroTik: the link's rate, or ``"0/0"`` (no limit) when it has none; Cisco: the link's
    AV-pairs; a generic NAS: both, as Access-Accept sends them."""
    mikrotik: list[Attribute] = [("Mikrotik-Rate-Limit", rate_limit or "0/0")]
    cisco: list[Attribute] = [("Cisco-AVPair", pair) for pair in cisco_avpairs]
    if kind == "mikrotik":
        return mikrotik
    if kind == "cisco":
        return cisco
    if kind == "generic":
        return ([("Mikrotik-Rate-Limit", rate_limit)] if rate_limit else []) + cisco
    raise ProfileError(f"NAS kind must be one of {', '.join(NAS_KINDS)}")


def accept_attributes(profile: RateProfile) -> list[Attribute]:
    """What an Access-Accept carries for a throttled account (every kind's; see the module comment)."""
    return [("Mikrotik-Rate-Limit", mikrotik_rate(profile)), *_cisco(profile), *profile.attributes]


@functools.cache
def known_attributes(folder: Path = DICTIONARIES) -> frozenset[str]:
    """The ATTRIBUTE names of the radius process's dictionaries."""
    names: set[str] = set()
    for path in sorted(folder.glob("dictionary*")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "ATTRIBUTE":
                names.add(parts[1])
    return frozenset(names)


def check_attributes(raw: object) -> tuple[Attribute, ...]:
    """A generic attribute list from a caller: ``[[name, value], …]`` with known names."""
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_ATTRIBUTES:
        raise ProfileError(f"attributes: a list of at most {MAX_ATTRIBUTES} [name, value] pairs")
    known = known_attributes()
    out: list[Attribute] = []
    for pair in raw:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ProfileError("attributes: each item is a [name, value] pair")
        name, value = pair
        if not isinstance(name, str) or name not in known:
            raise ProfileError(f"attributes: {str(name)[:64]!r} is not in the RADIUS dictionaries")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ProfileError(f"attributes: the value of {name} is a string or an int")
        if isinstance(value, str) and (len(value.encode()) > MAX_VALUE or "\0" in value):
            raise ProfileError(f"attributes: the value of {name} is at most {MAX_VALUE} bytes, no NUL")
        if isinstance(value, int) and not 0 <= value <= 2**32 - 1:
            raise ProfileError(f"attributes: the value of {name} is a 32-bit unsigned int")
        out.append((name, value))
    return tuple(out)


def check_policy_name(name: object, what: str) -> str:
    if not isinstance(name, str) or len(name) > 128 or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ProfileError(f"{what}: a Cisco policy name of letters, digits, '-', '_', '.' (at most 128)")
    return name


def attributes_wire(attrs: Sequence[Attribute]) -> list[list[Any]]:
    return [[name, value] for name, value in attrs]
