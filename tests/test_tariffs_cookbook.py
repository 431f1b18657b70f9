"""docs/tariffs.md, run: every recipe's commands and every amount its tables state.

Each ``## N.`` recipe runs in a fresh database against the core's own call handlers (`build_calls`, the
table the core serves over URFA), with the arguments converted exactly as billctl converts them (the
call's schema, `convert_args`), on a clock the recipe's table moves. Traffic and session time enter
through `commit_usage`, which ``netflow.submit`` and RADIUS accounting call; fees through the periodic
scheduler's `run_due`, which the core runs. After each table row the subscriber's balance must have
gone down by exactly the row's "charged" amount.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.clients.billctl import convert_args, money_fields, render, show_money
from billcore.common.money import parse_money
from billcore.billing.rating import SessionUsage, TrafficUsage
from billcore.billing.scheduler import run_due
from billcore.billing.usage import commit_usage
from billcore.server.calls import CallSpec
from billcore.common.config import Config
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.radius.secrets import SecretStore
from tests.test_tariffs_api import Ctx

DOC = Path(__file__).resolve().parents[1] / "docs" / "tariffs.md"
UNITS = {"bytes": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9}
TRAFFIC = re.compile(r"(\d+(?:\.\d+)?) (bytes|kB|MB|GB) of class (\d+)")
SESSION = re.compile(r"a session until (\d{4}-\d\d-\d\d \d\d:\d\d)")


@dataclass
class Recipe:
    title: str
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)   # (billctl line, expected ⊆ result)
    rows: list[tuple[datetime, str, int]] = field(default_factory=list)         # (when, what, charged)
    checks: list[tuple[str, str]] = field(default_factory=list)                 # (billctl line, its output)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.strip()).replace(tzinfo=timezone.utc)


def recipes() -> list[Recipe]:
    out: list[Recipe] = []
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        if not re.match(r"\d+\. ", title):
            continue
        recipe = Recipe(title.strip())
        table_at = body.find("\n| when")
        blocks = list(re.finditer(r"```(sh|text)\n(.*?)```", body, flags=re.S))
        for n, block in enumerate(blocks):
            if block.group(1) != "sh":
                continue
            text = block.group(2).replace("\\\n", " ")
            lines = [line for line in text.splitlines() if line.startswith("billctl ")]
            if block.start() > table_at:
                # after the table: a command whose billctl output the doc shows in the next text block
                shown = blocks[n + 1].group(2) if n + 1 < len(blocks) and blocks[n + 1].group(1) == "text" else None
                assert len(lines) == 1 and shown is not None, f"{title}: one command, then its output"
                recipe.checks.append((lines[0], shown))
                continue
            for line in lines:
                command, _, comment = line.partition("# →")
                recipe.commands.append((command.strip(), json.loads(comment) if comment.strip() else {}))
        table = False
        for line in body.splitlines():
            if line.startswith("| when"):
                table = True
            elif table and line.startswith("|") and not line.startswith("| ---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                recipe.rows.append((when(cells[0]), cells[1], parse_money(cells[2])))
            elif not line.startswith("|"):
                table = False
        out.append(recipe)
    return out


class Core:
    """The core's call handlers on a database, on a clock the recipe moves."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.clock = datetime(2000, 1, 1, tzinfo=timezone.utc)
        self.config = Config()
        self.core = CoreContext(pool, self.config, now=lambda: self.clock)
        self.core.extras["secret_store"] = SecretStore(secrets.token_bytes(32))  # RADIUS secrets, unused here
        self.specs: dict[str, CallSpec] = {s.name: s for s in build_calls(self.core)}
        self.admin = Ctx("admin", 1)
        self.watermark = 0

    async def billctl(self, line: str) -> Any:
        words = shlex.split(line)
        assert words[:2] == ["billctl", "call"], f"the cookbook uses `billctl call`: {line}"
        spec = self.specs[words[2]]
        return await spec.handler(self.admin, **convert_args(words[3:], dict(spec.args)))

    async def balance(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts"))

    async def usage(self, what: str) -> None:
        account = int(re.search(r"account (\d+)", what).group(1))  # type: ignore[union-attr]
        if m := TRAFFIC.search(what):
            nbytes = int(float(m.group(1)) * UNITS[m.group(2)])
            usage: Any = TrafficUsage(account, int(m.group(3)), self.clock, nbytes)
            now = self.clock + timedelta(minutes=1)
        elif m := SESSION.search(what):
            end = when(m.group(1))
            usage, now = SessionUsage(account, self.clock, int((end - self.clock).total_seconds())), end
        else:
            raise AssertionError(f"a table row the cookbook test does not know: {what!r}")
        self.watermark += 1
        async with self.pool.acquire() as conn:
            result = await commit_usage(conn, "cookbook", self.watermark, [usage], now, tz=self.config.zone)
        assert not result.rejected, f"{what}: rejected {result.rejected}"

    async def step(self, at: datetime, what: str) -> None:
        self.clock = at
        if m := re.fullmatch(r"`(billctl .*)`", what):
            await self.billctl(m.group(1))
        elif what == "the periodic run":
            await run_due(self.pool, at, tz=self.config.zone)
        else:
            await self.usage(what)


ALL = recipes()


def test_the_cookbook_has_its_recipes() -> None:
    titles = " / ".join(r.title for r in ALL)
    for topic in ("monthly fee", "day and night", "prepaid", "time", "period"):
        assert topic in titles.lower(), titles
    assert all(r.commands and r.rows for r in ALL)


@pytest.mark.parametrize("recipe", ALL, ids=[r.title.split(".")[0] for r in ALL])
async def test_recipe(recipe: Recipe, pool: asyncpg.Pool) -> None:
    core = Core(pool)
    core.clock = recipe.rows[0][0]
    for line, expected in recipe.commands:
        result = await core.billctl(line)
        assert {k: result.get(k) for k in expected} == expected, line
    for at, what, charged in recipe.rows:
        before = await core.balance()
        await core.step(at, what)
        assert before - await core.balance() == charged, f"{at:%Y-%m-%d %H:%M} {what}"
    for line, shown in recipe.checks:
        # as billctl shows it: money from the call's declared result fields
        money = money_fields(core.specs[shlex.split(line)[2]].fields)
        assert render(show_money(await core.billctl(line), money)) == shown.rstrip("\n"), line
