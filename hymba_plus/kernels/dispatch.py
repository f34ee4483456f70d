"""One kernel dispatch for every op.

Each op module registers its fast path's availability probe::

    fast_path("gdn", probe=lambda: importlib.import_module("fla.ops.gated_delta_rule"),
              doc="fla chunk_gated_delta_rule")

and asks, at call time, ``use_fast("gdn", x)``. The answer is True only when

* ``HYMBA_KERNELS`` is not ``reference`` (``auto``, the default, or ``fast``),
* every given tensor is on CUDA, and
* the probe succeeded (it runs once; an ImportError or any failure means "not available").

``HYMBA_KERNELS=fast`` makes a missing fast path an error instead of a silent fallback
(for benchmarks and GPU tests). ``available()`` reports every op's status (``hymba info``
and ARCHITECTURE.md use it). Nothing is registered for an op that has no real fast path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FastPath:
    name: str
    probe: Callable[[], Any]
    doc: str
    status: bool | None = None
    error: str = ""

    def ok(self) -> bool:
        if self.status is None:
            try:
                self.probe()
                self.status = True
            except Exception as e:  # noqa: BLE001 - any import/probe failure = unavailable
                self.status, self.error = False, f"{type(e).__name__}: {e}"
        return self.status


_FAST: dict[str, FastPath] = {}


def fast_path(name: str, probe: Callable[[], Any], doc: str) -> None:
    _FAST[name] = FastPath(name, probe, doc)


def mode() -> str:
    m = os.environ.get("HYMBA_KERNELS", "auto").lower()
    if m not in ("auto", "reference", "fast"):
        raise ValueError(f"HYMBA_KERNELS must be auto, reference or fast, got {m!r}")
    return m


def use_fast(name: str, *tensors: torch.Tensor) -> bool:
    m = mode()
    if m == "reference":
        return False
    fp = _FAST.get(name)
    on_cuda = all(t.is_cuda for t in tensors)
    if fp is None or not on_cuda or not fp.ok():
        if m == "fast" and on_cuda:
            why = "no fast path is registered" if fp is None else fp.error
            raise RuntimeError(f"HYMBA_KERNELS=fast but the fast path for {name!r} is unavailable: {why}")
        return False
    return True


def available() -> dict[str, tuple[str, bool, str]]:
    """op -> (description, importable here, error)."""
    return {n: (fp.doc, fp.ok(), fp.error) for n, fp in sorted(_FAST.items())}
