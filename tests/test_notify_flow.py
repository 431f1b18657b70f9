"""Notifications end to end below URFA: ledger → outbox → route → claim → the edge's senders → real receivers.

A real PostgreSQL (the test database), a real aiosmtpd and a real aiohttp
receiver on loopback; the outbox's own dispatch/claim/done functions move the
rows, and the notify edge's ``Deliverer`` sends them.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

import asyncpg
import pytest

from billcore.api.notify_calls import SAMPLES, _sample_vars
from billcore.billing import accounts, notify_lowbalance, notify_prefs, notify_webhooks
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.notify_route import RouteSettings, route_notifications
from billcore.billing.notify_templates import (
    DEFAULTS, EVENTS, MoneyStyle, NotifyTemplateError, Template, check_template, render,
)
from billcore.billing.outbox import enqueue_one
from billcore.billing.outbox_delivery import claim, dispatch, done
from billcore.radius.secrets import SecretStore
from notify.deliver import MailSettings, Outcome, http_verdict, smtp_verdict
from notify.process import Deliverer, NotifySettings, SecretCache
from tests.notify_peers import MailSink, WebhookSink, start_mail_sink, start_webhook_sink
from urfa.scram import make_verifier

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
UNIT = 1_000_000
VERIFIER = make_verifier("secret", iterations=4096)
SETTINGS = RouteSettings(MoneyStyle(2, "RUB"), "en", "isp.test")


async def subscriber(conn: asyncpg.Connection, login: str, email: str, language: str = "") -> int:
    user = await accounts.create_user(conn, login, VERIFIER, full_name=login.title(), email=email)
    if language:
        await conn.execute("UPDATE users SET language = $2 WHERE id = $1", user["id"], language)
    return int(user["basic_account_id"])


async def charge(pool: asyncpg.Pool, account_id: int, amount: int, key: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await post_charges(conn, [Entry(account_id, amount, "correction", key)], actor="test", now=NOW)


async def low_events(pool: asyncpg.Pool, account_id: int) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT payload::text AS p FROM outbox_events WHERE event = 'balance.low'"
                            " AND account_id = $1 ORDER BY id", account_id)
    return [json.loads(r["p"]) for r in rows]


async def route_and_send(pool: asyncpg.Pool, deliverer: Deliverer) -> tuple[list[int], list[Any]]:
    async def router(conn: Any, events: Any, now: dt.datetime) -> Any:
        return await route_notifications(conn, events, now, SETTINGS)

    async with pool.acquire() as conn:
        await dispatch(conn, [router], NOW)
        rows = [c.as_dict() for ch in ("email", "webhook") for c in await claim(conn, ch, 100, 60, NOW)]
    delivered, failed = await deliverer.deliver(rows)
    async with pool.acquire() as conn:
        await done(conn, delivered, NOW)
    return delivered, failed


@pytest.fixture
async def sinks() -> Any:
    mail = await start_mail_sink()
    hook = await start_webhook_sink()
    yield mail, hook
    mail.close()
    await hook.close()


def deliverer_for(mail: MailSink, pool: asyncpg.Pool, store: SecretStore) -> Deliverer:
    async def fetch(ids: list[int]) -> list[dict[str, Any]]:
        async with pool.acquire() as conn:
            return await notify_webhooks.secrets_of(conn, store, ids)

    settings = NotifySettings(MailSettings("127.0.0.1", mail.port, mail_from="billing@isp.test", timeout=10),
                              webhook_timeout=5, concurrency=4)
    return Deliverer(settings, SecretCache(fetch))


async def test_balance_low_fires_once_per_crossing(pool: asyncpg.Pool) -> None:
    notify_lowbalance.set_default(10 * UNIT)
    try:
        async with pool.acquire() as conn:
            acc = await subscriber(conn, "lowone", "low@example.test")
            own = await subscriber(conn, "lowown", "own@example.test")
            await conn.execute("UPDATE accounts SET low_balance = $2 WHERE id = $1", own, 50 * UNIT)
        await charge(pool, acc, 30 * UNIT, "pay1")           # 30: above, nothing
        assert await low_events(pool, acc) == []
        await charge(pool, acc, -25 * UNIT, "c1")            # 30 → 5: crossed
        await charge(pool, acc, -1 * UNIT, "c2")             # 5 → 4: still below, nothing more
        assert await low_events(pool, acc) == [{"account_id": acc, "balance": 5 * UNIT, "threshold": 10 * UNIT}]
        await charge(pool, acc, 10 * UNIT, "pay2")           # 4 → 14: above again
        await charge(pool, acc, -4 * UNIT - 1, "c3")         # 14 → 9.999999: crossed again
        assert [e["balance"] for e in await low_events(pool, acc)] == [5 * UNIT, 10 * UNIT - 1]
        # an account's own threshold wins over the default; one batch, two accounts, one statement
        await charge(pool, own, 60 * UNIT, "pay3")
        async with pool.acquire() as conn, conn.transaction():
            await post_charges(conn, [Entry(own, -20 * UNIT, "correction", "c4"),
                                      Entry(acc, -1, "correction", "c5")], actor="test", now=NOW)
        assert await low_events(pool, own) == [{"account_id": own, "balance": 40 * UNIT, "threshold": 50 * UNIT}]
        assert len(await low_events(pool, acc)) == 2          # acc was below already
        # a posting that rolls back leaves no event
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn, conn.transaction():
                await post_charges(conn, [Entry(own, 30 * UNIT, "correction", "c6")], actor="test", now=NOW)
                await post_charges(conn, [Entry(own, -30 * UNIT, "correction", "c7")], actor="test", now=NOW)
                raise RuntimeError("roll back")
        assert len(await low_events(pool, own)) == 1
    finally:
        notify_lowbalance.set_default(None)


async def test_email_in_english_and_russian_and_signed_webhook(pool: asyncpg.Pool, sinks: Any) -> None:
    mail, hook = sinks
    store = SecretStore(secrets.token_bytes(32))
    async with pool.acquire() as conn:
        ivan = await subscriber(conn, "ivan", "ivan@example.test", "en")
        pyotr = await subscriber(conn, "pyotr", "pyotr@example.test", "ru")
        made = await notify_webhooks.add(conn, store, "crm", f"http://127.0.0.1:{hook.port}/hook",
                                         ["balance.low"], True, NOW)
        await conn.execute("UPDATE accounts SET low_balance = $1", 10 * UNIT)
    hook.secret = made["secret"].encode()
    await charge(pool, ivan, 20 * UNIT, "i1")
    await charge(pool, pyotr, 20 * UNIT, "p1")
    await charge(pool, ivan, -15_500_000, "i2")       # 4.50
    await charge(pool, pyotr, -12_345_679, "p2")      # 7.654321: shown exactly, never rounded
    deliverer = deliverer_for(mail, pool, store)
    try:
        delivered, failed = await route_and_send(pool, deliverer)
    finally:
        await deliverer.close()
    assert failed == [] and len(delivered) == 4
    by_to = {m["To"]: m for m in mail.messages}
    en, ru = by_to["ivan@example.test"], by_to["pyotr@example.test"]
    assert en["Subject"] == "Your balance is low: 4.50 RUB"
    assert "the balance of account %d is 4.50 RUB, below 10.00 RUB" % ivan in en.get_content()
    assert ru["Subject"] == "Низкий баланс: 7.654321 RUB"
    assert "Баланс лицевого счёта %d составляет 7.654321 RUB" % pyotr in ru.get_content()
    assert ru["Content-Language"] == "ru" and ru["X-Billcore-Event"].isdigit()
    assert ru["Message-ID"].startswith(f"<billcore.{ru['X-Billcore-Event']}.") and ru["Message-ID"].endswith("@isp.test>")
    # the webhook receiver verified both signatures and holds both events
    assert hook.rejected == 0 and len(hook.seen) == 2
    body = hook.seen[en["X-Billcore-Event"]]
    assert body["event"] == "balance.low" and body["account_id"] == ivan and body["data"]["balance"] == 4_500_000
    assert body["id"] == int(en["X-Billcore-Event"])


async def test_webhook_redelivery_is_deduplicated_and_bad_signature_refused(pool: asyncpg.Pool, sinks: Any) -> None:
    mail, hook = sinks
    store = SecretStore(secrets.token_bytes(32))
    async with pool.acquire() as conn:
        made = await notify_webhooks.add(conn, store, "all", f"http://127.0.0.1:{hook.port}/hook", ["*"], True, NOW)
        async with conn.transaction():
            await enqueue_one(conn, "payment.added", {"amount": UNIT, "balance": UNIT}, NOW)
    hook.secret = made["secret"].encode()
    deliverer = deliverer_for(mail, pool, store)
    try:
        async with pool.acquire() as conn:
            await dispatch(conn, [lambda c, e, n: route_notifications(c, e, n, SETTINGS)], NOW)
            rows = [c.as_dict() for c in await claim(conn, "webhook", 10, 60, NOW)]
        assert len(rows) == 1
        assert (await deliverer.deliver(rows))[0] == [rows[0]["id"]]
        # the lease ran out unacknowledged: the same delivery comes again (at least once)
        assert (await deliverer.deliver(rows))[0] == [rows[0]["id"]]
        assert len(hook.seen) == 1 and hook.duplicates == 1
        # a receiver that holds another secret refuses: 401 is permanent
        hook.secret = b"whsec_not-the-one"
        delivered, failed = await deliverer.deliver(rows)
        assert delivered == [] and failed[0][1].permanent and failed[0][1].error == "HTTP 401"
        # a receiver in trouble: 503 and 429 are transient
        hook.secret = made["secret"].encode()
        for status in (503, 429):
            hook.status = status
            delivered, failed = await deliverer.deliver(rows)
            assert failed and not failed[0][1].permanent
    finally:
        await deliverer.close()


async def test_opt_out_respected_essential_sent(pool: asyncpg.Pool, sinks: Any) -> None:
    mail, hook = sinks
    async with pool.acquire() as conn:
        acc = await subscriber(conn, "olga", "olga@example.test")
        user_id = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", acc)
        with pytest.raises(InvalidValue, match="essential"):
            notify_prefs.check_optouts([{"event": "account.blocked", "channel": "email"}])
        async with conn.transaction():
            await notify_prefs.set_prefs(conn, user_id, "ru", notify_prefs.check_optouts(
                [{"event": "*", "channel": "email"}]))
            # a row for an essential event written behind the calls' back is ignored all the same
            await conn.execute("INSERT INTO notify_optouts VALUES ($1, 'account.blocked', 'email')", user_id)
            for event in ("payment.added", "balance.low", "account.blocked", "dunning.blocked"):
                await enqueue_one(conn, event, {"amount": UNIT, "balance": -UNIT, "threshold": 0, "kind": "system"},
                                  NOW, account_id=acc)
    deliverer = deliverer_for(mail, pool, SecretStore(secrets.token_bytes(32)))
    try:
        await route_and_send(pool, deliverer)
    finally:
        await deliverer.close()
    assert sorted(m["Subject"] for m in mail.messages) == ["Услуги приостановлены",
                                                           "Услуги приостановлены из-за неоплаты"]


async def test_smtp_refusal_verdicts(pool: asyncpg.Pool, sinks: Any) -> None:
    mail, hook = sinks
    async with pool.acquire() as conn:
        acc = await subscriber(conn, "nobody", "nobody@example.test")
        async with conn.transaction():
            await enqueue_one(conn, "account.blocked", {"kind": "system"}, NOW, account_id=acc)
    mail.refuse = "550 5.1.1 no such mailbox"
    deliverer = deliverer_for(mail, pool, SecretStore(secrets.token_bytes(32)))
    try:
        delivered, failed = await route_and_send(pool, deliverer)
    finally:
        await deliverer.close()
    assert delivered == [] and failed[0][1].permanent and "550" in failed[0][1].error
    assert not smtp_verdict(451, "try later").permanent and smtp_verdict(554, "no").permanent
    assert [http_verdict(s).permanent for s in (200, 301, 400, 404, 408, 429, 500)] == \
        [False, True, True, True, False, False, False]


def test_template_sandbox_refuses_code() -> None:
    style = MoneyStyle(2, "")
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ data.__class__ }}",
                 "{{ 9**9**9**9 }}", "{{ cycler.__init__.__globals__ }}",
                 "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"):
        with pytest.raises(NotifyTemplateError):
            render(check_template("s", evil), {"data": {}}, style)
    with pytest.raises(NotifyTemplateError, match="does not compile"):
        check_template("{{ unclosed", "body")
    with pytest.raises(NotifyTemplateError):
        render(Template("x", "{{ data.balance|money }}"), {"data": {"balance": 1.5}}, style)   # never a float


def test_every_default_renders_its_sample_in_both_languages() -> None:
    style = MoneyStyle(2, "EUR")
    for event in EVENTS:
        for lang in ("en", "ru"):
            done = render(DEFAULTS[(event, lang)], _sample_vars(event), style)
            assert done.subject and "\n" not in done.subject and done.body.strip()
        assert event in SAMPLES
    assert style.format(-1) == "-0.000001 EUR" and style.format(12_300_000) == "12.30 EUR"
    assert MoneyStyle(0, "").format(5 * UNIT) == "5" and MoneyStyle(3, "").format(5 * UNIT + 10_000) == "5.010"


async def test_a_payload_without_a_field_still_sends_the_default(pool: asyncpg.Pool, sinks: Any) -> None:
    """An operator's template that fails on a real event falls back to the default; a default the payload
    cannot fill renders with the missing parts empty: an essential notice is not lost."""
    mail, hook = sinks
    async with pool.acquire() as conn:
        acc = await subscriber(conn, "petr", "petr@example.test", "en")
        await conn.execute("INSERT INTO notify_templates VALUES ('dunning.blocked', 'email', 'en', 'Cut: {{ data.nope.x }}',"
                           " 'b', 'test', now())")
        async with conn.transaction():
            await enqueue_one(conn, "dunning.blocked", {"step": "block"}, NOW, account_id=acc)   # no balance
    deliverer = deliverer_for(mail, pool, SecretStore(secrets.token_bytes(32)))
    try:
        delivered, failed = await route_and_send(pool, deliverer)
    finally:
        await deliverer.close()
    assert failed == [] and len(delivered) == 1
    assert mail.messages[0]["Subject"] == "Your service is suspended for non-payment"
    assert "the balance of account %d is ;" % acc in mail.messages[0].get_content()


async def test_secret_cache_follows_rotation_and_deletion(pool: asyncpg.Pool) -> None:
    store = SecretStore(secrets.token_bytes(32))
    now = [100.0]
    calls: list[list[int]] = []

    async def fetch(ids: list[int]) -> list[dict[str, Any]]:
        calls.append(ids)
        async with pool.acquire() as conn:
            return await notify_webhooks.secrets_of(conn, store, ids)

    cache = SecretCache(fetch, ttl=60, clock=lambda: now[0])
    async with pool.acquire() as conn:
        made = await notify_webhooks.add(conn, store, "rot", "http://127.0.0.1:9/", ["*"], True, NOW)
    hook_id = made["id"]
    assert await cache.get([hook_id, hook_id]) == {hook_id: made["secret"].encode()}
    async with pool.acquire() as conn:
        _, after = await notify_webhooks.edit(conn, store, hook_id, NOW, rotate_secret=True)
    assert await cache.get([hook_id]) == {hook_id: made["secret"].encode()} and len(calls) == 1   # within the TTL
    now[0] += 61
    assert await cache.get([hook_id]) == {hook_id: after["secret"].encode()} and len(calls) == 2
    async with pool.acquire() as conn:
        await notify_webhooks.delete(conn, hook_id)
    now[0] += 61
    assert await cache.get([hook_id]) == {}


async def test_starttls_and_auth_to_a_relay_that_requires_both(tmp_path: Any) -> None:
    """A relay that refuses mail before STARTTLS and AUTH: the edge upgrades, verifies the certificate against
    [notify] smtp_ca_file, logs in, and delivers; a wrong password is a permanent failure (535)."""
    import asyncio
    import ssl
    import subprocess

    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    from notify.deliver import Mailer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                           "-out", str(cert)], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    sink = MailSink()

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"billing", b"relay-pw")
        return AuthResult(success=ok, handled=False)

    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, hostname="relay.test", tls_context=tls, require_starttls=True, auth_required=True,
                     authenticator=authenticator), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    row = {"id": 7, "event_id": 5, "message": {"to": "ivan@example.test", "subject": "Платёж получен", "body": "ok",
                                               "lang": "ru"}}
    try:
        good = Mailer(MailSettings("127.0.0.1", port, starttls=True, user="billing", password="relay-pw",
                                   mail_from="billing@isp.test", timeout=10, ca_file=str(cert)))
        assert await good.send(row) == Outcome(True)
        await good.close()
        assert sink.messages[0]["Subject"] == "Платёж получен"
        assert sink.messages[0]["Message-ID"] == "<billcore.5.7@isp.test>"
        bad = Mailer(MailSettings("127.0.0.1", port, starttls=True, user="billing", password="wrong",
                                  mail_from="billing@isp.test", timeout=10, ca_file=str(cert)))
        refused = await bad.send(row)
        await bad.close()
        assert not refused.ok and refused.permanent and "535" in refused.error
        untrusted = Mailer(MailSettings("127.0.0.1", port, starttls=True, user="billing", password="relay-pw",
                                        mail_from="billing@isp.test", timeout=10))
        failed = await untrusted.send(row)          # a certificate nobody vouches for: not sent, retried later
        await untrusted.close()
        assert not failed.ok and not failed.permanent and len(sink.messages) == 1
    finally:
        server.close()
