"""The package boundaries of docs/architecture.md, enforced on the imports.

Every ``import`` and ``from … import`` anywhere in a file counts (inside
functions, under ``if TYPE_CHECKING:``, in ``try`` blocks), and so does
``importlib.import_module("…")`` / ``__import__("…")`` with a literal
name.  The rules:

- an edge (the table ``EDGES``) imports nothing of ``billcore`` but
  ``billcore.common``, the shared kernel: it reaches the core through URFA;
- ``billcore/common/`` imports only the standard library and itself, so an
  edge that imports it pulls in nothing else;
- ``urfa/``, the protocol, imports nothing of billcore and no edge;
- a plugin imports the plugin API (``billcore.plugins.api``) and nothing
  else of the project;
- the core (``billcore/`` but the edges inside it) imports no edge package;
- the domain (``billcore/billing/``, ``billcore/radius/``, ``billcore/db/``)
  imports nothing of the URFA service, the call modules, the plugin loader,
  the operations tools or the clients: it takes a connection and values and
  raises domain errors, which ``billcore/server/wire_errors.py`` turns into
  wire errors.  (The protocol's vocabulary, ``urfa`` error codes and SCRAM
  verifiers, it may use.)

``billcore.radius`` (the core's RADIUS domain) is not the edge ``radius``:
names are compared as dotted module paths, never by their last part.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Edges: processes and tools that talk to the core only through URFA.  A new
# edge is one more row (a folder that does not exist yet is skipped).
EDGES: dict[str, str] = {
    "netflow": "netflow",
    "radius": "radius",
    "portal": "portal",
    "console": "console",
    "httpapi": "httpapi",
    "paygate": "paygate",
    "webedge": "webedge",
    "billcore/clients": "billcore.clients",
    "notify": "notify",
    "documents": "documents",
}
KERNEL = "billcore.common"      # what edges may import of billcore
PLUGIN_API = "billcore.plugins.api"
PROTOCOL = "urfa"
PLUGINS = "plugins"
CORE = "billcore"
DOMAIN = ("billcore/billing/", "billcore/radius/", "billcore/db/")
ABOVE_DOMAIN = ("billcore.server", "billcore.api", "billcore.plugins", "billcore.ops", "billcore.clients", "billcore.cli")
# top-level edge packages: the core may import none of them
EDGE_PACKAGES = tuple(module for module in EDGES.values() if "." not in module)
FIRST_PARTY = (CORE, PROTOCOL, *EDGE_PACKAGES)


@dataclass(frozen=True, slots=True)
class Imported:
    line: int
    module: str   # dotted; ``from a.b import c`` gives ``a.b.c`` (c may be a module or a name in a.b)


@dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module} ({self.rule})"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_of(relpath: str) -> str:
    """'billcore/api/x.py' -> 'billcore.api.x'; a package's __init__ is the package."""
    parts = relpath.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, relpath: str) -> list[Imported]:
    """Every module the file imports, relative imports resolved against ``relpath``."""
    tree = ast.parse(source, filename=relpath)
    here = module_of(relpath).split(".")
    package = here if relpath.endswith("__init__.py") else here[:-1]
    found: list[Imported] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Imported(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found += [Imported(node.lineno, f"{prefix}.{alias.name}" if alias.name != "*" else prefix)
                      for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append(Imported(node.lineno, node.args[0].value))
    return found


def edge_of(relpath: str) -> str | None:
    for folder in EDGES:
        if relpath.startswith(folder + "/"):
            return folder
    return None


def broken_rule(relpath: str, module: str) -> str | None:
    """Which rule importing ``module`` from ``relpath`` breaks, if any."""
    edge = edge_of(relpath)
    if edge is not None:
        if within(module, CORE) and not within(module, KERNEL) and not within(module, EDGES[edge]):
            return f"an edge imports only {KERNEL} of billcore"
        return None
    if relpath.startswith("billcore/common/"):
        root = module.split(".")[0]
        if not within(module, KERNEL) and root not in sys.stdlib_module_names:
            return f"{KERNEL} imports only the standard library and itself"
        return None
    if relpath.startswith(PROTOCOL + "/"):
        if any(within(module, package) for package in FIRST_PARTY if package != PROTOCOL) \
                or within(module, PLUGINS):
            return "urfa imports nothing of billcore and no edge"
        return None
    if relpath.startswith(PLUGINS + "/"):
        if any(within(module, package) for package in FIRST_PARTY) and not within(module, PLUGIN_API):
            return f"a plugin imports only {PLUGIN_API} of the project"
        return None
    if relpath.startswith(CORE + "/"):
        if any(within(module, package) for package in EDGE_PACKAGES):
            return "the core imports no edge"
        if relpath.startswith(DOMAIN) and any(within(module, package) for package in ABOVE_DOMAIN):
            return "the domain imports nothing of the service, the call modules, plugins, ops or clients"
    return None


def violations(source: str, relpath: str) -> list[Violation]:
    found = []
    for imported in imports(source, relpath):
        rule = broken_rule(relpath, imported.module)
        if rule is not None:
            found.append(Violation(relpath, imported.line, imported.module, rule))
    return found


def checked_files() -> list[str]:
    """Every source file a rule applies to, as a path relative to the checkout."""
    folders = [CORE, PROTOCOL, PLUGINS, *EDGES]
    files: set[str] = set()
    for folder in folders:
        files |= {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).rglob("*.py")}
    return sorted(files)


def test_the_tree_keeps_its_layers() -> None:
    found = [v for relpath in checked_files() for v in violations((ROOT / relpath).read_text(), relpath)]
    assert not found, "imports across a layer boundary:\n" + "\n".join(map(str, found))


def test_every_rule_has_files_to_check() -> None:
    """The rules cannot pass on an empty file list: each layer that exists is read."""
    files = checked_files()
    for prefix in ("netflow/", "radius/", "portal/", "webedge/", "billcore/clients/", "billcore/common/", "urfa/",
                   "plugins/", "billcore/server/"):
        assert any(f.startswith(prefix) for f in files), prefix
    for folder in EDGES:
        if (ROOT / folder).is_dir():
            assert any(f.startswith(folder + "/") for f in files), folder
    assert sum(len(imports((ROOT / f).read_text(), f)) for f in files) > 500


BAD = [
    # (file, source, the module reported)
    ("netflow/x.py", "from billcore.server import core\n", "billcore.server.core"),
    ("netflow/x.py", "import billcore\n", "billcore"),
    ("radius/x.py", "def f():\n    from billcore.db.pool import open_pool\n", "billcore.db.pool.open_pool"),
    ("portal/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import billcore.billing.ledger\n",
     "billcore.billing.ledger"),
    ("console/x.py", "import importlib\nimportlib.import_module('billcore.server.core')\n", "billcore.server.core"),
    ("billcore/clients/x.py", "from ..server import service\n", "billcore.server.service"),
    ("billcore/clients/x.py", "from billcore import radius\n", "billcore.radius"),
    ("billcore/common/x.py", "import asyncpg\n", "asyncpg"),
    ("billcore/common/x.py", "from ..db import pool\n", "billcore.db.pool"),
    ("billcore/common/x.py", "from urfa import errors\n", "urfa.errors"),
    ("urfa/x.py", "from billcore.common.money import format_money\n", "billcore.common.money.format_money"),
    ("urfa/x.py", "try:\n    import netflow.flows\nexcept ImportError:\n    pass\n", "netflow.flows"),
    ("plugins/p/x.py", "from billcore.plugins import loader\n", "billcore.plugins.loader"),
    ("plugins/p/x.py", "from billcore.common.config import load_config\n", "billcore.common.config.load_config"),
    ("plugins/p/x.py", "import urfa.client\n", "urfa.client"),
    ("billcore/api/x.py", "from netflow.rawstore import read\n", "netflow.rawstore.read"),
    ("billcore/api/x.py", "import radius.server\n", "radius.server"),
    ("billcore/radius/x.py", "from portal import app\n", "portal.app"),
    ("billcore/billing/x.py", "from billcore.server.wire_errors import constraint_field\n",
     "billcore.server.wire_errors.constraint_field"),
    ("billcore/radius/x.py", "from ..api import announce\n", "billcore.api.announce"),
    ("billcore/db/x.py", "from billcore.plugins import hooks\n", "billcore.plugins.hooks"),
]

GOOD = [
    ("netflow/x.py", "from billcore.common.config import load_config\nfrom urfa.client import connect\n"
                     "import numpy\nfrom . import flows\nfrom .journal import Journal\n"),
    ("billcore/clients/x.py", "from billcore.clients.tray import Tray\nfrom billcore.common import money\n"
                              "from . import billctl\n"),
    ("billcore/common/x.py", "import json\nfrom __future__ import annotations\nfrom . import money\n"
                             "from billcore.common.errors import Failure\n"),
    ("urfa/x.py", "import msgpack\nfrom . import framing\nfrom urfa.errors import CallFailed\n"),
    ("plugins/p/x.py", "from billcore.plugins.api import PluginAPI\nfrom billcore.plugins import api\n"
                       "from .codes import new_code\nimport secrets\n"),
    # the core's own RADIUS domain is not the edge ``radius``
    ("billcore/api/x.py", "from billcore.radius import accounting\nfrom ..radius import nas\n"
                          "from billcore.server.calls import CallSpec\nimport urfa.errors\n"),
    ("billcore/radius/__init__.py", "from .accounting import account\nfrom . import secrets\n"),
    ("billcore/billing/x.py", "from billcore.db.rows import DbConnection\nfrom urfa.scram import Verifier\n"
                              "from billcore.common.money import format_money\nfrom . import ledger\n"),
]


@pytest.mark.parametrize("relpath,source,module", BAD, ids=[f"{b[0]}:{b[2]}" for b in BAD])
def test_a_crossing_is_caught(relpath: str, source: str, module: str) -> None:
    assert [v.module for v in violations(source, relpath)] == [module]


@pytest.mark.parametrize("relpath,source", GOOD, ids=[g[0] for g in GOOD])
def test_an_allowed_import_passes(relpath: str, source: str) -> None:
    assert violations(source, relpath) == []


def test_relative_imports_resolve_against_the_file() -> None:
    assert [i.module for i in imports("from ..server import core\nfrom . import x\n", "billcore/api/a.py")] == [
        "billcore.server.core", "billcore.api.x"]
    assert [i.module for i in imports("from .accounting import f\n", "billcore/radius/__init__.py")] == [
        "billcore.radius.accounting.f"]
