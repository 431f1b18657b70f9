"""Languages of the web edges: English and Russian, and how a page picks one.

The language is the ``lang`` cookie when the user chose one with the
switch, else the best match of the browser's Accept-Language, else the
configured default.  Every visible string goes through a ``Translator``
over an edge's own catalogues (``{lang: {key: text}}``); a key missing from
a catalogue falls back to English, then to the key itself.

The console writes its messages per page module as ``{key: (English,
Russian)}``; ``catalogs_of`` folds such tables into catalogues and refuses
a key defined twice (two modules would otherwise overwrite each other's
text without a word).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["LANGUAGES", "Catalogs", "Translator", "pick_language", "catalogs_of"]

LANGUAGES = ("en", "ru")

Catalogs = Mapping[str, Mapping[str, str]]


class Translator:
    def __init__(self, catalogs: Catalogs, lang: str) -> None:
        self.lang = lang if lang in catalogs else "en"
        self._catalog = catalogs[self.lang]
        self._english = catalogs["en"]

    def __call__(self, key: str, **values: Any) -> str:
        text = self._catalog.get(key) or self._english.get(key, key)
        return text.format(**values) if values else text


def pick_language(accept_language: str, chosen: str | None, default: str = "en") -> str:
    """The chosen language if we have it, else the browser's best one we have."""
    if chosen in LANGUAGES:
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
        if lang in LANGUAGES and q > best_q:
            best, best_q = lang, q
    return best or (default if default in LANGUAGES else "en")


def catalogs_of(tables: Iterable[tuple[str, Mapping[str, tuple[str, str]]]]) -> dict[str, dict[str, str]]:
    """``{lang: {key: text}}`` from ``(owner, {key: (English, Russian)})`` tables; a key twice is a ValueError."""
    catalogs: dict[str, dict[str, str]] = {lang: {} for lang in LANGUAGES}
    owners: dict[str, str] = {}
    for owner, messages in tables:
        for key, texts in messages.items():
            if key in owners:
                raise ValueError(f"message {key!r} is defined by both {owners[key]} and {owner}")
            if len(texts) != len(LANGUAGES):
                raise ValueError(f"message {key!r} of {owner}: one text per language {LANGUAGES}")
            owners[key] = owner
            for lang, text in zip(LANGUAGES, texts):
                catalogs[lang][key] = text
    return catalogs
