"""Pay online: the office sends the subscriber to a payment gateway and shows the payment when it is booked.

Theory of operation
-------------------
``GET /pay`` is a form (the account, when the subscriber has several, and
the amount).  ``POST /pay`` (CSRF-checked by the office's guard) makes an
*order* — a random order id, the account, the amount in the gateway's
format, the currency, the return URL and the time — signs it with the
gateway's shared secret (``webedge.paysign.order_signature``) and answers
``303`` to the gateway's pay page with the order and its signature in the
query.  The office keeps nothing: the return URL carries the order too,
signed with the office's own key, so ``/pay/return`` can trust what it is
told without a table of orders.

The gateway collects the money, calls billcore's ``paygate`` edge (which
books the payment) and sends the browser back to ``/pay/return``.  The
page looks for the payment with the subscriber's own calls
(``me.payments``: method ``gateway:<name>``, the order's account and
amount, made after the order) and shows it once booked; until then it
refreshes itself every ``REFRESH`` seconds for ``WAIT`` seconds (a
callback may lag the browser), then says to look at the history later.

The session cookie is ``SameSite=Strict``, so the browser does not send it
on the navigation that comes from the gateway's site: ``/pay/return``
without a cookie answers a page that refreshes once to itself — a
navigation from the office's own page, which does carry the cookie.

The pay page is the one office page whose CSP allows a form to lead to
another origin: the gateway's (``form-action 'self' <gateway origin>``),
since the POST's answer redirects there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from webedge.http import ascii_int
from webedge.paysign import AmountRefused, amount_to_micro, micro_to_amount, order_signature
from webedge.settings import read_gateway_secret

from . import i18n

__all__ = ["PayOnline", "pay_online_of", "add_routes", "MESSAGES", "PAY"]

REFRESH = 2            # seconds between looks while the payment is not booked yet
WAIT = 600             # seconds after the order that the return page keeps looking
MIN_AMOUNT = 1_000_000          # 1.00: a smaller online payment costs more than it brings
MAX_AMOUNT = 1_000_000 * 1_000_000   # 1 000 000.00
SLACK = dt.timedelta(seconds=60)     # the core's clock and the office's may differ a little

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.pay": ("Pay online", "Оплатить онлайн"),
    "pay.title": ("Pay online", "Оплата онлайн"),
    "pay.amount": ("Amount", "Сумма"),
    "pay.account": ("Account", "Лицевой счёт"),
    "pay.submit": ("Go to payment", "Перейти к оплате"),
    "pay.hint": ("You will be sent to {gateway} to pay and brought back here.",
                 "Вы перейдёте на страницу {gateway} для оплаты и вернётесь сюда."),
    "pay.bad_amount": ("Enter an amount from {low} to {high}, like 500.00.",
                       "Введите сумму от {low} до {high}, например 500.00."),
    "pay.waiting": ("Waiting for the payment system to confirm your payment of {amount}…",
                    "Ждём подтверждения платежа на {amount} от платёжной системы…"),
    "pay.booked": ("Your payment of {amount} is booked. Thank you!", "Ваш платёж на {amount} зачислен. Спасибо!"),
    "pay.balance": ("Balance now", "Баланс сейчас"),
    "pay.late": ("The payment system has not confirmed the payment yet. It will appear in your payment history"
                 " once it does.", "Платёжная система ещё не подтвердила платёж. Он появится в истории платежей,"
                 " когда подтвердит."),
    "pay.bad_return": ("This payment link is not valid.", "Эта ссылка на платёж недействительна."),
    "pay.returning": ("Returning to your office…", "Возвращаемся в ваш кабинет…"),
}


def _register_words() -> None:
    """The office's catalogues get this module's words (a key twice is a mistake)."""
    for key, (en, ru) in MESSAGES.items():
        if i18n.EN.get(key, en) != en:
            raise ValueError(f"office message {key!r} defined twice")
        i18n.EN[key] = en
        i18n.RU[key] = ru


_register_words()


@dataclass(frozen=True, slots=True)
class PayOnline:
    gateway: str
    secret: bytes
    pay_url: str
    currency: str
    minor_units: int
    amount_format: str
    office_url: str = ""          # empty: the request's own scheme and host


PAY: web.AppKey[PayOnline] = web.AppKey("pay_online", PayOnline)


def pay_online_of(config: Any) -> PayOnline | None:
    """The office's pay-online settings from ``[paygate]`` (None when ``office_gateway`` is not set)."""
    section = getattr(config, "paygate", None)     # a config made by hand may have no [paygate] at all
    if section is None or not section.office_gateway:
        return None
    gw = next(g for g in section.gateways if g.name == section.office_gateway)   # checked at load
    if not gw.pay_url:
        return None
    billing = config.billing
    return PayOnline(gw.name, read_gateway_secret(Path(gw.secret_file)), gw.pay_url, gw.currency or billing.currency,
                     billing.minor_units, gw.amount_format, section.office_url.rstrip("/"))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _return_mac(key: bytes, order_id: str, account: str, amount: int, ts: str) -> str:
    text = f"pay-return\n{order_id}\n{account}\n{amount}\n{ts}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def add_routes(app: web.Application, pay: PayOnline) -> None:
    from . import app as office      # the office's page helpers (that module imports this one first)

    async def form(request: web.Request, status: int = 200, error: str = "", amount: str = "") -> web.Response:
        accounts = await office.ask(request, "me.accounts")
        t = office.translator(request)
        response = office.page(request, "pay.html", status, accounts=accounts, error=error, amount=amount,
                               gateway=pay.gateway,
                               hint=t("pay.hint", gateway=pay.gateway))
        # the one office page whose form leads (by the POST's redirect) to another origin: the gateway's
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self';"
            f" form-action 'self' {_origin(pay.pay_url)}; frame-ancestors 'none'; base-uri 'none'")
        return response

    async def pay_get(request: web.Request) -> web.StreamResponse:
        return await form(request)

    async def pay_post(request: web.Request) -> web.StreamResponse:
        data = request[office.FORM]
        t = office.translator(request)
        raw = data.get("amount", "").strip().replace(",", ".")[:32]
        low, high = micro_to_amount(MIN_AMOUNT, pay.minor_units), micro_to_amount(MAX_AMOUNT, pay.minor_units)
        try:
            micro = amount_to_micro(raw, pay.minor_units, "major")
            if not MIN_AMOUNT <= micro <= MAX_AMOUNT:
                raise AmountRefused("out of range")
        except AmountRefused:
            return await form(request, 400, t("pay.bad_amount", low=low, high=high), raw)
        accounts = await office.ask(request, "me.accounts")
        wanted = ascii_int(data.get("account_id", ""), 18) if data.get("account_id") else accounts[0]["id"]
        if wanted not in {a["id"] for a in accounts}:
            raise office.PageError(404, "error.404")
        order_id, ts, account = secrets.token_hex(8), str(int(time.time())), str(wanted)
        base = pay.office_url or f"{request.scheme}://{request.host}"
        back = base + "/pay/return?" + urlencode({
            "order": order_id, "account": account, "amount": micro, "ts": ts,
            "mac": _return_mac(request.app[office.STATE]["key"], order_id, account, micro, ts)})
        order = {"order_id": order_id, "account": account,
                 "amount": micro_to_amount(micro, pay.minor_units, pay.amount_format), "currency": pay.currency,
                 "return_url": back, "ts": ts}
        office.log.info("pay online order", extra={"order": order_id, "account": account, "amount": micro,
                                                   "gateway": pay.gateway})
        return office.redirect(pay.pay_url, **order, sig=order_signature(pay.secret, order))

    async def pay_return(request: web.Request) -> web.StreamResponse:
        q = request.query
        order_id, account, ts = q.get("order", "")[:32], q.get("account", "")[:20], q.get("ts", "")[:12]
        amount = ascii_int(q.get("amount", ""), 19)
        mac = _return_mac(request.app[office.STATE]["key"], order_id, account, amount or 0, ts)
        if amount is None or not ts.isdecimal() or not account.isdecimal() \
                or not hmac.compare_digest(mac, q.get("mac", "")):
            raise office.PageError(404, "pay.bad_return")
        if request[office.SID] is None and "again" not in q:
            # arrived from the gateway's site: the Strict cookie stayed home; one look from our own page
            response = office.page(request, "pay_return.html", state="returning", amount=amount, payment=None,
                                   balance=None)
            response.headers["Refresh"] = "0; url=" + request.path_qs + "&again=1"
            return response
        ordered = dt.datetime.fromtimestamp(int(ts), dt.timezone.utc)
        rows = await office.ask(request, "me.payments", account_id=int(account), limit=50)
        found = next((p for p in rows if p["method"] == f"gateway:{pay.gateway}" and p["amount"] == amount
                      and p["created_at"] >= ordered - SLACK and p["cancelled_at"] is None), None)
        if found is not None:
            accounts = await office.ask(request, "me.accounts")
            balance = next((a["balance"] for a in accounts if a["id"] == int(account)), None)
            return office.page(request, "pay_return.html", state="booked", amount=amount, payment=found,
                               balance=balance)
        late = time.time() - int(ts) > WAIT
        response = office.page(request, "pay_return.html", state="late" if late else "waiting", amount=amount,
                               payment=None, balance=None)
        if not late:
            response.headers["Refresh"] = str(REFRESH)
        return response

    app[PAY] = pay
    app.router.add_get("/pay", pay_get)
    app.router.add_post("/pay", pay_post)
    app.router.add_get("/pay/return", pay_return)
