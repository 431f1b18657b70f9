"""Languages of the office: English and Russian.

The language is the ``lang`` cookie when the subscriber chose one with the
switch, else the best match of the browser's Accept-Language, else the
configured default.  Every visible string goes through ``Translator``; a
key missing from a catalogue falls back to English (a test keeps the two
catalogues' keys equal).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LANGUAGES", "CATALOGS", "Translator", "pick_language"]

LANGUAGES = ("en", "ru")

EN: dict[str, str] = {
    "title": "Virtual office",
    "login.title": "Log in to your virtual office",
    "login.login": "Login",
    "login.password": "Password",
    "login.submit": "Log in",
    "login.wrong": "Wrong login or password.",
    "login.expired": "Your session has ended. Please log in again.",
    "login.out": "You have logged out.",
    "login.limited": "Too many failed attempts. Please wait a minute and try again.",
    "nav.overview": "Overview",
    "nav.traffic": "Traffic",
    "nav.history": "Payments and charges",
    "nav.sessions": "Sessions",
    "nav.password": "Password",
    "nav.logout": "Log out",
    "account": "Account",
    "balance": "Balance",
    "credit": "Credit",
    "promised": "Promised payment",
    "available": "Available",
    "internet": "Internet",
    "internet.on": "On",
    "internet.off": "Off",
    "internet.blocked": "Blocked",
    "internet.turn_off": "Switch internet off",
    "internet.turn_on": "Switch internet on",
    "internet.changed_off": "Internet is switched off.",
    "internet.changed_on": "Internet is switched on again.",
    "blocks": "Blocks",
    "blocks.none": "No blocks",
    "block.user": "switched off by you",
    "block.admin": "blocked by the operator",
    "block.system": "not enough money",
    "tariff": "Tariff",
    "tariff.none": "No tariff is linked to this account.",
    "tariff.since": "since",
    "services": "Services",
    "fee": "Fee",
    "period": "Current period",
    "prepaid": "Prepaid traffic",
    "prepaid.left": "left",
    "prepaid.used": "used",
    "prepaid.of": "of",
    "prepaid.none": "Your tariff has no prepaid traffic.",
    "promised.take": "Take a promised payment",
    "promised.taken": "A promised payment is credited to your account.",
    "promised.used": "This month's promised payment has been taken.",
    "traffic.title": "Traffic by day and class",
    "traffic.days": "Last {days} days",
    "traffic.none": "No traffic in this period.",
    "traffic.day": "Day",
    "traffic.class": "Class",
    "traffic.volume": "Volume",
    "traffic.amount": "Charged",
    "traffic.total": "Total",
    "history.charges": "Balance history",
    "history.payments": "Payments",
    "history.when": "When",
    "history.amount": "Amount",
    "history.after": "Balance after",
    "history.kind": "Kind",
    "history.method": "Method",
    "history.none": "Nothing yet.",
    "history.cancelled": "cancelled",
    "sessions.title": "Internet sessions",
    "sessions.start": "Start",
    "sessions.end": "End",
    "sessions.active": "active",
    "sessions.ip": "IP address",
    "sessions.duration": "Duration",
    "sessions.in": "Received",
    "sessions.out": "Sent",
    "sessions.none": "No sessions yet.",
    "password.title": "Change password",
    "password.old": "Current password",
    "password.new": "New password",
    "password.again": "New password again",
    "password.submit": "Change password",
    "password.changed": "Your password is changed.",
    "password.differ": "The new passwords differ.",
    "password.refused": "The password was not changed: {reason}",
    "error.title": "Something went wrong",
    "error.403": "This request was refused.",
    "error.csrf": "This form has expired or did not come from this office. Go back, reload the page and try again.",
    "error.404": "There is no such page or account.",
    "error.413": "The request is too large.",
    "error.429": "Too many requests. Please wait a minute.",
    "error.503": "The billing system is not available right now. Please try again in a few minutes.",
    "error.500": "An unexpected error happened. Please try again later.",
    "error.refused": "The billing system refused this: {reason}",
    "error.back": "Back to the office",
    "lang.switch": "Язык: русский",
}

RU: dict[str, str] = {
    "title": "Личный кабинет",
    "login.title": "Вход в личный кабинет",
    "login.login": "Логин",
    "login.password": "Пароль",
    "login.submit": "Войти",
    "login.wrong": "Неверный логин или пароль.",
    "login.expired": "Сеанс завершён. Войдите снова.",
    "login.out": "Вы вышли из кабинета.",
    "login.limited": "Слишком много неудачных попыток. Подождите минуту и попробуйте снова.",
    "nav.overview": "Обзор",
    "nav.traffic": "Трафик",
    "nav.history": "Платежи и списания",
    "nav.sessions": "Сессии",
    "nav.password": "Пароль",
    "nav.logout": "Выйти",
    "account": "Лицевой счёт",
    "balance": "Баланс",
    "credit": "Кредит",
    "promised": "Обещанный платёж",
    "available": "Доступно",
    "internet": "Интернет",
    "internet.on": "Включён",
    "internet.off": "Выключен",
    "internet.blocked": "Заблокирован",
    "internet.turn_off": "Выключить интернет",
    "internet.turn_on": "Включить интернет",
    "internet.changed_off": "Интернет выключен.",
    "internet.changed_on": "Интернет снова включён.",
    "blocks": "Блокировки",
    "blocks.none": "Блокировок нет",
    "block.user": "выключено вами",
    "block.admin": "блокировка оператора",
    "block.system": "недостаточно средств",
    "tariff": "Тариф",
    "tariff.none": "К счёту не подключён тариф.",
    "tariff.since": "с",
    "services": "Услуги",
    "fee": "Плата",
    "period": "Текущий период",
    "prepaid": "Предоплаченный трафик",
    "prepaid.left": "осталось",
    "prepaid.used": "израсходовано",
    "prepaid.of": "из",
    "prepaid.none": "В вашем тарифе нет предоплаченного трафика.",
    "promised.take": "Взять обещанный платёж",
    "promised.taken": "Обещанный платёж зачислен на ваш счёт.",
    "promised.used": "Обещанный платёж в этом месяце уже взят.",
    "traffic.title": "Трафик по дням и классам",
    "traffic.days": "Последние {days} дн.",
    "traffic.none": "Трафика за этот период нет.",
    "traffic.day": "День",
    "traffic.class": "Класс",
    "traffic.volume": "Объём",
    "traffic.amount": "Списано",
    "traffic.total": "Итого",
    "history.charges": "История баланса",
    "history.payments": "Платежи",
    "history.when": "Когда",
    "history.amount": "Сумма",
    "history.after": "Баланс после",
    "history.kind": "Вид",
    "history.method": "Способ",
    "history.none": "Пока ничего нет.",
    "history.cancelled": "отменён",
    "sessions.title": "Сессии доступа в интернет",
    "sessions.start": "Начало",
    "sessions.end": "Конец",
    "sessions.active": "активна",
    "sessions.ip": "IP-адрес",
    "sessions.duration": "Длительность",
    "sessions.in": "Получено",
    "sessions.out": "Отправлено",
    "sessions.none": "Сессий пока нет.",
    "password.title": "Смена пароля",
    "password.old": "Текущий пароль",
    "password.new": "Новый пароль",
    "password.again": "Новый пароль ещё раз",
    "password.submit": "Сменить пароль",
    "password.changed": "Пароль изменён.",
    "password.differ": "Новые пароли не совпадают.",
    "password.refused": "Пароль не изменён: {reason}",
    "error.title": "Что-то пошло не так",
    "error.403": "Запрос отклонён.",
    "error.csrf": "Форма устарела или отправлена не из кабинета. Вернитесь, обновите страницу и попробуйте снова.",
    "error.404": "Такой страницы или счёта нет.",
    "error.413": "Слишком большой запрос.",
    "error.429": "Слишком много запросов. Подождите минуту.",
    "error.503": "Биллинг сейчас недоступен. Попробуйте через несколько минут.",
    "error.500": "Произошла непредвиденная ошибка. Попробуйте позже.",
    "error.refused": "Биллинг отклонил запрос: {reason}",
    "error.back": "Вернуться в кабинет",
    "lang.switch": "Language: English",
}

CATALOGS: dict[str, dict[str, str]] = {"en": EN, "ru": RU}


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in CATALOGS else "en"
        self._catalog = CATALOGS[self.lang]

    def __call__(self, key: str, **values: Any) -> str:
        text = self._catalog.get(key) or EN.get(key, key)
        return text.format(**values) if values else text


def pick_language(accept_language: str, chosen: str | None, default: str = "en") -> str:
    """The chosen language if we have it, else the browser's best one we have."""
    if chosen in CATALOGS:
        return chosen
    best, best_q = None, 0.0
    for part in accept_language[:512].split(",")[:32]:
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower().split("-")[0]
        if lang in CATALOGS and q > best_q:
            best, best_q = lang, q
    return best or (default if default in CATALOGS else "en")
