"""The words and number shapes of documents, in English and Russian.

A document's labels come from ``LABELS[lang]`` (a test keeps both tables'
keys equal).  Quantities are shown the way a subscriber reads them and are
computed in integers: bytes in decimal units (GB, MB, kB, as ISPs sell
them) with two decimals rounded half up, seconds as h:mm (whole minutes
rounded down: a partial minute was not a minute).  A VAT rate comes as
basis points (2000 = 20 %).
"""

from __future__ import annotations

__all__ = ["LABELS", "LANGUAGES", "labels", "human_quantity", "human_rate"]

LANGUAGES = ("en", "ru")

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "invoice": "Invoice", "credit_note": "Credit note", "statement": "Statement of account",
        "number": "Number", "issued": "Issued", "period": "Period", "account": "Account",
        "issuer": "Issuer", "customer": "Customer", "tax_id": "Tax ID", "bank": "Bank details",
        "line_no": "#", "description": "Description", "quantity": "Quantity", "net": "Net", "vat": "VAT",
        "total": "Total", "vat_rate": "VAT rate", "amount_due": "Total due", "credit_total": "Total credited",
        "credit_for": "Credit note {number} for invoice {invoice}", "reason": "Reason",
        "credited_by": "Credited by", "page": "page", "currency": "Amounts in {currency}",
        "since": "From", "until": "To", "opening": "Opening balance", "closing": "Closing balance",
        "entries": "Entries", "date": "Date", "kind": "Entry", "amount": "Amount", "balance": "Balance",
        "reference": "Reference", "no_entries": "No entries in this period.", "login": "Login",
        "kind.payment": "Payment", "kind.payment_cancel": "Payment cancelled", "kind.charge": "Charge",
        "kind.charge_reversal": "Charge reversed", "kind.periodic": "Periodic fee", "kind.traffic": "Traffic",
        "kind.correction": "Correction",
    },
    "ru": {
        "invoice": "Счёт", "credit_note": "Корректировочный счёт", "statement": "Выписка по счёту",
        "number": "Номер", "issued": "Дата выставления", "period": "Период", "account": "Лицевой счёт",
        "issuer": "Поставщик", "customer": "Абонент", "tax_id": "ИНН", "bank": "Банковские реквизиты",
        "line_no": "№", "description": "Наименование", "quantity": "Количество", "net": "Без НДС",
        "vat": "НДС", "total": "Всего", "vat_rate": "Ставка НДС", "amount_due": "Итого к оплате",
        "credit_total": "Итого к возврату",
        "credit_for": "Корректировочный счёт {number} к счёту {invoice}", "reason": "Основание",
        "credited_by": "Скорректирован", "page": "стр.", "currency": "Суммы в {currency}",
        "since": "С", "until": "По", "opening": "Входящий остаток", "closing": "Исходящий остаток",
        "entries": "Операций", "date": "Дата", "kind": "Операция", "amount": "Сумма", "balance": "Остаток",
        "reference": "Основание", "no_entries": "За период операций нет.", "login": "Логин",
        "kind.payment": "Платёж", "kind.payment_cancel": "Отмена платежа", "kind.charge": "Списание",
        "kind.charge_reversal": "Возврат списания", "kind.periodic": "Абонентская плата", "kind.traffic": "Трафик",
        "kind.correction": "Корректировка",
    },
}

_BYTE_UNITS = {"en": ("GB", "MB", "kB", "B"), "ru": ("ГБ", "МБ", "кБ", "Б")}
_SIZES = (10**9, 10**6, 10**3)


def labels(lang: str) -> dict[str, str]:
    """The label table of ``lang``; an unknown language is an error, not a silent English."""
    try:
        return LABELS[lang]
    except KeyError:
        raise ValueError(f"document language: one of {', '.join(LANGUAGES)}, got {lang!r}") from None


def _hundredths(n: int, size: int) -> str:
    """``n / size`` with two decimals, rounded half up, in integers."""
    cents = (n * 100 + size // 2) // size
    return f"{cents // 100}.{cents % 100:02d}"


def human_quantity(line_kind: str, quantity: int | None, lang: str) -> str:
    """Bytes (traffic) as GB/MB/kB, seconds (time) as h:mm; '' when there is none."""
    if quantity is None:
        return ""
    quantity = int(quantity)
    if line_kind == "time":
        hours, rest = divmod(max(0, quantity), 3600)
        return f"{hours}:{rest // 60:02d}"
    if line_kind == "traffic":
        units = _BYTE_UNITS.get(lang, _BYTE_UNITS["en"])
        for unit, size in zip(units, _SIZES):
            if quantity >= size:
                return f"{_hundredths(quantity, size)} {unit}"
        return f"{quantity} {units[-1]}"
    return str(quantity)


def human_rate(basis_points: int) -> str:
    """2000 → '20%', 1050 → '10.5%' (exact)."""
    whole, frac = divmod(int(basis_points), 100)
    return f"{whole}.{frac:02d}".rstrip("0").rstrip(".") + "%"
