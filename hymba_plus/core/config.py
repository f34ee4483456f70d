"""Declarative config fields: defaults plus range rules the recipe loader checks.

    @dataclass(frozen=True)
    class MyConfig:
        n_heads: int = spec(4, min=1)
        kind: str = spec("yarn", choices=("linear", "ntk", "yarn"))

Cross-field rules go in an optional ``check(self, model) -> Iterable[(key, message)]``
method (``model`` is the recipe's ModelConfig); the loader attaches file, line and the
dotted key path to each message.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def spec(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,  # noqa: A002 - reads naturally in config classes
    max: float | None = None,  # noqa: A002
    gt: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    doc: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    meta = {"min": min, "max": max, "gt": gt, "lt": lt, "choices": choices, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_json_object(path: Any, error: type[Exception]) -> dict:
    """The JSON object in the file ``path``; a file that cannot be read, is not JSON or holds
    another JSON value raises ``error`` with one line naming the file."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object")
    return data


#: ``brief``'s repr of containers: a few items, a few levels (a YAML alias bomb of a few hundred bytes
#: nests 10^6 items: its whole repr took seconds and megabytes before being cut)
class _BriefRepr(reprlib.Repr):
    def repr1(self, x: Any, level: int) -> str:  # subclasses (the loader's LineDict) as their base
        for base in (dict, list, tuple, set, frozenset):
            if isinstance(x, base) and type(x) is not base:
                return getattr(self, f"repr_{base.__name__}")(x, level)
        if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 600:
            return f"<{_digits(x)}>"
        return super().repr1(x, level)


def _digits(x: int) -> str:
    """An integer's size in words (its repr past 4300 digits is a ValueError)."""
    return f"an integer of {int(x.bit_length() * math.log10(2)) + 1} digits"


_BRIEF_REPR = _BriefRepr()
for _k in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_BRIEF_REPR, _k, 6)
_BRIEF_REPR.maxlevel, _BRIEF_REPR.maxstring, _BRIEF_REPR.maxother = 3, 200, 200


def brief(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters: an error message quotes a value, never a whole file
    that was read where a value was expected (containers through a bounded repr; an integer of
    more digits than Python prints as its size)."""
    if isinstance(v, int) and v.bit_length() > 4000:  # (repr() of 4300+ digits is a ValueError)
        return _digits(v)
    container = isinstance(v, (list, tuple, dict, set, frozenset))
    r = _BRIEF_REPR.repr(v) if container else repr(v)
    if len(r) <= limit:
        return r
    return f"{r[:limit - 4]}..." + ("" if container else f" ({len(v) if isinstance(v, str) else len(r)} characters)")


def first_line(error: BaseException, empty: str | None = None) -> str:
    """The first line of ``str(error)`` (an error quoted in a one-line message); for an empty
    message ``empty``, by default the error's type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (type(error).__name__ if empty is None else empty)


#: the largest value of an integer setting whose spec gives no maximum (sizes, counts: 32-bit)
INT_MAX = 2**31 - 1
#: the largest magnitude of a float setting (float32's largest finite value, ``torch.finfo(torch.float32).max``):
#: settings fill float32 parameters and scale float32 tensors, and a value past it passed ``hymba check``
#: (built on the meta device, nothing filled) but failed ``build_model`` or the first forward
FLOAT_MAX = 3.4028234663852886e38


def range_errors(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yield (key path, message) for every field violating its spec (recursing). A float must be
    finite (NaN passes no comparison, so a range alone would let it through)."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        m = f.metadata
        if dataclasses.is_dataclass(v):
            yield from range_errors(v, key + ".")
            continue
        if v is None or isinstance(v, bool):
            continue
        if m.get("choices") is not None and v not in m["choices"]:
            yield key, f"must be one of {', '.join(map(repr, m['choices']))}, got {brief(v)}"
        if isinstance(v, float) and not math.isfinite(v):
            yield key, f"must be a finite number, got {v}"
        elif isinstance(v, (int, float)):
            found = []
            if m.get("min") is not None and v < m["min"]:
                found.append(f"must be >= {m['min']}, got {brief(v)}")
            if m.get("gt") is not None and v <= m["gt"]:
                found.append(f"must be > {m['gt']}, got {brief(v)}")
            if m.get("max") is not None and v > m["max"]:
                found.append(f"must be <= {m['max']}, got {brief(v)}")
            elif m.get("max") is None and isinstance(v, int) and v > INT_MAX:  # a size past int64 passed
                # `hymba check` and failed at the first forward (an OverflowError in a kernel's arguments)
                found.append(f"must be <= {INT_MAX}, got {brief(v)}")
            if m.get("lt") is not None and v >= m["lt"]:
                found.append(f"must be < {m['lt']}, got {brief(v)}")
            if not found and isinstance(v, float) and abs(v) > FLOAT_MAX:
                found.append(f"must be within float32's range (magnitude <= {FLOAT_MAX:.4g}), got {brief(v)}")
            for msg in found:
                yield key, msg


def in_range(cfg: Any) -> bool:
    """Every field of the config (nested ones included) within its spec: what the rules across
    fields (``check``) and a component's ``uses()`` may assume."""
    return next(range_errors(cfg), None) is None


def cross_errors(cfg: Any, model: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Yield (key path, message) from the config's own ``check`` and its nested configs'. Nothing
    while a field is out of range (``range_errors`` says that): the rules across fields assume
    valid ones (a negative ``head_dim`` must not reach an ATLAS feature count)."""
    if not dataclasses.is_dataclass(cfg) or not in_range(cfg):
        return
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield from cross_errors(v, model, f"{prefix}{f.name}.")
    check = getattr(cfg, "check", None)
    if check is not None:
        for key, msg in check(model):
            yield f"{prefix}{key}" if key else prefix.rstrip("."), msg
