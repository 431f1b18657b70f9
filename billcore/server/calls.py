"""The call registry and per-session call tables.

Theory of operation
-------------------
Every URFA function is a *symbol*: a name ("payments.add"), an async handler,
the right a session needs to call it, the login kinds that may call it at all,
and the *module* that owns it ("builtin", or a plugin's name).

When a session is created it takes a *snapshot* of the symbols registered at
that moment that its kind and rights allow: its ``CallTable``.  A symbol
registered later is not in old tables ("log in again to see new functions");
a symbol whose module was unloaded stays in old tables but is marked
*deleted*, and calling it fails with its own code.

A module that is being unloaded is only torn down when nothing refers to it
any more: each call table that holds one of its symbols, and each call in
flight, holds a reference.  ``CallRegistry`` counts them per module and calls
``on_module_idle(module)`` once a *deleted* module's count reaches zero.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL_KINDS",
    "CallError",
    "CallRegistry",
    "CallSpec",
    "CallTable",
    "SymbolDeleted",
    "NotInTable",
    "Symbol",
    "clean_doc",
]

ALL_KINDS: frozenset[str] = frozenset({"system", "admin", "user"})

Handler = Callable[..., Awaitable[Any]]


class CallError(Exception):
    """Root of the registry's errors."""


class NotInTable(CallError):
    """The function is not in this session's call table (log in again)."""


class SymbolDeleted(CallError):
    """The function's module was unloaded after the session was created."""


def clean_doc(text: str) -> str:
    """A call's doc as ``sys.calls`` gives it: the docstring's paragraphs, each on one line.

    Docs are mostly docstrings, wrapped at the source's line width and indented. Passed on raw, a
    client that shows a doc's first line (billctl, a GUI's tooltip) cut it mid-sentence at the wrap
    (``classes.add_rule`` ended "…[a, b],"); joined here, the first line is a whole paragraph."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


@dataclass(frozen=True, slots=True)
class CallSpec:
    """What a module registers.

    ``args`` maps each argument name to a type word from the protocol's
    schema vocabulary (``int``, ``money``, ``str``, ``bool``, ``ip``,
    ``time``, ``bytes``, ``list``, ``map``, ``any``); a trailing ``?`` marks
    an optional argument.  ``right`` is the right a session must hold
    (``None``: any session of an allowed kind; ``"a|b"``: either; see ``allows``).

    ``fields`` describes the result with the same type words: a map's keys,
    the keys of each map of a list, or — for a streaming call — the columns
    of each streamed row, in order.  A dotted name (``lines.amount``) is a
    field of a nested map or list.  Every money field is declared here as
    ``money``: clients format money from this declaration, never by guessing
    from a key's name.

    ``bound`` says how the result stays within one frame however large the
    data grows (docs/protocol.md, "Results that grow"; every built-in call
    declares it, tests/test_bounded_results.py checks each):

    * ``"fixed"`` — the size does not grow with subscribers, bindings,
      sessions, NAS, plugins or history (a record, a scalar, or a list
      capped by a constant or by the caller's own bounded input);
    * ``"page:N"`` — a list that takes ``limit`` (1..N, default at most N;
      more is refused with ``bad_args``) and ``offset``;
    * ``"stream"`` — a streaming call (``streaming=True``): bounded chunks.

    ``""`` is undeclared (a plugin's call may be).
    """

    name: str
    handler: Handler
    right: str | None = None
    kinds: frozenset[str] = ALL_KINDS
    module: str = "builtin"
    args: Mapping[str, str] = field(default_factory=dict)
    result: str = "any"
    doc: str = ""
    streaming: bool = False
    fields: Mapping[str, str] = field(default_factory=dict)
    bound: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc", clean_doc(self.doc))

    @property
    def page_max(self) -> int | None:
        """N of a ``"page:N"`` call, else None."""
        kind, _, n = self.bound.partition(":")
        return int(n) if kind == "page" and n.isdigit() else None

    def describe(self) -> dict[str, Any]:
        """The introspection record `sys.calls` returns for this symbol."""
        return {
            "name": self.name,
            "args": dict(self.args),
            "result": self.result,
            "right": self.right,
            "kinds": sorted(self.kinds),
            "module": self.module,
            "doc": self.doc,
            "streaming": self.streaming,
            "fields": dict(self.fields),
            "bound": self.bound,
        }


class Symbol:
    """A registered spec plus its mutable ``deleted`` flag."""

    __slots__ = ("spec", "deleted")

    def __init__(self, spec: CallSpec) -> None:
        self.spec = spec
        self.deleted = False

    def __repr__(self) -> str:
        state = " deleted" if self.deleted else ""
        return f"<Symbol {self.spec.name} of {self.spec.module}{state}>"


def allows(rights: frozenset[str], right: str | None) -> bool:
    """True when a holder of ``rights`` may call a symbol needing ``right``.

    ``"*"`` grants everything; ``"payments.*"`` grants every right that
    starts with ``"payments."``; ``"*.read"`` grants every right whose last
    part is ``read`` (``users.read``, ``radius.read``: an operator who may
    read everything, present and future).  A symbol may need one of several
    rights, written ``"session.proxy|session.proxy_admin"``.
    """
    if right is None or "*" in rights or right in rights:
        return True
    if "|" in right:
        return any(allows(rights, one) for one in right.split("|"))
    parts = right.split(".")
    if len(parts) > 1 and "*." + parts[-1] in rights:
        return True
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) + ".*" in rights:
            return True
    return False


class CallTable:
    """One session's snapshot of the symbols it may call."""

    __slots__ = ("_symbols", "_registry", "_modules", "_closed")

    def __init__(self, registry: CallRegistry, symbols: dict[str, Symbol]) -> None:
        self._registry = registry
        self._symbols = symbols
        self._modules = frozenset(symbol.spec.module for symbol in symbols.values())
        self._closed = False
        for module in self._modules:
            registry._acquire(module)

    def lookup(self, name: str) -> Symbol:
        symbol = self._symbols.get(name)
        if symbol is None:
            raise NotInTable(name)
        if symbol.deleted:
            raise SymbolDeleted(name)
        return symbol

    def describe(self) -> list[dict[str, Any]]:
        return [
            {**symbol.spec.describe(), "deleted": symbol.deleted}
            for symbol in sorted(self._symbols.values(), key=lambda symbol: symbol.spec.name)
        ]

    def names(self) -> list[str]:
        return sorted(self._symbols)

    def close(self) -> None:
        """Let go of every module this table refers to (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for module in self._modules:
            self._registry._release(module)


class CallRegistry:
    """Symbol name → Symbol, with per-module reference counts."""

    def __init__(self, on_module_idle: Callable[[str], None] | None = None) -> None:
        self._symbols: dict[str, Symbol] = {}
        self._refs: dict[str, int] = {}
        self._deleted_modules: set[str] = set()
        self.on_module_idle = on_module_idle

    # -- registration ---------------------------------------------------
    def register(self, spec: CallSpec) -> Symbol:
        old = self._symbols.get(spec.name)
        if old is not None and not old.deleted:
            raise CallError(f"{spec.name} is already registered by {old.spec.module}")
        if spec.module in self._deleted_modules:
            raise CallError(f"module {spec.module} is being unloaded")
        symbol = Symbol(spec)
        self._symbols[spec.name] = symbol
        return symbol

    def register_all(self, specs: Iterable[CallSpec]) -> None:
        for spec in specs:
            self.register(spec)

    def delete_module(self, module: str) -> list[str]:
        """Mark every symbol of ``module`` deleted; return their names.

        The module's teardown is signalled through ``on_module_idle`` once no
        call table or call in flight refers to it any more (maybe at once).
        """
        names = []
        for name, symbol in list(self._symbols.items()):
            if symbol.spec.module == module and not symbol.deleted:
                symbol.deleted = True
                del self._symbols[name]
                names.append(name)
        self._deleted_modules.add(module)
        if self._refs.get(module, 0) == 0:
            self._idle(module)
        return names

    def module_refs(self, module: str) -> int:
        return self._refs.get(module, 0)

    def is_pending(self, module: str) -> bool:
        """Deleted but still referenced: teardown waits for the last user."""
        return module in self._deleted_modules

    # -- lookup ---------------------------------------------------------
    def get(self, name: str) -> Symbol | None:
        return self._symbols.get(name)

    def symbols(self) -> list[Symbol]:
        return list(self._symbols.values())

    def snapshot(self, kind: str, rights: frozenset[str], keep: Callable[[str], bool] | None = None) -> CallTable:
        """The symbols a ``kind`` session with ``rights`` may call (and, given ``keep``, whose name it keeps)."""
        table = {
            name: s
            for name, s in self._symbols.items()
            if kind in s.spec.kinds and allows(rights, s.spec.right) and (keep is None or keep(name))
        }
        return CallTable(self, table)

    # -- references -----------------------------------------------------
    def in_flight(self, symbol: Symbol) -> _InFlight:
        """Context manager: a call of ``symbol`` holds its module."""
        return _InFlight(self, symbol.spec.module)

    def _acquire(self, module: str) -> None:
        self._refs[module] = self._refs.get(module, 0) + 1

    def _release(self, module: str) -> None:
        n = self._refs.get(module, 0) - 1
        assert n >= 0, f"reference count of {module} went negative"
        if n:
            self._refs[module] = n
            return
        self._refs.pop(module, None)
        if module in self._deleted_modules:
            self._idle(module)

    def _idle(self, module: str) -> None:
        self._deleted_modules.discard(module)
        if self.on_module_idle is not None:
            self.on_module_idle(module)


class _InFlight:
    __slots__ = ("_registry", "_module")

    def __init__(self, registry: CallRegistry, module: str) -> None:
        self._registry = registry
        self._module = module

    def __enter__(self) -> None:
        self._registry._acquire(self._module)

    def __exit__(self, *exc: object) -> None:
        self._registry._release(self._module)
