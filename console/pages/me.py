"""``/me/otp``: an operator's own second factor (TOTP) — enroll with a QR code, confirm, disable.

``self.otp_begin`` gives a fresh secret and its ``otpauth://`` URI; the page
shows the secret and the URI as a QR code (drawn here as SVG by ``segno``,
so no script and no outside service sees it), then ``self.otp_confirm``
with a code from the app enrolls it and answers the recovery codes, shown
this once.  The secret is carried in the confirm form only to draw the QR
code again after a mistyped code.
"""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import segno
from aiohttp import web
from markupsafe import Markup

from console.page import Page, Refused, call, form, redirect, render, t

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.me_otp": ("My two-factor", "Мой второй фактор"),
    "me.otp.title": ("Two-factor login", "Двухфакторный вход"),
    "me.otp.intro": ("With a second factor, logging in to the console asks for a code from an authenticator app "
                     "(any TOTP app) after the password.", "Со вторым фактором после пароля вход в консоль "
                     "спрашивает код из приложения-аутентификатора (любого TOTP)."),
    "me.otp.begin": ("Set up an authenticator app", "Настроить приложение-аутентификатор"),
    "me.otp.scan": ("Scan this code with the app, or type the secret in it, then enter the 6-digit code it shows.",
                    "Отсканируйте код приложением или введите в него секрет, затем введите показанный 6-значный код."),
    "me.otp.secret": ("Secret", "Секрет"),
    "me.otp.code": ("Code", "Код"),
    "me.otp.confirm": ("Confirm", "Подтвердить"),
    "me.otp.wrong": ("Not confirmed: {message}", "Не подтверждено: {message}"),
    "me.otp.enrolled": ("Two-factor login is on.", "Двухфакторный вход включён."),
    "me.otp.recovery": ("Recovery codes: each logs you in once instead of a code. Keep them somewhere safe: "
                        "they are shown only now.", "Резервные коды: каждый заменяет код один раз. Сохраните их "
                        "в надёжном месте — они показываются только сейчас."),
    "me.otp.disable": ("Turn two-factor login off", "Отключить двухфакторный вход"),
    "me.otp.disable_code": ("A current code (or a recovery code)", "Текущий код (или резервный код)"),
    "me.otp.disabled": ("Two-factor login is off.", "Двухфакторный вход отключён."),
}


def qr_svg(text: str) -> Markup:
    """``text`` as a QR code in inline SVG (black modules, no style attributes: the CSP allows it)."""
    buffer = io.BytesIO()
    segno.make(text, error="m").save(buffer, kind="svg", xmldecl=False, svgns=True, nl=False, scale=5,
                                     border=4, svgclass="qr-code", lineclass="qr-line")
    return Markup(buffer.getvalue().decode("ascii"))


def _secret_of(uri: str) -> str:
    return parse_qs(urlsplit(uri).query).get("secret", [""])[0]


def _setup(request: web.Request, uri: str, error: str = "", status: int = 200) -> web.StreamResponse:
    if not uri.startswith("otpauth://totp/"):
        raise web.HTTPBadRequest()
    return render(request, "me/otp_setup.html", status, uri=uri, secret=_secret_of(uri), qr=qr_svg(uri), error=error)


@ROUTES.get("/me/otp", needs=("self.otp_begin",), nav="me_otp")
async def otp_page(request: web.Request) -> web.StreamResponse:
    return render(request, "me/otp.html", error="")


@ROUTES.post("/me/otp/begin", needs=("self.otp_begin", "self.otp_confirm"))
async def otp_begin(request: web.Request) -> web.StreamResponse:
    begun = await call(request, "self.otp_begin")
    return _setup(request, str(begun["uri"]))


@ROUTES.post("/me/otp/confirm", needs=("self.otp_begin", "self.otp_confirm"))
async def otp_confirm(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    uri = fields.get("uri", "")[:512]
    try:
        done = await call(request, "self.otp_confirm", code=fields.get("code", "").strip()[:64])
    except Refused as refused:
        return _setup(request, uri, t("me.otp.wrong", message=refused.message or refused.code), 400)
    return render(request, "me/otp_done.html", codes=[str(code) for code in done["recovery_codes"]])


@ROUTES.post("/me/otp/disable", needs=("self.otp_begin", "self.otp_disable"))
async def otp_disable(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    try:
        await call(request, "self.otp_disable", code=fields.get("code", "").strip()[:64])
    except Refused as refused:
        return render(request, "me/otp.html", 400, error=t("me.otp.wrong", message=refused.message or refused.code))
    return redirect(request, "/me/otp", message="me.otp.disabled")
