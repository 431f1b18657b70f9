"""Notification templates: shipped EN/RU defaults, operators' overrides, a sandboxed renderer.

Theory of operation
-------------------
A template is a (subject, body) pair of Jinja2 text for one (event, channel,
language).  The defaults for every notification event ship here
(``DEFAULTS``, channel ``email``) in English and Russian; an operator's edit
is a row of ``notify_templates`` (schema 0016) that wins over the default,
and deleting it brings the default back.

Operators edit templates, so a template must not run code: they are compiled
in Jinja2's ``ImmutableSandboxedEnvironment`` (no attribute starting with
``_``, no mutation of the values handed in, ranges capped), ``**`` is refused
(``9**9**9`` would stall the process), and the rendered text is capped.  A
template that does not compile is refused when it is saved
(``NotifyTemplateError``, code ``notify.bad_template``); one that fails while
rendering an event falls back to the shipped default, so a bad edit never
loses a notification.

Variables (the same for every event; docs/automation/notify.md):

* ``event`` — the event name; ``event_id`` — the outbox event id;
* ``account_id``, ``login``, ``full_name`` — whose account;
* ``created_at`` — when it happened (ISO 8601, UTC);
* ``data`` — the event's payload (``data.balance``, ``data.threshold``,
  ``data.amount``, …; money in integer micro-units);
* ``currency`` — the installation's currency sign;
* the filter ``money``: ``{{ data.balance|money }}`` shows micro-units as the
  currency does (``[billing] minor_units`` decimals at least, more only when
  the amount has them: never rounded, never a float) with the currency sign.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jinja2
from jinja2 import ChainableUndefined, StrictUndefined, TemplateError, Undefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from billcore.common.errors import BillingError
from billcore.common.money import format_money

__all__ = [
    "CHANNELS", "DEFAULTS", "EVENTS", "LANGS", "MAX_BODY", "MAX_OUTPUT", "MAX_SUBJECT", "MoneyStyle",
    "NotifyTemplateError", "Rendered", "Template", "check_template", "render",
]

LANGS = ("en", "ru")
CHANNELS = ("email", "text")      # text: short messages for plugin channels (sms, messengers)
MAX_SUBJECT = 1000
MAX_BODY = 20_000
MAX_OUTPUT = 100_000              # characters a rendered subject + body may have


class NotifyTemplateError(BillingError, ValueError):
    """A template does not compile, uses what the sandbox refuses, or renders too much."""

    code: ClassVar[str] = "notify.bad_template"


@dataclass(frozen=True, slots=True)
class Template:
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class MoneyStyle:
    """How amounts are shown: the currency's minor units and its sign."""

    minor_units: int = 2
    currency: str = ""

    def format(self, amount: object) -> str:
        if type(amount) is not int:
            raise NotifyTemplateError("money takes int micro-units")
        text = format_money(amount, min_decimals=self.minor_units)
        return f"{text} {self.currency}" if self.currency else text


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            raise SecurityError("the power operator is not allowed in templates")
        return super().call_binop(context, op, left, right)


@functools.lru_cache(maxsize=16)
def _env(style: MoneyStyle, lenient: bool = False) -> _Sandbox:
    env = _Sandbox(undefined=ChainableUndefined if lenient else StrictUndefined, autoescape=False,
                   keep_trailing_newline=True)

    def money(amount: object) -> str:
        if lenient and isinstance(amount, Undefined):
            return ""
        return style.format(amount)

    env.filters["money"] = money
    return env


@functools.lru_cache(maxsize=512)
def _compiled(style: MoneyStyle, text: str, lenient: bool = False) -> jinja2.Template:
    """Compiling is most of a render's cost: a dispatch batch renders one template a thousand times."""
    return _env(style, lenient).from_string(text)


_CHECK_ENV = _env(MoneyStyle())


def check_template(subject: object, body: object) -> Template:
    """The template if both parts are strings of allowed size that compile; else ``NotifyTemplateError``."""
    if type(subject) is not str or len(subject) > MAX_SUBJECT:
        raise NotifyTemplateError(f"subject must be a string of at most {MAX_SUBJECT} characters")
    if type(body) is not str or not body.strip() or len(body) > MAX_BODY:
        raise NotifyTemplateError(f"body must be a non-empty string of at most {MAX_BODY} characters")
    for part, text in (("subject", subject), ("body", body)):
        try:
            _CHECK_ENV.from_string(text)
        except TemplateError as exc:
            raise NotifyTemplateError(f"{part} does not compile: {exc.message or type(exc).__name__}") from None
    return Template(subject, body)


def render(template: Template, variables: Mapping[str, Any], style: MoneyStyle, lenient: bool = False) -> Rendered:
    """Render inside the sandbox; ``NotifyTemplateError`` for anything it refuses or cannot fill.

    ``lenient``: a variable the event lacks renders empty instead of failing (the router's
    last resort with a shipped default, so an essential notice is never lost to a payload
    without a field)."""
    def bounded(text: str, room: int) -> str:
        out: list[str] = []
        for piece in _compiled(style, text, lenient).generate(variables):   # stops as soon as it is too long
            room -= len(piece)
            if room < 0:
                raise NotifyTemplateError(f"a rendered template may have at most {MAX_OUTPUT} characters")
            out.append(piece)
        return "".join(out)

    try:
        subject = bounded(template.subject, MAX_OUTPUT)
        body = bounded(template.body, MAX_OUTPUT - len(subject))
    except NotifyTemplateError:
        raise
    except SecurityError as exc:
        raise NotifyTemplateError(f"refused by the template sandbox: {exc}") from None
    except TemplateError as exc:
        raise NotifyTemplateError(f"template failed: {exc.message or type(exc).__name__}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, OverflowError) as exc:
        raise NotifyTemplateError(f"template failed: {type(exc).__name__}") from None
    # a subject is one header line
    return Rendered(" ".join(subject.split()), body)


def _t(subject: str, body: str) -> Template:
    return Template(subject, body.strip("\n") + "\n")


_SIGN_EN = "\n\n-- \nYour ISP's billing"
_SIGN_RU = "\n\n-- \nБиллинг вашего провайдера"

# (event, lang) → the shipped email template
DEFAULTS: dict[tuple[str, str], Template] = {
    ("balance.low", "en"): _t(
        "Your balance is low: {{ data.balance|money }}",
        "Hello {{ full_name or login }},\n\nthe balance of account {{ account_id }} is {{ data.balance|money }},"
        " below {{ data.threshold|money }}. Please top it up to keep your service running." + _SIGN_EN),
    ("balance.low", "ru"): _t(
        "Низкий баланс: {{ data.balance|money }}",
        "Здравствуйте, {{ full_name or login }}!\n\nБаланс лицевого счёта {{ account_id }} составляет"
        " {{ data.balance|money }}, это меньше {{ data.threshold|money }}. Пополните его, чтобы услуги"
        " не прервались." + _SIGN_RU),
    ("balance.runout_soon", "en"): _t(
        "Your balance runs out in {{ data.days_left }} days",
        "Hello {{ full_name or login }},\n\nat your current spending the balance of account {{ account_id }}"
        " ({{ data.balance|money }}) runs out on {{ data.runs_out_on }}, in {{ data.days_left }} days." + _SIGN_EN),
    ("balance.runout_soon", "ru"): _t(
        "Баланс закончится через {{ data.days_left }} дн.",
        "Здравствуйте, {{ full_name or login }}!\n\nПри текущих расходах баланса лицевого счёта {{ account_id }}"
        " ({{ data.balance|money }}) хватит до {{ data.runs_out_on }}, ещё на {{ data.days_left }} дн." + _SIGN_RU),
    ("payment.added", "en"): _t(
        "Payment received: {{ data.amount|money }}",
        "Hello {{ full_name or login }},\n\nwe received your payment of {{ data.amount|money }} to account"
        " {{ account_id }}. Your balance is now {{ data.balance|money }}. Thank you!" + _SIGN_EN),
    ("payment.added", "ru"): _t(
        "Платёж получен: {{ data.amount|money }}",
        "Здравствуйте, {{ full_name or login }}!\n\nПолучен платёж {{ data.amount|money }} на лицевой счёт"
        " {{ account_id }}. Баланс теперь {{ data.balance|money }}. Спасибо!" + _SIGN_RU),
    ("account.blocked", "en"): _t(
        "Your service is suspended",
        "Hello {{ full_name or login }},\n\nthe service of account {{ account_id }} is suspended"
        "{% if data.kind == 'system' %} because the balance is below the allowed limit{% endif %}."
        " It resumes as soon as the reason is gone." + _SIGN_EN),
    ("account.blocked", "ru"): _t(
        "Услуги приостановлены",
        "Здравствуйте, {{ full_name or login }}!\n\nУслуги по лицевому счёту {{ account_id }} приостановлены"
        "{% if data.kind == 'system' %}, потому что баланс ниже допустимого{% endif %}."
        " Они возобновятся, как только причина будет устранена." + _SIGN_RU),
    ("account.unblocked", "en"): _t(
        "Your service is back",
        "Hello {{ full_name or login }},\n\nthe service of account {{ account_id }} is running again." + _SIGN_EN),
    ("account.unblocked", "ru"): _t(
        "Услуги возобновлены",
        "Здравствуйте, {{ full_name or login }}!\n\nУслуги по лицевому счёту {{ account_id }} снова"
        " предоставляются." + _SIGN_RU),
    ("fup.quota_reached", "en"): _t(
        "You have used your traffic allowance",
        "Hello {{ full_name or login }},\n\naccount {{ account_id }} has used its traffic allowance for this"
        " period; the speed is reduced until the period ends." + _SIGN_EN),
    ("fup.quota_reached", "ru"): _t(
        "Лимит трафика исчерпан",
        "Здравствуйте, {{ full_name or login }}!\n\nЛицевой счёт {{ account_id }} израсходовал лимит трафика"
        " этого периода; скорость снижена до его конца." + _SIGN_RU),
    ("fup.restored", "en"): _t(
        "Your full speed is back",
        "Hello {{ full_name or login }},\n\naccount {{ account_id }} is back at full speed." + _SIGN_EN),
    ("fup.restored", "ru"): _t(
        "Скорость восстановлена",
        "Здравствуйте, {{ full_name or login }}!\n\nЛицевой счёт {{ account_id }} снова работает на полной"
        " скорости." + _SIGN_RU),
    ("dunning.grace", "en"): _t(
        "Payment overdue: grace period until {{ data.until }}",
        "Hello {{ full_name or login }},\n\nthe balance of account {{ account_id }} is {{ data.balance|money }}."
        " Please pay before {{ data.until }}; after that the service is limited." + _SIGN_EN),
    ("dunning.grace", "ru"): _t(
        "Просрочка оплаты: льготный период до {{ data.until }}",
        "Здравствуйте, {{ full_name or login }}!\n\nБаланс лицевого счёта {{ account_id }} составляет"
        " {{ data.balance|money }}. Оплатите до {{ data.until }}, иначе услуги будут ограничены." + _SIGN_RU),
    ("dunning.throttled", "en"): _t(
        "Your speed is limited for non-payment",
        "Hello {{ full_name or login }},\n\nthe balance of account {{ account_id }} is {{ data.balance|money }};"
        " the speed is limited until it is paid." + _SIGN_EN),
    ("dunning.throttled", "ru"): _t(
        "Скорость ограничена из-за неоплаты",
        "Здравствуйте, {{ full_name or login }}!\n\nБаланс лицевого счёта {{ account_id }} составляет"
        " {{ data.balance|money }}; скорость ограничена до оплаты." + _SIGN_RU),
    ("dunning.blocked", "en"): _t(
        "Your service is suspended for non-payment",
        "Hello {{ full_name or login }},\n\nthe balance of account {{ account_id }} is {{ data.balance|money }};"
        " the service is suspended until it is paid." + _SIGN_EN),
    ("dunning.blocked", "ru"): _t(
        "Услуги приостановлены из-за неоплаты",
        "Здравствуйте, {{ full_name or login }}!\n\nБаланс лицевого счёта {{ account_id }} составляет"
        " {{ data.balance|money }}; услуги приостановлены до оплаты." + _SIGN_RU),
    ("dunning.closed", "en"): _t(
        "Your contract is closed for non-payment",
        "Hello {{ full_name or login }},\n\naccount {{ account_id }} is closed for non-payment; the debt is"
        " {{ data.balance|money }}." + _SIGN_EN),
    ("dunning.closed", "ru"): _t(
        "Договор расторгнут из-за неоплаты",
        "Здравствуйте, {{ full_name or login }}!\n\nЛицевой счёт {{ account_id }} закрыт из-за неоплаты;"
        " задолженность {{ data.balance|money }}." + _SIGN_RU),
    ("invoice.issued", "en"): _t(
        "Invoice {{ data.number }}: {{ data.total|money }}",
        "Hello {{ full_name or login }},\n\ninvoice {{ data.number }} for account {{ account_id }} is issued:"
        " {{ data.total|money }}." + _SIGN_EN),
    ("invoice.issued", "ru"): _t(
        "Счёт {{ data.number }}: {{ data.total|money }}",
        "Здравствуйте, {{ full_name or login }}!\n\nВыставлен счёт {{ data.number }} по лицевому счёту"
        " {{ account_id }} на сумму {{ data.total|money }}." + _SIGN_RU),
    ("credit_note.issued", "en"): _t(
        "Credit note {{ data.number }}: {{ (-data.total)|money }} credited",
        "Hello {{ full_name or login }},\n\ncredit note {{ data.number }} credits {{ (-data.total)|money }} to"
        " account {{ account_id }}; the office's Documents page has it." + _SIGN_EN),
    ("credit_note.issued", "ru"): _t(
        "Корректировочный счёт {{ data.number }}: возврат {{ (-data.total)|money }}",
        "Здравствуйте, {{ full_name or login }}!\n\nПо лицевому счёту {{ account_id }} выставлен"
        " корректировочный счёт {{ data.number }}: зачислено {{ (-data.total)|money }}."
        " Документ — на странице «Документы» личного кабинета." + _SIGN_RU),
}

# the events a subscriber can be told of, in the order pages list them
EVENTS: tuple[str, ...] = tuple(dict.fromkeys(event for event, _ in DEFAULTS))
