"""Sending one claimed delivery: an email over SMTP, a webhook over HTTP.

Theory of operation
-------------------
A claimed delivery (``outbox.claim``'s row: id, event_id, channel, target,
message, …) goes out and comes back as an ``Outcome``: delivered, or failed
with a reason and whether trying again could help.  The verdict is a pure
function of what the peer said (``smtp_verdict``, ``http_verdict``):

* SMTP: a 5xx reply is permanent (the mailbox does not exist, the relay
  refuses us), a 4xx one transient (greylisting, a full queue); a connection
  that fails or times out is transient.
* HTTP: 2xx delivered; 4xx permanent (the receiver refuses this request as
  such) except 408 and 429 (it asks us to come back); 3xx permanent (we do
  not follow redirects with a signed body: set the final URL); 5xx and any
  connection failure or timeout transient.

``Mailer`` keeps up to ``concurrency`` SMTP connections open and reuses
them (a relay takes many messages per connection; a new TLS handshake per
email would cap throughput), dropping one on any error.  Every SMTP
conversation and every POST is bounded in time; a webhook's answer is read
up to ``max_response`` bytes and the rest dropped.

Receivers de-duplicate on the event id: ``X-Billcore-Event`` in both, and an
email's ``Message-ID: <billcore.<event_id>.<delivery_id>@<domain>>``.
Webhooks are signed (``billcore.common.webhook_sig.sign``):
``X-Billcore-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.header import Header
from email.mime.text import MIMEText
from typing import Any

import aiohttp
import aiosmtplib

from billcore.common.webhook_sig import sign

__all__ = ["MailSettings", "Mailer", "Outcome", "WebhookSender", "http_verdict", "message_id", "smtp_verdict"]

USER_AGENT = "billcore-notify/1"


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    error: str = ""
    permanent: bool = False


DELIVERED = Outcome(True)


def smtp_verdict(code: int, text: str) -> Outcome:
    """A refused SMTP command: 5xx permanent, anything else transient."""
    return Outcome(False, f"SMTP {code} {text}"[:500], permanent=500 <= code < 600)


def http_verdict(status: int) -> Outcome:
    if 200 <= status < 300:
        return DELIVERED
    permanent = (300 <= status < 500) and status not in (408, 429)
    return Outcome(False, f"HTTP {status}", permanent=permanent)


@dataclass(frozen=True, slots=True)
class MailSettings:
    host: str = "127.0.0.1"
    port: int = 25
    starttls: bool = False
    tls: bool = False
    user: str = ""
    password: str = ""
    mail_from: str = "billing@localhost"
    timeout: float = 30.0
    connections: int = 4
    ca_file: str = ""          # PEM CA bundle for the server's certificate ("" = the system's)


def message_id(delivery: Mapping[str, Any], mail_from: str) -> str:
    domain = mail_from.rpartition("@")[2] or "localhost"
    return f"<billcore.{int(delivery['event_id'])}.{int(delivery['id'])}@{domain}>"


def _header(text: str) -> Any:
    # a Header object, not its text: compat32 folds its encoded words itself
    return text if text.isascii() else Header(text, "utf-8")


def build_email(delivery: Mapping[str, Any], mail_from: str) -> bytes:
    """The message's bytes: text/plain UTF-8, RFC 2047 headers where not ASCII.

    (The compat32 ``MIMEText`` costs ~0.15 ms a message; ``EmailMessage`` with
    the default policy ~2.5 ms, most of a sender's CPU at thousands a second.)"""
    message = delivery["message"]
    to, subject = str(message["to"]), " ".join(str(message["subject"]).split())
    if any(c in to for c in "\r\n\0") or "@" not in to:
        raise ValueError("not one address")
    msg = MIMEText(str(message["body"]), "plain", "utf-8")
    msg["From"] = mail_from
    msg["To"] = to
    msg["Subject"] = _header(subject)
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = message_id(delivery, mail_from)
    msg["X-Billcore-Event"] = str(int(delivery["event_id"]))
    msg["Content-Language"] = str(message.get("lang") or "en")[:8]
    return msg.as_bytes()


class Mailer:
    """SMTP with a bounded pool of reused connections."""

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(max(1, settings.connections))

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(hostname=s.host, port=s.port, use_tls=s.tls, start_tls=s.starttls,
                                 timeout=s.timeout, username=s.user or None, password=s.password or None,
                                 cert_bundle=s.ca_file or None)
        await client.connect()
        return client

    async def send(self, delivery: Mapping[str, Any]) -> Outcome:
        try:
            raw = build_email(delivery, self.settings.mail_from)
            to = str(delivery["message"]["to"])
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(False, f"malformed email delivery: {type(exc).__name__}", permanent=True)
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            try:
                async with asyncio.timeout(self.settings.timeout):
                    if client is None or not client.is_connected:
                        client = await self._connect()
                    await client.sendmail(self.settings.mail_from, [to], raw)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                first = exc.recipients[0] if exc.recipients else None
                outcome = smtp_verdict(first.code, first.message) if first else Outcome(False, "recipient refused")
                self._keep(client)
                return outcome
            except aiosmtplib.SMTPResponseException as exc:
                self._drop(client)
                return smtp_verdict(exc.code, exc.message)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._drop(client)
                return Outcome(False, f"SMTP: {type(exc).__name__}: {exc}"[:500])
            self._keep(client)
            return DELIVERED

    def _keep(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None and client.is_connected:
            self._idle.append(client)

    def _drop(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None:
            client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(client.quit(), 2.0)
            client.close()


class WebhookSender:
    """Signed POSTs with bounded time and answer size."""

    def __init__(self, timeout: float = 10.0, max_response: int = 65536, connections: int = 16) -> None:
        self.timeout = timeout
        self.max_response = max_response
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
            connector=aiohttp.TCPConnector(limit=connections), headers={"User-Agent": USER_AGENT})

    async def send(self, delivery: Mapping[str, Any], secret: bytes, now: float | None = None) -> Outcome:
        try:
            url = str(delivery["message"]["url"])
            body = str(delivery["message"]["body"]).encode()
            event_id, delivery_id = int(delivery["event_id"]), int(delivery["id"])
        except (KeyError, TypeError, ValueError) as exc:
            return Outcome(False, f"malformed webhook delivery: {type(exc).__name__}", permanent=True)
        timestamp = int(time.time() if now is None else now)
        headers = {"Content-Type": "application/json", "X-Billcore-Event": str(event_id),
                   "X-Billcore-Delivery": str(delivery_id), "X-Billcore-Timestamp": str(timestamp),
                   "X-Billcore-Signature": sign(secret, timestamp, body)}
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(self.max_response)     # bounded; the rest is dropped with the connection
                return http_verdict(resp.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Outcome(False, f"HTTP: {type(exc).__name__}: {exc}"[:500])
        except ValueError as exc:   # a URL aiohttp cannot use
            return Outcome(False, f"HTTP: bad URL: {exc}"[:500], permanent=True)

    async def close(self) -> None:
        await self._session.close()
