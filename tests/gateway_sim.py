"""A payment gateway simulator, written for the tests (aiohttp, loopback only).

It does what a real gateway does with billcore, over real HTTP:

* ``GET /pay?order_id&account&amount&currency&return_url&ts&sig`` — the pay
  page the office redirects a subscriber's browser to; the order's
  signature (``webedge.paysign.order_signature`` with the shared secret)
  is checked, a bad one is a 403 page;
* ``POST /pay/confirm`` — the subscriber presses "Pay": the simulator makes
  a transaction id, POSTs the signed callback to billcore's ``paygate``
  edge, POSTs it once more (gateways retry: a duplicate must answer 2xx
  with the same payment), records both answers in ``sim.callbacks``, and
  sends the browser back to the order's return URL with ``303``.

``signed(secret, body, ts)`` gives the headers of one callback, for tests
that POST callbacks themselves.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from webedge.paysign import ORDER_FIELDS, callback_signature, order_ok

__all__ = ["GatewaySim", "signed", "callback_body"]


def signed(secret: bytes, body: bytes, ts: int | None = None) -> dict[str, str]:
    """The headers of a callback carrying ``body`` sent at ``ts`` (now by default)."""
    stamp = str(int(time.time()) if ts is None else ts)
    return {"Content-Type": "application/json", "X-Billcore-Timestamp": stamp,
            "X-Billcore-Signature": callback_signature(secret, stamp, body)}


def callback_body(txn_id: str, account: str, amount: str, currency: str = "RUB", status: str = "paid",
                  **more: Any) -> bytes:
    return json.dumps({"txn_id": txn_id, "account": account, "amount": amount, "currency": currency,
                       "status": status, **more}).encode()


@dataclass
class GatewaySim:
    name: str
    secret: bytes
    callback_url: str                     # the paygate edge's /callback/<name>
    callbacks: list[dict[str, Any]] = field(default_factory=list)   # {txn_id, status, answer} per POST
    orders: list[dict[str, str]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self, port: int) -> GatewaySim:
        app = web.Application(client_max_size=16384)
        app.router.add_get("/pay", self.pay_page)
        app.router.add_post("/pay/confirm", self.confirm)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def pay_page(self, request: web.Request) -> web.Response:
        order = {name: request.query.get(name, "") for name in ORDER_FIELDS}
        if not order_ok(self.secret, order, request.query.get("sig")):
            return web.Response(status=403, text="<h1>Bad order signature</h1>", content_type="text/html")
        self.orders.append(order)
        hidden = "".join(f'<input type="hidden" name="{n}" value="{html.escape(v)}">'
                         for n, v in [*order.items(), ("sig", request.query["sig"])])
        page = (f"<!doctype html><title>Gateway {self.name}</title><h1>Pay {html.escape(order['amount'])}"
                f" {html.escape(order['currency'])}</h1><p id=account>Account {html.escape(order['account'])}</p>"
                f'<form method=post action="/pay/confirm">{hidden}<button id=pay type=submit>Pay</button></form>')
        return web.Response(text=page, content_type="text/html")

    async def confirm(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        order = {name: str(form.get(name, "")) for name in ORDER_FIELDS}
        if not order_ok(self.secret, order, str(form.get("sig", ""))):
            return web.Response(status=403, text="bad order")
        txn_id = "T" + secrets.token_hex(8)
        body = callback_body(txn_id, order["account"], order["amount"], order["currency"],
                             order_id=order["order_id"])
        async with aiohttp.ClientSession() as session:
            for _ in range(2):          # the callback, then the gateway's retry of it
                async with session.post(self.callback_url, data=body, headers=signed(self.secret, body)) as r:
                    self.callbacks.append({"txn_id": txn_id, "status": r.status, "answer": await r.json()})
        back = order["return_url"]
        sep = "&" if "?" in back else "?"
        return web.Response(status=303, headers={"Location": back + sep + urlencode({"txn": txn_id})})
