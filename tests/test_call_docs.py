"""Every call's documentation, as ``sys.calls`` hands it to a client, is whole sentences: a client that shows
its first line (billctl, a GUI) shows a whole paragraph, never a sentence cut where the source wrapped it."""

from __future__ import annotations

import importlib
import logging
import re
import secrets
from pathlib import Path

import pytest

from billcore.clients.billctl import render
from billcore.server.calls import CallSpec, clean_doc
from billcore.common.config import Config
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.plugins.admin_calls import plugin_calls
from billcore.plugins.api import PluginAPI
from billcore.plugins.bundle import read_bundle
from billcore.plugins.db import PluginDB, schema_of
from billcore.plugins.manifest import parse_manifest
from billcore.plugins.settings import settings_for
from billcore.radius_calls import SecretStore
from billcore.server.builtin_calls import builtin_specs

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"(": ")", "[": "]", "{": "}"}
CLOSES = {")": "(", "]": "[", "}": "{"}


def first_party_plugin_calls() -> list[CallSpec]:
    """The calls plugins/* register in their setup() (no database: setup only registers)."""
    out: list[CallSpec] = []
    for folder in sorted(p for p in (ROOT / "plugins").iterdir() if (p / "plugin.toml").exists()):
        bundle = read_bundle(folder)
        manifest = parse_manifest(bundle.files["plugin.toml"])
        api = PluginAPI(manifest, bundle, settings_for(manifest.name, manifest.config, None, None),
                        PluginDB(None, schema_of(manifest.name)), None, logging.getLogger("test"))  # type: ignore[arg-type]
        importlib.import_module(f"plugins.{folder.name}").setup(api)
        out.extend(api._calls)
    return out


def every_call() -> list[CallSpec]:
    core = CoreContext(None, Config())  # type: ignore[arg-type]  # no call is made, only described
    core.extras["secret_store"] = SecretStore(secrets.token_bytes(32))
    return [*builtin_specs(None, None), *build_calls(core), *plugin_calls(None),  # type: ignore[arg-type]
            *first_party_plugin_calls()]


def problems(doc: str) -> list[str]:
    out = []
    if not doc:
        return ["empty"]
    for paragraph in doc.split("\n\n"):
        if "\n" in paragraph or "  " in paragraph:
            out.append(f"a wrapped line inside a paragraph: {paragraph!r}")
        if not (paragraph[0].isupper() or paragraph[0] in "`\"'"):
            out.append(f"does not start a sentence: {paragraph[:30]!r}")
        if paragraph[-1] not in ".?!":
            out.append(f"does not end a sentence: …{paragraph[-30:]!r}")
        stack = []
        for ch in paragraph:
            if ch in PAIRS:
                stack.append(PAIRS[ch])
            elif ch in CLOSES:
                want = stack.pop() if stack else None
                if want != ch and not (want == "]" and ch == ")"):  # a half-open interval: [since, until)
                    out.append(f"unbalanced {ch!r}")
                    break
        if stack:
            out.append(f"unclosed {''.join(stack)!r}")
        if paragraph.count("`") % 2 or paragraph.count('"') % 2:
            out.append("an unclosed quote")
    return out


def test_every_call_is_documented_in_whole_sentences() -> None:
    calls = every_call()
    assert len(calls) > 60 and {"vouchers.redeem", "example.hello"} <= {c.name for c in calls}
    bad = {c.name: problems(c.describe()["doc"]) for c in calls}
    assert {name: p for name, p in bad.items() if p} == {}


def test_the_first_line_of_a_wrapped_docstring_is_a_whole_paragraph() -> None:
    spec = next(c for c in every_call() if c.name == "classes.add_rule")
    doc = spec.describe()["doc"]
    assert "\n" not in doc and doc.startswith("Add a rule:") and doc.endswith("(docs/tariffs.md).")
    # the raw docstring wraps here; the doc a client gets does not
    raw = spec.handler.__doc__ or ""
    assert "\n" in raw and "(interface index) must all match;" in doc


def test_clean_doc_joins_lines_keeps_paragraphs() -> None:
    assert clean_doc("""One line
        and its wrap.

        A second paragraph.
        """) == "One line and its wrap.\n\nA second paragraph."
    assert clean_doc("") == ""
    assert clean_doc(clean_doc("A.\n  b.")) == "A. b."


def test_billctl_calls_table_shows_whole_docs() -> None:
    rows = [{"name": c.name, "right": c.right or "", "doc": c.describe()["doc"].split("\n")[0]}
            for c in every_call()]
    table = render(rows)
    for row in rows:
        assert re.search(re.escape(row["doc"]) + "$", table, re.M), row["name"]


@pytest.mark.parametrize("name", ["services.add", "services.set_rate", "classes.add_rule", "timeranges.add"])
def test_catalogue_calls_point_to_the_cookbook(name: str) -> None:
    """The calls whose arguments have a syntax of their own send the operator to docs/tariffs.md, which exists."""
    spec = next(c for c in every_call() if c.name == name)
    assert "(docs/tariffs.md)." in spec.describe()["doc"] and (ROOT / "docs" / "tariffs.md").exists()
