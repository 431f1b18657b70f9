"""docs/api.md's curl examples run against a live API, and answer what the page shows.

Every ```` ```sh ```` block of docs/api.md is a curl example; the
```` ```json ```` block right after it is its answer. The examples run in
order in one shell environment, as an integrator following the page would
type them: ``BASE`` (the API's URL) and ``TOKEN`` (a fresh token of group
``superusers``) are set, and a variable one example assigns
(``USER_ID=$(curl …)``) is there in the next. Each example must exit 0
and print the JSON documents its answer block shows: the same keys, the
same values, except the ids and times a fresh run makes anew (compared by
type). ``DOCS_PRINT=1`` prints what each example answered, to paste.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_httpapi_parity import api_stack

pytestmark = pytest.mark.timeout(300)

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_ASSIGNED = re.compile(r"^\s*([A-Z][A-Z0-9_]*)=", re.M)
# made anew by each run: compared by type
VOLATILE = {"id", "sid", "payment_id", "ledger_id", "account_id", "user_id", "token_id", "created_at", "expires_at",
            "last_used_at", "token"}


def examples(text: str) -> list[tuple[str, str]]:
    """(shell code, the answer shown) for each ```sh block and the ```json block after it."""
    blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]
    found = []
    for i, (kind, body) in enumerate(blocks):
        if kind != "sh":
            continue
        assert "curl" in body, f"a ```sh block of docs/api.md that is no curl example:\n{body}"
        assert i + 1 < len(blocks) and blocks[i + 1][0] == "json", f"no ```json answer after:\n{body}"
        found.append((body, blocks[i + 1][1]))
    return found


def documents(text: str) -> list[Any]:
    """The JSON documents in ``text``, one after the other (pretty-printed or one per line)."""
    decoder, at = json.JSONDecoder(), 0
    docs: list[Any] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return docs
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)


def mismatches(shown: Any, got: Any, where: str = "") -> list[str]:
    if isinstance(shown, dict):
        if not isinstance(got, dict) or set(shown) != set(got):
            return [f"{where or 'answer'}: shown keys {sorted(shown)}, got {got!r:.300}"]
        found = []
        for key in shown:
            if key in VOLATILE:
                if type(shown[key]) is not type(got[key]):
                    found.append(f"{where}.{key}: shown a {type(shown[key]).__name__}, got {got[key]!r}")
            else:
                found += mismatches(shown[key], got[key], f"{where}.{key}")
        return found
    if isinstance(shown, list):
        if not isinstance(got, list) or len(shown) != len(got):
            return [f"{where or 'answer'}: shown {shown!r:.200}, got {got!r:.300}"]
        return [d for i, (a, b) in enumerate(zip(shown, got)) for d in mismatches(a, b, f"{where}[{i}]")]
    if type(shown) is not type(got) or shown != got:
        return [f"{where or 'answer'}: shown {shown!r:.200}, got {got!r:.200}"]
    return []


def test_every_example_has_an_answer_and_the_page_covers_the_tasks() -> None:
    text = DOC.read_text()
    shown = examples(text)
    assert len(shown) >= 10
    code = "\n".join(body for body, _ in shown)
    # a curl example per common task
    for call in ("sys.whoami", "openapi.json", "users.create", "subscribers.search", "payments.add", "accounts.get",
                 "payments.list", "blocks.set", "reports.traffic", "tokens.create", "tokens.revoke"):
        assert call in code, f"docs/api.md has no example of {call}"
    assert "Idempotency-Key" in code
    for _, answer in shown:
        documents(answer)                    # every answer shown is JSON


async def test_the_curl_examples_of_docs_api_md_answer_what_the_page_shows(tmp_path: Path) -> None:
    assert shutil.which("curl") and shutil.which("jq"), "the examples need curl and jq"
    async with api_stack("api-docs") as st:
        made = await st.admin.call("tokens.create", {"name": "docs-admin", "groups": ["superusers"]})
        state = tmp_path / "state.sh"
        state.write_text(f"export BASE={st.url}\nexport TOKEN={made['token']}\n")
        failures = []
        for n, (code, answer) in enumerate(examples(DOC.read_text()), 1):
            names = sorted(set(_ASSIGNED.findall(code)))
            script = (f"set -euo pipefail\nsource {state}\n{code}\n"
                      + "".join(f"printf 'export {name}=%q\\n' \"${name}\" >> {state}\n" for name in names))
            done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                                  env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
            if os.environ.get("DOCS_PRINT"):
                print(f"--- example {n}:\n{code}\n>>> {done.stdout}")
            if done.returncode != 0:
                failures.append(f"example {n} exited {done.returncode}: {done.stderr[-500:]} {done.stdout[-500:]}"
                                f"\n{code}")
                continue
            try:
                got = documents(done.stdout)
            except ValueError:
                failures.append(f"example {n} printed no JSON: {done.stdout[-500:]}\n{code}")
                continue
            found = mismatches(documents(answer), got)
            if found:
                failures.append(f"example {n}:\n{code}\n" + "\n".join(found))
        assert not failures, "\n\n".join(failures)
