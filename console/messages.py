"""The frame's own words (login, navigation, errors); each page module brings its own ``MESSAGES``."""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    "title": ("Operator's console", "Консоль оператора"),
    "login.title": ("Log in to the console", "Вход в консоль"),
    "login.login": ("Login", "Логин"),
    "login.password": ("Password", "Пароль"),
    "login.submit": ("Log in", "Войти"),
    "login.code": ("Code from your authenticator app (or a recovery code)",
                   "Код из приложения-аутентификатора (или резервный код)"),
    "login.code_submit": ("Confirm", "Подтвердить"),
    "login.working": ("Checking…", "Проверяем…"),
    "login.wrong": ("Wrong login or password.", "Неверный логин или пароль."),
    "login.otp_wrong": ("Wrong code.", "Неверный код."),
    "login.limited": ("Too many failed attempts. Please wait a minute and try again.",
                      "Слишком много неудачных попыток. Подождите минуту и попробуйте снова."),
    "login.stale": ("The login form has expired. Reload the page and try again.",
                    "Форма входа устарела. Обновите страницу и попробуйте снова."),
    "login.server": ("The server's answer is not the billing core's: the login was stopped.",
                     "Ответ сервера не от ядра биллинга: вход остановлен."),
    "login.noscript": ("The console's login needs JavaScript: your password is checked in this browser and "
                       "never sent.", "Для входа в консоль нужен JavaScript: пароль проверяется в этом "
                       "браузере и никуда не отправляется."),
    "login.insecure": ("This browser refuses the login's cryptography on an insecure page: open the console "
                       "over HTTPS.", "Браузер не даёт выполнить вход на незащищённой странице: откройте "
                       "консоль по HTTPS."),
    "login.expired": ("Your session has ended. Please log in again.", "Сеанс завершён. Войдите снова."),
    "login.out": ("You have logged out.", "Вы вышли из консоли."),
    "nav.logout": ("Log out", "Выйти"),
    "nav.dashboard": ("Dashboard", "Сводка"),
    "lang.switch": ("Русский", "English"),
    "error.title": ("Something went wrong", "Что-то пошло не так"),
    "error.403": ("You have no right to this page or action.", "У вас нет прав на эту страницу или действие."),
    "error.csrf": ("The form has expired or did not come from the console. Go back, reload the page and try again.",
                   "Форма устарела или отправлена не из консоли. Вернитесь, обновите страницу и попробуйте снова."),
    "error.404": ("No such page.", "Такой страницы нет."),
    "error.405": ("This page does not take that request.", "Эта страница не принимает такой запрос."),
    "error.413": ("The request is too large.", "Слишком большой запрос."),
    "error.503": ("The billing core is not available right now. Try again in a few minutes.",
                  "Ядро биллинга сейчас недоступно. Попробуйте через несколько минут."),
    "error.500": ("An unexpected error occurred. Try again later.",
                  "Произошла непредвиденная ошибка. Попробуйте позже."),
    "error.refused": ("The core refused: {message} ({code})", "Ядро отклонило запрос: {message} ({code})"),
    "error.back": ("Back to the dashboard", "Вернуться к сводке"),
}
