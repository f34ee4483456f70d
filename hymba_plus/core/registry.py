"""The component registry: one name -> (module class, config dataclass, aliases, kind).

Components register themselves with ``@register("name", config=Cls, aliases=(...))``.
The block_pattern parser and the recipe loader resolve names and aliases here, so a new
component needs no change anywhere else. A registered component checks the config it is
built with (its first argument, a dataclass: its own, or a head's recipe section) for its
ranges (``core.config.range_errors``: the recipe loader's ``spec`` rules) when it is built,
so a config made in code, which never passed the loader, is refused as a recipe would be.

Some aliases of the DESIGN grammar belong to components that arrive in later work; they
are *reserved* (``reserve``): the parser reports them as "not available yet" instead of
"unknown", and nothing is registered under them (no false claims).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import range_errors

KINDS = ("mixer", "ffn", "router", "objective", "head")  # router: structure-level controllers (etd_router);
# objective: what the model is trained to predict (objectives/, the recipe's objective section);
# head: output modules besides the LM head (mtp)


class RegistryError(KeyError):
    """Unknown or unavailable component name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: type | None
    aliases: tuple[str, ...]
    kind: str


_ENTRIES: dict[str, Entry] = {}
_ALIASES: dict[str, str] = {}
_RESERVED: dict[str, str] = {}  # alias or name -> what it will be


def register(
    name: str, *, config: type | None = None, aliases: tuple[str, ...] = (), kind: str = "mixer"
) -> Callable[[type], type]:
    """Class decorator registering a component under ``name`` (and its ``aliases``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(cls: type) -> type:
        if name in _ENTRIES and _ENTRIES[name].cls is not cls:
            raise ValueError(f"component {name!r} is already registered")
        for a in aliases:
            if a in _ALIASES and _ALIASES[a] != name:
                raise ValueError(f"alias {a!r} already names {_ALIASES[a]!r}")
        _ENTRIES[name] = Entry(name, cls, config, tuple(aliases), kind)
        for a in (name, *aliases):
            _ALIASES[a] = name
            _RESERVED.pop(a, None)
        cls.registry_name = name
        if "_checks_config" not in cls.__dict__:  # (heads too: their config is a recipe section)
            cls.__init__ = _checking_config(cls.__init__)
            cls._checks_config = True
        return cls

    return deco


def _checking_config(init: Callable) -> Callable:
    """``init`` (a component's ``__init__(self, cfg, ...)``) that first refuses a config with a
    field out of its ``spec`` range, in one line naming the config class and the field with the
    loader's message (``AtlasConfig.memory_depth: must be >= 2, got 1``). The loader reports the
    same fields as ``components.<name>.<key>`` before anything is built; the rules across fields
    (``check``) need the model's config and stay the loader's."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN001
        cfg = args[0] if args else kwargs.get("cfg")
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
            errors = [f"{type(cfg).__name__}.{key}: {msg}" for key, msg in range_errors(cfg)]
            if errors:
                raise ValueError("; ".join(errors))
        init(self, *args, **kwargs)

    return __init__


def reserve(name: str, *aliases: str) -> None:
    """Reserve a component name and aliases that a later feature will register."""
    for a in (name, *aliases):
        if a not in _ALIASES:
            _RESERVED[a] = name


def names(kind: str | None = None) -> list[str]:
    """Registered component names (optionally only one kind: mixer, ffn or router)."""
    return sorted(n for n, e in _ENTRIES.items() if kind is None or e.kind == kind)


def aliases(kind: str | None = None) -> dict[str, str]:
    """alias -> canonical name, for every registered component (names map to themselves)."""
    return {a: n for a, n in _ALIASES.items() if kind is None or _ENTRIES[n].kind == kind}


def is_reserved(name: str) -> bool:
    return name in _RESERVED and name not in _ALIASES


def reserved() -> dict[str, str]:
    return {a: n for a, n in _RESERVED.items() if a not in _ALIASES}


def canonical(name: str) -> str:
    """Resolve an alias to its registered name; errors explain unknown / not-yet names."""
    if name in _ALIASES:
        return _ALIASES[name]
    if name in _RESERVED:
        raise RegistryError(f"component {name!r} ({_RESERVED[name]}) is not available yet")
    raise RegistryError(f"unknown component {name!r}{suggest(name, list(_ALIASES))}")


def get(name: str) -> Entry:
    return _ENTRIES[canonical(name)]


def suggest(word: str, candidates: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    if not close:
        low = {c.lower(): c for c in candidates}
        close = [low[word.lower()]] if word.lower() in low else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(name: str, cfg: Any, **kwargs: Any) -> Any:
    """Instantiate the registered module ``name`` with its config and model-level kwargs."""
    return get(name).cls(cfg, **kwargs)
