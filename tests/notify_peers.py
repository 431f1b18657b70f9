"""Real receivers for the notify edge: an aiosmtpd SMTP server and an aiohttp webhook receiver, on loopback.

The SMTP server keeps every message it accepted (parsed, with its envelope).
The webhook receiver does what docs/automation/notify.md tells an
integrator to do: refuses a request whose timestamp is more than 300 s off or
whose signature is wrong (401), and de-duplicates by ``X-Billcore-Event``: a
redelivery is answered 200 and not processed again.  Both can be told to
refuse (``smtp_code`` / ``http_status``) to exercise the failure verdicts.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from billcore.common.webhook_sig import verify

__all__ = ["MailSink", "WebhookSink", "start_mail_sink", "start_webhook_sink"]


@dataclass
class MailSink:
    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    refuse: str = ""                 # e.g. "550 5.1.1 no such mailbox" for RCPT
    server: asyncio.AbstractServer | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        self.arrived.set()
        return "250 Message accepted"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def start_mail_sink() -> MailSink:
    sink = MailSink()
    loop = asyncio.get_running_loop()
    sink.server = await loop.create_server(lambda: SMTP(sink, hostname="sink.test", decode_data=False),
                                           "127.0.0.1", 0)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


@dataclass
class WebhookSink:
    secret: bytes = b""
    port: int = 0
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)   # X-Billcore-Event → body
    requests: int = 0
    rejected: int = 0
    duplicates: int = 0
    status: int = 200
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if not verify(self.secret, request.headers.get("X-Billcore-Timestamp", ""), body,
                      request.headers.get("X-Billcore-Signature", ""), time.time()):
            self.rejected += 1
            return web.Response(status=401, text="bad signature")
        if self.status != 200:
            return web.Response(status=self.status)
        event_id = request.headers["X-Billcore-Event"]
        if event_id in self.seen:
            self.duplicates += 1           # a redelivery: acknowledged, not processed again
            return web.Response(text="duplicate")
        self.seen[event_id] = await request.json()
        return web.Response(text="ok")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def start_webhook_sink(secret: bytes = b"") -> WebhookSink:
    sink = WebhookSink(secret)
    app = web.Application()
    app.router.add_post("/hook", sink.handle)
    sink.runner = web.AppRunner(app, access_log=None)
    await sink.runner.setup()
    site = web.TCPSite(sink.runner, "127.0.0.1", 0)
    await site.start()
    sink.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return sink
