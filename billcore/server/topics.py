"""Event topics and who may read them: one table, checked at subscribe and at delivery.

Theory of operation
-------------------
The core publishes ``(topic, payload)`` to subscribed URFA sessions (see
``billcore.server.event_hub``).  A call table decides who may *call*; this table
decides who may *see* what a topic carries, per session kind:

* an **admin** or **system** session may subscribe when its rights allow
  one of the topic's ``rights`` (``billcore.server.calls.allows``: ``*`` and
  ``prefix.*`` count), and then gets every event of the topic as published;
* a **subscriber** (``user``) session may subscribe only to a topic with a
  ``for_subscriber`` view, and then gets only the events of its own accounts
  (the payload's ``account_id``), passed through that view, which keeps only
  what a subscriber may read of their own account: no operator identity,
  no operator's free text;
* a **proxied** subscriber session (the web office's), and an API
  token's session (kind ``token``, always proxied), has no connection of its
  own and may not subscribe at all.

A topic missing from the table is delivered to nobody and refused at
subscribe time, so a new topic is invisible until someone writes its rule
here (and the test over every topic and session kind covers it).  The
rules are documented for clients in docs/protocol.md §9.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from billcore.server.calls import allows

__all__ = ["Topic", "TOPICS", "NOTICE_RIGHT", "subscriber_block", "may_subscribe"]

# Opens a topic and nothing else (no call requires it): the operators' console
# hears that something changed and has its pages re-read with the operator's own
# session, without being able to read the data itself.
NOTICE_RIGHT = "events.notice"

# What a subscriber may read of one of their own blocks (an event or a row of
# me.blocks): when, which kind, set or lifted.  Never who did it (an
# operator's login), nor an operator's reason text.
_BLOCK_KEYS = frozenset({"id", "block_id", "account_id", "kind", "action", "at", "set_at", "lifted_at"})


def subscriber_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """A block as its subscriber may see it.  The reason text stays for the
    blocks the subscriber or the debt rule set (their own words, or the
    balance), never for an operator's."""
    view = {k: v for k, v in block.items() if k in _BLOCK_KEYS}
    if block.get("kind") in ("user", "system") and "reason" in block:
        view["reason"] = block["reason"]
    return view


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    rights: tuple[str, ...]    # an admin or system session needs one of these
    doc: str
    # what a subscriber sees of an event on one of their own accounts;
    # None: subscribers may not subscribe
    for_subscriber: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


TOPICS: dict[str, Topic] = {topic.name: topic for topic in (
    Topic("blocks", ("blocks.read", "radius.serve", NOTICE_RIGHT), for_subscriber=subscriber_block,
          doc="a block set or lifted: account_id, kind, action, block_id, reason, at, by"),
    Topic("classifier", ("netflow.submit", "netflow.read"),
          doc="IP bindings, traffic classes or rules changed: version (NetFlow workers reload)"),
    Topic("radius.nas", ("radius.serve", "radius.read", NOTICE_RIGHT),
          doc="a NAS was added, changed or deleted: changed or deleted (its id)"),
    Topic("radius.disconnect", ("radius.serve", "radius.read", NOTICE_RIGHT),
          doc="an operator asked to disconnect RADIUS sessions: sessions (their rows, with NAS and address)"),
    Topic("radius.sessions", ("radius.serve", "radius.read", NOTICE_RIGHT),
          doc="RADIUS sessions started or ended: event (started, stopped or closed), session, account_id,"
              " or closed (how many an Accounting-On/Off or the stale sweep ended)"),
    Topic("outbox", ("outbox.claim",),
          doc="outbox deliveries are due: channels (the deliverers of those channels claim them now)"),
)}


def may_subscribe(topic: Topic, kind: str, rights: frozenset[str], proxied: bool) -> bool:
    """Whether a session of ``kind`` with ``rights`` may subscribe to ``topic``."""
    if proxied or kind == "token":   # an API token's session has no connection to hear events on
        return False
    if kind == "user":
        return topic.for_subscriber is not None
    return any(allows(rights, right) for right in topic.rights)
