"""What billctl's command modules share: one command's sub-commands, whichever module makes it first.

``billctl invoices`` gathers actions from three modules (billctl_invoices:
run, issue, list, show, credit; billctl_documents: pdf, html;
billctl_export: export).  Each asks ``actions_of`` for the command's
sub-parsers: the first creates the command, the others add to it.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["actions_of"]


def actions_of(sub: Any, name: str, help_text: str) -> Any:
    """The sub-parsers (dest ``action``) of ``billctl NAME``, creating the command if no module has yet."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help_text)
        return parser.add_subparsers(dest="action", required=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="action", required=True)
